"""The inference fast path (peft_qst/fast_path.py) computes what the general path through the transformers modules
computes, is used where it applies and only there, and follows every change of the side weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig
from peft_qst.fast_path import fast_path_disabled

from .conftest import tiny_causal_lm, train_steps

PAD = 0


def open_adapter(model, seed: int = 0):
    """Random side weights with the upsample and gates open, so that the side network visibly changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * 0.2
                parameter.add_(noise.to(parameter.dtype))
    return model


def qst_model(model_type="llama", side_dtype=None, **config):
    if model_type == "llama" and "base" not in config:
        base = tiny_causal_lm(pad_token_id=PAD)
    else:
        torch.manual_seed(0)
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, pad_token_id=PAD)
        sizes.update(config.pop("base", {}))
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).eval()
    qst = QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype=side_dtype, **config)
    return open_adapter(get_peft_model(base, qst)).eval()


def side_of(model):
    return model.base_model.model.model.qst_side["default"]


def left_padded_batch():
    ids = torch.tensor([[PAD, PAD, PAD, 5, 17, 33, 2, 99], [11, 12, 13, 14, 15, 16, 17, 18]])
    mask = (ids != PAD).long()
    return ids, mask


def both_paths(fn):
    fast = fn()
    with fast_path_disabled():
        general = fn()
    return fast, general


FAST_TYPES = [
    ("llama", {}),
    ("mistral", {"base": {"sliding_window": None}}),
    ("qwen2", {}),  # q/k/v biases
    ("llama", {"base": {"attention_bias": True, "mlp_bias": True}}),  # biases on every projection, o and mlp too
    ("llama", {"base": {"rms_norm_eps": 0.5}}),  # an epsilon that counts: each RMS denominator must add its own
]


@pytest.mark.parametrize("model_type,config", FAST_TYPES,
                         ids=["llama", "mistral", "qwen2", "llama-biases", "large-epsilon"])
def test_forward_equals_the_general_path(model_type, config):
    model = qst_model(model_type, **dict(config))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert side_of(model).__dict__.get("_packed_weights") is not None  # the fast path ran
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (fast - base)[real].abs().max() > 0.1  # the adapter changes the output
    torch.testing.assert_close(fast[real], general[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("downsample", ["adapter", "lora", "linear", "maxpool", "avgpool"])
def test_every_downsampler_equals_the_general_path(downsample):
    model = qst_model(downsample=downsample)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)


#: the fast path computes plain rotary embeddings itself and takes scaled ones and other activations from the modules
DECODING_VARIANTS = [
    ("llama", {}),
    ("llama", {"base": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}}),
    ("llama", {"base": {"hidden_act": "gelu_pytorch_tanh"}}),
    ("qwen2", {}),
    ("llama", {"side_heads": 2}),  # two side heads, one key/value head ("auto" makes one head here)
    ("llama", {"side_heads": None}),  # the model's 4 heads over 2 key/value heads (the paper's layout)
]


@pytest.mark.parametrize("model_type,config", DECODING_VARIANTS,
                         ids=["llama", "linear-rope", "gelu", "qwen2", "side-heads-2", "model-heads"])
def test_cached_decoding_equals_the_general_path_step_by_step(model_type, config):
    """Prefill and decode steps with the paired cache, left padding included: logits of every step agree."""
    model = qst_model(model_type, **dict(config))
    ids, mask = left_padded_batch()
    fast, general = both_paths(lambda: greedy_decoding_logits(model, ids, mask, steps=6))
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)


def greedy_decoding_logits(model, ids, mask, steps: int) -> torch.Tensor:
    """The last position's logits of a prefill and ``steps - 1`` greedy one-token steps with the paired cache."""
    logits, cache, step_ids, step_mask = [], None, ids, mask
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], 1)
    return torch.stack(logits)


