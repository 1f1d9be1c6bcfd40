"""Sequence classification: QSTConfig(task_type="SEQ_CLS") on AutoModelForSequenceClassification.

PEFT puts the classification head (``score`` for Llama-likes) in ``modules_to_save`` for SEQ_CLS: it trains and is saved
next to the side network, and loading it back (in a fresh process, through PeftModel, AutoPeftModelForSequenceClassification
and a Hub cache) gives the trained model's logits exactly. Nothing else trains.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from peft_qst import QSTConfig

from .conftest import bnb_config, logits_in_fresh_process, tiny_causal_lm
from .test_hub import lay_out_as_hub_cache, push_to_recording_hub

NUM_LABELS = 3
IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [8, 9, 10, 11, 12, 0, 0, 0]])  # row 2 right-padded with pad id 0
MASK = (IDS != 0).long()
LABELS = torch.tensor([2, 0])


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random Llama saved as a causal LM: loading it for sequence classification adds a new ``score`` head, as
    with a real pretrained decoder."""
    path = tmp_path_factory.mktemp("tiny-llama-cls")
    tiny_causal_lm(pad_token_id=0).save_pretrained(path)
    return str(path)


def load_classifier(path, **kwargs):
    torch.manual_seed(1)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS, **kwargs)


def train(model, steps=4, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def check_head_and_side_train_alone(model):
    assert "score" in model.peft_config["default"].modules_to_save
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".score.modules_to_save.default." in n}
    assert head and trainable == head | {n for n in trainable if ".qst_side.default." in n}
    losses = train(model)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert head <= changed  # the head learns
    assert changed and changed <= trainable  # nothing else moves: backbone, original head copy


def test_seq_cls_head_trains_saves_and_reloads_in_a_fresh_process(tmp_path, classifier_dir):
    model = get_peft_model(load_classifier(classifier_dir), QSTConfig(task_type="SEQ_CLS", r=4))
    check_head_and_side_train_alone(model)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits  # the padded row's logits are read at its last non-pad token
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)

    saved = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved
    assert saved["base_model.model.score.weight"].shape == (NUM_LABELS, 64)
    assert all(".qst_side." in key or key == "base_model.model.score.weight" for key in saved)

    for load in (
        f"""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        base = AutoModelForSequenceClassification.from_pretrained({classifier_dir!r}, num_labels={NUM_LABELS})
        model = PeftModel.from_pretrained(base, {str(adapter)!r})
        """,
        f"""
        from peft import AutoPeftModelForSequenceClassification
        model = AutoPeftModelForSequenceClassification.from_pretrained({str(adapter)!r}, num_labels={NUM_LABELS})
        """,
    ):
        assert torch.equal(logits_in_fresh_process(tmp_path, load, IDS), expected)


def test_a_head_for_another_number_of_labels_is_refused_with_the_fix(tmp_path, classifier_dir):
    from peft import AutoPeftModelForSequenceClassification, PeftModel

    from peft_qst import QSTAdapterFileError

    model = get_peft_model(load_classifier(classifier_dir), QSTConfig(task_type="SEQ_CLS", r=4))
    model.save_pretrained(tmp_path)
    with pytest.raises(QSTAdapterFileError, match=f"num_labels={NUM_LABELS}"):
        PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(classifier_dir), str(tmp_path))
    with pytest.raises(QSTAdapterFileError, match=f"num_labels={NUM_LABELS}"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path))
    # asked for, as with LoRA: the side network loads and the head of the other size stays as it is
    other = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=5)
    head = other.score.weight.detach().clone()
    loaded = PeftModel.from_pretrained(other, str(tmp_path), ignore_mismatched_sizes=True)
    saved = {k: v for k, v in model.state_dict().items() if ".qst_side." in k}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(loaded.base_model.model.score.modules_to_save["default"].weight, head)


def test_seq_cls_on_a_4bit_backbone(tmp_path, classifier_dir):
    model = get_peft_model(load_classifier(classifier_dir, quantization_config=bnb_config()),
                           QSTConfig(task_type="SEQ_CLS", r=4))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    check_head_and_side_train_alone(model)
    with torch.no_grad():
        # before saving: bitsandbytes' CPU kernels repack 4-bit weights at the first eval forward, and state_dict()
        # unpacks them lossily, so the in-memory backbone shifts after save_pretrained (a fresh load does not)
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    got = logits_in_fresh_process(
        tmp_path,
        f"""
        from peft import AutoPeftModelForSequenceClassification
        from transformers import BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoPeftModelForSequenceClassification.from_pretrained(
            {str(tmp_path / "adapter")!r}, num_labels={NUM_LABELS}, quantization_config=bnb)
        """,
        IDS,
    )
    assert torch.equal(got, expected)


