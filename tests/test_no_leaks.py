"""Long-running use stays flat: nothing QST installs or keeps grows, or outlives the call or the adapter it is for.

Counts objects, tensors and hooks deterministically (no timing).
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from peft import get_peft_model
from transformers import DynamicCache

import peft_qst
from peft_qst import QSTConfig
from peft_qst import fast_path

from .conftest import tiny_causal_lm

PAD = 0


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    # fake tensors (symbolic shapes, no storage) that torch.compile left in a test run before this one die on their own
    # schedule: they are not the model's tensors and hold no memory, so they are not counted
    tensors = [
        o
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and not isinstance(o, (torch.nn.Parameter, FakeTensor))
    ]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def qst_model(**config):
    return get_peft_model(tiny_causal_lm(pad_token_id=PAD), QSTConfig(task_type="CAUSAL_LM", r=4, **config)).eval()


_per_thread_counts = "parallel backend: openmp" in torch.__config__.parallel_info().lower()


@pytest.mark.skipif(not _per_thread_counts, reason="the intra-op thread count is per thread only with OpenMP")
def test_one_thread_sections_in_overlapping_threads_give_each_thread_its_count_back():
    """Thread A opens a section, thread B opens one, A closes, B closes: each thread runs on its own count again.
    (One process-wide saved count, restored by the last thread to close, left A on one thread for good.)"""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    counts = {}

    started = threading.Barrier(2)

    def thread_a():
        torch.set_num_threads(2)
        torch.get_num_threads()  # PyTorch sets a thread's count up at its first use: before any section opens
        started.wait(10)
        with fast_path._one_thread_section():
            a_in.set()
            assert b_in.wait(10)
        a_out.set()
        counts["a"] = torch.get_num_threads()

    def thread_b():
        torch.set_num_threads(2)
        torch.get_num_threads()
        started.wait(10)
        assert a_in.wait(10)
        with fast_path._one_thread_section():
            assert torch.get_num_threads() == 1
            b_in.set()
            assert a_out.wait(10)
        counts["b"] = torch.get_num_threads()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert counts == {"a": 2, "b": 2}


@pytest.mark.skipif(not _per_thread_counts, reason="the intra-op thread count is per thread only with OpenMP")
def test_decoding_forwards_in_overlapping_threads_leave_no_thread_on_one_thread(monkeypatch):
    """Two server threads decoding at once through the fast path: afterwards each still has its two threads."""
    model = qst_model()
    ids = torch.tensor([[5, 17, 33]])
    inner = fast_path._fast_side_forward
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    counts, errors = {}, []

    def synchronised(*args, **kwargs):
        if threading.current_thread().name == "A":
            a_in.set()
            assert b_in.wait(10)
        else:
            b_in.set()
            assert a_out.wait(10)
        return inner(*args, **kwargs)

    monkeypatch.setattr(fast_path, "_fast_side_forward", synchronised)

    started = threading.Barrier(2)

    def run(name):
        try:
            torch.set_num_threads(2)
            torch.get_num_threads()  # PyTorch sets a thread's count up at its first use: before any section opens
            started.wait(10)
            if name == "B":
                assert a_in.wait(10)
            with torch.no_grad():
                model(input_ids=ids)
            if name == "A":
                a_out.set()
            counts[name] = torch.get_num_threads()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            a_out.set()
            b_in.set()

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not errors
    assert counts == {"A": 2, "B": 2}


def test_copy_head_forward_keeps_no_side_output_on_the_module():
    """A no-grad forward of an adapter with copy heads runs the side trunk on the fast path and mixes on the general
    path: the fast path's output must not stay referenced by the side network until the next forward."""
    model = qst_model(copy_heads=2)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (1, 4)))
    before = _live_tensors()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (16, 64)))  # output dropped at once
    side = next(m for m in model.modules() if isinstance(m, peft_qst.side.QSTSideNetwork))
    assert side.__dict__["_packed_weights"].last_output is None
    assert _live_tensors() == before


def test_unload_takes_qst_model_tags_off_the_base_model():
    base = tiny_causal_lm()
    for _ in range(3):
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4)).unload()
    assert "model_tags" not in vars(base) and base.model_tags is None
    base.add_model_tags(["mine"])
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    assert {"qst", "peft-qst", "mine"} <= set(base.model_tags)
    model.unload()
    assert base.model_tags == ["mine"]


