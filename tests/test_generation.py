"""Generation with QST models: paired caches in every decoding mode, left padding, disabled and mixed adapters."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model
from transformers import GenerationConfig

from peft_qst import QSTCache, QSTConfig

from .conftest import tiny_causal_lm, train_steps

PAD = 0
PROMPTS = [[5, 17, 33, 2, 99, 64, 7, 21, 3, 9], [11, 12, 13], [40, 41, 42, 43, 44, 45]]


def trained_model(adapters=("default",), steps=8):
    """A tiny Llama whose QST adapters were trained a little each, so that each visibly changes the output."""
    model = get_peft_model(tiny_causal_lm(pad_token_id=PAD), QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, QSTConfig(task_type="CAUSAL_LM", r=2))
    for i, name in enumerate(adapters):
        model.set_adapter(name)
        torch.manual_seed(100 + i)
        train_steps(model, torch.randint(1, 128, (4, 24)), steps=steps, lr=3e-2)
    model.set_adapter(adapters[0])
    return model


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generate(model, ids, mask=None, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kwargs)


@pytest.fixture(scope="module")
def model():
    return trained_model()


@pytest.mark.parametrize(
    "mode",
    [
        dict(),
        dict(do_sample=True, top_k=20, temperature=0.9),
        dict(num_beams=3),
        dict(num_beams=2, do_sample=True),
        dict(max_new_tokens=300),
    ],
    ids=["greedy", "sampling", "beam-search", "beam-sampling", "300-new-tokens"],
)
def test_cached_equals_uncached(model, mode):
    ids, mask = left_padded(PROMPTS)
    cached = generate(model, ids, mask, seed=0, use_cache=True, **mode)
    uncached = generate(model, ids, mask, seed=0, use_cache=False, **mode)
    assert torch.equal(cached, uncached)
    with model.disable_adapter():
        base = generate(model, ids, mask, seed=0, **mode)
    assert not torch.equal(cached, base), "the adapter should change the generation"


def test_long_prompt(model):
    torch.manual_seed(3)
    ids = torch.randint(1, 128, (1, 200))
    assert torch.equal(generate(model, ids, use_cache=True), generate(model, ids, use_cache=False))


def test_each_left_padded_row_generates_what_its_prompt_generates_alone(model):
    ids, mask = left_padded(PROMPTS)
    batch = generate(model, ids, mask)
    width = ids.shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]))
        assert batch[row, width:].tolist() == alone[0, len(prompt):].tolist()


def test_disable_adapter_generates_like_the_base_model(model):
    ids, mask = left_padded(PROMPTS)
    with model.disable_adapter():
        disabled = generate(model, ids, mask, num_beams=2)
    base = model.get_base_model()
    # the same weights without QST: a fresh tiny model built from the same seed
    plain = tiny_causal_lm(pad_token_id=PAD)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), _backbone_state(base).values()))
    expected = plain.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=24,
                              do_sample=False, num_beams=2)
    assert torch.equal(disabled, expected)


def _backbone_state(model):
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".qst_side." not in k}


def test_beam_search_reorders_the_side_caches():
    # beams of one prompt diverge, so reordering matters; a side cache left unreordered would change the tokens
    model = trained_model()
    ids = torch.tensor([PROMPTS[0]])
    out = model.generate(input_ids=ids, num_beams=4, num_return_sequences=4, max_new_tokens=20, do_sample=False,
                         pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    uncached = model.generate(input_ids=ids, num_beams=4, num_return_sequences=4, max_new_tokens=20,
                              do_sample=False, pad_token_id=PAD, use_cache=False)
    assert torch.equal(out.sequences, uncached)


def test_manual_decoding_loop_with_either_cache_keyword(model):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, torch.tensor([[7, 8]])], dim=1)).logits[:, -1]
        for keyword in ("cache", "past_key_values"):
            first = model(input_ids=ids, use_cache=True)
            cache = first.cache
            assert isinstance(cache, QSTCache) and set(cache.side) == {"default"}
            step = model(input_ids=torch.tensor([[7]]), use_cache=True, **{keyword: cache})
            step = model(input_ids=torch.tensor([[8]]), use_cache=True, **{keyword: step.cache})
            torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)


def test_a_manual_decoding_loop_passing_a_cache_under_a_config_without_use_cache(model):
    """``model.config.use_cache = False`` (set for training in QLoRA recipes) and a loop that passes its own cache
    without ``use_cache=True``: the trunk fills the cache it is given whatever the config says, and the base model (as
    LoRA) continues it; QST returned the backbone's cache without the side networks' halves, and the second step was
    refused as "a plain DynamicCache ... has no side-network state"."""
    from transformers import DynamicCache

    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, torch.tensor([[7, 8]])], dim=1), use_cache=False).logits[:, -1]
        model.config.use_cache = False
        try:
            step = model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
            assert isinstance(step.past_key_values, QSTCache)
            step = model(input_ids=torch.tensor([[7]]), past_key_values=step.past_key_values)
            step = model(input_ids=torch.tensor([[8]]), past_key_values=step.past_key_values)
            # no cache passed: none made, as the config says
            assert model(input_ids=ids).past_key_values is None
        finally:
            model.config.use_cache = True
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)


def test_the_callers_own_cache_continues_across_generate_calls(model):
    """transformers' multi-turn pattern: one DynamicCache passed to every generate call. generate keeps the caller's
    object (the backbone half), not the paired cache the model returned; the side halves are found from it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    first = generate(model, torch.tensor([PROMPTS[0]]), past_key_values=cache, max_new_tokens=5)
    history = torch.cat([first, torch.tensor([[7, 8, 9]])], dim=1)
    second = generate(model, history, past_key_values=cache, max_new_tokens=6)
    assert torch.equal(second, generate(model, history, max_new_tokens=6))


