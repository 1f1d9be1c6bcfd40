"""What QST promises about autograd: only the side network learns, and the backbone records nothing for backward."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training

from peft_qst import QSTConfig, QSTLayer
from peft_qst.side_config import num_blocks
from peft_qst.signature import text_config_of

from .conftest import load_smollm2_4bit, train_steps


def qst_layer(model) -> QSTLayer:
    return next(m for m in model.modules() if isinstance(m, QSTLayer))


def audit_backward(model, input_ids, watched=None, **inputs):
    """Run forward + backward while recording every tensor autograd saves for backward.

    ``watched``: the frozen modules whose outputs are recorded (default: every module of the wrapped trunk);
    ``inputs``: further forward arguments (``labels`` defaults to ``input_ids``).
    Returns (out, saved, backbone_outputs, handed_over): the output, the saved tensors' storage pointers and sizes,
    the storage pointers of every tensor a watched module produced, and the hidden states handed to the side network
    by storage pointer. Tensors are kept alive (dict values) so that their storage cannot be reused by later tensors
    during the audit.
    """
    layer = qst_layer(model)
    backbone_outputs: dict[int, torch.Tensor] = {}
    handed_over: dict[int, torch.Tensor] = {}

    def collect(_module, _inputs, output):
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                backbone_outputs[item.untyped_storage().data_ptr()] = item
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif hasattr(item, "values") and callable(item.values):
                stack.extend(item.values())

    def record_handover(_module, args, kwargs):
        for hidden in args[0]:
            handed_over[hidden.untyped_storage().data_ptr()] = hidden

    watched = layer.base_layer.modules() if watched is None else watched
    hooks = [m.register_forward_hook(collect) for m in watched]
    hooks += [side.register_forward_pre_hook(record_handover, with_kwargs=True) for side in layer.qst_side.values()]
    saved: list[tuple[int, torch.Size]] = []

    def pack(tensor):
        saved.append((tensor.untyped_storage().data_ptr(), tensor.shape))
        return tensor

    inputs.setdefault("labels", input_ids)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=input_ids, **inputs)
    finally:
        for hook in hooks:
            hook.remove()
    out.loss.backward()
    return out, saved, backbone_outputs, handed_over


def take_one_step(model, input_ids, lr=1e-2):
    """One optimizer step, so that the zero-initialised upsample no longer blocks gradients to the side blocks."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def assert_only_side_learns_and_backbone_saves_nothing(model, input_ids):
    take_one_step(model, input_ids)
    out, saved, backbone_outputs, handed_over = audit_backward(model, input_ids)
    assert torch.isfinite(out.loss)
    # the embedding output and one per block (LongCat-Flash's num_hidden_layers counts two sublayers per block)
    num_hidden_states = num_blocks(text_config_of(model.get_base_model().config)) + 1

    # 1. every side parameter has a finite gradient, no backbone parameter has one
    side_params = {n: p for n, p in model.named_parameters() if ".qst_side." in n}
    assert side_params and all(p.requires_grad for p in side_params.values())
    for name, param in side_params.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    for name, param in model.named_parameters():
        if ".qst_side." not in name:
            assert param.grad is None, f"backbone parameter {name} got a gradient"
            assert not param.requires_grad, f"backbone parameter {name} is trainable"

    # 2. nothing the backbone computed is saved for backward, except the hidden states handed to the downsamplers
    leaked = [shape for ptr, shape in saved if ptr in backbone_outputs and ptr not in handed_over]
    assert not leaked, f"backbone activations saved for backward: {leaked[:5]}"
    assert len(handed_over) == num_hidden_states
    # the hidden states themselves are saved only as the downsamplers' inputs: at most once per state and downsampler
    # linear layer of the default 'adapter' downsampler
    saved_handovers = [ptr for ptr, _ in saved if ptr in handed_over]
    assert len(set(saved_handovers)) <= num_hidden_states
    return out


