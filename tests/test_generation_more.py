"""More generate() paths: cached generation equals uncached decoding, and the fast path follows weights that changed
between two turns of one cache."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_qst import QSTCache

from .conftest import train_steps
from .test_generation import PAD, PROMPTS, left_padded, trained_model


@pytest.fixture(scope="module")
def model():
    return trained_model()


def _generate(model, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("do_sample", False)
    return model.generate(pad_token_id=PAD, **kwargs)


@torch.no_grad()
def _greedy_by_full_forwards(model, ids, mask, steps):
    """Greedy decoding by repeated full forwards without a cache (left padding: positions from the mask)."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=True, num_return_sequences=3),
        dict(num_beams=4, num_return_sequences=3, length_penalty=-1.0, early_stopping=True, eos_token_id=[7, 9]),
        dict(min_new_tokens=10, eos_token_id=[3, 9]),
        dict(suppress_tokens=[3, 9, 21]),
    ],
    ids=["sampling-3-returns", "beams-3-returns", "min-new-tokens", "suppress-tokens"],
)
def test_cached_equals_uncached_in_more_modes(model, mode):
    from peft_qst.fast_path import fast_path_disabled

    ids, mask = left_padded(PROMPTS)
    cached = _generate(model, input_ids=ids, attention_mask=mask, use_cache=True, **mode)  # the fast path
    with fast_path_disabled():  # the transformers modules, without a cache
        uncached = _generate(model, input_ids=ids, attention_mask=mask, use_cache=False, **mode)
    assert torch.equal(cached, uncached)


def test_inputs_embeds_and_chunked_prefill_generate_the_greedy_tokens(model):
    ids, mask = left_padded(PROMPTS)
    expected = _greedy_by_full_forwards(model, ids, mask, 10)
    embeds = model.get_input_embeddings()(ids).detach()
    assert torch.equal(_generate(model, inputs_embeds=embeds, attention_mask=mask), expected[:, ids.shape[1]:])
    assert torch.equal(_generate(model, inputs_embeds=embeds, input_ids=ids, attention_mask=mask), expected)
    assert torch.equal(_generate(model, input_ids=ids, attention_mask=mask, prefill_chunk_size=3), expected)


@pytest.mark.parametrize("change", ["optimizer-step", "load_adapter"])
def test_the_next_turn_after_the_weights_changed_runs_on_the_new_weights(tmp_path, change):
    """Two turns of one cache with the adapter's weights changed in between (online learning, a chat that keeps
    training; a checkpoint loaded into the adapter, as trainers do): the second turn's new tokens run on the weights
    as they are now, on the fast path as on the general path. The fast path skips its weight check for forwards that
    continue a cache it checked; it must not skip it across an optimizer step or an adapter load, or the turn runs on
    the packed weights from before (and, worse, on the new weights whenever some other sequence happened to start in
    between)."""
    from transformers import DynamicCache

    from peft_qst.fast_path import fast_path_disabled

    model = trained_model()
    if change == "load_adapter":
        other = trained_model()
        torch.manual_seed(56)
        train_steps(other, torch.randint(1, 128, (4, 24)), steps=2, lr=3e-2)
        other.save_pretrained(tmp_path)
    ids, mask = left_padded(PROMPTS)
    cache = DynamicCache()
    first = _generate(model, input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6)
    if change == "load_adapter":
        model.load_adapter(str(tmp_path), adapter_name="default")
    else:
        torch.manual_seed(56)
        train_steps(model, torch.randint(1, 128, (4, 24)), steps=1, lr=3e-2)
    ids = torch.cat([first, torch.tensor([[7, 8, 9, 10]] * len(PROMPTS))], 1)
    mask = torch.cat([mask, torch.ones(len(PROMPTS), 10, dtype=mask.dtype)], 1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True,
                  output_logits=True)
    general_cache = copy.deepcopy(cache)
    fast = _generate(model, past_key_values=cache, **kwargs)
    with fast_path_disabled():
        general = _generate(model, past_key_values=general_cache, **kwargs)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(general.logits), atol=2e-5, rtol=1e-4)
    assert torch.equal(fast.sequences, general.sequences)


def test_an_optimizer_stepping_another_model_during_generation_keeps_the_packed_weights(monkeypatch):
    """The fast path's weight check watches process-wide counters; an optimizer stepping an unrelated model while this
    one decodes (training in another thread) moves them at every token. Each such step makes the next decoding step
    check the weights again, but the side weights did not change: they are not packed again, and the tokens are the
    general path's."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from peft_qst import fast_path

    model = trained_model()
    other = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)

    class StepAnotherModel(LogitsProcessor):
        def __call__(self, input_ids, scores):
            with torch.enable_grad():  # generate runs under no_grad
                other(torch.ones(1, 4)).sum().backward()
            optimizer.step()
            return scores

    packings = []
    original_init = fast_path.PackedSideWeights.__init__

    def counting_init(self, *args, **kwargs):
        packings.append(1)
        original_init(self, *args, **kwargs)

    ids, mask = left_padded(PROMPTS)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, logits_processor=LogitsProcessorList(
        [StepAnotherModel()]))
    _generate(model, **kwargs)  # packs the weights once
    monkeypatch.setattr(fast_path.PackedSideWeights, "__init__", counting_init)
    fast = _generate(model, **kwargs)
    with fast_path.fast_path_disabled():
        general = _generate(model, **kwargs)
    assert torch.equal(fast, general)
    assert packings == []


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_reset_cache_is_reused_like_a_fresh_one(kind):
    """``cache.reset()`` (how a preallocated static cache is reused for the next prompt) empties every half of the
    QSTCache a generation returned, side caches too: generating into it again gives what a fresh generation gives."""
    from transformers import DynamicCache, StaticCache

    model = trained_model()
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True,
                  output_logits=True)
    cache = StaticCache(config=model.config, max_cache_len=32) if kind == "static" else DynamicCache()
    cache = _generate(model, past_key_values=cache, **kwargs).past_key_values
    assert repr(cache).startswith("QSTCache(backbone=") and repr(cache).endswith("side=['default'])")
    cache.reset()
    assert int(cache.get_seq_length()) == 0 and int(cache.side_cache("default").get_seq_length()) == 0
    again, fresh = _generate(model, past_key_values=cache, **kwargs), _generate(model, **kwargs)
    assert torch.equal(again.sequences, fresh.sequences)
    for step, expected in zip(again.logits, fresh.logits):
        torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind, first, again",
    [
        *[(kind, dict(r=4), dict(r=4)) for kind in ("static", "dynamic")],
        *[(kind, dict(r=4), dict(r=2)) for kind in ("static", "dynamic")],
        ("dynamic", dict(r=4, copy_heads=2, copy_head_dim=8), dict(r=4, copy_heads=2, copy_head_dim=8)),
    ],
    ids=["static-same-shape", "dynamic-same-shape", "static-another-shape", "dynamic-another-shape", "copy-heads"],
)
def test_a_reset_cache_is_reused_like_a_fresh_one_after_its_adapter_was_added_again(kind, first, again):
    """A reset cache holds no tokens, so it starts afresh also after its adapter was deleted and added again (or
    loaded from other weights) between the two generations. Its side halves kept the record of the side network
    that filled them before the reset, and the new generation was refused at its second step as continuing another
    network's history, although all of that history was its own first step."""
    from peft import get_peft_model
    from transformers import DynamicCache, StaticCache

    from peft_qst import QSTConfig

    from .conftest import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(pad_token_id=PAD), QSTConfig(task_type="CAUSAL_LM", **first),
                           adapter_name="a")
    model.add_adapter("b", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.eval()
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True)
    cache = StaticCache(config=model.config, max_cache_len=32) if kind == "static" else DynamicCache()
    cache = _generate(model, past_key_values=cache, **kwargs).past_key_values
    cache.reset()
    model.set_adapter("b")
    model.delete_adapter("a")
    model.add_adapter("a", QSTConfig(task_type="CAUSAL_LM", **again))
    model.set_adapter("a")
    reused = _generate(model, past_key_values=cache, **kwargs).sequences
    assert torch.equal(reused, _generate(model, **kwargs).sequences)