def test_a_generations_caches_are_freed_when_it_returns(model):
    """The side halves recorded on the backbone cache (for the caller's own cache object) must not refer back to it:
    a cycle would keep every generation's KV tensors alive until the garbage collector runs."""
    import gc
    import weakref

    from transformers import DynamicCache

    caches = []
    original = DynamicCache.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(weakref.ref(self))

    DynamicCache.__init__ = tracked
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=4)
        alive = sum(ref() is not None for ref in caches)
    finally:
        gc.enable()
        DynamicCache.__init__ = original
    assert caches and alive == 0


def test_several_threads_generate_at_once(model):
    """A server may run generate on one model from several Python threads; each forward's captured hidden states
    and side inputs are its own."""
    import threading

    prompts = [torch.tensor([p]) for p in PROMPTS] + [torch.tensor([PROMPTS[0][:5]])]
    expected = [generate(model, ids, max_new_tokens=8) for ids in prompts]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = [generate(model, prompts[i], max_new_tokens=8) for _ in range(3)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(torch.equal(out, expected[i]) for i, outs in results.items() for out in outs)


def test_token_type_ids_go_to_the_backbone(tiny_model_dir):
    """GPT-2 embeds token types with its token embedding, which the side trunk does not have; the embedding output the
    side network reads already holds them."""
    base = tiny_causal_lm("gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64).eval()
    ids = torch.tensor([PROMPTS[0]])
    types = torch.tensor([[0] * 5 + [1] * 5])
    with torch.no_grad():
        expected = base(input_ids=ids, token_type_ids=types).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, token_type_ids=types).logits, expected)  # the side output starts at 0
    train_steps(model, ids)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids, token_type_ids=types).logits, expected)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, token_type_ids=types).logits, expected)
    assert model.generate(input_ids=ids, token_type_ids=types, max_new_tokens=3, do_sample=False).shape == (1, 13)


def test_continuous_batching_is_refused_clearly(model):
    """transformers' generate_batch (TRL's use_transformers_continuous_batching) runs a paged cache of the backbone's
    layers only; it would swallow a failure deep in the forward and return empty completions."""
    from peft_qst import QSTUnsupportedModelError

    with pytest.raises(QSTUnsupportedModelError, match="continuous batching"):
        model.generate_batch(inputs=[PROMPTS[0]], max_new_tokens=4)


def test_a_plain_filled_cache_is_refused(model):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids, use_cache=True).cache
    assert not isinstance(plain, QSTCache)
    with pytest.raises(ValueError, match="no side-network state"):
        model(input_ids=torch.tensor([[7]]), cache=plain, use_cache=True)


def test_a_cache_filled_by_another_adapter_is_refused_naming_the_adapter(two_adapters):
    """A QSTCache holds the side state of the adapters that filled it: continued after set_adapter() to another one,
    whose side network never saw the history, it is refused naming that adapter, not run on an empty side cache."""
    ids, active = torch.tensor([PROMPTS[0]]), two_adapters.active_adapter
    try:
        two_adapters.set_adapter("a")
        with torch.no_grad():
            cache = two_adapters(input_ids=ids, use_cache=True).cache
        assert isinstance(cache, QSTCache)
        two_adapters.set_adapter("b")
        with pytest.raises(ValueError, match=rf"holds {ids.shape[1]} past tokens but no side-network state for "
                                             r"adapter\(s\) \['b'\]: it was filled with other adapters"):
            two_adapters(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)
        two_adapters.set_adapter("a")
        with torch.no_grad():
            two_adapters(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)  # its own adapter continues it
            # emptied, it holds no history, and the other adapter starts its own side state in it
            cache.reset()
            two_adapters.set_adapter("b")
            fresh = two_adapters(input_ids=ids).logits
            torch.testing.assert_close(two_adapters(input_ids=ids, cache=cache, use_cache=True).logits, fresh)
            assert cache.side_cache("b").get_seq_length() == ids.shape[1]
    finally:
        two_adapters.set_adapter(active)


