"""More sequence-classification checks: behaviours users expect from LoraConfig(task_type="SEQ_CLS")."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaForSequenceClassification

from peft_qst import QSTConfig

from .conftest import tiny_causal_lm, tiny_llama_config

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [8, 9, 10, 11, 12, 0, 0, 0], [40, 41, 0, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def _perturb(model, adapter, seed):
    """Move an adapter's side output and its copy of the head away from their start, so that adapters differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if f".{adapter}." in name and ("upsample" in name or "modules_to_save" in name):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_mixed_adapter_batch_routes_each_row_to_its_own_classification_head():
    """adapter_names=[...] with SEQ_CLS: each row takes its adapter's side network AND its adapter's copy of the
    score head ("__base__": the original head), as with LoRA. Before the fix every row went through the active
    adapter's head, so rows of other adapters and base rows got wrong logits."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(tiny_llama_config(pad_token_id=0, num_labels=3)).eval()
    with torch.no_grad():
        base_logits = base(input_ids=IDS, attention_mask=MASK).logits
    model = get_peft_model(base, QSTConfig(task_type="SEQ_CLS", r=4), adapter_name="a")
    model.add_adapter("b", QSTConfig(task_type="SEQ_CLS", r=4))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    model.eval()
    with torch.no_grad():
        model.set_adapter("a")
        logits_a = model(input_ids=IDS, attention_mask=MASK).logits
        model.set_adapter("b")
        logits_b = model(input_ids=IDS, attention_mask=MASK).logits
        expected = {"a": logits_a, "b": logits_b, "__base__": base_logits}
        for names in (["a", "__base__", "b"], ["__base__", "a", "a"]):
            mixed = model(input_ids=IDS, attention_mask=MASK, adapter_names=names).logits
            for row, name in enumerate(names):
                torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)


def test_mixed_adapter_generation_routes_rows_to_their_own_lm_head_copy():
    """The same with a trained LM head (modules_to_save=["lm_head"]) through generate, greedy and beam search."""
    model = tiny_causal_lm(pad_token_id=0)
    config = lambda: QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"])  # noqa: E731
    model = get_peft_model(model, config(), adapter_name="a")
    model.add_adapter("b", config())
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    model.eval()
    ids = torch.tensor([[5, 17, 33, 2], [8, 9, 10, 11], [40, 41, 42, 43]])
    names = ["a", "__base__", "b"]
    for num_beams in (1, 2):
        kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0)
        alone = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model.generate(input_ids=ids, **kwargs)
        with model.disable_adapter():
            alone["__base__"] = model.generate(input_ids=ids, **kwargs)
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            assert torch.equal(mixed[row], alone[name][row]), (num_beams, row, name)


def test_mixed_adapter_batch_with_an_adapter_saved_without_the_head():
    """An adapter saved without the head (modules_to_save=None beside one with modules_to_save=["lm_head"]) runs the
    original head, as it does alone, whichever adapter is active: PEFT's wrapper looked its name up among its copies
    and failed with KeyError: 'b'."""
    model = tiny_causal_lm(pad_token_id=0)
    model = get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("b", QSTConfig(task_type="CAUSAL_LM", r=4))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    model.eval()
    ids = torch.tensor([[5, 17, 33, 2], [8, 9, 10, 11], [40, 41, 42, 43]])
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        expected = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            expected[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            expected["__base__"] = model(input_ids=ids).logits
        for active in ("a", "b"):
            model.set_adapter(active)
            mixed = model(input_ids=ids, adapter_names=names).logits
            for row, name in enumerate(names):
                torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    alone = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        alone[name] = model.generate(input_ids=ids, **kwargs)
    mixed = model.generate(input_ids=ids, adapter_names=["b", "a", "b"], **kwargs)
    for row, name in enumerate(["b", "a", "b"]):
        assert torch.equal(mixed[row], alone[name][row]), (row, name)


@pytest.mark.parametrize(
    "task_type, auto_class, head, labels",
    [
        ("QUESTION_ANS", "AutoModelForQuestionAnswering", "qa_outputs",
         {"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 4, 1])}),
        ("TOKEN_CLS", "AutoModelForTokenClassification", "score", {"labels": (IDS % 3).masked_fill(MASK == 0, -100)}),
    ],
)
def test_question_answering_and_token_classification(tmp_path, tiny_model_dir, task_type, auto_class, head, labels):
    """As with LoRA: the output starts at the base model's, PEFT's head (modules_to_save) and the side network train
    and nothing else moves, and the saved adapter loads back to the same outputs."""
    import transformers
    from peft import PeftModel

    def load_base():
        torch.manual_seed(1)  # the new head's initialisation
        return getattr(transformers, auto_class).from_pretrained(tiny_model_dir, num_labels=3).eval()

    def outputs(model):
        with torch.no_grad():
            out = model(input_ids=IDS, attention_mask=MASK)
        return [out[name] for name in ("start_logits", "end_logits", "logits") if name in out]

    base = load_base()
    expected = outputs(base)
    model = get_peft_model(base, QSTConfig(task_type=task_type, r=4))
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), expected))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".qst_side.default." in name or f"{head}.modules_to_save.default." in name for name in trainable)
    assert any(f"{head}.modules_to_save" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, attention_mask=MASK, **labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed <= trainable
    assert any(".qst_side." in name for name in changed) and any(f"{head}.modules_to_save" in name for name in changed)
    trained = outputs(model)
    assert not torch.allclose(trained[0], expected[0])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_base(), str(tmp_path)).eval()
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded), trained))


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("task_type, auto_class", [("QUESTION_ANS", "AutoModelForQuestionAnswering"),
                                                   ("TOKEN_CLS", "AutoModelForTokenClassification")])
def test_inference_fast_path_gives_the_training_path_outputs_at_padding_positions(task_type, auto_class, padding):
    """The no_grad forward (the inference fast path, as Trainer.evaluate runs it) gives the outputs of a forward with
    gradients (the training path) at every position, padding included: question answering's start/end logits of all
    positions enter its loss. The fast path let a padding position attend to itself, which the general path (and
    transformers' mask) does not, so the start/end logits of padding positions and the evaluation loss differed from
    the training path's (here by up to 0.05 and the loss by up to 6e-3)."""
    import transformers

    ids = IDS if padding == "right" else torch.stack([row.roll(int((row == 0).sum())) for row in IDS])
    mask = (ids != 0).long()
    labels = ({"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 4, 1])}
              if task_type == "QUESTION_ANS" else {"labels": (ids % 3).masked_fill(mask == 0, -100)})
    torch.manual_seed(0)
    base = getattr(transformers, auto_class).from_config(tiny_llama_config(pad_token_id=0, num_labels=3))
    model = get_peft_model(base, QSTConfig(task_type=task_type, r=4))
    _perturb(model, "default", 1)
    model.eval()  # no dropout: the paths differ only in how they compute
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask, **labels)
    general = model(input_ids=ids, attention_mask=mask, **labels)
    for name in ("loss", "logits", "start_logits", "end_logits"):
        if name in general:
            torch.testing.assert_close(fast[name], general[name].detach(), rtol=1e-5, atol=2e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Task heads that bitsandbytes quantized
# --------------------------------------------------------------------------------------------------------------------

TASK_HEADS = {"TOKEN_CLS": ("AutoModelForTokenClassification", "score"),
              "QUESTION_ANS": ("AutoModelForQuestionAnswering", "qa_outputs"),
              "SEQ_CLS": ("AutoModelForSequenceClassification", "score")}


@pytest.fixture(scope="module")
def task_model_dirs(tmp_path_factory):
    """Tiny random Llamas saved with their task head (as a fine-tuned classifier is), per task type."""
    import transformers

    dirs = {}
    for task_type, (auto_class, _) in TASK_HEADS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(task_type.lower())
        getattr(transformers, auto_class).from_config(tiny_llama_config(pad_token_id=0, num_labels=3)).save_pretrained(
            path
        )
        dirs[task_type] = str(path)
    return dirs


def _load_4bit(path, task_type, **bnb):
    import transformers
    from transformers import BitsAndBytesConfig

    torch.manual_seed(1)  # a newly initialised head's
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                **bnb)
    return getattr(transformers, TASK_HEADS[task_type][0]).from_pretrained(path, num_labels=3,
                                                                           quantization_config=config).eval()


def _untouched(base, head):
    return type(getattr(base, head)).__name__ == "Linear4bit" and not any(
        "qst_" in name or "modules_to_save" in name for name, _ in base.named_modules()
    )


@pytest.mark.parametrize(
    "task_type, source, bnb",
    [
        ("TOKEN_CLS", "causal-lm", {}),  # a new head, whose 4-bit layer holds a weight never quantized
        ("TOKEN_CLS", "task", {}),  # the saved head, packed to 4 bits
        ("QUESTION_ANS", "task", {}),
        ("SEQ_CLS", "causal-lm", {"llm_int8_skip_modules": []}),  # quantized only when told to
    ],
)
def test_a_4bit_task_head_is_refused_before_anything_changes(tiny_model_dir, task_model_dirs, task_type, source, bnb):
    """transformers' default bitsandbytes config keeps only the last parameter and the LM head unquantized, so a
    head with a bias (TOKEN_CLS's score, QUESTION_ANS's qa_outputs) is loaded as a Linear4bit. PEFT's trainable copy
    of it failed after the side network was injected: "only Tensors of floating point dtype can require gradients"
    in get_peft_model for a saved head, a bare AssertionError at the first forward for a new one. The error names
    the head and the BitsAndBytesConfig that keeps it unquantized, before the model is changed."""
    from peft_qst import QSTUnsupportedModelError

    head = TASK_HEADS[task_type][1]
    base = _load_4bit(tiny_model_dir if source == "causal-lm" else task_model_dirs[task_type], task_type, **bnb)
    assert type(getattr(base, head)).__name__ == "Linear4bit"
    fix = re.escape(f"llm_int8_skip_modules=['{head}']")
    with pytest.raises(QSTUnsupportedModelError, match=f"'{head}' \\(Linear4bit\\) was loaded quantized.*{fix}"):
        get_peft_model(base, QSTConfig(task_type=task_type, r=4))
    assert _untouched(base, head)


def test_seq_cls_score_stays_unquantized_with_the_default_config(tiny_model_dir):
    """SEQ_CLS's score has no bias: its weight is the model's last parameter, which transformers keeps unquantized,
    so the default config works (tests/test_seq_cls.py trains, saves and reloads it)."""
    assert type(_load_4bit(tiny_model_dir, "SEQ_CLS").score) is torch.nn.Linear


def test_a_4bit_lm_head_in_modules_to_save_is_refused(tiny_model_dir):
    """The same for a module named in modules_to_save: an LM head quantized on request (llm_int8_skip_modules=[])."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_qst import QSTUnsupportedModelError

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=[]))
    with pytest.raises(QSTUnsupportedModelError, match=re.escape("(modules_to_save)") + ".*"
                       + re.escape("llm_int8_skip_modules=['lm_head']")):
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"]))
    assert _untouched(base, "lm_head")


@pytest.mark.parametrize("task_type", ["TOKEN_CLS", "QUESTION_ANS"])
def test_a_4bit_backbone_with_the_head_kept_unquantized_trains_saves_and_reloads(tmp_path, task_model_dirs, task_type):
    """The fix the error names works: llm_int8_skip_modules=[head] keeps the head a plain Linear beside a 4-bit
    trunk; the head copy and the side network train, and the saved adapter loads back onto a base loaded the same
    way to the same outputs. Loading it onto a base whose head is quantized is refused as get_peft_model is."""
    from peft import PeftModel

    from peft_qst import QSTUnsupportedModelError

    head = TASK_HEADS[task_type][1]
    path = task_model_dirs[task_type]
    labels = ({"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 4, 1])}
              if task_type == "QUESTION_ANS" else {"labels": (IDS % 3).masked_fill(MASK == 0, -100)})

    def outputs(model):
        with torch.no_grad():
            out = model(input_ids=IDS, attention_mask=MASK)
        return [out[name] for name in ("start_logits", "end_logits", "logits") if name in out]

    base = _load_4bit(path, task_type, llm_int8_skip_modules=[head])
    assert type(getattr(base, head)) is torch.nn.Linear
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = get_peft_model(base, QSTConfig(task_type=task_type, r=4))
    copy = f"{head}.modules_to_save.default.weight"
    start = next(p for n, p in model.named_parameters() if n.endswith(copy)).detach().clone()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=IDS, attention_mask=MASK, **labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(next(p for n, p in model.named_parameters() if n.endswith(copy)), start)
    expected = outputs(model)  # before saving: see test_seq_cls.py's test_seq_cls_on_a_4bit_backbone
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_load_4bit(path, task_type, llm_int8_skip_modules=[head]), str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded.eval()), expected))
    quantized = _load_4bit(path, task_type)
    with pytest.raises(QSTUnsupportedModelError, match=re.escape(f"llm_int8_skip_modules=['{head}']")):
        PeftModel.from_pretrained(quantized, str(tmp_path))
    assert _untouched(quantized, head)


class _DenseHead(nn.Module):
    """A classification head as RoBERTa's: dense, tanh, out_proj; its Linear layers lie inside it."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states):
        return self.out_proj(torch.tanh(self.dense(hidden_states)))


class LlamaMLPHeadForSequenceClassification(LlamaForSequenceClassification):
    """A user's classifier whose head is an nn.Sequential."""

    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                   nn.Linear(config.hidden_size, config.num_labels))
        self.post_init()