@pytest.mark.parametrize("owner", ["callers-own", "returned"])
@pytest.mark.parametrize("change", ["reorder_cache", "batch_select_indices", "crop", "batch_repeat_interleave"])
def test_the_callers_own_cache_changed_between_turns_continues_like_a_fresh_generation(change, owner):
    """The caller's own cache object is the backbone half; its layout methods, called between two turns (crop to
    regenerate a reply, batch_select_indices to drop finished rows, a reorder), must move the side halves recorded on
    it too, as they do under LoRA. Left behind, a reorder continued every row with another row's side history (wrong
    logits and tokens, no error), and the other changes failed with shape errors or a refusal. The same holds for the
    QSTCache a generation returns (``owner="returned"``), whose layout methods move each of its halves."""
    from transformers import DynamicCache

    model = trained_model()
    ids, mask = left_padded(PROMPTS)
    cache = DynamicCache() if owner == "callers-own" else None
    output = _generate(model, input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                       return_dict_in_generate=True)
    first = output.sequences
    if cache is None:
        cache = output.past_key_values
        assert isinstance(cache, QSTCache)
    history, history_mask = first, torch.cat([mask, torch.ones(len(PROMPTS), 4, dtype=mask.dtype)], 1)
    if change == "reorder_cache":
        rows = torch.tensor([2, 0, 1])
        cache.reorder_cache(rows)
    elif change == "batch_select_indices":
        rows = torch.tensor([0, 2])
        cache.batch_select_indices(rows)
    elif change == "batch_repeat_interleave":
        rows = torch.arange(len(PROMPTS)).repeat_interleave(2)
        cache.batch_repeat_interleave(2)
    else:  # drop the last two tokens of the history (the cache holds all but the last generated token)
        rows = torch.arange(len(PROMPTS))
        cache.crop(-2)
        history, history_mask = history[:, :-2], history_mask[:, :-2]
    history, history_mask = history[rows], history_mask[rows]
    ids = torch.cat([history, torch.full((len(rows), 2), 7)], 1)
    mask = torch.cat([history_mask, torch.ones(len(rows), 2, dtype=mask.dtype)], 1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                  output_logits=True)
    continued = _generate(model, past_key_values=cache, **kwargs)
    fresh = _generate(model, **kwargs)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(fresh.logits), atol=2e-5, rtol=1e-4)
    assert torch.equal(continued.sequences, fresh.sequences)


def _assert_continuation_refused_and_fresh_cache_generates(model, cache, history, mask, computed_by: str):
    """Adapter "a" made active again after its re-adding: continuing ``cache`` is refused, naming what computed its
    side state and the fix; generation without it goes on."""
    model.set_adapter("a")
    model.eval()
    with pytest.raises(ValueError, match=f"side-network state for adapter 'a' was computed by {computed_by}.*"
                       "deleted and added again.*fresh cache"):
        _generate(model, input_ids=history, attention_mask=mask, max_new_tokens=3, past_key_values=cache)
    fresh = _generate(model, input_ids=history, attention_mask=mask, max_new_tokens=3)
    assert fresh.shape == (len(PROMPTS), history.shape[1] + 3)


def _assert_continues_as_fresh(model, cache, history, mask):
    """Two more prompt tokens after ``history``: generation continuing ``cache`` gives the logits and tokens of a
    fresh generation from the whole history."""
    kwargs = dict(input_ids=torch.cat([history, torch.full((len(PROMPTS), 2), 7)], 1),
                  attention_mask=torch.cat([mask, torch.ones(len(PROMPTS), 2, dtype=mask.dtype)], 1),
                  max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    continued = _generate(model, past_key_values=cache, **kwargs)
    fresh = _generate(model, **kwargs)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(fresh.logits), atol=2e-5, rtol=1e-4)
    assert torch.equal(continued.sequences, fresh.sequences)


def _first_turn(model, cache_kind):
    """A first turn of four new tokens: the cache to continue, the history and its attention mask."""
    from transformers import DynamicCache

    ids, mask = left_padded(PROMPTS)
    if cache_kind == "returned":
        out = _generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True)
        cache, history = (out.cache if "cache" in out else out.past_key_values), out.sequences
    else:
        cache = DynamicCache()
        history = _generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, past_key_values=cache)
    return cache, history, torch.cat([mask, torch.ones(len(PROMPTS), 4, dtype=mask.dtype)], 1)


@pytest.mark.parametrize("cache_kind", ["returned", "callers-own"])
@pytest.mark.parametrize(
    "shape, changed",
    [(dict(r=2), "hidden_size 16 -> 32"), (dict(r=4, side_heads=2), "num_attention_heads 1 -> 2")],
    ids=["r", "side_heads"],
)
def test_a_cache_continued_after_its_adapter_was_added_again_in_another_shape_is_refused(cache_kind, shape, changed):
    """generate with adapter "a", delete_adapter("a"), add_adapter("a", ...) with another r or side_heads, and
    continue the old cache: its side keys and values were computed by the deleted side network. With another
    side_heads the continuation failed inside attention ("Sizes of tensors must match"); with another r, whose side
    blocks keep one key-value head of the same size on this model, it continued silently on the old network's
    history. Both are refused, naming the adapter, what changed and the fix; a fresh cache generates."""
    from peft import get_peft_model

    from peft_qst import QSTConfig

    from .conftest import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(pad_token_id=PAD), QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name="a")
    model.add_adapter("b", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.eval()
    cache, history, mask = _first_turn(model, cache_kind)
    model.set_adapter("b")
    model.delete_adapter("a")
    model.add_adapter("a", QSTConfig(task_type="CAUSAL_LM", **shape))
    _assert_continuation_refused_and_fresh_cache_generates(model, cache, history, mask, "a side network of another "
                                                           rf"shape than adapter 'a' has now \([^)]*{changed}")


def _saved_adapter(folder, seed):
    """A QST adapter "a" trained a little from ``seed`` and saved to ``folder``."""
    from peft import get_peft_model

    from peft_qst import QSTConfig

    from .conftest import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(pad_token_id=PAD), QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name="a")
    torch.manual_seed(seed)
    train_steps(model, torch.randint(1, 128, (4, 24)), steps=2, lr=3e-2)
    model.save_pretrained(folder)
    return folder / "a" if (folder / "a").is_dir() else folder


@pytest.mark.parametrize("cache_kind", ["returned", "callers-own"])
@pytest.mark.parametrize("how", ["add_adapter", "load_adapter-other-weights"])
def test_a_cache_continued_after_its_adapter_was_added_again_in_the_same_shape_is_refused(tmp_path, cache_kind, how):
    """generate with adapter "a", delete_adapter("a"), then add_adapter("a", the same config) or load_adapter of
    other saved weights into "a", and continue the old cache: the new side network has the shape of the deleted one,
    so the layout check passed, and the continuation attended silently to the deleted network's side keys and values
    (tokens neither network generates). Refused, naming the adapter and the fix; a fresh cache generates."""
    from peft import PeftModel

    from peft_qst import QSTConfig

    from .conftest import tiny_causal_lm

    folder = _saved_adapter(tmp_path / "first", seed=56)
    model = PeftModel.from_pretrained(tiny_causal_lm(pad_token_id=PAD), folder, adapter_name="a").eval()
    cache, history, mask = _first_turn(model, cache_kind)
    model.delete_adapter("a")
    if how == "add_adapter":
        model.add_adapter("a", QSTConfig(task_type="CAUSAL_LM", r=4))
    else:
        model.load_adapter(str(_saved_adapter(tmp_path / "other", seed=57)), adapter_name="a")
    _assert_continuation_refused_and_fresh_cache_generates(model, cache, history, mask, "another side network")