def test_a_side_cache_ahead_of_the_backbone_half_is_refused(model):
    """A backbone half cropped outside the model (its layers cropped directly, not through the cache) leaves the side
    half holding tokens the backbone half no longer has: refused as a cache changed outside the model, not continued
    on a side history of other positions."""
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
        for layer in cache.backbone.layers:
            layer.crop(-2)
        assert cache.side_cache("default").get_seq_length() == cache.backbone.get_seq_length() + 2
        with pytest.raises(ValueError, match="cropped or changed outside the model"):
            model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)


def test_a_side_cache_left_behind_is_refused(model):
    """Tokens added to a paired cache with the adapter disabled move its backbone half only; continuing it with the
    adapter again would run the side network on a history it never saw."""
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(pad_token_id=PAD, do_sample=False, return_dict_in_generate=True)
    adapted = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **kwargs)
    mask = torch.cat([mask, torch.ones(mask.shape[0], 3, dtype=mask.dtype)], dim=1)
    with model.disable_adapter():
        base = model.generate(input_ids=adapted.sequences, attention_mask=mask, past_key_values=adapted.past_key_values,
                              max_new_tokens=3, **kwargs)
    cache = base.past_key_values
    assert cache.side_cache("default").get_seq_length() < cache.backbone.get_seq_length()
    mask = torch.cat([mask, torch.ones(mask.shape[0], 3, dtype=mask.dtype)], dim=1)
    with pytest.raises(ValueError, match="with adapters disabled or with another adapter active"):
        model.generate(input_ids=base.sequences, attention_mask=mask, past_key_values=cache, max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3)], ids=["greedy", "beam-search"])
def test_a_static_cache_generates_what_the_dynamic_cache_generates(model, mode):
    """generate(cache_implementation="static") builds the decoding masks over the preallocated length; the side
    network gets a static cache of that length too."""
    from transformers import StaticCache

    ids, mask = left_padded(PROMPTS)
    dynamic = generate(model, ids, mask, **mode)
    assert torch.equal(generate(model, ids, mask, cache_implementation="static", **mode), dynamic)
    if not mode:
        cache = StaticCache(config=model.config, max_cache_len=64)
        assert torch.equal(generate(model, ids, mask, past_key_values=cache), dynamic)
    with model.disable_adapter():
        assert not torch.equal(generate(model, ids, mask, cache_implementation="static", **mode), dynamic)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16-autocast", "fp16-autocast"])
def test_a_static_cache_under_an_autocast_to_another_dtype_than_the_side_network(autocast_dtype):
    """Under an autocast to another dtype than the side network's (a float32 side network, as ``side_dtype`` makes it
    for a float16 model so that ``Trainer(fp16=True)`` can unscale its gradients, under the Trainer's autocast, in
    which it evaluates and generates), the side trunk's keys are autocast's dtype, and the static side cache is
    allocated in it at the first step. The general path then cast that cache to the side dtype before the next step,
    and the static layer no longer took its keys ("index_copy_(): self and source expected to have the same dtype"):
    generation failed where the base model's ran. It now generates what the dynamic cache generates under the same
    autocast through the same modules."""
    from peft_qst.fast_path import fast_path_disabled

    model = trained_model()
    assert model.get_base_model().model.qst_side["default"].upsample.weight.dtype == torch.float32
    ids, mask = left_padded(PROMPTS)

    def under_autocast(**kwargs):
        with torch.autocast("cpu", dtype=autocast_dtype):
            return generate(model, ids, mask, max_new_tokens=8, **kwargs)

    with model.disable_adapter():
        base = under_autocast(cache_implementation="static")  # the base model generates so
    static = under_autocast(cache_implementation="static")
    with fast_path_disabled():  # (the fast path computes in float32 with autocast off: other roundings)
        assert torch.equal(static, under_autocast())
    assert not torch.equal(static, base), "the adapter should change the generation"


