"""QST adapters under other names than "default", and the model card that says how to load them.

PEFT saves the adapter called "default" in the save folder itself and any other one in a subfolder of its name
(``side/adapter_config.json``), but writes the card (README.md) only at the root. The card's loading section must name
every QST adapter saved there, with the ``subfolder=`` and ``adapter_name=`` that load it: it is run here, as a reader
would copy it, and must rebuild the saved adapters.
"""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig
from peft_qst.card import MARKER

from .conftest import logits_in_fresh_process, tiny_causal_lm, train_steps
from .test_trainer import make_trainer, trainable_state

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])
THIS_FOLDER = "<this repository id, or the folder holding this card>"


def model_with_adapters(base_dir: str, names: list[str], task_type: str = "CAUSAL_LM", **base_kwargs):
    """A QST model on the base model in ``base_dir`` holding an adapter for each name, each trained apart (so that
    each gives other logits); returns the model and {name: its logits of IDS}."""
    auto = {"CAUSAL_LM": AutoModelForCausalLM}.get(task_type)
    if auto is None:
        from transformers import AutoModelForSequenceClassification as auto
    torch.manual_seed(0)
    model = get_peft_model(auto.from_pretrained(base_dir, **base_kwargs), QSTConfig(task_type=task_type, r=4),
                           adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, QSTConfig(task_type=task_type, r=4))
    logits = {}
    for steps, name in enumerate(names, start=2):
        model.set_adapter(name)
        if task_type == "CAUSAL_LM":
            train_steps(model, IDS, steps=steps)
        else:
            with torch.no_grad():  # a side network moved off its start, and a head of its own
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.05 * steps * torch.randn_like(parameter))
        with torch.no_grad():
            logits[name] = model.eval()(input_ids=IDS).logits
    return model, logits


def loading_code(card_path) -> str:
    """The code block of the card's QST section, as a reader copies it, with the folder put in for the placeholder."""
    text = ModelCard.load(str(card_path)).text
    assert text.count(MARKER) == 1
    code = re.search(re.escape(MARKER) + r".*?```python\n(.*?)\n```", text, re.DOTALL).group(1)
    return code.replace(THIS_FOLDER, str(card_path.parent))


def run_card(card_path):
    """Run the card's loading code; returns the model it builds."""
    scope = {}
    exec(loading_code(card_path), scope)
    return scope["model"]


def assert_loads_the_saved_adapters(loaded, logits):
    assert set(loaded.peft_config) == set(logits)
    for name, expected in logits.items():
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected), name


@pytest.mark.parametrize("names", [["side"], ["default", "side"], ["a", "b"]], ids=["side", "default+side", "a+b"])
def test_the_card_loads_every_adapter_saved_under_its_name(tmp_path, tiny_model_dir, names):
    """``get_peft_model(..., adapter_name="side")`` then ``save_pretrained(out)`` saves ``out/side/`` and ``out/README.md``:
    the card had no loading section at all (QST wrote it from ``out/adapter_config.json`` only), and with a default
    adapter beside ``side`` it spoke of the default one alone. Its code now loads each, under its name."""
    model, logits = model_with_adapters(tiny_model_dir, names)
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out")  # saved over: still one section

    code = loading_code(tmp_path / "out" / "README.md")
    for name in names:
        if name != "default":
            assert f'subfolder="{name}"' in code and f'adapter_name="{name}"' in code
    where = {"side": "The adapter is saved under the name `side` (in `side/`).",
             "default+side": "This repository holds 2 QST adapters: `default` (at the top level), `side` (in `side/`).",
             "a+b": "This repository holds 2 QST adapters: `a` (in `a/`), `b` (in `b/`)."}["+".join(names)]
    assert where in ModelCard.load(str(tmp_path / "out" / "README.md")).text
    loaded = run_card(tmp_path / "out" / "README.md")
    assert loaded.active_adapter == names[0]  # the adapter the section loads first runs, as its comment says
    assert_loads_the_saved_adapters(loaded, logits)