def test_a_row_of_padding_alone_in_one_token_steps_equals_the_general_path():
    """A one-token forward whose row sees no position (an empty prompt beside one-token prompts; a row masked out with
    all its past) gets a zero attention output from SDPA on the general path, as in the backbone. The fast path let
    such a row see itself instead: its logits differed from the general path's (by ~0.4 here), and generate picked
    other tokens for it."""
    model = qst_model()
    ids, mask = torch.tensor([[5], [PAD]]), torch.tensor([[1], [0]])
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)

    def run():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD,
                              output_logits=True, return_dict_in_generate=True)

    fast, general = both_paths(run)
    assert torch.equal(fast.sequences, general.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(general.logits), atol=2e-5, rtol=1e-4)

    prompt, prompt_mask = left_padded_batch()
    prompt_mask[0] = 0  # the first row is padding alone, in its past and in the step

    def step():
        with torch.no_grad():
            cache = model(input_ids=prompt, attention_mask=prompt_mask, use_cache=True).past_key_values
            step_mask = torch.cat([prompt_mask, torch.tensor([[0], [1]])], 1)
            return model(input_ids=prompt[:, -1:], attention_mask=step_mask, past_key_values=cache).logits

    fast, general = both_paths(step)
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=20)],
                         ids=["greedy", "beams", "sampling"])
def test_generate_equals_the_general_path(mode):
    model = qst_model()
    ids, mask = left_padded_batch()

    def run():
        torch.manual_seed(0)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, pad_token_id=PAD, **mode)

    fast, general = both_paths(run)
    assert torch.equal(fast, general)


def test_bfloat16_side_network_agrees_with_its_general_path():
    """A bf16 side network runs in float32 on the fast path: the same function, more precisely rounded."""
    model = qst_model(side_dtype="bfloat16")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    real = mask.bool()
    assert (fast - general)[real].abs().max() < 0.05 * general[real].abs().max()


def test_a_bfloat16_side_network_runs_in_float32_on_the_fast_path():
    """Float32 throughout, gates included: the fast path's logits for a bf16 side network are those of the same
    weights computed in float32 (the general path on a float32 copy of the side network), to float32 rounding. Its
    gates and (1 - gate) were computed in bfloat16, which put them 1e-3 off on a tiny 4-bit Llama."""
    model = qst_model(side_dtype="bfloat16")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
    side = side_of(model)
    # the parameters' values as the bf16 side network computes them (norm weights and output gate are bf16 offsets
    # from a constant, see ConstantOffset), kept exactly in the float32 copy
    values = {
        (name, tensor): getattr(module, tensor).detach().clone()
        for name, module in side.named_modules()
        if parametrize.is_parametrized(module)
        for tensor in module.parametrizations
    }
    side.to(torch.float32)
    for (name, tensor), value in values.items():
        parametrization = side.get_submodule(name).parametrizations[tensor]
        parametrization.original.data = value.float() - parametrization[0].constant
        assert torch.equal(getattr(side.get_submodule(name), tensor), value.float())
    with torch.no_grad(), fast_path_disabled():
        float32 = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(fast[real], float32[real], atol=2e-5, rtol=1e-4)


def test_switching_paths_in_the_middle_of_a_generation():
    """The fast path keeps its side cache in float32, the general path in the side dtype: a cache filled by one
    continues on the other."""
    model = qst_model(side_dtype="bfloat16")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)  # fast
        step = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(step)], 1)
        with fast_path_disabled():
            general_step = model(input_ids=step, attention_mask=step_mask, past_key_values=prefill.past_key_values)
            reference = model(input_ids=torch.cat([ids, step], 1), attention_mask=step_mask).logits[:, -1]
    torch.testing.assert_close(general_step.logits[:, -1], reference, atol=0.05, rtol=0.05)


def test_a_cache_filled_on_the_fast_path_continues_with_gradients():
    """The fast path runs under inference mode, so the side cache it fills holds inference tensors; a forward with
    gradients that continues that cache (the general path) still back-propagates, with the gradients a cache filled
    on the general path gives."""
    ids, mask = left_padded_batch()

    def gradients():
        model = qst_model()
        with torch.no_grad():
            prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
            step = prefill.logits[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([mask, torch.ones_like(step)], 1)
            decoded = model(input_ids=step, attention_mask=step_mask, past_key_values=prefill.past_key_values)
        cache = decoded.past_key_values
        inference = cache.side_cache("default").layers[0].keys.is_inference()
        last = decoded.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=last, attention_mask=torch.cat([step_mask, torch.ones_like(last)], 1),
                    past_key_values=cache)
        out.logits.float().pow(2).mean().backward()
        return inference, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast_inference, fast = gradients()
    with fast_path_disabled():
        general_inference, general = gradients()
    assert fast_inference and not general_inference
    assert any(g.abs().max() > 0 for g in fast.values())
    for name in fast:
        torch.testing.assert_close(fast[name], general[name], atol=1e-5, rtol=1e-3, msg=name)