def test_a_cache_of_the_training_model_continued_by_its_saved_adapter_is_refused_naming_that(tmp_path):
    """A cache filled by the model that trained an adapter, continued by a model that loaded the adapter it saved
    (``PeftModel.from_pretrained``, as in a fresh process with the cache saved by ``torch.save``): the loaded side
    network takes the saved weights' digest as its identity, the training one had its own, so the continuation is
    refused (README: start a new cache there). The refusal said only that the adapter "was deleted and added again
    under the same name", which the user had not done; it names this case too, and the fix."""
    from peft import PeftModel, get_peft_model

    from peft_qst import QSTConfig

    from .conftest import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm(pad_token_id=PAD), QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name="a")
    torch.manual_seed(56)
    train_steps(model, torch.randint(1, 128, (4, 24)), steps=2, lr=3e-2)
    cache, history, mask = _first_turn(model.eval(), "callers-own")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_causal_lm(pad_token_id=PAD), str(tmp_path / "a"), adapter_name="a")
    loaded.eval()
    with pytest.raises(ValueError, match="adapter 'a' was computed by another side network.*loaded it from saved "
                       "weights .*filled by another model, such as the one that trained and saved them.*fresh cache"):
        _generate(loaded, input_ids=history, attention_mask=mask, max_new_tokens=3, past_key_values=cache)
    fresh = _generate(loaded, input_ids=history, attention_mask=mask, max_new_tokens=3)
    assert fresh.shape == (len(PROMPTS), history.shape[1] + 3)

@pytest.mark.parametrize("cache_kind", ["returned", "callers-own"])
@pytest.mark.parametrize(
    "how",
    ["same-model", "load_adapter-same-folder", "from_pretrained-again", "transformers-load_adapter", "deepcopy",
     "torch.save"],
)
def test_a_cache_continues_with_the_side_network_that_filled_it_or_the_same_saved_weights(tmp_path, cache_kind, how):
    """The identity check refuses only another side network: the adapter that filled the cache, a copy of the model
    (deepcopy, torch.save and torch.load), the same saved adapter loaded again after delete_adapter, or into another
    model by PEFT or by transformers (as in a fresh process that loads the adapter and a cache saved with torch.save)
    continue it, and the continuation equals generating from the whole history without a cache."""
    import io

    from peft import PeftModel

    from .conftest import copy_of, tiny_causal_lm

    folder = _saved_adapter(tmp_path, seed=56)
    model = PeftModel.from_pretrained(tiny_causal_lm(pad_token_id=PAD), folder, adapter_name="a").eval()
    cache, history, mask = _first_turn(model, cache_kind)
    if how == "load_adapter-same-folder":
        model.add_adapter("b", model.peft_config["a"])
        model.set_adapter("b")
        model.delete_adapter("a")
        model.load_adapter(str(folder), adapter_name="a")
        model.set_adapter("a")
        model.delete_adapter("b")
    elif how in ("from_pretrained-again", "transformers-load_adapter"):
        buffer = io.BytesIO()
        torch.save(cache, buffer)
        buffer.seek(0)
        cache = torch.load(buffer, weights_only=False)
        if how == "from_pretrained-again":
            model = PeftModel.from_pretrained(tiny_causal_lm(pad_token_id=PAD), folder, adapter_name="a")
        else:
            model = tiny_causal_lm(pad_token_id=PAD)
            model.load_adapter(str(folder), adapter_name="a")
    elif how in ("deepcopy", "torch.save"):
        model = copy_of(model, how)
    _assert_continues_as_fresh(model.eval(), cache, history, mask)


def test_a_cache_continues_on_the_same_saved_adapter_over_a_base_given_a_pad_token_id_since(tmp_path):
    """Token ids are no sizes: the same saved adapter loaded onto the same base model whose config had no
    pad_token_id when the cache was filled and has one now continues that cache, as a fresh generation from the whole
    history (the side trunk's config keeps a padding index where the base has one)."""
    from peft import PeftModel

    from .conftest import tiny_causal_lm

    folder = _saved_adapter(tmp_path, seed=56)
    base = tiny_causal_lm(pad_token_id=PAD)
    base.config.pad_token_id = None
    model = PeftModel.from_pretrained(base, folder, adapter_name="a").eval()
    cache, history, mask = _first_turn(model, "returned")
    model = PeftModel.from_pretrained(tiny_causal_lm(pad_token_id=PAD), folder, adapter_name="a")
    _assert_continues_as_fresh(model.eval(), cache, history, mask)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_of_a_model_pickled_before_side_networks_had_an_identity_continue_each_others_caches(how):
    """A whole model pickled (``torch.save(model)``) by a version before side networks had an identity holds networks
    without one (written here by removing it, all that differs), which draw one when first asked. A copy made before
    that (``copy.deepcopy``, ``torch.save`` again) drew its own: a cache the loaded model filled was refused by its
    copy, and the copy's by it, as "computed by another side network", although both networks hold the same weights.
    The copy keeps the original's identity, as copies of today's models do, and continues the cache as a fresh
    generation from the whole history."""
    from peft_qst.side import QSTSideNetwork

    from .conftest import copy_of

    trained = trained_model()
    for module in trained.modules():
        if isinstance(module, QSTSideNetwork):
            del module.__dict__["_cache_identity"]
    loaded = copy_of(trained, "torch.save").eval()  # as this version reads the earlier version's pickle
    copied = copy_of(loaded, how).eval()
    for filled_by, continued_by in ((loaded, copied), (copied, loaded)):
        cache, history, mask = _first_turn(filled_by, "callers-own")
        _assert_continues_as_fresh(continued_by, cache, history, mask)


def test_generate_returns_the_adapted_logits_and_final_hidden_states(model):
    """return_dict_in_generate: each step's logits are the adapted model's forward logits (general path, no cache),
    and the last hidden-state entry is the adapted one the LM head read, as under LoRA; the others are the
    backbone's."""
    from peft_qst.fast_path import fast_path_disabled

    ids, mask = left_padded(PROMPTS)
    out = _generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True,
                    output_logits=True, output_scores=True, output_hidden_states=True)
    head = model.get_output_embeddings()
    for step, (logits, hidden) in enumerate(zip(out.logits, out.hidden_states)):
        step_mask = torch.cat([mask, torch.ones(len(PROMPTS), step, dtype=mask.dtype)], 1)
        with torch.no_grad(), fast_path_disabled():
            reference = model(input_ids=out.sequences[:, :ids.shape[1] + step], attention_mask=step_mask,
                              position_ids=(step_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                              output_hidden_states=True)
            torch.testing.assert_close(head(hidden[-1][:, -1]), logits)
        torch.testing.assert_close(logits, reference.logits[:, -1], atol=2e-5, rtol=1e-4)
        assert len(hidden) == len(reference.hidden_states)
        for mine, theirs in zip(hidden, reference.hidden_states):
            torch.testing.assert_close(mine[:, -1], theirs[:, -1], atol=2e-5, rtol=1e-4)
    assert all(torch.equal(s, l) for s, l in zip(out.scores, out.logits))


def _side_keys(cache):
    """The first layer's keys of every side half recorded on a caller's cache object."""
    from peft_qst.cache import _PAIRING_ATTR

    side, memory = cache.__dict__[_PAIRING_ATTR]
    return [half.layers[0].keys.clone() for half in (*side.values(), *memory.values())]


def test_a_cache_subclass_whose_override_calls_super_moves_the_side_caches_once(model):
    """A user's cache class that overrides a layout method and calls ``super()``: both methods are patched (the
    subclass's when its object is paired, transformers' ``Cache``'s at any QST forward with a cache), and each moved
    the side halves, so a reorder was applied to them twice (silently wrong logits, no error) and a crop cut twice as
    many tokens."""
    from transformers import DynamicCache

    class LoggingCache(DynamicCache):
        def reorder_cache(self, beam_idx):
            super().reorder_cache(beam_idx)

        def crop(self, tokens_to_remove):
            super().crop(tokens_to_remove)

    ids, mask = left_padded(PROMPTS)
    _generate(model, input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), max_new_tokens=2)
    cache = LoggingCache()
    first = _generate(model, input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4)
    before, backbone_before = _side_keys(cache), cache.layers[0].keys.clone()
    rows = torch.tensor([2, 0, 1])
    cache.reorder_cache(rows)
    assert torch.equal(cache.layers[0].keys, backbone_before[rows])
    for moved, was in zip(_side_keys(cache), before):
        assert torch.equal(moved, was[rows])
    cache.crop(-1)
    assert [keys.shape[-2] for keys in _side_keys(cache)] == [cache.get_seq_length()] * len(before)
    history = first[rows][:, :-1]
    history_mask = torch.cat([mask, torch.ones(len(PROMPTS), 3, dtype=mask.dtype)], 1)[rows]
    kwargs = dict(input_ids=torch.cat([history, torch.full((3, 2), 7)], 1),
                  attention_mask=torch.cat([history_mask, torch.ones(3, 2, dtype=mask.dtype)], 1), max_new_tokens=4,
                  return_dict_in_generate=True, output_logits=True)
    continued = _generate(model, past_key_values=cache, **kwargs)
    fresh = _generate(model, **kwargs)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(fresh.logits), atol=2e-5, rtol=1e-4)