@pytest.mark.parametrize("kind", ["llama", "sliding-window", "sliding-and-full"])
def test_a_static_cache_with_an_eager_side_trunk_on_an_sdpa_backbone(kind):
    """With a static cache generate builds each step's 4-D masks for the backbone's attention (SDPA: boolean), and the
    side trunk gets them too. A side trunk switched to eager attention (README: ``...trunk.set_attn_implementation``)
    adds its mask to the scores, so it must get the additive form: with SDPA's booleans it attended to padding and to
    the cache's unfilled slots, and its logits silently differed from recomputation (by 0.04-0.1 here). Models with
    sliding and full layers get one mask per layer kind (a dict): each must reach the side trunk additive."""
    from peft_qst.fast_path import fast_path_disabled

    if kind == "llama":
        model = trained_model()
    else:
        model = trained_sliding_window_model(full_layers=kind == "sliding-and-full")[0]
    assert model.get_base_model().config._attn_implementation == "sdpa"
    model.get_base_model().model.qst_side["default"].trunk.set_attn_implementation("eager")
    ids, mask = left_padded(PROMPTS)
    static = generate(model, ids, mask, max_new_tokens=10, cache_implementation="static", return_dict_in_generate=True,
                      output_logits=True)
    with fast_path_disabled():
        recomputed = generate(model, ids, mask, max_new_tokens=10, use_cache=False, return_dict_in_generate=True,
                              output_logits=True)
    assert torch.equal(static.sequences, recomputed.sequences)
    for step, (mine, theirs) in enumerate(zip(static.logits, recomputed.logits)):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4, msg=lambda m: f"step {step}: {m}")


def trained_sliding_window_model(full_layers: bool = False):
    """A tiny Mistral with a 4-token sliding window and a trained QST adapter, and its config; with ``full_layers`` a
    tiny Qwen2 whose first layer attends through the window and whose second attends to everything."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, sliding_window=4, pad_token_id=PAD)
    if full_layers:
        config = AutoConfig.for_model("qwen2", use_sliding_window=True, max_window_layers=1, **sizes)
        assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    else:
        config = AutoConfig.for_model("mistral", **sizes)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), QSTConfig(task_type="CAUSAL_LM", r=4))
    torch.manual_seed(7)
    train_steps(model, torch.randint(1, 128, (4, 24)), steps=8, lr=3e-2)
    return model, config


@pytest.mark.parametrize("assistant", ["prompt-lookup", "assistant-model"])
def test_assisted_decoding_on_a_sliding_window_model(assistant):
    """Assisted and prompt-lookup decoding roll the cache back with crop(); sliding-window layers can be rolled back
    only if they recorded their past from the first token, in the side caches as in the backbone's."""
    from transformers import AutoModelForCausalLM

    model, config = trained_sliding_window_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])  # repeats, so that prompt lookup proposes drafts
    greedy = generate(model, ids, max_new_tokens=20)
    extra = (dict(prompt_lookup_num_tokens=3) if assistant == "prompt-lookup"
             else dict(assistant_model=AutoModelForCausalLM.from_config(config).eval()))
    assert torch.equal(generate(model, ids, max_new_tokens=20, **extra), greedy)
    with model.disable_adapter():
        assert not torch.equal(generate(model, ids, max_new_tokens=20), greedy)


def test_assisted_decoding_continues_the_cache_qst_returned():
    """A second turn of prompt-lookup decoding on the QSTCache the first turn returned: generate asks that cache
    (not a fresh backbone cache) to record its past, with transformers >= 5.25's ``recurrent_states_to_keep``."""
    import copy

    model, _ = trained_sliding_window_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    first = generate(model, ids, max_new_tokens=6, return_dict_in_generate=True)
    cache = first.cache if "cache" in first else first.past_key_values
    assert isinstance(cache, QSTCache)
    ids = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], 1)
    plain = generate(model, ids, max_new_tokens=12, past_key_values=copy.deepcopy(cache))
    assert torch.equal(generate(model, ids, max_new_tokens=12, past_key_values=cache, prompt_lookup_num_tokens=3),
                       plain)


@pytest.mark.parametrize("kind", ["llama", "sliding-window"])
def test_self_speculative_early_exit_generates_the_greedy_tokens(kind):
    """generate(assistant_early_exit=n) drafts with the model's own first n blocks (transformers lowers the config's
    num_hidden_layers meanwhile) and checks the drafts with full forwards: the adapted greedy tokens. The drafting
    forward used to fail (the side network found n blocks run, not all of them), and left the config lowered, so
    that every later generate of the model failed too."""
    from peft_qst.fast_path import fast_path_disabled

    model = trained_model() if kind == "llama" else trained_sliding_window_model()[0]
    layers = model.config.num_hidden_layers
    ids = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21, 3, 9, 5, 17, 33]])
    with fast_path_disabled():
        greedy = generate(model, ids, use_cache=False, max_new_tokens=16)
    for exit_layer in range(1, layers):
        assert torch.equal(generate(model, ids, max_new_tokens=16, assistant_early_exit=exit_layer), greedy)
        assert model.config.num_hidden_layers == layers
    assert torch.equal(generate(model, ids, max_new_tokens=16), greedy)
    with model.disable_adapter():
        assert not torch.equal(generate(model, ids, max_new_tokens=16), greedy)