@pytest.mark.parametrize("quantization", [
    None,
    dict(load_in_4bit=True),  # bitsandbytes' default 4-bit type is FP4, not QLoRA's NF4
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
         bnb_4bit_compute_dtype=torch.bfloat16),
    dict(load_in_8bit=True),
    dict(load_in_8bit=True, llm_int8_threshold=4.0),
], ids=["unquantized", "fp4", "nf4-double-bf16", "8bit", "8bit-threshold"])
def test_the_card_loads_the_base_model_quantized_as_it_was_trained(tmp_path, tiny_model_dir, quantization):
    """The card showed QLoRA's NF4 recipe whatever the base model was: run as written, it loaded an adapter trained
    on an FP4, an 8-bit or an unquantized base onto an NF4 one (logits 0.01-0.05 off on this tiny Llama, no error).
    It now repeats the saving model's own quantization config, and its code gives the trained logits exactly."""
    from transformers import BitsAndBytesConfig

    kwargs = {} if quantization is None else dict(quantization_config=BitsAndBytesConfig(**quantization))
    model, logits = model_with_adapters(tiny_model_dir, ["default"], **kwargs)
    model.save_pretrained(tmp_path / "out")

    code = loading_code(tmp_path / "out" / "README.md")
    assert ("BitsAndBytesConfig(" in code) == (quantization is not None)
    if quantization and quantization.get("bnb_4bit_quant_type") == "nf4":
        assert 'bnb_4bit_quant_type="nf4"' in code and "bnb_4bit_compute_dtype=torch.bfloat16" in code
    for name in set(quantization or {}) - {"load_in_4bit", "load_in_8bit", "bnb_4bit_compute_dtype"}:
        assert f"{name}={quantization[name]!r}".replace("'", '"') in code  # each option set otherwise than default
    compile(code, "card", "exec")
    assert_loads_the_saved_adapters(run_card(tmp_path / "out" / "README.md"), logits)


def test_the_card_of_a_base_model_quantized_otherwise_than_by_bitsandbytes_says_so():
    """The card writes out bitsandbytes' options only; for a base model quantized by another method (GPTQ, AWQ, ...)
    it cannot, and its code, which loads the base model unquantized, says which method to configure instead."""
    from transformers import GPTQConfig

    from peft_qst.card import usage_section

    section = usage_section("some/base", "CAUSAL_LM", quantization=GPTQConfig(bits=4).to_dict(), dtype="float16")
    code = re.search(r"```python\n(.*?)\n```", section, re.DOTALL).group(1)
    assert "# the base model was quantized with gptq when this adapter was trained: pass the same " \
           "quantization_config" in code
    assert "BitsAndBytesConfig" not in code
    compile(code, "card", "exec")


def test_the_card_of_a_4bit_token_classifier_keeps_its_head_unquantized(tmp_path, tiny_model_dir):
    """A TOKEN_CLS head has a bias, which bitsandbytes quantizes unless ``llm_int8_skip_modules`` names it, and QST
    refuses a quantized head to train or load. The card now names the head as the saving model's config did, so its
    code loads the classifier; before, it built the head quantized and the load was refused."""
    from transformers import AutoModelForTokenClassification, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["score"])
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForTokenClassification.from_pretrained(tiny_model_dir, num_labels=3,
                                                                           quantization_config=bnb),
                           QSTConfig(task_type="TOKEN_CLS", r=4))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
        expected = model.eval()(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "out")

    code = loading_code(tmp_path / "out" / "README.md")
    assert 'llm_int8_skip_modules=["score"]' in code and "num_labels=3" in code
    loaded = run_card(tmp_path / "out" / "README.md")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)


def test_the_card_quotes_adapter_names_and_base_model_paths_of_any_characters(tmp_path):
    """PEFT takes any adapter name without a dot (torch refuses those as module names), and a base model's path may
    hold quotes or backslashes (a Windows path). The card put them between double quotes as they stood: ``it's "x"``
    ended the literal early (a SyntaxError), and ``C:\\new`` loaded the subfolder ``C:`` + newline + ``ew``. Its
    code now holds them as Python string literals, and run as a reader copies it, rebuilds both adapters from the
    base model at that path."""
    base_dir = tmp_path / 'the "base" model\\it\'s'
    tiny_causal_lm().save_pretrained(base_dir)
    names = ['it\'s "x"', "C:\\new"]
    model, logits = model_with_adapters(str(base_dir), names)
    model.save_pretrained(tmp_path / "out")

    code = loading_code(tmp_path / "out" / "README.md")
    compile(code, "card", "exec")
    assert 'adapter_name="it\'s \\"x\\""' in code and 'subfolder="C:\\\\new"' in code
    assert_loads_the_saved_adapters(run_card(tmp_path / "out" / "README.md"), logits)


def test_saving_again_keeps_what_a_user_wrote_around_or_in_the_loading_section(tmp_path):
    """The loading section is rewritten on each save from the adapters saved, and only it: text written below it
    stays, and a section whose code a user rewrote (here under another language tag) is no longer recognised, and is
    left as it is rather than followed by a second section."""
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path)
    card = tmp_path / "README.md"
    card.write_text(card.read_text() + "\n## My notes\n\nTrained on my data.\n")
    model.save_pretrained(tmp_path)
    text = card.read_text()
    assert text.count(MARKER) == 1 and text.rstrip().endswith("## My notes\n\nTrained on my data.")

    card.write_text(text.replace("```python\n", "```py\n# my own loading code\n"))
    model.save_pretrained(tmp_path)
    text = card.read_text()
    assert text.count(MARKER) == 1 and "```py\n# my own loading code\n" in text