def test_fast_path_follows_training_steps_and_loaded_weights(tmp_path):
    """The packed weights are rebuilt after every change of the side parameters: an optimizer step, a load."""
    model = qst_model()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # packs the current weights
    train_steps(model, torch.randint(1, 128, (2, 12)), steps=2, lr=1e-2)
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)

    model.save_pretrained(tmp_path)
    other = qst_model()
    with torch.no_grad():
        before = other(input_ids=ids, attention_mask=mask).logits  # packs the other model's own weights
    other.load_adapter(str(tmp_path), adapter_name="default")
    other.eval()
    with torch.no_grad():
        after = other(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[mask.bool()], fast[mask.bool()], atol=2e-5, rtol=1e-4)


def test_fast_path_follows_updates_through_data():
    """A hand-written SGD step or an EMA writes through ``param.data``, which bumps no version counter and is no
    optimizer step: the packed weights must follow it too."""
    model = qst_model()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits  # packs the current weights
    model.train()
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-1e-1)
                p.grad = None
    model.eval()
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(fast, before)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
def test_fast_path_follows_a_fused_optimizer(optimizer):
    """A fused AdamW (transformers' and TRL's default ``optim="adamw_torch_fused"``) writes the parameters without
    bumping their version counters; the packed weights must be rebuilt after its steps all the same."""
    model = qst_model()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits  # packs the current weights
    parameters = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(parameters, lr=1e-2, **{optimizer: True})
    versions = [p._version for p in parameters]
    model.train()
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        adamw.step()
        adamw.zero_grad()
    model.eval()
    if optimizer == "fused":
        assert [p._version for p in parameters] == versions  # what the optimizer-step count is there for
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(fast, before)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)


def test_weights_are_checked_once_per_sequence_and_again_for_the_next(monkeypatch):
    """Decoding steps that continue a cache the packed weights were checked for skip the check; the next generation
    (a new cache) checks again and runs on the weights as they are then."""
    from peft_qst import fast_path

    model = qst_model()
    ids, mask = left_padded_batch()
    checks = []
    original = fast_path.weights_key
    monkeypatch.setattr(fast_path, "weights_key", lambda side: checks.append(1) or original(side))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD)
    assert len(checks) == 1  # the prefill; not the 5 decoding steps

    train_steps(model, torch.randint(1, 128, (2, 12)), steps=2, lr=1e-2)
    model.eval()
    fast, general = both_paths(
        lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=PAD,
                               output_logits=True, return_dict_in_generate=True)
    )
    assert torch.equal(fast.sequences, general.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(general.logits), atol=2e-5, rtol=1e-4)


def test_general_path_where_the_fast_path_does_not_apply():
    ids, mask = left_padded_batch()
    # other block structures (q/k norms in Qwen3, sliding windows), gradients, dropout in training mode
    for model in (qst_model("qwen3", base={"head_dim": 16}), qst_model("mistral", base={"sliding_window": 4})):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert side_of(model).__dict__.get("_packed_weights") is None
    model = qst_model()
    model(input_ids=ids, attention_mask=mask)
    assert side_of(model).__dict__.get("_packed_weights") is None
    # dropout in training mode (QST's own, the attention's), and an activation the fast path does not compute
    dropout = qst_model(dropout=0.1).train()
    attention_dropout = qst_model(base={"attention_dropout": 0.1}).train()
    gelu_new = qst_model(base={"hidden_act": "gelu_new"})
    for model in (dropout, attention_dropout, gelu_new):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert side_of(model).__dict__.get("_packed_weights") is None
    for model in (dropout, attention_dropout):  # in evaluation mode nothing is dropped: the fast path runs
        with torch.no_grad():
            model.eval()(input_ids=ids, attention_mask=mask)
        assert side_of(model).__dict__.get("_packed_weights") is not None