def test_seq_cls_card_and_loading_from_a_hub_cache(tmp_path, classifier_dir, monkeypatch):
    repo_id = "qst-user/tiny-qst-classifier"
    model = get_peft_model(load_classifier(classifier_dir), QSTConfig(task_type="SEQ_CLS", r=4))
    train(model, steps=2)
    uploaded = push_to_recording_hub(model, repo_id, tmp_path / "uploaded", monkeypatch)

    card = ModelCard.load(uploaded["README.md"])
    assert card.data.library_name == "peft"
    assert card.data.base_model == classifier_dir
    assert "qst" in card.data.tags
    # the card's snippet builds the right model class, with the head's number of labels (and, the model being
    # unquantized here, no quantization config)
    assert f'AutoModelForSequenceClassification.from_pretrained("{classifier_dir}", dtype=torch.float32, ' \
           f"num_labels={NUM_LABELS})" in " ".join(card.text.split())  # arguments wrapped where the path is long
    assert "AutoModelForCausalLM" not in card.text

    cache = str(tmp_path / "hub-cache")
    lay_out_as_hub_cache(cache, repo_id, uploaded)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    got = logits_in_fresh_process(
        tmp_path,
        f"""
        from peft import AutoPeftModelForSequenceClassification
        model = AutoPeftModelForSequenceClassification.from_pretrained({repo_id!r}, num_labels={NUM_LABELS})
        """,
        IDS,
        env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"},
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("card", ["kept", "replaced"])
def test_a_classifier_saved_over_a_causal_lm_adapter_gets_the_classifiers_loading_section(tmp_path, classifier_dir,
                                                                                         card):
    """PeftModel.save_pretrained updates the folder's card before it writes the new adapter_config.json, and every
    card update of a QST model writes the loading section from the config the folder holds. Saved over a folder with
    a causal-LM QST adapter, the classifier's card said AutoModelForCausalLM without num_labels: where the card kept
    the first adapter's section ("kept"), and where the card had been rewritten without it since ("replaced", a
    trainer's card in an output folder reused). The section follows the adapter the folder holds now, once."""
    from transformers import AutoModelForCausalLM

    causal = get_peft_model(AutoModelForCausalLM.from_pretrained(classifier_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    causal.save_pretrained(tmp_path)
    assert f'AutoModelForCausalLM.from_pretrained("{classifier_dir}"' in (tmp_path / "README.md").read_text()
    if card == "replaced":
        (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\n---\n# A training run\n")

    get_peft_model(load_classifier(classifier_dir), QSTConfig(task_type="SEQ_CLS", r=4)).save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert text.count("## How to load this QST adapter") == 1
    assert f'AutoModelForSequenceClassification.from_pretrained("{classifier_dir}", dtype=torch.float32, ' \
           f"num_labels={NUM_LABELS})" in " ".join(text.split())
    assert "AutoModelForCausalLM" not in text


def test_token_classification_card_names_the_number_of_labels(tmp_path, classifier_dir):
    """TOKEN_CLS saves a head of num_labels rows too: the card's loading snippet must build the base model with as
    many, and following it loads the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForTokenClassification.from_pretrained(classifier_dir, num_labels=5),
                           QSTConfig(task_type="TOKEN_CLS", r=4))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert f'AutoModelForTokenClassification.from_pretrained("{classifier_dir}", dtype=torch.float32, ' \
           "num_labels=5)" in " ".join(card.text.split())
    loaded = PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(classifier_dir, num_labels=5),
                                       str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def _truncate_weights(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _edit_saved_config(**values):
    def edit(folder):
        import json

        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    return edit


@pytest.mark.parametrize(
    "damage, refused",
    [
        (_truncate_weights, "truncated or corrupt"),
        (_edit_saved_config(modules_to_save=5), None),
        (_edit_saved_config(task_type=["SEQ_CLS"]), None),
    ],
    ids=["weights-truncated", "modules-to-save-int", "task-type-list"],
)
def test_a_classifier_saves_over_a_damaged_folder_as_the_refusal_says(tmp_path, classifier_dir, damage, refused):
    """Saving again is the fix that loading a damaged adapter names ("Save the adapter again"; "restore the file or
    save the adapter again"), and with LoRA it works. For a classifier the card's loading section, written before the
    new files from the adapter the folder still holds, read the old weights' header for num_labels and the old
    config's fields as they stood: a weights file truncated by an interrupted save failed the new save with
    safetensors' bare "invalid header length", and a config edited by hand with a TypeError, before anything was
    written. The old folder only informs the card, which is rewritten from the new files once they are saved."""
    model = get_peft_model(load_classifier(classifier_dir), QSTConfig(task_type="SEQ_CLS", r=4))
    train(model, steps=1)
    model.save_pretrained(tmp_path)
    damage(tmp_path)
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            PeftModel.from_pretrained(load_classifier(classifier_dir), str(tmp_path))

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_classifier(classifier_dir), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS, attention_mask=MASK).logits,
                           model.eval()(input_ids=IDS, attention_mask=MASK).logits)
    text = ModelCard.load(tmp_path / "README.md").text
    assert text.count("## How to load this QST adapter") == 1
    assert f'AutoModelForSequenceClassification.from_pretrained("{classifier_dir}", dtype=torch.float32, ' \
           f"num_labels={NUM_LABELS})" in " ".join(text.split())