def test_repeated_generation_keeps_tensors_hooks_and_caches_flat():
    """Greedy, beams, a user's cache and mixed adapter_names, many times: no tensor, hook or cache outlives its call."""
    model = qst_model()
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=2))
    ids = torch.tensor([[5, 17, 33, 2, 99], [PAD, PAD, 11, 12, 13]])
    mask = (ids != PAD).long()
    caches = []

    def calls():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, num_beams=2)
            cache = DynamicCache()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD,
                                 past_key_values=cache, return_dict_in_generate=True)
            caches.extend([weakref.ref(cache), weakref.ref(out.past_key_values)])
            del cache, out
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD,
                           adapter_names=["other", "__base__"])

    calls()
    hooks, tensors = _hook_count(model), _live_tensors()
    for _ in range(5):
        calls()
    assert _hook_count(model) == hooks
    assert _live_tensors() == tensors
    assert not any(ref() is not None for ref in caches)


def test_repeated_wrap_and_unload_leaves_no_qst_hooks_or_attributes():
    base = tiny_causal_lm()
    ids = torch.randint(1, 128, (2, 8))
    before = {
        name: (set(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()
    }
    for _ in range(3):
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert model.unload() is base
    after = {name: (set(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in base.named_modules()}
    assert after == before


def test_the_fast_paths_change_check_keeps_nothing_after_the_model_is_gone():
    """The fast path's check for edited side weights multiplies each parameter by position weights as long as the
    longest one. Those were kept in a module-level cache, per device, at the longest length seen in the process: a
    model with wider side parameters than any before left them behind (on its device) after it was deleted."""
    ids = torch.randint(1, 128, (2, 8))
    with torch.no_grad():
        qst_model()(input_ids=ids)  # whatever the first use of the fast path sets up for good
    before = _live_tensors()
    wide = get_peft_model(tiny_causal_lm(pad_token_id=PAD, hidden_size=256, intermediate_size=512),
                          QSTConfig(task_type="CAUSAL_LM", r=4)).eval()
    with torch.no_grad():
        wide(input_ids=ids)
    del wide
    assert _live_tensors() == before


@pytest.mark.parametrize("config", [{}, {"backbone_lora_layers": 1}], ids=["qst", "hybrid"])
def test_a_deleted_model_frees_its_backbone_without_the_garbage_collector(config):
    """The hooks QST puts on the backbone's blocks and layers (hidden-state capture, backbone adapters) and on the
    trunk (its checkpointing switch) call the layer that wraps that trunk. Bound methods of the layer there made
    cycles through the trunk (layer -> trunk -> block -> hook -> layer): after a forward, ``del model`` (then
    ``torch.cuda.empty_cache()``) freed the model object but not the backbone's weights, which waited for the
    garbage collector's next run. (``test_a_deleted_model_is_freed_without_the_garbage_collector`` of
    test_copy_heads.py checks the model object only.)"""
    import weakref

    ids = torch.randint(1, 128, (2, 8))
    model = qst_model(**config)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    layer = next(m for m in model.modules() if isinstance(m, peft_qst.QSTLayer))
    trunk, weight = weakref.ref(layer.base_layer), weakref.ref(layer.base_layer.layers[-1].mlp.down_proj.weight)
    del layer
    gc.collect()
    gc.disable()
    try:
        del model
        assert trunk() is None and weight() is None
    finally:
        gc.enable()


@torch.no_grad()
@pytest.mark.parametrize("config", [{}, {"backbone_lora_layers": 1}], ids=["qst", "hybrid"])
def test_a_trunk_that_outlives_its_qst_layer_runs_as_the_base_trunk(config):
    """The hooks on the trunk's blocks call the QST layer through a weak reference: where the trunk is kept and the
    model that held the layer is gone, they do nothing, and the trunk runs (its blocks, their linear layers) as it
    did before the adapter was added."""
    ids = torch.randint(1, 128, (2, 8))
    base = tiny_causal_lm()
    expected = base.model(input_ids=ids).last_hidden_state
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **config)).eval()
    model(input_ids=ids)
    layer = weakref.ref(model.get_base_model().model)
    trunk = layer().get_base_layer()
    del model, base
    gc.collect()
    assert layer() is None
    assert torch.equal(trunk(input_ids=ids).last_hidden_state, expected)