def test_adapters_saved_one_at_a_time_with_selected_adapters_are_all_named(tmp_path, tiny_model_dir):
    """``save_pretrained(out, selected_adapters=[...])`` saves the adapters named; saved one after the other into one
    folder, the card names what the folder holds of the model's adapters (both), never one not saved there."""
    model, logits = model_with_adapters(tiny_model_dir, ["a", "b", "c"])
    model.save_pretrained(tmp_path / "out", selected_adapters=["a"])
    code = loading_code(tmp_path / "out" / "README.md")
    assert 'adapter_name="a"' in code and '"b"' not in code and '"c"' not in code
    model.save_pretrained(tmp_path / "out", selected_adapters=["b"])

    code = loading_code(tmp_path / "out" / "README.md")
    assert '"c"' not in code
    del logits["c"]
    assert_loads_the_saved_adapters(run_card(tmp_path / "out" / "README.md"), logits)


def test_the_card_of_a_classifier_under_another_name_builds_its_head(tmp_path, tiny_model_dir):
    """The base model's class and ``num_labels`` come from the adapter's own config and head, in its subfolder."""
    model, logits = model_with_adapters(tiny_model_dir, ["cls"], task_type="SEQ_CLS", num_labels=3)
    model.save_pretrained(tmp_path / "out")

    code = loading_code(tmp_path / "out" / "README.md")
    assert "AutoModelForSequenceClassification.from_pretrained(" in code and "num_labels=3" in code
    assert_loads_the_saved_adapters(run_card(tmp_path / "out" / "README.md"), logits)


def test_push_to_hub_of_an_adapter_under_another_name_loads_from_the_hub_by_subfolder(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """``push_to_hub`` uploads ``side/`` and the card (restored after transformers' generic one), which names
    ``subfolder="side"``; the upload, as a Hub cache holds it, loads by that subfolder in a fresh process."""
    from .test_hub import REPO_ID, lay_out_as_hub_cache, push_to_recording_hub

    model, logits = model_with_adapters(tiny_model_dir, ["side"])
    uploaded = push_to_recording_hub(model, REPO_ID, tmp_path / "uploaded", monkeypatch)

    assert {"side/adapter_config.json", "side/adapter_model.safetensors", "README.md"} <= set(uploaded)
    card = ModelCard.load(uploaded["README.md"])
    assert card.data.library_name == "peft" and card.data.base_model == tiny_model_dir
    assert 'subfolder="side"' in loading_code(tmp_path / "uploaded" / "README.md")
    cache = str(tmp_path / "hub-cache")
    lay_out_as_hub_cache(cache, REPO_ID, uploaded)
    got = logits_in_fresh_process(
        tmp_path,
        f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({tiny_model_dir!r})
        model = PeftModel.from_pretrained(base, {REPO_ID!r}, subfolder="side", adapter_name="side")
        assert model.active_adapter == "side"
        """,
        IDS,
        env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"},
    )
    assert torch.equal(got, logits["side"])


def side_model(seed: int):
    """The tiny random Llama with one QST adapter, called "side", seeded by ``seed``."""
    base = tiny_causal_lm()
    torch.manual_seed(seed)
    return get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name="side")


def test_trainer_checkpoints_resumes_and_pushes_a_model_whose_only_adapter_is_not_default(tmp_path, monkeypatch):
    """A Trainer saves the adapter "side" in ``checkpoint-N/side/``, whose card says so; resuming from it into a model
    started elsewhere ends at the straight run's weights; the pushed card names the subfolder."""
    from .test_trainer_lifecycle import capture_uploads

    straight = side_model(seed=0)
    trainer = make_trainer(tmp_path / "straight", straight, hub_model_id="qst-user/side-run")
    trainer.train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "side" / "adapter_model.safetensors").is_file()
    assert 'subfolder="side", adapter_name="side"' in " ".join(loading_code(checkpoint / "README.md").split())

    resumed = side_model(seed=1)
    make_trainer(tmp_path / "resumed", resumed).train(resume_from_checkpoint=str(checkpoint))
    expected, got = trainable_state(straight), trainable_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    capture_uploads(monkeypatch, tmp_path)
    trainer.push_to_hub()
    uploaded = tmp_path / "uploaded"
    card = ModelCard.load(str(uploaded / "README.md"))
    assert "### Training hyperparameters" in card.text  # the trainer's summary, kept
    code = " ".join(loading_code(uploaded / "README.md").split())
    # the card names "side", never a checkpoint folder beside it (which holds it too, under checkpoint-N/side/)
    assert 'subfolder="side", adapter_name="side"' in code and code.count("subfolder=") == 1
    loaded = PeftModel.from_pretrained(tiny_causal_lm(), str(uploaded), subfolder="side", adapter_name="side")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, straight.eval()(input_ids=IDS).logits)