def test_a_num_hidden_layers_left_lowered_outside_drafting_does_not_drop_the_adapter():
    """transformers lowers the config's num_hidden_layers while generate(assistant_early_exit=n) drafts, and restores
    it without ``finally``: a generate interrupted while drafting (here by a logits processor, which the drafts run
    too; in a notebook, Ctrl-C) leaves it lowered, as does a caller running a truncated model. Every later forward was
    taken for a draft and returned the base model's truncated outputs, the adapter dropped silently. It is refused,
    naming the count and how to restore it; restored, the model gives its adapted logits again."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from peft_qst import QSTUnsupportedModelError

    class Interrupted(Exception):
        pass

    class Interrupt(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise Interrupted

    model = trained_model()
    layers = model.config.num_hidden_layers
    ids = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    with pytest.raises(Interrupted):
        generate(model, ids, assistant_early_exit=1, logits_processor=LogitsProcessorList([Interrupt()]))
    assert model.config.num_hidden_layers == 1  # transformers' own: left lowered
    with torch.no_grad(), pytest.raises(
        QSTUnsupportedModelError, match=rf"num_hidden_layers is 1, lower than the {layers} blocks.*"
        rf"model.config.num_hidden_layers = {layers}"
    ):
        model(input_ids=ids)
    model.config.num_hidden_layers = layers
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted)
    assert torch.equal(generate(model, ids, max_new_tokens=8, assistant_early_exit=1),
                       generate(model, ids, max_new_tokens=8))


def test_a_lowered_num_hidden_layers_counts_as_drafting_only_in_transformers_early_exit_generator():
    """Only transformers' ``EarlyExitCandidateGenerator.get_candidates`` drafts on the lowered count: a forward from
    another ``get_candidates`` (a candidate generator of the caller's, or assisted decoding's) with the count left
    lowered is refused as any other such forward is, not run as the base model's early exit."""
    from peft_qst import QSTUnsupportedModelError

    class CandidateGenerator:  # not transformers' EarlyExitCandidateGenerator
        def get_candidates(self, model, ids):
            return model(input_ids=ids)

    model = trained_model()
    layers = model.config.num_hidden_layers
    model.config.num_hidden_layers = 1
    try:
        with torch.no_grad(), pytest.raises(QSTUnsupportedModelError, match="num_hidden_layers is 1"):
            CandidateGenerator().get_candidates(model, torch.tensor([[5, 17, 33, 2]]))
    finally:
        model.config.num_hidden_layers = layers


# --------------------------------------------------------------------------------------------------------------------
# mixed-adapter batches
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapters():
    return trained_model(adapters=("a", "b"))


ROUTES = ["a", "b", "__base__"]


def _per_adapter(model, fn):
    results = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        results[name] = fn()
    with model.disable_adapter():
        results["__base__"] = fn()
    model.set_adapter("a")
    return results


def test_mixed_batch_forward(two_adapters):
    ids, mask = left_padded(PROMPTS)
    calls = []
    hook = two_adapters.get_base_model().model.base_layer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        mixed = two_adapters(input_ids=ids, attention_mask=mask, adapter_names=ROUTES).logits
    hook.remove()
    assert len(calls) == 1, "the backbone runs once for the whole batch"
    with torch.no_grad():
        alone = _per_adapter(two_adapters, lambda: two_adapters(input_ids=ids, attention_mask=mask).logits)
    for row, name in enumerate(ROUTES):
        assert torch.equal(mixed[row], alone[name][row]), name
    assert not torch.equal(alone["a"], alone["b"])


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2)], ids=["greedy", "beam-search"])
def test_mixed_batch_generate(two_adapters, mode):
    ids, mask = left_padded(PROMPTS)
    mixed = generate(two_adapters, ids, mask, adapter_names=ROUTES, **mode)
    alone = _per_adapter(two_adapters, lambda: generate(two_adapters, ids, mask, **mode))
    for row, name in enumerate(ROUTES):
        assert torch.equal(mixed[row], alone[name][row]), name


def _routing_undone(model) -> bool:
    """No adapter_names call's routing is left on the model: its expansion note (peft_qst.model._route_expansion)
    and its forward hooks."""
    from peft_qst.model import _EXPANSION_KEY, _RowRouting
    from peft_qst.per_call import held_call_state

    state = held_call_state(model.get_base_model()) or {}
    hooks = [hook for module in model.modules() for hook in module._forward_pre_hooks.values()]
    return state.get(_EXPANSION_KEY) is None and not any(isinstance(hook, _RowRouting) for hook in hooks)