def test_tiny_model_only_side_learns(tiny_model):
    model = get_peft_model(tiny_model, QSTConfig(r=4))
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    assert_only_side_learns_and_backbone_saves_nothing(model, ids)
    # once the upsample has moved off zero, the side network's gradients are not merely finite but non-zero
    side_grads = [p.grad for n, p in model.named_parameters() if ".qst_side." in n]
    assert all(g.abs().sum() > 0 for g in side_grads)


def test_tiny_model_with_input_grads_and_gradient_checkpointing(tiny_model):
    # what prepare_model_for_kbit_training and TRL do to the model before get_peft_model
    tiny_model.enable_input_require_grads()
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(tiny_model, QSTConfig(r=4))
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    assert_only_side_learns_and_backbone_saves_nothing(model, ids)


def _side_block_runs_in_a_training_step(model, ids, monkeypatch) -> int:
    """How often the side blocks run in one forward and backward: once each, twice under gradient checkpointing
    (backward recomputes them)."""
    from peft_qst.side import QSTSideBlock

    runs = []
    original = QSTSideBlock._mix_and_run
    monkeypatch.setattr(QSTSideBlock, "_mix_and_run", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    monkeypatch.setattr(QSTSideBlock, "_mix_and_run", original)
    return len(runs)


def test_gradient_checkpointing_switched_on_before_wrapping_reaches_the_side_blocks(monkeypatch):
    """PEFT's QLoRA recipe turns checkpointing on before get_peft_model (prepare_model_for_kbit_training); the side
    network, built later, checkpoints like the blocks that existed then, and so does an adapter added afterwards."""
    from .conftest import tiny_causal_lm

    ids = torch.randint(0, 128, (2, 9))
    plain = get_peft_model(tiny_causal_lm(), QSTConfig(r=4))
    blocks = plain.base_model.model.config.num_hidden_layers
    assert _side_block_runs_in_a_training_step(plain, ids, monkeypatch) == blocks
    base = tiny_causal_lm()
    base.gradient_checkpointing_enable()
    model = get_peft_model(base, QSTConfig(r=4))
    assert _side_block_runs_in_a_training_step(model, ids, monkeypatch) == 2 * blocks
    model.add_adapter("second", QSTConfig(r=4))
    model.set_adapter("second")
    assert _side_block_runs_in_a_training_step(model, ids, monkeypatch) == 2 * blocks


def test_side_blocks_follow_which_backbone_blocks_checkpoint(monkeypatch):
    """Side block i checkpoints as backbone block i does: a block left out of checkpointing (its flag switched off
    after gradient_checkpointing_enable(), as selective checkpointing does) keeps its side block's activations too,
    while the others run again in backward."""
    from peft_qst.side import QSTSideBlock

    from .conftest import tiny_causal_lm

    base = tiny_causal_lm()
    base.gradient_checkpointing_enable()
    base.model.layers[1].gradient_checkpointing = False
    model = get_peft_model(base, QSTConfig(r=4))
    side = model.base_model.model.model.qst_side["default"]
    assert [block.block.gradient_checkpointing for block in side._blocks] == [True, False, True]
    runs, position = [], {id(block): i for i, block in enumerate(side._blocks)}
    original = QSTSideBlock._mix_and_run
    monkeypatch.setattr(QSTSideBlock, "_mix_and_run",
                        lambda self, *a, **k: runs.append(position[id(self)]) or original(self, *a, **k))
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert sorted(runs) == [0, 0, 1, 2, 2]  # the checkpointed side blocks run again in backward


def test_training_starts_at_the_pretrained_output(tiny_model):
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = tiny_model(input_ids=ids).logits
    model = get_peft_model(tiny_model, QSTConfig(r=4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_a_few_steps_reduce_the_loss(tiny_model):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model, QSTConfig(r=4))
    losses = train_steps(model, torch.randint(0, 128, (4, 16)), steps=30)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.smollm2
def test_smollm2_4bit_after_prepare_model_for_kbit_training(smollm2_dir):
    base = load_smollm2_4bit(smollm2_dir)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, 49152, (2, 24))
    assert_only_side_learns_and_backbone_saves_nothing(model, ids)


@pytest.mark.smollm2
def test_smollm2_default_config_trains_under_one_percent(smollm2_dir):
    model = get_peft_model(load_smollm2_4bit(smollm2_dir), QSTConfig(task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    share = trainable / total
    assert 0 < share < 0.01, share
    # the side network follows bnb_4bit_compute_dtype
    assert {p.dtype for n, p in model.named_parameters() if ".qst_side." in n} == {torch.bfloat16}  # compute dtype


def _side_gradients_of_two_micro_batches(model, ids) -> dict[str, torch.Tensor]:
    """The gradients of the summed loss of two forwards (the rows of ``ids`` split between them) before one backward,
    by parameter name without checkpoint wrappers' prefixes; the RNG seeded, so that dropout draws the same masks."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    sum(model(input_ids=rows, labels=rows).loss for rows in ids.chunk(2)).backward()
    return {
        name.replace("_checkpoint_wrapped_module.", ""): param.grad
        for name, param in model.named_parameters()
        if param.grad is not None
    }


def _qst_model_with_side_blocks_checkpointed(checkpoint_impl):
    """A tiny QST model (side dropout, a backbone low-rank adapter, upsample off zero so that every side parameter
    gets a gradient) and the same model with torch's checkpoint wrapper around each side block, as FSDP1's activation
    checkpointing puts it there (None: unwrapped)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from peft_qst.side import QSTSideBlock

    from .conftest import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, dropout=0.2, backbone_lora_layers=1))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if name.endswith("upsample.weight"):
            param.data.normal_(0.0, 0.1, generator=generator)
    if checkpoint_impl is not None:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=lambda block: checkpoint_wrapper(block, checkpoint_impl=checkpoint_impl),
            check_fn=lambda module: isinstance(module, QSTSideBlock),
        )
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_side_blocks_in_non_reentrant_checkpoint_wrappers_get_the_gradients_of_unwrapped_ones(training):
    """FSDP1's activation checkpointing wraps side blocks and recomputes them in backward, outside the side network's
    forward: they find the backbone hidden state they mixed in by their input, with two forwards before one backward,
    dropout (the recomputation draws the same mask), a backbone low-rank adapter and in eval mode too (the wrapper
    recomputes whether or not the model trains); nothing stays recorded after backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl

    from peft_qst.side import _BACKBONE_HIDDEN_BY_BLOCK_INPUT

    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(0))
    unwrapped = _qst_model_with_side_blocks_checkpointed(None).train(training)
    wrapped = _qst_model_with_side_blocks_checkpointed(CheckpointImpl.NO_REENTRANT).train(training)
    # blocks no wrapper holds record nothing, also while the graph of their forward is alive
    loss = unwrapped(input_ids=ids, labels=ids).loss
    assert len(_BACKBONE_HIDDEN_BY_BLOCK_INPUT) == 0
    del loss
    expected = _side_gradients_of_two_micro_batches(unwrapped, ids)
    got = _side_gradients_of_two_micro_batches(wrapped, ids)
    assert len(_BACKBONE_HIDDEN_BY_BLOCK_INPUT) == 0
    assert got.keys() == expected.keys() and any(".qst_side." in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name)


def test_side_blocks_in_reentrant_checkpoint_wrappers_are_refused_by_name():
    """A reentrant checkpoint recomputes side blocks on copies of their inputs, by which the backbone hidden state
    cannot be found: backward fails with the error naming the non-reentrant alternatives."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl

    model = _qst_model_with_side_blocks_checkpointed(CheckpointImpl.REENTRANT).train()
    ids = torch.randint(0, 128, (2, 9))
    with pytest.raises(RuntimeError, match="reentrant activation checkpoint.*use_reentrant=False"):
        model(input_ids=ids, labels=ids).loss.backward()