def test_a_cache_loaded_in_a_fresh_process_moves_its_side_caches(model, tmp_path):
    """A caller's cache saved after a turn (torch.save) and loaded in a fresh process, where no QST forward has run
    yet: its class's layout methods were patched only at the first pairing recorded in that process, so a
    ``reorder_cache`` before the next turn left the side halves in the old order (silently wrong logits). Loading the
    recorded halves patches the class."""
    from transformers import DynamicCache

    from .conftest import run_python

    ids, mask = left_padded(PROMPTS)
    cache = DynamicCache()
    _generate(model, input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3)
    rows = torch.tensor([2, 0, 1])
    torch.save({"cache": cache, "rows": rows, "expected": [keys[rows] for keys in _side_keys(cache)]},
               tmp_path / "cache.pt")
    run_python(
        "import torch, peft_qst\n"
        "from peft_qst.cache import _PAIRING_ATTR\n"
        f"saved = torch.load({str(tmp_path / 'cache.pt')!r}, weights_only=False)\n"
        "cache = saved['cache']\n"
        "cache.reorder_cache(saved['rows'])\n"
        "side, memory = cache.__dict__[_PAIRING_ATTR]\n"
        "halves = [half.layers[0].keys for half in (*side.values(), *memory.values())]\n"
        "moved = all(torch.equal(h, e) for h, e in zip(halves, saved['expected'], strict=True))\n"
        "assert moved, 'the side halves were not reordered'\n"
    )


def test_the_side_caches_beside_a_configured_cache_keep_the_sliding_layers():
    """Only the caller's config-less ``DynamicCache()`` (all full-attention layers) gets a config-less side cache:
    beside generate's default cache, made from the model's config, the side cache keeps the side trunk's sliding
    layers, which hold the window only, as the backbone's do."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from .test_generation import trained_sliding_window_model

    model, _ = trained_sliding_window_model()
    out = _generate(model, input_ids=torch.tensor([[5, 6, 7, 8, 9, 5, 6]]), max_new_tokens=6,
                    return_dict_in_generate=True)
    cache = out.past_key_values
    for half in (cache.backbone, cache.side_cache("default")):
        assert half.layers and all(isinstance(layer, DynamicSlidingWindowLayer) for layer in half.layers)


@pytest.mark.parametrize("use", ["crop", "prompt-lookup"])
def test_a_config_less_dynamic_cache_on_a_sliding_window_model(use):
    """The caller's own ``DynamicCache()`` made without a config has full-attention layers, also on a sliding-window
    model, so LoRA's can be cropped past the window (to regenerate a reply) and prompt-lookup decoding rolls it back.
    The side cache, made with the side trunk's sliding layers, refused both (``activate_past_recording``), a crop
    after it had already cropped the caller's cache."""
    from transformers import DynamicCache

    from .test_generation import trained_sliding_window_model

    model, _ = trained_sliding_window_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])  # repeats, so that prompt lookup proposes drafts
    cache = DynamicCache()
    if use == "prompt-lookup":
        greedy = _generate(model, input_ids=ids, max_new_tokens=12)
        assert torch.equal(_generate(model, input_ids=ids, max_new_tokens=12, past_key_values=cache,
                                     prompt_lookup_num_tokens=3), greedy)
        return
    first = _generate(model, input_ids=ids, past_key_values=cache, max_new_tokens=6)  # far past the 4-token window
    cache.crop(-3)  # regenerate from three tokens back
    kwargs = dict(input_ids=torch.cat([first[:, :-3], torch.tensor([[9, 5]])], 1), max_new_tokens=6,
                  return_dict_in_generate=True, output_logits=True)
    continued = _generate(model, past_key_values=cache, **kwargs)
    fresh = _generate(model, **kwargs)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(fresh.logits), atol=2e-5, rtol=1e-4)
    assert torch.equal(continued.sequences, fresh.sequences)


@pytest.mark.parametrize("route", ["forward", "forward-no-grad", "generate"])
def test_input_ids_of_three_dimensions_are_refused(model, route):
    """The backbone runs a 3-D input_ids (batch, 1, sequence), broadcasting over the extra dimension, but the side
    network is built for (batch, sequence, width) hidden states: with gradients the logits differed from those of the
    same ids given as 2-D, without them (the inference fast path, generate) it failed with "too many values to
    unpack"."""
    ids = torch.tensor([[PROMPTS[0]]])  # (1, 1, sequence)
    with pytest.raises(ValueError, match=r"hidden states of shape \(batch, sequence, width\).*input_ids"):
        if route == "generate":
            _generate(model, input_ids=ids, max_new_tokens=2)
        elif route == "forward-no-grad":
            with torch.no_grad():
                model(input_ids=ids)
        else:
            model(input_ids=ids)


def test_generate_in_training_mode_on_a_trunk_that_starts_no_cache_while_training():
    """CohereCompassModel starts its cache only outside training mode ("use_cache and cache is None and not
    self.training"). get_peft_model leaves the new side network in training mode (as PEFT leaves LoRA's dropout), and
    generate inside a training loop runs so too: the eval-mode backbone returned its cache, the side trunk none, and
    the second decoding step was refused ("The cache holds 9 past tokens but no side-network state"). Cached
    generation now keeps a side cache and equals uncached generation and the eval-mode one."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_qst import QSTConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    config = AutoConfig.for_model(
        "cohere_compass_text", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
        layer_types=["full_attention", "full_attention"],
        rope_parameters={"full_attention": rope, "sliding_attention": rope},
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an adapter that changes the tokens
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    side = next(m for m in model.modules() if type(m).__name__ == "QSTSideNetwork")
    assert side.training and not base.model.base_layer.training
    ids = torch.randint(3, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(use_cache=True, **kwargs)
        uncached = model.generate(use_cache=False, **kwargs)
        model.eval()
        in_eval = model.generate(use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, in_eval)


#: tiny decoders with cross-attention, run alone as causal LMs (encoder states given by the caller)
CROSS_ATTENTION_DECODERS = {
    "bart": dict(d_model=128, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
                 decoder_ffn_dim=256, encoder_ffn_dim=256),
    "trocr": dict(d_model=128, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=256),
    "roberta": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                    is_decoder=True, add_cross_attention=True),
    "gpt2": dict(n_embd=128, n_layer=2, n_head=4, add_cross_attention=True),
    "xglm": dict(d_model=128, num_layers=2, attention_heads=4, ffn_dim=256, add_cross_attention=True),
    # distil-whisper's shape: fewer decoder blocks than encoder ones (the checkpoint's: 2 and 32)
    "whisper": dict(d_model=128, decoder_layers=2, encoder_layers=4, decoder_attention_heads=4,
                    encoder_attention_heads=4, decoder_ffn_dim=256, encoder_ffn_dim=256, max_target_positions=64,
                    max_source_positions=32, num_mel_bins=16, decoder_start_token_id=1),
}


def _cross_attention_decoder(model_type: str, folder=None):
    """The tiny decoder of ``model_type`` (float32), or, given a folder, saved there and loaded back in 4 bits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .conftest import bnb_config

    config = AutoConfig.for_model(model_type, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                                  **CROSS_ATTENTION_DECODERS[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    if folder is None:
        return model
    model.save_pretrained(folder)  # safetensors
    quantization = bnb_config(compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    return quantized.eval()


def _adapted(base):
    """``base`` with a QST adapter whose side network visibly moves the logits."""
    from peft import get_peft_model

    from peft_qst import QSTConfig

    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.1)
    return model.eval()


def _encoder_inputs(hidden_size: int):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, 5), generator=generator), torch.randn(2, 3, hidden_size, generator=generator)