def _expanded_rows_match(mixed, alone, expand):
    """Each prompt's adapter routes all ``expand`` rows generate made of it (consecutive rows, as it repeats them)."""
    assert mixed.shape[0] == len(ROUTES) * expand
    for row in range(mixed.shape[0]):
        name = ROUTES[row // expand]
        assert torch.equal(mixed[row], alone[name][row]), (row, name)


@pytest.mark.parametrize(
    "mode, expand",
    [
        (dict(generation_config=GenerationConfig(num_beams=2)), 1),
        (dict(generation_config=GenerationConfig(num_beams=3, num_return_sequences=2)), 2),
        ("model's generation_config", 1),
    ],
    ids=["num_beams-in-generation_config", "num_return_sequences-of-beams", "model-generation_config"],
)
def test_mixed_batch_beams_set_outside_generate_keywords(two_adapters, mode, expand):
    """generate expands the batch for a num_beams that no keyword of generate names (a generation_config argument,
    the model's own generation_config): adapter_names had one entry per prompt for a batch of prompts x beams.
    ``expand``: the sequences returned per prompt."""
    ids, mask = left_padded(PROMPTS)
    saved = two_adapters.generation_config.num_beams
    if mode == "model's generation_config":
        two_adapters.generation_config.num_beams, mode = 2, {}
    try:
        mixed = generate(two_adapters, ids, mask, adapter_names=ROUTES, **mode)
        alone = _per_adapter(two_adapters, lambda: generate(two_adapters, ids, mask, **mode))
    finally:
        two_adapters.generation_config.num_beams = saved
    _expanded_rows_match(mixed, alone, expand)


@pytest.mark.parametrize("where", ["keyword", "generation_config"])
def test_mixed_batch_sampling_num_return_sequences(two_adapters, where):
    """Sampling with num_return_sequences=2 gives two rows per prompt, both from that prompt's adapter: each row
    samples what the same seed samples from its adapter alone (the draws of a row do not depend on the others')."""
    ids, mask = left_padded(PROMPTS)
    mode = dict(do_sample=True, top_k=20, num_return_sequences=2)
    if where == "generation_config":  # do_sample stays a keyword too: the helper's default would override the config's
        mode = dict(generation_config=GenerationConfig(**mode), do_sample=True)
    mixed = generate(two_adapters, ids, mask, seed=7, adapter_names=ROUTES, **mode)
    alone = _per_adapter(two_adapters, lambda: generate(two_adapters, ids, mask, seed=7, **mode))
    _expanded_rows_match(mixed, alone, expand=2)
    assert not torch.equal(mixed[0], mixed[1]), "the two samples of a prompt should differ"
    assert _routing_undone(two_adapters), "the routing is undone"


def test_mixed_batch_refuses_names_per_expanded_row(two_adapters):
    """adapter_names takes one name per prompt, as PEFT's LoRA does; names already repeated for the beams are refused
    with a message saying so."""
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="one adapter name per prompt"):
        generate(two_adapters, ids, mask, adapter_names=[n for n in ROUTES for _ in range(2)], num_beams=2)
    assert _routing_undone(two_adapters), "the routing is undone"


