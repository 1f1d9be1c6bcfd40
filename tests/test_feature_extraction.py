"""Feature extraction: QSTConfig(task_type="FEATURE_EXTRACTION") on a bare decoder trunk (``AutoModel``: LlamaModel),
as embedding models (e5-mistral, LLM2Vec, gte-Qwen2, sentence-transformers' Transformer module) load a decoder for
LoRA.

PEFT injects by replacing a child module, and here the trunk is the root model: the tuner wraps the root itself
(``base_model.model`` is the QSTLayer), while ``get_base_model()`` and ``unload()`` give the trunk back. The features
are the trunk's ``last_hidden_state`` plus the gated, upsampled side output.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, Trainer, TrainingArguments

from peft_qst import QSTConfig, QSTUnsupportedModelError
from peft_qst.layer import QSTLayer

from .conftest import bnb_config, logits_in_fresh_process

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [8, 9, 10, 11, 12, 13, 14, 15]])


def feature_model(path, **kwargs):
    return get_peft_model(AutoModel.from_pretrained(path, **kwargs), QSTConfig(task_type="FEATURE_EXTRACTION", r=4))


def mean_pooled(model, input_ids, attention_mask=None):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def train_features(model, input_ids, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps pulling the mean-pooled features towards a fixed random target (an MSE embedding loss)."""
    target = torch.randn(input_ids.shape[0], model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(mean_pooled(model, input_ids).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


class ContrastiveTrainer(Trainer):
    """In-batch contrastive loss (InfoNCE) on mean-pooled features of two views of each row (``input_ids`` holds
    both, so that the Trainer keeps the column)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchors, positives = (mean_pooled(model, inputs["input_ids"][:, view], inputs["attention_mask"][:, view])
                              for view in (0, 1))
        scores = torch.nn.functional.normalize(anchors, dim=-1) @ torch.nn.functional.normalize(positives, dim=-1).T
        loss = torch.nn.functional.cross_entropy(scores / 0.05, torch.arange(len(scores)))
        return (loss, scores) if return_outputs else loss


def test_features_start_at_the_trunks_and_training_moves_only_the_side_network(tmp_path, tiny_model_dir):
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(input_ids=IDS).last_hidden_state
    model = get_peft_model(base, QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    assert isinstance(model.base_model.model, QSTLayer)
    assert model.get_base_model() is base
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".qst_side.default." in name for name in trainable)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).last_hidden_state, expected)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    # the Trainer keeps the dataset's columns by the signature of get_base_model().forward: the trunk's
    rows = [
        {"input_ids": torch.stack([ids, ids.flip(0)]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long)}
        for ids in torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(0))
    ]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, label_names=[])
    ContrastiveTrainer(model=model, args=args, train_dataset=rows).train()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= trainable
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=IDS).last_hidden_state
        assert not torch.allclose(adapted, expected)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).last_hidden_state, expected)
        assert torch.equal(base(input_ids=IDS).last_hidden_state, expected)  # the trunk's own forward is untouched


def test_trainer_gradient_checkpointing_checkpoints_the_side_network_too(tmp_path, tiny_model_dir):
    """Trainer(gradient_checkpointing=True) calls model.gradient_checkpointing_enable(), which reaches the bare trunk's
    wrapper: the trunk's own method switched the trunk's blocks only, and the side network, whose activations are what
    QST trains through, kept all of them (a model with a head switches every module it holds, the side network's too).
    Checkpointed side blocks run again in backward; the training is otherwise the same."""
    rows = [
        {"input_ids": torch.stack([ids, ids.flip(0)]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long)}
        for ids in torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    ]
    trained, side_runs = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same side network both times
        model = feature_model(tiny_model_dir)
        side_block = model.base_model.model.qst_side["default"]._blocks[0].block
        runs = []
        side_block.register_forward_pre_hook(lambda *_: runs.append(None))  # (recomputation stops before its end)
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                                 report_to=[], save_strategy="no", use_cpu=True, label_names=[],
                                 gradient_checkpointing=checkpointing)
        ContrastiveTrainer(model=model, args=args, train_dataset=rows).train()
        trained[checkpointing] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        side_runs[checkpointing] = len(runs)
    # one step, two views: each side block runs twice forward, and twice more in backward when checkpointed
    assert side_runs == {False: 2, True: 4}
    for name, weight in trained[False].items():
        torch.testing.assert_close(trained[True][name], weight, rtol=1e-5, atol=1e-6, msg=name)

    model.gradient_checkpointing_disable()  # and off again, trunk and side network alike
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def test_checkpointing_switched_on_the_trunk_itself_reaches_the_side_network(tiny_model_dir):
    """get_base_model() is the trunk, whose own gradient_checkpointing_enable() set the flags of the trunk's modules
    only: the side network, which the trunk does not hold, kept all its activations (and gradient_checkpointing_disable()
    on it left side blocks checkpointed after the PeftModel's switch). Switched there, the side blocks follow: each
    runs again in backward, with the same gradients, and the trunk's disable turns both off."""
    grads, side_runs = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same side network both times
        model = feature_model(tiny_model_dir)
        train_features(model, IDS, steps=2)  # the side network starts closed: open it so that gradients reach it all
        side = model.base_model.model.qst_side["default"]
        runs = []
        side._blocks[0].block.register_forward_pre_hook(lambda *_: runs.append(None))
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable()
            assert all(block.block.gradient_checkpointing for block in side._blocks)
        model.train()
        model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        side_runs[checkpointing] = len(runs)
    assert side_runs == {False: 1, True: 2}  # recomputed in backward when checkpointed
    assert any(grad.abs().max() > 0 for name, grad in grads[False].items() if ".block." in name)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6, msg=name)

    model.get_base_model().gradient_checkpointing_disable()
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    model.gradient_checkpointing_enable()  # on through the PeftModel, off through the trunk itself
    model.get_base_model().gradient_checkpointing_disable()
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert "_set_gradient_checkpointing" not in vars(model.unload())  # unload() hands the trunk back as it was


def test_hidden_states_masks_and_left_padding_behave_as_for_the_trunk(tiny_model_dir):
    model = feature_model(tiny_model_dir)
    train_features(model, IDS)
    short = IDS[1:, 3:]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)  # left-padded with 3 pad positions
    batch, mask = torch.cat([IDS[:1], padded]), torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    with torch.no_grad():
        out = model(input_ids=batch, attention_mask=mask, output_hidden_states=True)
        alone = model(input_ids=short).last_hidden_state
        first = model(input_ids=IDS[:1]).last_hidden_state
        with model.disable_adapter():
            base_out = model(input_ids=batch, attention_mask=mask, output_hidden_states=True)
    # the padded row's real tokens, and the other row, get the features they get alone: the padding does not leak
    torch.testing.assert_close(out.last_hidden_state[1, 3:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.last_hidden_state[:1], first, atol=1e-5, rtol=1e-5)
    # the hidden states are the trunk's, but for the last, which is the adapted output
    assert len(out.hidden_states) == len(base_out.hidden_states) == model.config.num_hidden_layers + 1
    for adapted, base in zip(out.hidden_states[:-1], base_out.hidden_states[:-1]):
        assert torch.equal(adapted, base)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert not torch.allclose(out.last_hidden_state, base_out.last_hidden_state)


def test_save_and_load_give_the_same_features(tmp_path, tiny_model_dir):
    model = feature_model(tiny_model_dir)
    train_features(model, IDS)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=IDS).last_hidden_state

    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).last_hidden_state, expected)
    assert type(loaded).__name__ == "PeftModelForFeatureExtraction"

    fresh = logits_in_fresh_process(tmp_path, f"""
        from peft import AutoPeftModelForFeatureExtraction
        model = AutoPeftModelForFeatureExtraction.from_pretrained({str(tmp_path)!r})
        """, IDS, field="last_hidden_state")
    assert torch.equal(fresh, expected)

    card = ModelCard.load(tmp_path / "README.md")
    assert f'base = AutoModel.from_pretrained("{tiny_model_dir}", dtype=torch.float32)' in \
        " ".join(card.text.split())  # the arguments wrapped under the first where the path is long


