"""The fingerprint of the base model's weights an adapter records (``base_model_fingerprint``): loading onto another
checkpoint of the same architecture and sizes (an Instruct model and its base, a fine-tune), which the base model's
signature cannot tell apart, warns naming both checkpoints; the same checkpoint in float32, bf16 or real 4-bit, a
resized vocabulary and an adapter saved before the fingerprint existed load without that warning."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_qst import QSTConfig
from peft_qst.serialization import weights_digest

from .conftest import load_smollm2_4bit, tiny_causal_lm, train_steps

IDS = torch.tensor([[5, 17, 30, 2, 35, 64, 7, 21], [28, 2, 3, 4, 29, 6, 7, 8]])


def fingerprint_warnings(load):
    """The result of ``load()`` and the messages of the fingerprint warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    found = [w for w in caught if "base_model_fingerprint" in str(w.message)]
    assert all(w.filename == __file__ for w in found)  # reported at the user's line that loaded
    return result, [str(w.message) for w in found]


def fine_tuned(model, steps: int, lr: float):
    """``model`` after ``steps`` AdamW steps of full fine-tuning (every weight trained), as a fine-tuned checkpoint."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(input_ids=IDS % model.config.vocab_size, labels=IDS % model.config.vocab_size).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_the_same_checkpoint_in_float32_bf16_and_4bit_loads_without_a_warning(tmp_path, smollm2_dir):
    model = get_peft_model(load_smollm2_4bit(smollm2_dir), QSTConfig(task_type="CAUSAL_LM", r=16))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    fingerprint = saved["base_model_fingerprint"]
    assert fingerprint["rows"] == 49152 and len(fingerprint["input_embeddings"]) == 64
    assert "output_embeddings" not in fingerprint  # tied to the token embeddings
    assert "base_model_fingerprint" not in saved["base_model_signature"]  # which must match entry by entry
    # the digest covers the weights, not the config: it still verifies
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["adapter_weights_sha256"] == weights_digest(weights)
    for load_base in (
        lambda: AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        lambda: AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16),
        lambda: AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float16),
        lambda: load_smollm2_4bit(smollm2_dir),
        lambda: AutoModelForCausalLM.from_pretrained(
            smollm2_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        ),
    ):
        loaded, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(load_base(), str(tmp_path / "adapter")))
        assert found == [] and isinstance(loaded, PeftModel)


def test_a_fine_tuned_checkpoint_of_the_same_shapes_warns_on_every_load_path(tmp_path, smollm2_dir):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), QSTConfig(task_type="CAUSAL_LM", r=16)
    )
    model.save_pretrained(tmp_path / "adapter")
    # a colleague's fine-tune: a few full fine-tuning steps, saved as a checkpoint of its own
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    fine_tuned(base, steps=3, lr=1e-4).save_pretrained(tmp_path / "fine-tune")
    other = str(tmp_path / "fine-tune")

    def base():
        return AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)

    adapter = str(tmp_path / "adapter")
    loads = {
        "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(base(), adapter),
        "load_adapter": lambda: PeftModel.from_pretrained(base(), adapter).load_adapter(adapter, "second"),
        "transformers' load_adapter": lambda: base().load_adapter(adapter),
    }
    for how, load in loads.items():
        _, found = fingerprint_warnings(load)
        assert len(found) == (2 if how == "load_adapter" else 1), how
        assert smollm2_dir in found[0] and other in found[0], found[0]
    # an adapter saved before the fingerprint was recorded: nothing to compare, no warning
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["base_model_fingerprint"]
    path.write_text(json.dumps(config))
    loaded, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(base(), adapter))
    assert found == [] and isinstance(loaded, PeftModel)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_resized_vocabulary_gives_no_false_warning(tmp_path, when):
    tiny_causal_lm(tie_word_embeddings=False).save_pretrained(tmp_path / "base")

    def base(resize):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
        if resize:
            model.resize_token_embeddings(136)  # the added rows are drawn at random, differently each time
        return model

    model = get_peft_model(base(when == "before"), QSTConfig(task_type="CAUSAL_LM", r=4))
    if when == "after":
        model.base_model.model.resize_token_embeddings(136)
    model.save_pretrained(tmp_path / "adapter")
    fingerprint = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert fingerprint["rows"] == 128 and len(fingerprint["output_embeddings"]) == 64  # untied: the LM head too
    assert all(row < 128 for row, _, _ in fingerprint["input_embeddings"] + fingerprint["output_embeddings"])
    for resize in (True, False):  # resized as in training, and resized by the load itself
        loaded, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(base(resize), str(tmp_path / "adapter")))
        assert found == [] and loaded.get_input_embeddings().weight.shape[0] == 136
    # the LM head alone of another checkpoint (an untied model fine-tuned on few tokens) is told too
    other = base(True)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.01)
    _, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(other, str(tmp_path / "adapter")))
    assert len(found) == 1


def test_an_lm_head_trained_with_the_adapter_is_not_taken_for_another_checkpoint(tmp_path, tiny_model_dir):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"]),
    )
    train_steps(model, IDS, steps=2)  # the saved copy of the head moves; the base model's own does not
    model.save_pretrained(tmp_path / "adapter")
    for load in (
        lambda: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter")
        ),
        lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).load_adapter(str(tmp_path / "adapter")),
    ):
        _, found = fingerprint_warnings(load)
        assert found == []
    # saved again from the loaded model, onto which it was loaded: the same fingerprint
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))
    loaded.save_pretrained(tmp_path / "again")
    assert (json.loads((tmp_path / "again" / "adapter_config.json").read_text())["base_model_fingerprint"]
            == json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_fingerprint"])


def test_unreadable_weights_and_a_damaged_fingerprint(tmp_path):
    from peft_qst.fingerprint import base_model_fingerprint

    with torch.device("meta"):
        assert base_model_fingerprint(tiny_causal_lm()) is None  # nothing recorded, nothing compared
    with pytest.raises(ValueError, match="base_model_fingerprint is invalid"):
        QSTConfig(base_model_fingerprint={"input_embeddings": [[0, 1]]})
    # a negative position would index from the end and compare another entry than the one recorded
    with pytest.raises(ValueError, match="its input_embeddings is not a list of"):
        QSTConfig(base_model_fingerprint={"rows": 8, "input_embeddings": [[-1, 0, 0.5]]})


def test_an_adapter_saved_again_from_another_checkpoint_names_the_one_its_fingerprint_describes(tmp_path):
    """An adapter loaded onto another checkpoint (warned) and saved again records that checkpoint's fingerprint (it is
    the base the adapter was last trained or saved on), but PEFT keeps the adapter's first base_model_name_or_path:
    loading it onto that first checkpoint warned "It was saved on <it> and is being loaded onto <it>", told to load it
    onto the checkpoint it was being loaded onto. The warning names the checkpoint whose weights were sampled."""
    tiny_causal_lm().save_pretrained(tmp_path / "base")
    fine_tuned(tiny_causal_lm(), steps=3, lr=1e-2).save_pretrained(tmp_path / "fine-tune")
    base, other = str(tmp_path / "base"), str(tmp_path / "fine-tune")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(
        tmp_path / "adapter")
    resumed, found = fingerprint_warnings(
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other), tmp_path / "adapter",
                                          is_trainable=True))
    assert len(found) == 1 and f"It was saved on {base!r} and is being loaded onto {other!r}" in found[0]
    resumed.save_pretrained(tmp_path / "again")
    _, found = fingerprint_warnings(
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "again"))
    assert len(found) == 1 and f"It was saved on {other!r} and is being loaded onto {base!r}" in found[0], found
    _, found = fingerprint_warnings(
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other), tmp_path / "again"))
    assert found == []
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["base_model_fingerprint"][
        "name_or_path"] == other
    with pytest.raises(ValueError, match="base_model_fingerprint is invalid: its name_or_path is 3"):
        QSTConfig(base_model_fingerprint={"rows": 8, "name_or_path": 3})


def test_models_built_from_configs_are_described_without_a_name(tmp_path):
    """Two models built from configs (no checkpoint name on either side) with other weights: the warning says so in
    words, where it printed "'(not recorded)'" and told the user to load the adapter onto "((not recorded))"."""
    get_peft_model(tiny_causal_lm(seed=0), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(tmp_path / "a")
    _, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(tiny_causal_lm(seed=1), tmp_path / "a"))
    assert len(found) == 1
    assert "saved on a checkpoint whose name was not recorded and is being loaded onto a model built from a config" \
        in found[0]
    assert "(not recorded)" not in found[0]


def test_a_load_refused_after_the_fingerprint_check_gives_the_refusal_alone(tmp_path):
    """An adapter loaded onto another checkpoint whose file the load then refuses (here a tensor of neither the side
    network nor the base model, with a digest that matches it): the fingerprint warning, given where the check found
    it, came before the refusal, telling of an adapter "trained on other base model weights" that was then not loaded.
    It is given only once the load succeeded: a refused load gives the refusal alone, on every load path; the same
    load of the intact file still warns once, at the user's line."""
    from safetensors.torch import save_file

    from peft_qst.serialization import QSTAdapterFileError

    get_peft_model(tiny_causal_lm(seed=0), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(tmp_path / "intact")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    weights = load_file(str(tmp_path / "intact" / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.mlp.nothing.weight"] = torch.zeros(4)
    save_file(weights, str(tampered / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "intact" / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = weights_digest(weights)
    (tampered / "adapter_config.json").write_text(json.dumps(config))

    def loaded_elsewhere():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its own load's warning, not the one under test
            return PeftModel.from_pretrained(tiny_causal_lm(seed=1), tmp_path / "intact")

    loads = {
        "PeftModel.from_pretrained": lambda folder: PeftModel.from_pretrained(tiny_causal_lm(seed=1), folder),
        "load_adapter": lambda folder: loaded_elsewhere().load_adapter(folder, "second"),
        "transformers' load_adapter": lambda folder: tiny_causal_lm(seed=1).load_adapter(str(folder)),
    }
    for how, load in loads.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(QSTAdapterFileError, match="belong neither"):
                load(tampered)
        assert [str(w.message) for w in caught if "base_model_fingerprint" in str(w.message)] == [], how
        _, found = fingerprint_warnings(lambda: load(tmp_path / "intact"))
        assert len(found) == 1, how


def test_an_adapter_saved_on_a_float32_load_gives_no_warning_on_half_precision_loads(tmp_path, tiny_model_dir):
    """The other direction of the test above, whose checkpoint is stored in bf16: a checkpoint stored in float32 (the
    adapter saved on a float32 load records float32 values) loaded in bf16, float16 or 4-bit rounds every entry to
    the load's dtype, by up to 2^-9 of its value in bf16. Those are the same weights and give no warning."""
    from .conftest import bnb_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           QSTConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path / "adapter")
    for load_base in (
        lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
        lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16),
        lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config()),
    ):
        loaded, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(load_base(), str(tmp_path / "adapter")))
        assert found == [] and isinstance(loaded, PeftModel)


def test_a_checkpoint_differing_in_one_recorded_entry_is_told(tmp_path, tiny_model_dir):
    """A fine-tune that trained the token embeddings on a small data set moves only the rows of the tokens it saw, so
    few of the sampled entries differ: one entry beyond the load's rounding is already another checkpoint, and warns
    (1 of the 128 compared). Any tolerance in the count would let such a fine-tune through without a word."""
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4)
                   ).save_pretrained(tmp_path / "adapter")
    fingerprint = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_fingerprint"]
    row, column, _ = fingerprint["input_embeddings"][0]
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.get_input_embeddings().weight[row, column] += 0.05  # one token's row, trained a little
    _, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(other, str(tmp_path / "adapter")))
    assert len(found) == 1 and "this model's: 1 of 128 entries" in found[0], found  # 64 each, untied LM head