@pytest.mark.parametrize("variant", ["bart", "bart-4bit", "trocr", "roberta", "gpt2", "xglm"])
def test_a_cross_attention_decoder_generates_from_encoder_states_with_the_default_cache(variant, tmp_path):
    """A decoder with cross-attention run alone (``BartForCausalLM``) gets a plain ``DynamicCache`` from generate,
    into which transformers' cross-attention writes the encoder's keys and values at the self-attention's layers (the
    base model's cached logits are then not its uncached ones; RoBERTa's decoder fails). The adapted generation was
    refused at its second step with a misleading "tokens were added to it with adapters disabled". QST now gives that
    cache a cross-attention half: the cached tokens and logits are those of uncached recomputation, and those of one
    forward without a cache over the generated sequence. The adapter disabled still generates what the base model
    does, unchanged."""
    model_type, _, quantized = variant.partition("-")
    base = _cross_attention_decoder(model_type, tmp_path if quantized else None)
    ids, encoder = _encoder_inputs(base.config.hidden_size)
    kwargs = dict(input_ids=ids, encoder_hidden_states=encoder, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        base_default = base.generate(**kwargs) if model_type != "roberta" else None  # (RoBERTa's fails)
    model = _adapted(base)
    tolerance = dict(atol=2e-4, rtol=1e-4) if quantized else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        cached = model.generate(**kwargs)
        uncached = model.generate(use_cache=False, **kwargs)
        forward = model(input_ids=cached.sequences, encoder_hidden_states=encoder, use_cache=False).logits
        with model.disable_adapter():
            disabled = model.generate(**kwargs) if base_default is not None else None
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), **tolerance)
    if model_type != "roberta":  # (generate numbers RoBERTa's positions from 0, its own forward from the pad id on)
        torch.testing.assert_close(torch.stack(cached.logits), forward[:, ids.shape[1] - 1:-1].transpose(0, 1),
                                   **tolerance)
    if base_default is not None:
        assert torch.equal(disabled.sequences, base_default.sequences)
        assert torch.equal(torch.stack(disabled.logits), torch.stack(base_default.logits))
        assert not torch.allclose(torch.stack(cached.logits), torch.stack(disabled.logits), atol=1e-2)


def test_a_plain_cache_given_with_encoder_states_is_refused_naming_the_encoder_decoder_cache():
    """A plain cache the caller passes with encoder states (``generate(cache=DynamicCache())``, a forward's own cache
    continued) cannot keep the cross-attention's keys apart from the self-attention's: refused at once, naming
    ``EncoderDecoderCache`` (before: a misleading "tokens were added to it with adapters disabled" at the second
    step). An ``EncoderDecoderCache`` passed in continues across turns as uncached recomputation does."""
    from transformers import DynamicCache, EncoderDecoderCache

    model = _adapted(_cross_attention_decoder("bart"))
    ids, encoder = _encoder_inputs(model.config.hidden_size)
    kwargs = dict(encoder_hidden_states=encoder, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"plain DynamicCache.*EncoderDecoderCache\(DynamicCache\(\), Dyn"):
            model.generate(input_ids=ids, cache=DynamicCache(), **kwargs)
        own = DynamicCache()
        first = model(input_ids=ids, encoder_hidden_states=encoder, cache=own, use_cache=True)
        step = first.logits[:, -1:].argmax(-1)
        continued = model(input_ids=step, encoder_hidden_states=encoder, cache=first.past_key_values, use_cache=True)
        full = model(input_ids=torch.cat([ids, step], 1), encoder_hidden_states=encoder, use_cache=False)
        torch.testing.assert_close(continued.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"6 past tokens\), not an EncoderDecoderCache.*the cache the model ret"):
            model(input_ids=step, encoder_hidden_states=encoder, cache=own, use_cache=True)

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        turn = model.generate(input_ids=ids, cache=cache, **kwargs)
        prompt = torch.cat([turn, ids[:, :2]], 1)
        assert torch.equal(model.generate(input_ids=prompt, cache=cache, **kwargs),
                           model.generate(input_ids=prompt, use_cache=False, **kwargs))