def test_adapters_do_not_move_between_the_trunk_and_the_causal_lm(tmp_path, tiny_model_dir):
    """The bare trunk's adapter holds no LM head and its weights are named from the root; a causal LM's adapter
    names them under its trunk (``model``). Each is refused on the other, with the class to load instead."""
    feature_model(tiny_model_dir).save_pretrained(tmp_path / "features")
    causal = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    causal.save_pretrained(tmp_path / "causal")

    with pytest.raises(QSTUnsupportedModelError, match="bare decoder trunk.*AutoModel.from_pretrained"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "features"))
    with pytest.raises(QSTUnsupportedModelError, match="bare decoder trunk.*loads onto that model class"):
        PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), str(tmp_path / "causal"))


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_other_task_types_on_a_bare_trunk_are_refused(tiny_model_dir, task_type):
    """PEFT's plain PeftModel runs get_base_model(), the unadapted trunk here; a causal-LM wrapper wants logits."""
    base = AutoModel.from_pretrained(tiny_model_dir)
    with pytest.raises(QSTUnsupportedModelError, match="bare decoder trunk.*FEATURE_EXTRACTION"):
        get_peft_model(base, QSTConfig(task_type=task_type, r=4))
    assert not any(isinstance(m, QSTLayer) for m in base.modules())


def test_unload_gives_the_trunk_back_and_merging_is_refused(tiny_model_dir):
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(input_ids=IDS).last_hidden_state
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()}
    model = get_peft_model(base, QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    train_features(model, IDS)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert unloaded is base
    assert not any(isinstance(m, QSTLayer) for m in unloaded.modules())
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()} == hooks
    assert "qst" not in (unloaded.model_tags or []) and not hasattr(unloaded, "peft_config")
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=IDS).last_hidden_state, expected)
    # and it can be side-tuned again
    again = get_peft_model(unloaded, QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).last_hidden_state, expected)