def test_cached_decoding_of_unpadded_rows_with_a_mask_equals_the_general_path():
    """Decoding steps whose mask keeps every position (a batch without padding, the mask passed all the same) attend
    to the whole cache, as the general path does."""
    model = qst_model()
    ids = torch.tensor([[5, 17, 33, 2, 99], [11, 12, 13, 14, 15]])
    fast, general = both_paths(lambda: greedy_decoding_logits(model, ids, torch.ones_like(ids), steps=4))
    assert side_of(model).__dict__.get("_packed_weights") is not None
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)


def test_packed_sequences_take_the_general_path():
    """No attention mask and position ids restarting: packed sequences, which must not see each other."""
    model = qst_model()
    first, second = torch.tensor([5, 17, 33, 2, 99]), torch.tensor([11, 12, 13, 14])
    with torch.no_grad():
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
        packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False)
        alone = model(input_ids=second[None], use_cache=False).logits
        # the shortest packed row: two one-token sequences
        pair = model(input_ids=torch.tensor([[5, 11]]), position_ids=torch.tensor([[0, 0]]), use_cache=False).logits
        single = model(input_ids=torch.tensor([[11]]), use_cache=False).logits
    torch.testing.assert_close(packed.logits[:, 5:], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pair[:, 1:], single, atol=2e-5, rtol=1e-4)


def test_lm_head_gets_one_token_inputs_with_standard_strides():
    """Generation's last-position logits take PyTorch's fast matmul path (peft_qst/lm_head.py): the LM head's input
    has standard strides under no_grad, and the logits are unchanged."""
    model = qst_model()
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    ids = torch.tensor([[5, 17, 33, 2, 99, 64]])
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=1).logits
        full = model(input_ids=ids).logits
    handle.remove()
    assert seen[0] == (64, 64, 1)  # a (1, 1, 64) slice of the (1, 6, 64) hidden states, restrided
    torch.testing.assert_close(last[:, -1], full[:, -1])


def test_decoding_steps_run_on_one_thread_and_give_the_thread_count_back(monkeypatch):
    from peft_qst import fast_path

    model = qst_model()
    ids, mask = left_padded_batch()
    seen = []
    inner = fast_path._fast_side_forward

    def record(*args, **kwargs):
        seen.append((args[2][0].shape[1], torch.get_num_threads()))
        return inner(*args, **kwargs)

    monkeypatch.setattr(fast_path, "_fast_side_forward", record)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, pad_token_id=PAD)
        assert torch.get_num_threads() == 2
        assert seen == [(8, 1), (1, 1), (1, 1)]  # 2 x 8 prompt tokens and the decoding steps: at most 64 tokens
        seen.clear()
        long_ids = torch.randint(1, 128, (2, 40))
        with torch.no_grad():
            model(input_ids=long_ids)  # 80 tokens: the side network may use every thread
        assert seen == [(40, 2)] and torch.get_num_threads() == 2

        def fail(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(fast_path, "_fast_side_forward", fail)
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_overlapping_one_thread_sections_give_the_first_thread_count_back():
    """Generation in several Python threads: sections that overlap in any order leave the thread count as it was."""
    from peft_qst.fast_path import _one_thread_section

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = _one_thread_section(), _one_thread_section()
        first.__enter__()
        assert torch.get_num_threads() == 1
        second.__enter__()  # another thread enters while the first is inside: it must not save "1"
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 1  # the second is still inside
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("make_double", ["double", "default_dtype"])
def test_a_float64_side_network_keeps_float64_precision(make_double):
    """The fast path computes in float32; a float64 model (``model.double()``, or built under a float64 default dtype)
    must not be rounded to float32 by it: its forward and generation equal the general path's to float64 rounding."""
    if make_double == "double":
        model = qst_model().double()
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            base = tiny_causal_lm(pad_token_id=PAD, dtype=torch.float64)
            model = open_adapter(get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))).eval()
        finally:
            torch.set_default_dtype(previous)
    assert {p.dtype for p in side_of(model).parameters()} == {torch.float64}
    ids, mask = left_padded_batch()
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=1e-12, rtol=1e-12)
    fast, general = both_paths(
        lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD,
                               output_logits=True, return_dict_in_generate=True)
    )
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(general.logits), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("edit", ["flip_rows", "transpose", "swap_q_heads"])
def test_fast_path_follows_data_edits_that_keep_each_sum(edit):
    """Weight surgery through ``param.data`` that only moves values (rows permuted, a square matrix transposed, heads
    reordered) keeps each parameter's sum, storage and version: the packed weights must follow it all the same."""
    model = qst_model()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits  # packs the current weights
    side = side_of(model)
    attention = side._blocks[0].block.self_attn
    with torch.no_grad():
        if edit == "flip_rows":
            for p in side.parameters():
                if p.dim() == 2:
                    p.data.copy_(p.data.flip(0))
        elif edit == "transpose":
            square = [p for p in side.parameters() if p.dim() == 2 and p.shape[0] == p.shape[1]]
            assert square
            for p in square:
                p.data.copy_(p.data.t().clone())
        else:
            weight = attention.q_proj.weight
            heads = weight.data.unflatten(0, (-1, attention.head_dim))
            weight.data.copy_(heads.roll(1, 0).flatten(0, 1))
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(general, before)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)