def _scores_equal(a, b, tolerance):
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), **tolerance)


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-4bit"])
def test_a_plain_cache_of_the_caller_continues_across_turns_where_the_decoder_wraps_it_itself(variant, tmp_path):
    """GPT-2 built with ``add_cross_attention`` wraps a plain cache it is given into an ``EncoderDecoderCache``
    itself (the given cache as the self-attention half), so the base model's own generation from the caller's
    ``DynamicCache`` is its uncached one, turn after turn. The adapted generation was refused at its first step with
    a false claim that the cache would be filled wrong (before that refusal, at the second turn, as a plain cache
    without side-network state). Now the caller's own object continues across turns, in generate (greedy and beam
    search, ``cache=`` and ``past_key_values=``, with encoder states and without) and in a loop of forwards, as
    uncached recomputation."""
    from transformers import DynamicCache

    model_type, _, quantized = variant.partition("-")
    base = _cross_attention_decoder(model_type, tmp_path if quantized else None)
    ids, encoder = _encoder_inputs(base.config.hidden_size)
    kwargs = dict(encoder_hidden_states=encoder, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    tolerance = dict(atol=2e-4, rtol=1e-4) if quantized else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the base model's own: its plain cache continues as uncached recomputation
        own = DynamicCache()
        turn = base.generate(input_ids=ids, cache=own, **kwargs)
        _scores_equal(turn, base.generate(input_ids=ids, use_cache=False, **kwargs), tolerance)
        prompt = torch.cat([turn.sequences, ids[:, :2]], 1)
        _scores_equal(base.generate(input_ids=prompt, cache=own, **kwargs),
                      base.generate(input_ids=prompt, use_cache=False, **kwargs), tolerance)

    model = _adapted(base)
    with torch.no_grad():
        own = DynamicCache()
        first = model.generate(input_ids=ids, cache=own, **kwargs)
        _scores_equal(first, model.generate(input_ids=ids, use_cache=False, **kwargs), tolerance)
        assert type(own) is DynamicCache and own.get_seq_length() == ids.shape[1] + 3
        prompt = torch.cat([first.sequences, ids[:, :2]], 1)
        second = model.generate(input_ids=prompt, cache=own, **kwargs)
        _scores_equal(second, model.generate(input_ids=prompt, use_cache=False, **kwargs), tolerance)
        # the adapter moves the logits: these are not the base model's
        assert not torch.allclose(torch.stack(first.scores), torch.stack(turn.scores), atol=1e-2)

        beams = dict(kwargs, num_beams=3)  # beam search reorders the caller's cache inside the wrapper
        _scores_equal(model.generate(input_ids=ids, cache=DynamicCache(), **beams),
                      model.generate(input_ids=ids, use_cache=False, **beams), tolerance)
        _scores_equal(model.generate(input_ids=ids, past_key_values=DynamicCache(), **kwargs), first, tolerance)

        alone = {k: v for k, v in kwargs.items() if k != "encoder_hidden_states"}
        own = DynamicCache()  # without encoder states GPT-2 wraps it too: the next turn was refused as without sides
        turn = model.generate(input_ids=ids, cache=own, **alone)
        prompt = torch.cat([turn.sequences, ids[:, :2]], 1)
        _scores_equal(model.generate(input_ids=prompt, cache=own, **alone),
                      model.generate(input_ids=prompt, use_cache=False, **alone), tolerance)

        own = DynamicCache()  # a loop of forwards passing the caller's own object again
        out = model(input_ids=ids, encoder_hidden_states=encoder, cache=own, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        continued = model(input_ids=step, encoder_hidden_states=encoder, cache=own, use_cache=True)
        full = model(input_ids=torch.cat([ids, step], 1), encoder_hidden_states=encoder, use_cache=False)
        torch.testing.assert_close(continued.logits[:, -1], full.logits[:, -1], **tolerance)


@pytest.mark.parametrize("encoder_states", [True, False], ids=["encoder-states", "no-encoder-states"])
def test_a_static_cache_of_the_caller_continues_across_turns_where_the_decoder_wraps_it_itself(encoder_states):
    """GPT-2 built with ``add_cross_attention`` wraps a static cache it is given as it wraps a ``DynamicCache``, and
    its own generation with one is its uncached one. The adapted generation with encoder states was refused at once,
    claiming that GPT-2's own generation fails with a static cache; without encoder states, the caller's own
    ``StaticCache`` was refused at its second turn as a plain cache without side-network state. Both continue now
    (``cache_implementation="static"``, the caller's object across turns, beam search) as uncached recomputation."""
    from transformers import StaticCache

    base = _cross_attention_decoder("gpt2")
    ids, encoder = _encoder_inputs(base.config.hidden_size)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    if encoder_states:
        kwargs["encoder_hidden_states"] = encoder
    tolerance = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the base model's own generation with a static cache
        _scores_equal(base.generate(input_ids=ids, cache_implementation="static", **kwargs),
                      base.generate(input_ids=ids, use_cache=False, **kwargs), tolerance)
    model = _adapted(base)
    with torch.no_grad():
        _scores_equal(model.generate(input_ids=ids, cache_implementation="static", **kwargs),
                      model.generate(input_ids=ids, use_cache=False, **kwargs), tolerance)
        own = StaticCache(config=base.config, max_cache_len=32)
        first = model.generate(input_ids=ids, cache=own, **kwargs)
        _scores_equal(first, model.generate(input_ids=ids, use_cache=False, **kwargs), tolerance)
        assert type(own) is StaticCache and own.get_seq_length() == ids.shape[1] + 3
        prompt = torch.cat([first.sequences, ids[:, :2]], 1)
        _scores_equal(model.generate(input_ids=prompt, cache=own, **kwargs),
                      model.generate(input_ids=prompt, use_cache=False, **kwargs), tolerance)
        beams = dict(kwargs, num_beams=3)
        _scores_equal(model.generate(input_ids=ids, cache_implementation="static", **beams),
                      model.generate(input_ids=ids, use_cache=False, **beams), tolerance)


@pytest.mark.parametrize("model_type", ["xglm", "bart"])
def test_a_plain_cache_of_the_caller_is_refused_where_the_decoder_fills_it_wrong(model_type):
    """XGLM's and BART's decoders write the encoder's keys and values into the self-attention's layers of a plain
    cache they are given: the base model's own generation from the caller's ``DynamicCache`` is not its uncached one.
    The adapted generation is refused at its first step, saying so and naming ``EncoderDecoderCache``."""
    from transformers import DynamicCache

    base = _cross_attention_decoder(model_type)
    ids, encoder = _encoder_inputs(base.config.hidden_size)
    kwargs = dict(encoder_hidden_states=encoder, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = base.generate(input_ids=ids, cache=DynamicCache(), **kwargs)
        uncached = base.generate(input_ids=ids, use_cache=False, **kwargs)
    assert not torch.allclose(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-3)
    model = _adapted(base)
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"the {model_type} cross-attention writes .* into the self-attention's "
                                             r"cache layers.*EncoderDecoderCache\(DynamicCache\(\), Dyn"):
            model.generate(input_ids=ids, cache=DynamicCache(), **kwargs)


@pytest.mark.parametrize("model_type", ["bart", "gpt2"])
@pytest.mark.parametrize("readded", ["same-shape", "another-shape"])
def test_the_fresh_cache_that_a_refused_continuation_advises_generates_on_a_cross_attention_decoder(model_type,
                                                                                                      readded):
    """A cache continued after its adapter was deleted and added again is refused with the advice to start again
    with a fresh cache. That advice named a new ``DynamicCache()``, which a decoder with cross-attention that fills a
    plain cache wrong (BART) refuses in turn when given encoder states: it names
    ``EncoderDecoderCache(DynamicCache(), DynamicCache())`` there, and following it generates. GPT-2, which wraps a
    plain cache itself, keeps the advice of a new ``DynamicCache()``, which generates there."""
    from transformers import DynamicCache, EncoderDecoderCache

    from peft_qst import QSTConfig

    model = _adapted(_cross_attention_decoder(model_type))
    ids, encoder = _encoder_inputs(model.config.hidden_size)
    kwargs = dict(encoder_hidden_states=encoder, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, return_dict_in_generate=True, **kwargs)
    cache, history = out.past_key_values, out.sequences
    model.add_adapter("b", QSTConfig(task_type="CAUSAL_LM"))
    model.set_adapter("b")
    model.delete_adapter("default")
    model.add_adapter("default", QSTConfig(task_type="CAUSAL_LM", **({"r": 4} if readded == "another-shape" else {})))
    model.set_adapter("default")
    model.eval()
    computed_by = "another side network" if readded == "same-shape" else "a side network of another shape"
    advised = (r"EncoderDecoderCache\(DynamicCache\(\), DynamicCache\(\)\) \(from transformers\)"
               if model_type == "bart" else r"DynamicCache\(\)")
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"computed by {computed_by}.*or pass a new {advised}\), or") as refused:
            model.generate(input_ids=history, cache=cache, **kwargs)
        if model_type == "gpt2":
            assert "EncoderDecoderCache" not in str(refused.value)
        fresh = EncoderDecoderCache(DynamicCache(), DynamicCache()) if model_type == "bart" else DynamicCache()
        followed = model.generate(input_ids=history, cache=fresh, **kwargs)
        assert torch.equal(followed, model.generate(input_ids=history, use_cache=False, **kwargs))


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_a_distilled_whisper_decoder_trains_generates_and_reloads_with_encoder_outputs(quantized, tmp_path):
    """``WhisperForCausalLM`` (the decoder that distil-whisper checkpoints run as Whisper's assistant model) takes the
    encoder states as ``encoder_outputs``. Its config's ``num_hidden_layers`` is the encoder's block count, and
    distilled checkpoints have fewer decoder blocks (distil-whisper: 32 and 2): QST looked for a list of 4 blocks in
    this 2-block decoder and refused the model ("cannot find the list of 4 decoder blocks in WhisperDecoder"). Now it
    counts the decoder's blocks: a training step with encoder states has a finite loss and trains the side network
    only; cached generation (also continued after a crop, as assisted decoding rolls its cache back) gives the tokens
    and logits of uncached recomputation; a plain cache the caller passes is refused naming the
    ``EncoderDecoderCache``, as on BART; the adapter disabled generates as the base model; a saved adapter reloads to
    the same logits."""
    from peft import PeftModel, get_peft_model
    from transformers import DynamicCache

    from peft_qst import QSTConfig

    base = _cross_attention_decoder("whisper", tmp_path / "base" if quantized else None)
    assert base.config.num_hidden_layers == 4 and len(base.model.decoder.layers) == 2
    ids, encoder = _encoder_inputs(base.config.hidden_size)
    encoder_outputs = (encoder,)
    kwargs = dict(input_ids=ids, encoder_outputs=encoder_outputs, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        base_default = base.generate(**kwargs)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, encoder_outputs=encoder_outputs, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert trained and all(".qst_side." in n for n in trained)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()

    # (in 4 bits the base model's own cached logits are 1.6e-3 from its uncached ones: bitsandbytes' CPU kernel rounds
    # by the number of rows it is given)
    tolerance = dict(atol=5e-3, rtol=1e-3) if quantized else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        cached = model.generate(**kwargs)
        uncached = model.generate(use_cache=False, **kwargs)
        forward = model(input_ids=cached.sequences, encoder_outputs=encoder_outputs, use_cache=False).logits
        cache = cached.past_key_values
        cache.crop(-2)
        continued = model.generate(**dict(kwargs, input_ids=cached.sequences[:, :-2], cache=cache))
        recomputed = model.generate(**dict(kwargs, input_ids=cached.sequences[:, :-2], use_cache=False))
        with model.disable_adapter():
            disabled = model.generate(**kwargs)
        with pytest.raises(ValueError, match=r"This whisper decoder .*EncoderDecoderCache\(DynamicCache\(\), Dyn"):
            model.generate(**dict(kwargs, cache=DynamicCache()))
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), **tolerance)
    torch.testing.assert_close(torch.stack(cached.logits), forward[:, ids.shape[1] - 1:-1].transpose(0, 1),
                               **tolerance)
    assert torch.equal(continued.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(recomputed.logits), **tolerance)
    assert torch.equal(disabled.sequences, base_default.sequences)
    assert torch.equal(torch.stack(disabled.logits), torch.stack(base_default.logits))
    assert not torch.allclose(torch.stack(cached.logits), torch.stack(disabled.logits), atol=1e-2)

    with torch.no_grad():
        expected = model(input_ids=ids, encoder_outputs=encoder_outputs).logits
    model.save_pretrained(tmp_path / "adapter")  # safetensors
    fresh = _cross_attention_decoder("whisper", tmp_path / "base" if quantized else None)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, encoder_outputs=encoder_outputs).logits, expected,
                                   atol=1e-6, rtol=1e-6)