def test_feature_extraction_on_a_4bit_trunk(tmp_path, tiny_model_dir):
    base = AutoModel.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    with torch.no_grad():
        expected = base(input_ids=IDS).last_hidden_state
    model = get_peft_model(base, QSTConfig(task_type="FEATURE_EXTRACTION", r=4)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).last_hidden_state, expected)
    train_features(model, IDS)
    with torch.no_grad():
        adapted = model(input_ids=IDS).last_hidden_state
    assert not torch.allclose(adapted.float(), expected.float())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir, quantization_config=bnb_config()),
                                       str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).last_hidden_state, adapted)


def test_several_adapters_on_a_bare_trunk(tiny_model_dir):
    """LoRA's multi-adapter API: the second adapter goes into the same root wrapper, rows route per adapter."""
    model = feature_model(tiny_model_dir)
    train_features(model, IDS)
    model.add_adapter("other", QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    assert not any(p.requires_grad for p in model.get_base_model().parameters())
    with torch.no_grad():
        adapted = model(input_ids=IDS).last_hidden_state
        model.set_adapter("other")
        with model.disable_adapter():
            expected = model(input_ids=IDS).last_hidden_state
        assert torch.equal(model(input_ids=IDS).last_hidden_state, expected)  # a fresh adapter starts at the trunk
        routed = model(input_ids=IDS, adapter_names=["default", "__base__"]).last_hidden_state
    assert torch.equal(routed[0], adapted[0]) and torch.equal(routed[1], expected[1])
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


def test_what_cannot_work_on_a_bare_trunk_is_refused(tmp_path, tiny_model_dir):
    """modules_to_save lie inside the trunk (frozen under no_grad); copy heads need an LM head; transformers' own
    adapter loading injects in place, which cannot wrap the root model: all refused before anything changes."""
    with pytest.raises(ValueError, match="inside the decoder trunk .the bare trunk is the whole model"):
        get_peft_model(AutoModel.from_pretrained(tiny_model_dir),
                       QSTConfig(task_type="FEATURE_EXTRACTION", r=4, modules_to_save=["norm"]))
    with pytest.raises(QSTUnsupportedModelError, match="copy_heads needs a model with an LM head"):
        get_peft_model(AutoModel.from_pretrained(tiny_model_dir),
                       QSTConfig(task_type="FEATURE_EXTRACTION", r=4, copy_heads=2))
    feature_model(tiny_model_dir).save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tiny_model_dir)
    with pytest.raises(QSTUnsupportedModelError, match="bare decoder trunk.*PeftModel.from_pretrained"):
        base.load_adapter(str(tmp_path))
    assert not any(isinstance(m, QSTLayer) for m in base.modules()) and not getattr(base, "peft_config", None)


def test_a_further_adapters_refusals_name_the_trunks_class(tiny_model_dir):
    """add_adapter checks a further adapter against the model the tuner wraps, on a bare trunk the root QSTLayer: its
    refusals named that wrapper ("match no module of QSTLayer", "an LM head (QSTLayer, a llama model, ..."), a class
    the user never loaded. They name the trunk's (LlamaModel), as get_peft_model's do, and change nothing."""
    model = feature_model(tiny_model_dir)
    for options, refusal in (
        (dict(modules_to_save=["score"]), r"\['score'\] match no module of LlamaModel "),
        (dict(copy_heads=2), r"needs a model with an LM head \(LlamaModel, a llama model"),
    ):
        with pytest.raises(ValueError, match=refusal) as refused:
            model.add_adapter("other", QSTConfig(task_type="FEATURE_EXTRACTION", r=4, **options))
        assert "QSTLayer" not in str(refused.value)
        assert list(model.peft_config) == ["default"]


def test_a_composite_models_bare_model_side_tunes_its_language_model(tmp_path):
    """AutoModel on a Llava config loads LlavaModel (vision tower, projector, language model; no LM head): QST
    side-tunes its language model as in LlavaForConditionalGeneration, and the adapted features are LlavaModel's
    last_hidden_state. Its trunk is ``language_model`` there, ``model.language_model`` in the model with the head, so
    the card must name AutoModel (it named AutoModelForImageTextToText, onto which the adapter does not load)."""
    from transformers import AutoConfig

    from .test_multimodal import FAMILIES, make_inputs

    config = AutoConfig.for_model("llava", **FAMILIES["llava"][0])
    torch.manual_seed(0)
    base = AutoModel.from_config(config).eval()
    assert type(base).__name__ == "LlavaModel"
    ids, images = make_inputs("llava")
    _, other_images = make_inputs("llava", pixel_seed=1)
    with torch.no_grad():
        expected = base(input_ids=ids, **images).last_hidden_state
    model = get_peft_model(base, QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, **images).last_hidden_state, expected)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        adapted = model(input_ids=ids, **images).last_hidden_state
        with model.disable_adapter():
            other_base = model(input_ids=ids, **other_images).last_hidden_state
        # the side network reads the image: its share of the features changes with it
        assert not torch.allclose(model(input_ids=ids, **other_images).last_hidden_state - other_base,
                                  adapted - expected)
    assert not torch.allclose(adapted, expected)

    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "base = AutoModel.from_pretrained(" in card.text
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(AutoModel.from_config(config), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, **images).last_hidden_state, adapted)