def test_a_model_without_an_lm_head_records_its_embeddings_and_warns_on_another_checkpoint(tmp_path):
    """A bare decoder trunk (AutoModel, for its features) has input embeddings and no LM head: its adapter records
    the fingerprint of the embeddings alone (the head's absence is not a weight it cannot read, which recorded none),
    and a load onto another checkpoint of the same shapes warns."""
    from transformers import AutoModel

    tiny_causal_lm(seed=0).save_pretrained(tmp_path / "base")
    tiny_causal_lm(seed=1).save_pretrained(tmp_path / "other")
    model = get_peft_model(AutoModel.from_pretrained(tmp_path / "base"), QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    model.save_pretrained(tmp_path / "adapter")
    fingerprint = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert len(fingerprint["input_embeddings"]) == 64 and "output_embeddings" not in fingerprint
    _, found = fingerprint_warnings(
        lambda: PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")))
    assert found == []
    _, found = fingerprint_warnings(
        lambda: PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "other"), str(tmp_path / "adapter")))
    assert len(found) == 1 and str(tmp_path / "other") in found[0]


def test_another_checkpoint_whose_lm_head_is_tied_warns(tmp_path):
    """Whether the LM head is tied to the embeddings is not in the base model's signature, so an adapter saved on an
    untied checkpoint loads onto one of the same sizes whose head is tied: its recorded head was compared with nothing
    and the whole fingerprint was left out, so that a checkpoint of other embeddings too loaded without a word. The
    tied head is compared as the embeddings it computes the logits with."""
    tiny_causal_lm(seed=0, tie_word_embeddings=False).save_pretrained(tmp_path / "base")
    tiny_causal_lm(seed=1, tie_word_embeddings=True).save_pretrained(tmp_path / "other")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), QSTConfig(task_type="CAUSAL_LM", r=4)
                   ).save_pretrained(tmp_path / "adapter")
    fingerprint = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_fingerprint"]
    assert "output_embeddings" in fingerprint
    _, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "other"), str(tmp_path / "adapter")))
    assert len(found) == 1 and str(tmp_path / "other") in found[0] and "of 128 entries" in found[0], found
    _, found = fingerprint_warnings(lambda: PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")))
    assert found == []