@pytest.mark.parametrize("quantization", [None, dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)],
                         ids=["unquantized", "4bit"])
def test_the_card_loads_a_half_precision_checkpoint_in_float32_as_it_was_trained(tmp_path, quantization):
    """transformers 5 loads a checkpoint in the dtype it was saved in unless ``dtype=`` says otherwise
    (``dtype="auto"``, its default). The card left the dtype out for a model in float32, as for a default, so a base
    saved in bfloat16 (SmolLM2's checkpoints) and trained on in float32 was built by the card's code in bfloat16,
    its side network too: other logits than the saved adapter's, silently. float32 is now written as any dtype."""
    from transformers import BitsAndBytesConfig

    tiny_causal_lm(dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16-base")
    kwargs = {} if quantization is None else dict(quantization_config=BitsAndBytesConfig(**quantization))
    model, logits = model_with_adapters(str(tmp_path / "bf16-base"), ["default"], dtype=torch.float32, **kwargs)
    model.save_pretrained(tmp_path / "out")

    assert "dtype=torch.float32" in loading_code(tmp_path / "out" / "README.md")
    assert_loads_the_saved_adapters(run_card(tmp_path / "out" / "README.md"), logits)


@pytest.mark.parametrize(
    "task_type, auto_class, pipeline",
    [
        ("SEQ_CLS", "AutoModelForSequenceClassification", "text-classification"),
        ("TOKEN_CLS", "AutoModelForTokenClassification", "token-classification"),
        ("QUESTION_ANS", "AutoModelForQuestionAnswering", "question-answering"),
        ("FEATURE_EXTRACTION", "AutoModel", "feature-extraction"),
        ("CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    ],
)
def test_the_card_names_the_pipeline_of_the_adapters_task(tmp_path, tiny_model_dir, task_type, auto_class, pipeline):
    """PEFT's card sets ``pipeline_tag`` for a causal LM only: the card of a classifier (a reward model with one
    label too), a question-answering or a feature-extraction adapter named no task. Each names its own, and keeps its
    loading section; a pipeline_tag already in the card is kept when the adapter is saved again."""
    import transformers

    kwargs = {"num_labels": 1} if task_type == "SEQ_CLS" else {}
    base = getattr(transformers, auto_class).from_pretrained(tiny_model_dir, **kwargs)
    model = get_peft_model(base, QSTConfig(task_type=task_type, r=4))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == pipeline
    assert card.text.count(MARKER) == 1 and f"base = {auto_class}.from_pretrained(" in card.text
    card.data.pipeline_tag = "text-ranking"
    card.save(tmp_path / "README.md")
    model.save_pretrained(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.pipeline_tag == "text-ranking"


def test_the_card_says_that_loading_without_import_peft_qst_fails_with_a_key_error(tmp_path, tiny_model_dir):
    """PEFT has no plug-in discovery: in a process that did not ``import peft_qst``, ``PeftModel.from_pretrained`` and
    ``AutoPeftModelForCausalLM.from_pretrained`` of a QST adapter fail with a bare ``KeyError: 'QST'``, which names
    neither peft-qst nor the import (QST cannot run code before that import). The card written beside the adapter,
    which a reader of the failing folder finds, says so in its text and on its import line, which comes first."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path)
    without_import = f"""
import json
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM
base, folder = {tiny_model_dir!r}, {str(tmp_path)!r}
errors = []
for load in (lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder),
             lambda: AutoPeftModelForCausalLM.from_pretrained(folder)):
    try:
        load()
        errors.append(None)
    except Exception as error:
        errors.append(f"{{type(error).__name__}}: {{error}}")
print(json.dumps(errors))
"""
    result = subprocess.run([sys.executable, "-c", without_import], capture_output=True, text=True, timeout=600,
                            cwd=REPO, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == ["KeyError: 'QST'"] * 2

    text = ModelCard.load(str(tmp_path / "README.md")).text
    section = text[text.index(MARKER):]
    assert "fail with\n`KeyError: 'QST'`" in section or "fail with `KeyError: 'QST'`" in section
    lines = loading_code(tmp_path / "README.md").splitlines()
    import_line = next(i for i, line in enumerate(lines) if line.startswith("import peft_qst"))
    assert lines[import_line].endswith("without it, loading fails with KeyError: 'QST'")
    assert import_line < min(i for i, line in enumerate(lines) if line.startswith(("from peft", "from transformers")))
    assert run_card(tmp_path / "README.md").peft_config["default"].peft_type == "QST"