def _mixed_generate_running_once(model, ids, mask, during):
    """``generate(adapter_names=ROUTES)`` with beams, calling ``during()`` once from a stopping criterion while it runs
    (as a criterion, logits processor or streamer holding the model can); each row must come out as that adapter's
    generation alone. Returns those generations ({adapter name: sequences})."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    calls = []

    class Once(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if not calls:
                calls.append(during())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    mixed = generate(model, ids, mask, adapter_names=ROUTES, num_beams=2,
                     stopping_criteria=StoppingCriteriaList([Once()]))
    assert calls, "the stopping criterion never ran"
    alone = _per_adapter(model, lambda: generate(model, ids, mask, num_beams=2))
    for row, name in enumerate(ROUTES):
        assert torch.equal(mixed[row], alone[name][row]), name
    return alone


def test_a_copy_taken_during_a_mixed_batch_generate_keeps_none_of_its_routing(two_adapters, tmp_path):
    """A stopping criterion (or logits processor, streamer, another thread) that deep-copies or pickles the model it
    holds does so while generate(adapter_names=...) runs. The copy carried that call's routing (the forward hooks
    and an instance attribute shadowing _expand_inputs_for_generation): its plain forwards kept running the rows
    through that call's adapters, silently, and its beam search was refused for a wrong count of adapter names;
    torch.save(model) failed on the hook, a local function. Copies now route nothing, and the call itself is
    unchanged."""
    import copy
    import io

    ids, mask = left_padded(PROMPTS)
    taken = {}

    def snapshot():
        taken["deepcopy"] = copy.deepcopy(two_adapters)
        buffer = io.BytesIO()
        torch.save(two_adapters, buffer)
        buffer.seek(0)
        taken["pickle"] = torch.load(buffer, weights_only=False)

    alone = _mixed_generate_running_once(two_adapters, ids, mask, snapshot)
    assert _routing_undone(two_adapters)
    with torch.no_grad():
        plain = two_adapters(input_ids=ids, attention_mask=mask).logits
    for how, model in taken.items():
        assert _routing_undone(model) and "_expand_inputs_for_generation" not in model.get_base_model().__dict__, how
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain), how
        assert torch.equal(generate(model, ids[:1], mask[:1], num_beams=2), alone["a"][:1]), how


def test_a_copy_generating_during_a_mixed_batch_generate_leaves_both_calls_their_own_rows(two_adapters):
    """Copies and pickles of a model get per-call state of their own (peft_qst.per_call): a copy taken during
    generate(adapter_names=...) and generating itself meanwhile (a stopping criterion or streamer that runs a copy of
    the model it holds) does not see the running call's row routing. Shared, the copy's beam search expanded the
    original call's adapter names and was refused for their count ("adapter_names has 6 entries for 1 prompts")."""
    import copy

    ids, mask = left_padded(PROMPTS)
    taken = {}

    def copy_and_generate():
        taken["copy"] = copy.deepcopy(two_adapters)
        taken["generated"] = generate(taken["copy"], ids[:1], mask[:1], num_beams=2)

    alone = _mixed_generate_running_once(two_adapters, ids, mask, copy_and_generate)
    assert torch.equal(taken["generated"], alone["a"][:1])
    assert _routing_undone(two_adapters) and _routing_undone(taken["copy"])


