"""push_to_hub up to the network: the model card, and the uploaded folder loading back from a Hub cache."""

from __future__ import annotations

import hashlib
import os
import shutil
from types import SimpleNamespace

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import logits_in_fresh_process, run_python, train_steps

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])
REPO_ID = "qst-user/tiny-qst-adapter"
COMMIT = "3f1c2b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e"


def lay_out_as_hub_cache(cache: str, repo_id: str, files: dict[str, str], commit: str = COMMIT,
                         ref: str = "main") -> None:
    """Write files as huggingface_hub's cache holds a downloaded snapshot: blobs by hash, snapshot links, and the ref
    (``refs/main``, or a tag or branch ``ref``) naming the snapshot's ``commit``."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    snapshot = os.path.join(repo, "snapshots", commit)
    for path_in_repo, local in files.items():
        data = open(local, "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        shutil.copyfile(local, blob)
        link = os.path.join(snapshot, path_in_repo)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(repo, "refs", ref), "w") as handle:
        handle.write(commit)


def push_to_recording_hub(model, repo_id: str, staging, monkeypatch, **push_kwargs) -> dict[str, str]:
    """``model.push_to_hub(repo_id)`` with everything up to the network real; the network calls copy what they would
    send into ``staging``. Returns {path in the repository: local copy}."""
    from transformers.utils import hub as transformers_hub

    api = transformers_hub.hf_api()
    uploaded: dict[str, str] = {}

    def create_commit(repo_id, operations, **kwargs):
        for op in operations:
            target = staging / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
            uploaded[op.path_in_repo] = str(target)
        return SimpleNamespace(oid=COMMIT, commit_url=f"https://hub/{repo_id}/commit/{COMMIT}", pr_url=None)

    def new_repo_card(repo_id, tags=None, token=None):  # what transformers does for a repo without a card
        data = ModelCardData(tags=list(tags or []), library_name="transformers")
        return ModelCard.from_template(data, model_description="generic")

    monkeypatch.setattr(api, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(api, "create_commit", create_commit)
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", new_repo_card)
    model.push_to_hub(repo_id, **push_kwargs)
    return uploaded


def test_push_to_hub_card_and_loading_from_a_hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS, steps=2)
    uploaded = push_to_recording_hub(model, REPO_ID, tmp_path / "uploaded", monkeypatch, tags=["my-tag"])

    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    card = ModelCard.load(uploaded["README.md"])
    assert card.data.library_name == "peft"
    assert card.data.base_model == tiny_model_dir
    assert {"qst", "peft-qst", "my-tag"} <= set(card.data.tags)
    assert "import peft_qst" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{tiny_model_dir}"' in card.text

    cache = str(tmp_path / "hub-cache")
    lay_out_as_hub_cache(cache, REPO_ID, uploaded)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    got = logits_in_fresh_process(
        tmp_path,
        f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}), {REPO_ID!r})
        """,
        IDS,
        env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"},
    )
    assert torch.equal(got, expected)


def test_save_pretrained_writes_the_card(tmp_path, tiny_model_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again does not repeat the section
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert card.data.library_name == "peft"
    assert card.data.base_model == tiny_model_dir
    assert {"qst", "peft-qst"} <= set(card.data.tags)
    assert card.text.count("## How to load this QST adapter") == 1


def test_a_hub_adapter_with_pickled_weights_only_is_refused(tmp_path, tiny_model_dir):
    """A repository holding adapter_model.bin and no safetensors file (an older PEFT's upload): refused before
    anything is unpickled, through the Hub cache as through a local folder, and by PEFT's public load_peft_weights
    (which custom training loops call themselves; it unpickled the file)."""
    from peft import get_peft_model_state_dict

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    folder = tmp_path / "adapter"
    model.peft_config["default"].save_pretrained(str(folder))
    torch.save(get_peft_model_state_dict(model), folder / "adapter_model.bin")
    cache = str(tmp_path / "hub-cache")
    lay_out_as_hub_cache(cache, REPO_ID, {name: str(folder / name) for name in os.listdir(folder)})
    out = run_python(
        f"""
import torch, peft_qst
from peft import PeftModel
from transformers import AutoModelForCausalLM
def no_unpickling(*args, **kwargs):
    raise AssertionError("torch.load was called")
torch.load = no_unpickling
try:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}), {REPO_ID!r})
except peft_qst.QSTAdapterFileError as err:
    print("refused:", err)
from peft import load_peft_weights
try:
    load_peft_weights({REPO_ID!r})
except peft_qst.QSTAdapterFileError as err:
    print("load_peft_weights refused:", err)
""",
        env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"},
    )
    assert "refused:" in out and "never unpickles" in out
    assert "load_peft_weights refused:" in out and f"The Hub repository {REPO_ID!r}" in out


def test_a_hub_adapter_loads_with_the_legacy_use_auth_token_argument(tmp_path, tiny_model_dir):
    """PEFT still takes ``use_auth_token=`` (the token's name before huggingface_hub renamed it ``token=``) and passes
    it on with the download arguments, which ``hf_hub_download`` no longer accepts: QST's reader of Hub repositories
    hands it over as ``token=``, so a script written against the earlier name loads the weights into its adapter."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    cache = str(tmp_path / "hub-cache")
    lay_out_as_hub_cache(cache, REPO_ID, {name: str(tmp_path / "adapter" / name)
                                         for name in ("adapter_config.json", "adapter_model.safetensors")})
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    got = logits_in_fresh_process(
        tmp_path,
        f"""
        from transformers import AutoModelForCausalLM
        import peft_qst
        from peft import get_peft_model
        # a trainer script resuming into its adapter (PEFT itself refuses the argument where it reads the config)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}),
                               peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4))
        model.load_adapter({REPO_ID!r}, adapter_name="default", use_auth_token="hf_legacy_token_argument")
        """,
        IDS,
        env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"},
    )
    assert torch.equal(got, expected)


def test_a_hub_adapter_loads_from_the_revision_asked_for(tmp_path, tiny_model_dir):
    """``revision=`` picks the adapter's commit on the Hub (a tag, a branch): QST's reader of the weights, and its
    look at the saved config and tensor shapes before PEFT injects the adapter, read that revision's files, for
    ``PeftModel.from_pretrained(..., revision=)`` and transformers' ``load_adapter(..., adapter_kwargs={"revision":
    ...})`` alike. Read from ``main`` instead, the weights of another training run went with the asked-for revision's
    config."""
    folders, expected = {}, {}
    for revision, steps in (("main", 1), ("v2", 4)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               QSTConfig(task_type="CAUSAL_LM", r=4))
        train_steps(model, IDS, steps=steps)
        model.save_pretrained(tmp_path / revision)
        folders[revision] = {name: str(tmp_path / revision / name)
                             for name in ("adapter_config.json", "adapter_model.safetensors")}
        with torch.no_grad():
            expected[revision] = model(input_ids=IDS).logits
    assert not torch.equal(expected["main"], expected["v2"])
    cache = str(tmp_path / "hub-cache")
    lay_out_as_hub_cache(cache, REPO_ID, folders["main"])
    lay_out_as_hub_cache(cache, REPO_ID, folders["v2"], commit="a" * 40, ref="v2")
    env = {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    for load in (
        f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}), {REPO_ID!r},
                                          revision="v2")
        """,
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r})
        model.load_adapter({REPO_ID!r}, adapter_kwargs={{"revision": "v2"}})
        """,
    ):
        assert torch.equal(logits_in_fresh_process(tmp_path, load, IDS, env=env), expected["v2"])