class LlamaDenseHeadForSequenceClassification(LlamaForSequenceClassification):
    """A user's classifier whose head is a module holding its Linear layers."""

    def __init__(self, config):
        super().__init__(config)
        self.score = _DenseHead(config)
        self.post_init()


HEADED = {"sequential": LlamaMLPHeadForSequenceClassification, "dense-head": LlamaDenseHeadForSequenceClassification}


@pytest.fixture(scope="module")
def headed_dirs(tmp_path_factory):
    """Tiny random Llama classifiers with a head made of sub-modules, saved as fine-tuned classifiers are."""
    dirs = {}
    for kind, model_class in HEADED.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        model_class(tiny_llama_config(pad_token_id=0, num_labels=3)).save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


def _load_headed_4bit(path, kind, **bnb):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                **bnb)
    return HEADED[kind].from_pretrained(path, quantization_config=config).eval()


@pytest.mark.parametrize("kind", list(HEADED))
def test_a_4bit_head_made_of_sub_modules_is_refused_and_trains_when_kept_unquantized(tmp_path, headed_dirs, kind):
    """A head made of sub-modules (an nn.Sequential, a dense + out_proj head) is loaded with its Linear layers in
    4 bits, and PEFT copies it whole to train it: the refusal looked at the head module's own parameters only (it has
    none), so get_peft_model failed inside PEFT with "only Tensors of floating point dtype can require gradients",
    after the side network was injected. Every layer inside a head or modules_to_save entry is checked now, on every
    path that builds an adapter (get_peft_model, add_adapter, PeftModel.from_pretrained), and the fix named,
    llm_int8_skip_modules=['score'], trains, saves and reloads."""
    from peft import PeftModel

    from peft_qst import QSTUnsupportedModelError

    path = headed_dirs[kind]
    inner = [name for name, module in _load_headed_4bit(path, kind).score.named_modules()
             if type(module).__name__ == "Linear4bit"]
    assert len(inner) == 2
    holder = "Sequential" if kind == "sequential" else "_DenseHead"
    refused = (re.escape(f"'score' ({holder} holding Linear4bit 'score.{inner[0]}', Linear4bit 'score.{inner[1]}') "
                         "was loaded quantized") + ".*" + re.escape("llm_int8_skip_modules=['score']"))

    base = _load_headed_4bit(path, kind)
    with pytest.raises(QSTUnsupportedModelError, match=refused):
        get_peft_model(base, QSTConfig(task_type="SEQ_CLS", r=4))
    assert not any("qst_" in name or "modules_to_save" in name for name, _ in base.named_modules())
    # an adapter that trains the side network only, then one that trains the head too (modules_to_save)
    model = get_peft_model(_load_headed_4bit(path, kind), QSTConfig(r=4))
    with pytest.raises(QSTUnsupportedModelError, match=refused):
        model.add_adapter("head", QSTConfig(r=4, modules_to_save=["score"]))

    base = _load_headed_4bit(path, kind, llm_int8_skip_modules=["score"])
    assert not any(type(module).__name__ == "Linear4bit" for module in base.score.modules())
    model = get_peft_model(base, QSTConfig(task_type="SEQ_CLS", r=4))
    copied = [p for n, p in model.named_parameters() if ".modules_to_save.default." in n]
    start = [p.detach().clone() for p in copied]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 2])).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(not torch.equal(p, s) for p, s in zip(copied, start))
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_load_headed_4bit(path, kind, llm_int8_skip_modules=["score"]), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS, attention_mask=MASK).logits, expected)
    with pytest.raises(QSTUnsupportedModelError, match=refused):
        PeftModel.from_pretrained(_load_headed_4bit(path, kind), str(tmp_path))