def test_a_mixed_batch_generate_routes_no_other_threads_forwards(two_adapters):
    """Several threads may run one model at once. While generate(adapter_names=...) ran in one thread, its routing
    hooks on the shared modules also routed another thread's forwards by its names: a plain forward (adapter "a" for
    every row) ran its rows through "a", "b" and the base model, silently, and another thread's own adapter_names
    were overridden. Each call now routes its own thread's forwards only. The other thread runs while the first is
    held inside its generate by a stopping criterion (no timing involved)."""
    import threading

    from transformers import StoppingCriteria, StoppingCriteriaList

    ids, mask = left_padded(PROMPTS)
    other = ["b", "__base__", "a"]
    with torch.no_grad():
        plain = two_adapters(input_ids=ids, attention_mask=mask).logits
        alone = _per_adapter(two_adapters, lambda: two_adapters(input_ids=ids, attention_mask=mask).logits)
    inside, release, results = threading.Event(), threading.Event(), {}

    class Hold(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if not inside.is_set():
                inside.set()
                release.wait()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generating():
        results["mixed"] = generate(two_adapters, ids, mask, adapter_names=ROUTES, num_beams=2,
                                    stopping_criteria=StoppingCriteriaList([Hold()]))

    thread = threading.Thread(target=generating)
    thread.start()
    try:
        assert inside.wait(timeout=120), "the generate thread never reached its first step"
        with torch.no_grad():
            results["plain"] = two_adapters(input_ids=ids, attention_mask=mask).logits
            results["other"] = two_adapters(input_ids=ids, attention_mask=mask, adapter_names=other).logits
    finally:
        release.set()
        thread.join()
    assert torch.equal(results["plain"], plain)
    for row, name in enumerate(other):
        assert torch.equal(results["other"][row], alone[name][row]), name
    expected = _per_adapter(two_adapters, lambda: generate(two_adapters, ids, mask, num_beams=2))
    for row, name in enumerate(ROUTES):
        assert torch.equal(results["mixed"][row], expected[name][row]), name
    assert _routing_undone(two_adapters)

def test_mixed_batch_refusals(two_adapters):
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['c'\]"):
        two_adapters(input_ids=ids, attention_mask=mask, adapter_names=["a", "c", "b"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        two_adapters(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])
    # a bare name (not a list of one per row), and names that are not strings
    for names in ("a", ["a", 3, "b"]):
        with pytest.raises(TypeError, match=f"one adapter name per row, got {re.escape(repr(names))}"):
            two_adapters(input_ids=ids, attention_mask=mask, adapter_names=names)
    two_adapters.train()
    try:
        # the refusal names the fix (LoRA's own message does not)
        with pytest.raises(ValueError, match=r"training mode.*Call model\.eval\(\) first"):
            two_adapters(input_ids=ids, attention_mask=mask, adapter_names=ROUTES)
    finally:
        two_adapters.eval()


# --------------------------------------------------------------------------------------------------------------------
# the real 4-bit SmolLM2
# --------------------------------------------------------------------------------------------------------------------


def first_divergence(a: torch.Tensor, b: torch.Tensor):
    for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        if x != y:
            return i
    return None


#: tokens generated on the real model (an uncached step runs the whole sequence: 40 uncached tokens took about a minute)
SMOLLM2_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2_trained(smollm2_dir):
    """The real 4-bit SmolLM2 with a QST adapter trained a few steps on a fixed text (so that it changes the output),
    a chat prompt, and its greedy cached generation with scores: shared by the two tests below, as loading, training
    and generating on the real model are most of their time."""
    from transformers import AutoTokenizer

    from .conftest import load_smollm2_4bit

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = get_peft_model(load_smollm2_4bit(smollm2_dir), QSTConfig(task_type="CAUSAL_LM"))
    text = tokenizer("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt").input_ids
    train_steps(model, text)
    chat = [{"role": "user", "content": "Name three rivers in Europe."}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    cached = model.generate(**inputs, max_new_tokens=SMOLLM2_NEW_TOKENS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    return model, inputs, cached


@pytest.mark.smollm2
def test_smollm2_4bit_cached_equals_uncached(smollm2_trained):
    model, inputs, cached_run = smollm2_trained
    prompt_length = inputs["input_ids"].shape[1]
    uncached_run = model.generate(**inputs, max_new_tokens=SMOLLM2_NEW_TOKENS, do_sample=False, use_cache=False,
                                  output_scores=True, return_dict_in_generate=True)
    with model.disable_adapter():
        base = model.generate(**inputs, max_new_tokens=SMOLLM2_NEW_TOKENS, do_sample=False)
    cached, uncached = cached_run.sequences[0, prompt_length:], uncached_run.sequences[0, prompt_length:]
    assert not torch.equal(cached, base[0, prompt_length:]), "the adapter should change the generation"
    step = first_divergence(cached, uncached)
    if step is not None:
        # allowed only at a genuine near-tie: bf16 logits of the two tokens within bf16 resolution of each other
        scores = uncached_run.scores[step][0]
        gap = (scores[uncached[step]] - scores[cached[step]]).abs().item()
        assert gap <= 2 ** -7 * scores.abs().max().item(), f"diverged at step {step} with a logit gap of {gap}"


@pytest.mark.smollm2
def test_smollm2_4bit_self_speculative_early_exit(smollm2_trained):
    """assistant_early_exit on the real 4-bit SmolLM2 with a trained adapter: the drafts of its first 10 blocks are
    checked by the adapted model, which generates its own greedy tokens (a difference allowed only at a bf16 near-tie
    of the top two logits, as for the cache above)."""
    model, inputs, plain = smollm2_trained
    prompt_length = inputs["input_ids"].shape[1]
    drafted = model.generate(**inputs, max_new_tokens=SMOLLM2_NEW_TOKENS, do_sample=False, assistant_early_exit=10)
    assert model.config.num_hidden_layers == 30
    expected, got = plain.sequences[0, prompt_length:], drafted[0, prompt_length:]
    step = first_divergence(got, expected)
    if step is not None:
        scores = plain.scores[step][0]
        gap = (scores[expected[step]] - scores[got[step]]).abs().item()
        assert gap <= 2 ** -7 * scores.abs().max().item(), f"diverged at step {step} with a logit gap of {gap}"


def test_a_static_cache_of_a_model_with_sliding_and_full_attention_layers():
    """A static cache of a model whose layers mix sliding-window and full attention (Qwen2 with
    ``use_sliding_window``) preallocates the window for its sliding layers and the whole length for the others: the
    side network's static cache is as long as the longest of them, so that its full-attention layers hold the whole
    generation, and static generation gives the dynamic cache's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=PAD, use_sliding_window=True, sliding_window=4,
        max_window_layers=1,
    )
    assert sorted(set(config.layer_types)) == ["full_attention", "sliding_attention"]
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, torch.randint(1, 128, (4, 24), generator=torch.Generator().manual_seed(1)), steps=4, lr=3e-2)
    ids, mask = left_padded(PROMPTS)
    dynamic = generate(model, ids, mask, max_new_tokens=12)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=12, cache_implementation="static"), dynamic)
    with model.disable_adapter():
        assert not torch.equal(generate(model, ids, mask, max_new_tokens=12), dynamic)