def test_a_mask_per_layer_type_takes_the_general_path():
    """transformers' models accept an attention mask per layer type (a dict, as ``create_masks_for_generate`` builds
    for configs with ``layer_types``, Qwen2's included); QST's general path hands it to the side trunk as it is. The
    fast path called ``mask.dim()`` on it and failed with an AttributeError under ``torch.no_grad()``. (Llama's
    model, without layer types, takes no dict.)"""
    model = qst_model("qwen2")
    ids, mask = left_padded_batch()
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    per_layer_type = {"full_attention": causal[None, None] & mask.bool()[:, None, None, :]}
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits  # 2-D: the fast path
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=per_layer_type).logits)
    real = mask.bool()
    torch.testing.assert_close(fast[real], general[real])
    torch.testing.assert_close(fast[real], reference[real], atol=2e-5, rtol=1e-4)


def _next_turn_after(model, change):
    """The next turn of a chat after ``change(fast_cache)`` changed the side weights between two turns: a left-padded
    batch prefilled into a cache on each path, then one new token per row continuing it. The new token's logits must
    have moved (the change reached them) and be the general path's on the fast path."""
    ids, mask = left_padded_batch()
    step = torch.tensor([[7], [9]])
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)
    with torch.no_grad():
        before = model(input_ids=torch.cat([ids, step], 1), attention_mask=step_mask).logits[:, -1]
        with fast_path_disabled():
            general_cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        fast_cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    change(fast_cache)
    with torch.no_grad():
        fast = model(input_ids=step, attention_mask=step_mask, past_key_values=fast_cache).logits[:, -1]
        with fast_path_disabled():
            general = model(input_ids=step, attention_mask=step_mask, past_key_values=general_cache).logits[:, -1]
    assert (general - before).abs().max() > 1e-2  # the change moved the new token's logits
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)


def test_a_cache_continued_after_a_training_step_runs_on_the_new_weights():
    """Decoding steps that continue a cache skip the weights check (see the test above), but not after an optimizer
    step: the next turn of a chat, with a training step between the turns, runs its new tokens on the trained
    weights, as the general path does, not on the weights its earlier tokens were computed with."""
    model = qst_model()

    def train(fast_cache):
        # the packed weights were checked for this cache: its continuation skips the check of the weights themselves
        assert side_of(model).__dict__["_packed_weights"].checked_cache() is fast_cache.side_cache("default")
        train_steps(model, torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(4)), steps=2, lr=1e-2)

    _next_turn_after(model, train)


def test_a_4d_mask_gives_what_the_2d_mask_gives():
    """A 4-D mask (a caller's own, as transformers accepts one) is not the (batch, length) padding mask the fast path
    reads: the general path hands it to the side trunk's attention as it is, and the logits are those of the same
    positions masked by the 2-D mask."""
    model = qst_model()
    ids, mask = left_padded_batch()
    length = ids.shape[1]
    mask_4d = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask_4d).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fast_first", [True, False], ids=["fast-then-general", "general-then-fast"])