def test_a_distilled_whisper_decoder_with_an_adapter_drafts_for_whisper_as_its_assistant_model():
    """Whisper's ``generate(input_features, assistant_model=...)`` with a distil-whisper-shaped ``WhisperForCausalLM``
    as the assistant hands it the main model's ``encoder_outputs`` and rolls its cache back (``crop``) after each
    rejected draft. The assistant with a QST adapter was refused when the adapter was added (its 2 decoder blocks
    looked for as the encoder's 4); now it drafts, and greedy assisted decoding gives the main model's own tokens."""
    from transformers import GenerationMixin, WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=128, pad_token_id=0, **CROSS_ATTENTION_DECODERS["whisper"])
    torch.manual_seed(0)
    main = WhisperForConditionalGeneration(config).eval()
    assistant = _adapted(_cross_attention_decoder("whisper"))
    features = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(2))
    kwargs = dict(input_features=features, decoder_input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=8,
                  do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        # (GenerationMixin's generate: Whisper's own needs a real generation config, with timestamps and languages)
        alone = GenerationMixin.generate(main, **kwargs)
        assisted = GenerationMixin.generate(main, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, alone)


#: tiny decoders of configs that map their sizes to the encoder's (``num_attention_heads`` -> ``encoder_attention_heads``,
#: ``num_hidden_layers`` -> ``encoder_layers``), with encoder and decoder of other depths, head counts and FFN widths
SPLIT_SIZE_DECODERS = {
    "bart": dict(CROSS_ATTENTION_DECODERS["bart"], encoder_layers=3, encoder_attention_heads=2,
                 decoder_attention_heads=8, encoder_ffn_dim=512),
    "whisper": dict(CROSS_ATTENTION_DECODERS["whisper"], encoder_attention_heads=2, decoder_attention_heads=8),
}


def _split_size_decoder(model_type: str, folder=None, **sizes):
    """The tiny decoder of ``model_type`` of :data:`SPLIT_SIZE_DECODERS` (float32), saved to ``folder`` and loaded back
    from its safetensors where one is given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                                  **dict(SPLIT_SIZE_DECODERS[model_type], **sizes))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    if folder is None:
        return model
    if not (folder / "model.safetensors").exists():
        model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).float().eval()


def _logits_with_encoder_states(model, model_type: str):
    ids, encoder = _encoder_inputs(128)
    states = dict(encoder_outputs=(encoder,)) if model_type == "whisper" else dict(encoder_hidden_states=encoder)
    with torch.no_grad():
        return model(input_ids=ids, **states).logits


@pytest.mark.parametrize("model_type", ["bart", "whisper"])
def test_side_heads_shape_the_side_decoder_of_a_config_that_maps_its_heads_to_the_encoder(model_type):
    """BART's and Whisper's configs map ``num_attention_heads`` to ``encoder_attention_heads`` (and Whisper's
    ``num_key_value_heads`` too), and their ``*ForCausalLM`` runs the decoder alone: QST set ``side_heads`` on the side
    config's encoder, which the side trunk does not build, so the side decoder kept the backbone decoder's 8 heads (of
    width 1 at r=16) whatever ``side_heads`` said, and "auto" chose from the encoder's head width. Now the side blocks
    have the heads ``side_heads`` names ("auto": one head of 8, as wide as it gets beside the decoder's 16-wide heads),
    the FFN widths are the decoder's divided by r, and the signature records the decoder's sizes."""
    from peft import get_peft_model

    from peft_qst import QSTConfig

    for side_heads, resolved, heads in (("auto", 1, 1), (2, 2, 2), (None, None, 8)):
        model = get_peft_model(_split_size_decoder(model_type), QSTConfig(task_type="CAUSAL_LM", side_heads=side_heads))
        config = model.peft_config["default"]
        assert config.side_heads == resolved
        attentions = [module for name, module in model.named_modules() if ".qst_side." in name and
                      name.endswith(".self_attn")]
        assert len(attentions) == 2
        assert [(a.num_heads, a.head_dim) for a in attentions] == [(heads, 8 // heads)] * 2, side_heads
        fc1 = [module for name, module in model.named_modules() if ".qst_side." in name and name.endswith(".fc1")]
        assert [layer.out_features for layer in fc1] == [256 // 16] * 2
        assert torch.isfinite(_logits_with_encoder_states(model, model_type)).all()
        assert config.base_model_signature == {
            "model_type": model_type, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
            "sizes_of": "decoder", "num_key_value_heads": 8, "head_dim": 16, "intermediate_size": 256,
            "vocab_size": 128,
        }


@pytest.mark.parametrize("model_type", ["bart", "whisper"])
def test_an_adapter_of_a_config_that_maps_its_heads_to_the_encoder_reloads_with_its_side_heads(model_type, tmp_path):
    """An adapter saved by this version for BART or Whisper records the decoder's sizes (``sizes_of``), so its
    ``side_heads`` (1, chosen by "auto") is read as saved and reloads to the logits it was saved with. Only a file
    without ``sizes_of`` (written before the decoder's sizes were read, below) is read as ``side_heads=None``: taken so,
    this one would have loaded its weights silently into the decoder's 8 heads (q/k/v are d -> d whatever the heads)."""
    from peft import PeftConfig, PeftModel, get_peft_model

    from peft_qst import QSTConfig

    model = get_peft_model(_split_size_decoder(model_type), QSTConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    expected = _logits_with_encoder_states(model.eval(), model_type)  # eval: the side decoder's dropout off
    model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(str(tmp_path)).side_heads == 1
    reloaded = PeftModel.from_pretrained(_split_size_decoder(model_type), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].side_heads == 1
    assert torch.equal(_logits_with_encoder_states(reloaded, model_type), expected)


#: the ``base_model_signature`` the previous version recorded for :data:`SPLIT_SIZE_DECODERS` (the encoder's sizes,
#: read through the configs' generic names; checked by running that version), and the ``side_heads`` its "auto" chose
#: from the encoder's 64-wide heads (one head at r=16), which its side decoder did not apply: its blocks had the
#: backbone decoder's 8 heads
EARLIER_SIGNATURES = {
    model_type: {"head_dim": 64, "hidden_size": 128, "model_type": model_type, "num_attention_heads": 2,
                 "num_hidden_layers": layers, "num_key_value_heads": 2, "vocab_size": 128}
    for model_type, layers in (("bart", 3), ("whisper", 4))
}


@pytest.mark.parametrize("model_type", ["bart", "whisper"])
def test_an_adapter_saved_before_the_decoder_heads_were_read_loads_as_it_was_trained(model_type, tmp_path):
    """An adapter saved before QST read the decoder's sizes of these configs records the encoder's sizes and a
    ``side_heads`` its side decoder never had (the backbone decoder's heads were kept). Its weights fit any head count
    (q/k/v are d -> d), so honouring that ``side_heads`` now would load them silently into another attention layout.
    Such a file (no ``sizes_of`` in its signature) is read as ``side_heads=None``: it loads to the logits it was saved
    with, through PEFT and transformers alike, its encoder-sized signature is accepted, and saved again it records the
    decoder's sizes and None. A config of today's default given with its weights is refused, naming the fix."""
    import json

    from peft import PeftConfig, PeftModel, get_peft_model

    from peft_qst import QSTConfig
    from peft_qst.serialization import QSTAdapterFileError

    base_folder, folder = tmp_path / "base", tmp_path / "adapter"
    # the side network the previous version built: the backbone decoder's heads, whatever side_heads said
    model = get_peft_model(_split_size_decoder(model_type, base_folder),
                           QSTConfig(task_type="CAUSAL_LM", side_heads=None))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.eval()
    trained = _logits_with_encoder_states(model, model_type)
    model.save_pretrained(folder)
    file = folder / "adapter_config.json"
    saved = json.loads(file.read_text())
    saved.update(side_heads=1, base_model_signature=EARLIER_SIGNATURES[model_type])  # as the previous version wrote
    file.write_text(json.dumps(saved))

    assert PeftConfig.from_pretrained(str(folder)).side_heads is None
    loaded = PeftModel.from_pretrained(_split_size_decoder(model_type, base_folder), str(folder)).eval()
    assert loaded.peft_config["default"].side_heads is None
    assert torch.equal(_logits_with_encoder_states(loaded, model_type), trained)

    through_transformers = _split_size_decoder(model_type, base_folder)
    through_transformers.load_adapter(str(folder))
    assert torch.equal(_logits_with_encoder_states(through_transformers.eval(), model_type), trained)

    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert resaved["side_heads"] is None and resaved["base_model_signature"]["sizes_of"] == "decoder"
    assert resaved["base_model_signature"]["num_hidden_layers"] == 2
    again = PeftModel.from_pretrained(_split_size_decoder(model_type, base_folder), str(tmp_path / "resaved"))
    assert torch.equal(_logits_with_encoder_states(again.eval(), model_type), trained)

    given = QSTConfig(task_type="CAUSAL_LM")
    with pytest.raises(QSTAdapterFileError, match=r"predates the decoder head count .*side_heads=1 was not applied"
                                                  r".*built with side_heads=1.*config.side_heads = None"):
        PeftModel.from_pretrained(_split_size_decoder(model_type, base_folder), str(folder), config=given)
    given = QSTConfig(task_type="CAUSAL_LM", side_heads=None)
    with_none = PeftModel.from_pretrained(_split_size_decoder(model_type, base_folder), str(folder), config=given)
    assert torch.equal(_logits_with_encoder_states(with_none.eval(), model_type), trained)


def test_an_adapter_of_a_deeper_whisper_decoder_is_refused_naming_the_decoder_depths(tmp_path):
    """An adapter of whisper-large-v3-turbo's decoder (32 encoder and 4 decoder blocks) loaded onto distil-whisper's
    (32 and 2): both signatures recorded the encoder's 32 layers, and the load failed only on the weight names. The
    signature records the decoder's depth now, and the refusal names it."""
    from peft import PeftModel, get_peft_model

    from peft_qst import QSTConfig

    get_peft_model(_split_size_decoder("whisper", decoder_layers=4), QSTConfig(task_type="CAUSAL_LM")).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"whisper model \(hidden_size=128, 4 decoder layers, 8 attention heads\) but "
                                         r"is being loaded onto a whisper model \(hidden_size=128, 2 decoder layers.*"
                                         r"differ in num_hidden_layers 4 against 2"):
        PeftModel.from_pretrained(_split_size_decoder("whisper"), str(tmp_path))


def test_an_adapter_saved_before_the_decoder_heads_were_read_loads_as_trained_on_a_config_of_remote_code(tmp_path):
    """A model of remote code (``trust_remote_code=True``) whose config subclasses BART's keeps BART's
    ``attribute_map`` under a model type transformers does not register (``CONFIG_MAPPING``), so the file alone cannot
    tell that an adapter saved before QST read the decoder's sizes has side blocks of the decoder's heads whatever its
    ``side_heads`` says. Before, such an adapter's ``side_heads=1`` was applied on loading, and its weights, trained with
    the decoder's 8 heads, ran as one head: other logits, silently. The model's config tells it when the adapter is
    bound: it loads to the logits it was saved with, and saved again records the decoder's sizes and None."""
    import json

    from peft import PeftModel, get_peft_model
    from transformers import BartConfig, BartForCausalLM

    from peft_qst import QSTConfig
    from peft_qst.serialization import QSTAdapterFileError

    class RemoteBartConfig(BartConfig):  # as a checkpoint's configuration_*.py defines it
        model_type = "remote_bart_of_a_test"

    def base():
        config = RemoteBartConfig(vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                                  **SPLIT_SIZE_DECODERS["bart"])
        torch.manual_seed(0)
        return BartForCausalLM(config).float().eval()

    model = get_peft_model(base(), QSTConfig(task_type="CAUSAL_LM", side_heads=None))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    trained = _logits_with_encoder_states(model.eval(), "bart")
    model.save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(file.read_text())
    saved.update(side_heads=1,
                 base_model_signature=dict(EARLIER_SIGNATURES["bart"], model_type=RemoteBartConfig.model_type))
    file.write_text(json.dumps(saved))

    loaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    assert torch.equal(_logits_with_encoder_states(loaded, "bart"), trained)
    assert loaded.peft_config["default"].side_heads is None
    through_transformers = base()
    through_transformers.load_adapter(str(tmp_path / "adapter"))
    assert torch.equal(_logits_with_encoder_states(through_transformers.eval(), "bart"), trained)
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert resaved["side_heads"] is None and resaved["base_model_signature"]["sizes_of"] == "decoder"

    with pytest.raises(QSTAdapterFileError, match=r"predates the decoder head count .*side_heads=1 was not applied"):
        PeftModel.from_pretrained(base(), str(tmp_path / "adapter"), config=QSTConfig(task_type="CAUSAL_LM"))
    with_none = QSTConfig(task_type="CAUSAL_LM", side_heads=None)
    given = PeftModel.from_pretrained(base(), str(tmp_path / "adapter"), config=with_none).eval()
    assert torch.equal(_logits_with_encoder_states(given, "bart"), trained)
    with pytest.raises(QSTAdapterFileError, match=r"predates the decoder head count .*side_heads=1 was not applied"):
        base().load_adapter(str(tmp_path / "adapter"), peft_config=QSTConfig(task_type="CAUSAL_LM"))
    through_transformers = base()
    through_transformers.load_adapter(str(tmp_path / "adapter"), peft_config=with_none)
    assert torch.equal(_logits_with_encoder_states(through_transformers.eval(), "bart"), trained)