def test_switching_paths_in_the_middle_of_a_generation_under_eager_attention(fast_first):
    """As above, with a side trunk on eager attention (a backbone loaded with ``attn_implementation="eager"``), which
    multiplies the query by the cached keys as they are: the cache filled by one path is cast to the dtype the other
    computes in (float32 on the fast path, the side dtype on the general one) before it is continued."""
    model = qst_model(side_dtype="bfloat16", base={"attn_implementation": "eager"})
    assert side_of(model).trunk.config._attn_implementation == "eager"
    ids, mask = left_padded_batch()
    first, second = (contextlib.nullcontext(), fast_path_disabled()) if fast_first else (fast_path_disabled(),
                                                                                          contextlib.nullcontext())
    with torch.no_grad():
        with first:
            prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(step)], 1)
        with second:
            continued = model(input_ids=step, attention_mask=step_mask, past_key_values=prefill.past_key_values)
        with fast_path_disabled():
            reference = model(input_ids=torch.cat([ids, step], 1), attention_mask=step_mask).logits[:, -1]
    torch.testing.assert_close(continued.logits[:, -1], reference, atol=0.05, rtol=0.05)


def test_dynamic_rotary_scaling_follows_the_rotary_module():
    """Dynamic NTK scaling recomputes the rotary frequencies once a sequence runs past ``max_position_embeddings``: the
    fast path must take them from the rotary module at each forward (only plain rotary embeddings, whose frequencies
    never change, are computed from the frequencies seen when the weights were packed), or every position past the
    limit is rotated with the unscaled frequencies."""
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = qst_model(base={"rope_parameters": rope, "max_position_embeddings": 8})
    ids, mask = left_padded_batch()  # 8 tokens: the decoding steps run past position 8
    # transformers' dynamic rotary modules keep the longest frequencies they have computed (the backbone's too), so
    # one generation first puts both paths' runs below in the same state
    with torch.no_grad():
        greedy_decoding_logits(model, ids, mask, steps=6)
    assert side_of(model).__dict__.get("_packed_weights") is not None  # the fast path ran
    fast, general = both_paths(lambda: greedy_decoding_logits(model, ids, mask, steps=6))
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)


def test_a_parameter_replaced_between_two_turns_of_a_cache_is_followed():
    """Weight surgery that assigns a new Parameter (``module.weight = nn.Parameter(...)``) is no optimizer step, no
    load and no write to the old tensor: the registration counter makes a cache continued after it check the weights
    again, and the check reads the side network's parameters anew (not the list it kept, which holds the old
    tensor). The next turn, and the next sequence, run on the new weight, as on the general path."""
    model = qst_model()
    side = side_of(model)

    def replace(_):
        side.upsample.weight = torch.nn.Parameter(side.upsample.weight.detach().flip(0).clone())

    _next_turn_after(model, replace)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        fast, general = both_paths(lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)


def test_other_keyword_arguments_take_the_general_path():
    """Keyword arguments the fast path does not read (here packed-sequence metadata for a single sequence, as a
    padding-free collator gives it, with consecutive positions) go to the general path, which hands them to the side
    trunk; the fast path's forward takes only the arguments it understands."""
    model = qst_model()
    ids = torch.tensor([[5, 17, 33, 2, 99, 64]])
    bounds = torch.tensor([0, ids.shape[1]], dtype=torch.int32)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits  # the fast path
        del side_of(model).__dict__["_packed_weights"]
        flattened = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], cu_seq_lens_q=bounds,
                          cu_seq_lens_k=bounds, max_length_q=ids.shape[1], max_length_k=ids.shape[1],
                          use_cache=False).logits
    assert side_of(model).__dict__.get("_packed_weights") is None  # the general path ran
    torch.testing.assert_close(flattened, plain, atol=2e-5, rtol=1e-4)


def test_a_static_cache_passed_to_forward_takes_the_general_path():
    """A ``StaticCache`` handed to the model's forward with a 2-D mask (``generate`` builds a 4-D mask for one, a
    direct call need not): its side half is preallocated, so its layers return keys of the full cache length, which
    the fast path's attention does not mask; the general path runs it, prefill and decoding step."""
    from transformers import StaticCache

    model = qst_model()
    ids, mask = left_padded_batch()
    step = torch.tensor([[7], [9]])
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)

    def prefill_and_step():
        with torch.no_grad():
            cache = StaticCache(config=model.config, max_cache_len=16)
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            following = model(input_ids=step, attention_mask=step_mask, past_key_values=out.past_key_values)
            return out.logits, following.logits

    (fast, fast_step), (general, general_step) = both_paths(prefill_and_step)
    torch.testing.assert_close(fast[mask.bool()], general[mask.bool()], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_step, general_step, atol=2e-5, rtol=1e-4)


def test_a_reset_cache_reused_after_a_data_edit_runs_on_the_edited_weights():
    """``cache.reset()`` empties the cache a generation filled, for the next prompt; a forward that continues a cache
    the packed weights were checked for skips the check, but an emptied one starts a new sequence and is checked
    again: an update through ``param.data`` between the two generations (an EMA, weight surgery), which no counter
    records, is followed as on the general path."""
    from transformers import DynamicCache

    model = qst_model()
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        cache = model.generate(past_key_values=DynamicCache(), **kwargs).past_key_values
        cache.reset()
        for p in side_of(model).parameters():
            if p.dim() == 2:
                p.data.copy_(p.data.flip(0))
    fast = model.generate(past_key_values=cache, **kwargs)
    with fast_path_disabled():
        general = model.generate(**kwargs)
    assert torch.equal(fast.sequences, general.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(general.logits), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_length,new", [(1, 1), (3, 1), (2, 2)], ids=["new-token", "short", "two-new-tokens"])
def test_a_2d_mask_over_other_than_the_past_and_new_tokens_gives_the_general_paths_logits(mask_length, new):
    """A 2-D mask beside a filled cache that does not cover past + new tokens (one over the new tokens alone, a common
    mistake in hand-written decoding loops): transformers pads it on the right with masked positions, for the
    backbone and the general path alike, and the base model runs. The fast path read its last columns instead: a
    one-token step failed ("shape '[2, 1, 1, 7]' is invalid for input of size 2"), a two-token one attended to other
    positions than the backbone did (0.09 off the general path's logits)."""
    model = qst_model()
    ids = torch.tensor([[5, 17, 33, 2, 99, 64], [11, 12, 13, 14, 15, 16]])

    def step():
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            return model(input_ids=torch.full((2, new), 7), attention_mask=torch.ones(2, mask_length, dtype=torch.long),
                         past_key_values=cache).logits

    fast, general = both_paths(step)
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)


def test_another_threads_side_forward_during_the_fast_mix_leaves_this_forwards_output():
    """Threads generating on one model at once each run the side network's fast forward and then its fast mix, which
    reads the forward's float32 output kept on the packed weights. A thread switch between the mix's check that the
    output kept is its own and its read of it let another thread's forward replace it: the mix added that forward's
    side output (silently other logits, where the shapes matched). The switch is made here where it hurt, by a trace
    function that runs another forward of the side network when the mix reaches that read."""
    import inspect
    import sys

    from peft_qst import fast_path

    model = qst_model()
    side = side_of(model)
    ids = torch.tensor([[5, 17, 33, 2], [11, 12, 13, 14]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    other = tuple(torch.randn(2, 4, 64) for _ in range(len(side._blocks) + 1))
    source, first = inspect.getsourcelines(fast_path.fast_mix)
    reads = {first + i for i, line in enumerate(source) if line.lstrip().startswith("out32 =")}
    switched = []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in reads and not switched:
            switched.append(frame.f_lineno)
            side(other)  # another thread's forward of the same side network, on the fast path
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is fast_path.fast_mix.__code__ else None

    with torch.no_grad():
        sys.settrace(tracer)
        try:
            got = model(input_ids=ids).logits
        finally:
            sys.settrace(None)
    assert switched, "the trace never reached the mix's read of the kept output"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
