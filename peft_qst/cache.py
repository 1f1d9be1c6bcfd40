"""`QSTCache`: the backbone's KV cache and the side networks' KV caches, carried through generation as one object.

During cached generation the backbone and every side network each need their own cache of past keys and values.
transformers' `generate` holds one cache object per call: it passes it to the model, takes the model's returned cache
for the next step, and reorders, crops or repeats it for beam search, assisted decoding and the like. `QSTCache`
is that one object. Everything that changes the batch or sequence layout (reorder, crop, repeat, select, reset,
past recording) is applied to every half, so a beam-search reorder can never leave a side cache behind (a bug of the
reference code);
everything else — ``update``, ``get_seq_length``, mask sizes, ... — is the backbone cache's, because the backbone's
attention is what transformers asks about.

A caller who passes their own cache object (``generate(past_key_values=DynamicCache())``, transformers' multi-turn
pattern) keeps that object, not the `QSTCache` generate got back, and passes it again for the next turn. The backbone
half *is* that object, updated in place, so the side halves are recorded on it (:func:`remember_pairing`) and paired
with it again when it comes back (:func:`paired_cache`). Between turns the caller may change that object's layout
(``crop`` to regenerate a reply, ``batch_select_indices`` to drop finished rows, ``reorder_cache``): its layout
methods apply to the side halves recorded on it too (:func:`_follow_layout_methods`).
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

_LAYOUT_METHODS = (
    "reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset", "activate_past_recording"
)


def cache_field(output) -> str:
    """Name of a model output's cache field: ``cache`` in transformers >= 5.24, ``past_key_values`` before.

    Read from the output class's fields, because asking a 5.24 output for the old name logs a deprecation warning.
    """
    return "cache" if "cache" in _field_names(output) else "past_key_values"


def has_cache_field(output) -> bool:
    """Whether a model output has a cache field at all (some trunks, e.g. RecurrentGemma's, return none)."""
    return bool(_field_names(output) & {"cache", "past_key_values"})


def past_length(cache) -> int:
    """How many past tokens a cache holds: its first layer's count (``get_seq_length()``) or, where that layer holds
    none, the most any of its layers holds. RecurrentGemma's first blocks are recurrent: they keep their state in
    their own modules and leave their cache layers empty, and only its attention layers count the tokens, so its
    ``get_seq_length()`` says 0 at every step; taken at its word, a cache it had filled was taken for a fresh one, and
    each step started the side network's attention from nothing. Other caches' first layers count every token."""
    length = cache.get_seq_length()
    if length:
        return length
    counts = [layer.get_seq_length() for layer in getattr(cache, "layers", ()) if hasattr(layer, "get_seq_length")]
    return max(counts, default=0)


def _field_names(output) -> set[str]:
    return {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set(output.keys())


class QSTCache(Cache):
    """A backbone cache plus one side cache per adapter name.

    Attribute access other than the layout methods goes to the backbone cache, so transformers sees the backbone's
    cache (its layers, sequence length, mask sizes) exactly as it would without QST.
    """

    _own = frozenset(
        ("backbone", "side", "memory", "routing", "side_cache", "with_side", "copy_memory", "with_copy_memory",
         "_each", "is_croppable", *_LAYOUT_METHODS)
    )

    def __init__(self, backbone: Cache, side: Optional[dict[str, Cache]] = None):
        # Cache.__init__ is not called: the storage belongs to the wrapped caches.
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "side", dict(side or {}))
        # per adapter with copy heads: the keys and token rows of past positions (see peft_qst.side.CopyHead)
        object.__setattr__(self, "memory", {})
        # which hybrid adapters' backbone LoRA computed the backbone half (see BackboneRouting)
        object.__setattr__(self, "routing", BackboneRouting())

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") or name in QSTCache._own or name == "_own":
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "backbone"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in QSTCache._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.backbone, name, value)

    def __setstate__(self, state: dict) -> None:
        # a QSTCache pickled before caches recorded their routing: which backbone adapters filled it is unknown
        state = {"routing": BackboneRouting(recorded=False), **state}
        object.__getattribute__(self, "__dict__").update(state)

    def __len__(self) -> int:
        return len(self.backbone)

    def __repr__(self) -> str:
        return f"QSTCache(backbone={self.backbone!r}, side={sorted(self.side)})"

    def side_cache(self, adapter_name: str) -> Optional[Cache]:
        return self.side.get(adapter_name)

    def with_side(self, adapter_name: str, cache: Optional[Cache]) -> "QSTCache":
        if cache is not None:
            self.side[adapter_name] = cache
        return self

    def copy_memory(self, adapter_name: str) -> Optional[Cache]:
        return self.memory.get(adapter_name)

    def with_copy_memory(self, adapter_name: str, cache: Optional[Cache]) -> "QSTCache":
        if cache is not None:
            self.memory[adapter_name] = cache
        return self

    def _each(self):
        yield self.backbone
        yield from self.side.values()
        yield from self.memory.values()
        yield self.routing

    def reorder_cache(self, beam_idx):
        with _halves_applied_here(self.backbone):
            for cache in self._each():
                cache.reorder_cache(beam_idx)

    def crop(self, max_length: int):
        with _halves_applied_here(self.backbone):
            for cache in self._each():
                cache.crop(max_length)

    def batch_repeat_interleave(self, repeats: int):
        with _halves_applied_here(self.backbone):
            for cache in self._each():
                cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        with _halves_applied_here(self.backbone):
            for cache in self._each():
                cache.batch_select_indices(indices)

    def reset(self):
        with _halves_applied_here(self.backbone):
            for cache in self._each():
                cache.reset()

    def activate_past_recording(self, **kwargs):
        """Keep past states in every half, so that a later ``crop`` (assisted decoding's rollback) can restore
        sliding-window layers of the side caches too. ``kwargs`` go to every half as given: transformers >= 5.25
        passes ``recurrent_states_to_keep`` (how many recurrent states linear-attention layers keep for the
        rollback)."""
        with _halves_applied_here(self.backbone):
            for cache in self._each():
                cache.activate_past_recording(**kwargs)

    @property
    def is_croppable(self) -> bool:
        return all(cache.is_croppable for cache in self._each())


class BackboneRouting:
    """Which hybrid adapter (``backbone_lora_layers``) adapted the backbone blocks that filled each row of a backbone
    cache: ``rows`` is None (no row's backbone was adapted), an adapter name (every row's was, by that adapter), or a
    tuple with one entry per row (a mixed batch, ``adapter_names=[...]``).

    Without backbone LoRA the backbone half is the same whichever adapter runs, so any adapter, or none, may continue
    it. A hybrid adapter's LoRA changes the keys and values of its top blocks: a cache it filled, continued with
    adapters disabled (or the reverse, or by another hybrid), attended to keys and values of another model (silently
    wrong tokens, not the base model's). The layer refuses a continuation whose routing differs
    (:meth:`QSTLayer._check_routing`). It has the layout methods of a cache, so that it follows the rows of the batch
    wherever the side halves do.

    ``recorded`` is False for a cache saved (``torch.save``, pickle) before caches recorded their routing: nothing
    says which backbone adapters filled it, so its continuation is not checked (as before), rather than refused for
    the adapter that filled it and allowed for the others."""

    is_croppable = True

    def __init__(self, rows=None, recorded: bool = True):
        self.rows = rows
        self.recorded = recorded

    def record(self, rows) -> None:
        """The rows of the forward that just extended the cache."""
        self.rows = rows
        self.recorded = True

    def __repr__(self) -> str:
        return f"BackboneRouting({self.rows!r})"

    @staticmethod
    def uniform(rows):
        """``rows`` with a tuple whose rows all agree written as that one entry (None for an empty batch)."""
        if isinstance(rows, tuple) and len(set(rows)) <= 1:
            return rows[0] if rows else None
        return rows

    def _select(self, indices) -> None:
        if isinstance(self.rows, tuple):
            picked = torch.arange(len(self.rows))[torch.as_tensor(indices).cpu()].tolist()
            self.rows = self.uniform(tuple(self.rows[i] for i in picked))

    def reorder_cache(self, beam_idx) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(self.rows, tuple):
            self.rows = tuple(row for row in self.rows for _ in range(repeats))

    def crop(self, max_length: int) -> None:
        pass  # the rows stay as they are

    def activate_past_recording(self, **kwargs) -> None:
        pass

    def reset(self) -> None:
        self.rows = None


#: the attribute of a backbone cache that holds its side halves: (side caches, copy memories) by adapter name
_PAIRING_ATTR = "_peft_qst_side_halves"


def remember_pairing(paired: QSTCache) -> None:
    """Record ``paired``'s side halves on its backbone cache (on the caller's plain cache inside it, where QST gave
    that one a cross-attention half: :func:`with_cross_attention_half`), so that the caller's own cache object leads
    back to them. The halves, not the `QSTCache`: that refers to the backbone cache, and a reference back would make a
    cycle that keeps every generation's caches alive until the garbage collector runs."""
    holder = _pairing_holder(paired.backbone)
    backbone_vars = getattr(holder, "__dict__", None)
    if backbone_vars is not None:
        backbone_vars[_PAIRING_ATTR] = _SideHalves(type(holder), paired.side, paired.memory, paired.routing)
        _follow_layout_methods(type(holder))


#: marks an ``EncoderDecoderCache`` that QST built around a plain cache (:func:`with_cross_attention_half`)
_WRAPPER_ATTR = "_peft_qst_wraps_plain_cache"


def with_cross_attention_half(cache: Cache) -> EncoderDecoderCache:
    """``cache`` as the self-attention half of a new ``EncoderDecoderCache`` with an empty cross-attention half, as
    GPT-2 with ``add_cross_attention`` wraps a plain cache it is given. The caller keeps and continues ``cache``, not
    the wrapper: the side halves are recorded on ``cache`` (:func:`remember_pairing`), and the next turn wraps it
    again, its cross-attention half computed again from the encoder states given then."""
    halves = EncoderDecoderCache(cache, DynamicCache(offloading=getattr(cache, "offloading", False)))
    halves.__dict__[_WRAPPER_ATTR] = True
    return halves


def _pairing_holder(backbone):
    """The cache object that the side halves are recorded on: the plain cache inside a wrapper that QST built, else
    the backbone cache itself."""
    if getattr(backbone, "__dict__", {}).get(_WRAPPER_ATTR):
        return backbone.self_attention_cache
    return backbone


class _SideHalves(tuple):
    """(side caches, copy memories) by adapter name, as recorded on a backbone cache, with the backbone cache's class
    and its :class:`BackboneRouting`.

    The class's layout methods are patched when a pairing is recorded in this process. A cache saved with its halves
    (``torch.save``, pickle) and loaded in a fresh process has none recorded there yet: a ``reorder_cache`` before its
    first forward left the side halves in the old order (silently wrong logits). Unpickling the halves patches the
    class first."""

    def __new__(cls, cache_class: type, side: dict, memory: dict, routing: Optional[BackboneRouting] = None):
        halves = super().__new__(cls, (side, memory))
        halves.cache_class = cache_class
        halves.routing = routing if routing is not None else BackboneRouting()
        return halves

    def __reduce__(self):
        return _restored_halves, (self.cache_class, self[0], self[1], self.routing)


def _restored_halves(cache_class: type, side: dict, memory: dict, routing=None) -> _SideHalves:
    _follow_layout_methods(cache_class)
    # halves pickled before they recorded their routing (three arguments): unknown, not "no backbone adapter"
    return _SideHalves(cache_class, side, memory, BackboneRouting(recorded=False) if routing is None else routing)


#: ids of the backbone caches whose side halves a layout method is being applied to in this context: an inner call on
#: the same cache (``QSTCache``'s own methods, which move every half themselves; a subclass's override that calls
#: ``super()``, both patched) must not move the halves a second time
_halves_handled: ContextVar[frozenset] = ContextVar("peft_qst_halves_handled", default=frozenset())


@contextmanager
def _halves_applied_here(backbone):
    # the plain cache inside a wrapper QST built holds the halves and is moved by the wrapper's methods: once only
    token = _halves_handled.set(_halves_handled.get() | {id(backbone), id(_pairing_holder(backbone))})
    try:
        yield
    finally:
        _halves_handled.reset(token)


def _follow_layout_methods(cache_class: type) -> None:
    """Make the layout methods of ``cache_class`` (``reorder_cache``, ``crop``, ``batch_select_indices``, ...) apply
    to the side halves recorded on a backbone cache as well, wherever they are defined (transformers' ``Cache`` for
    its dynamic, static and quantized caches). Once per defining class; a cache without recorded halves is unchanged.

    The caller's own cache object is the backbone half only. Changed between turns by its own methods (``crop`` to
    regenerate the last reply, ``batch_select_indices`` to drop finished rows, ``reorder_cache``), it left the side
    halves as they were: a reorder continued every row with another row's side history (silently wrong tokens), a
    selection or a crop failed with a shape error or a refusal, where LoRA's cache just continues."""
    for name in _LAYOUT_METHODS:
        owner = next((klass for klass in cache_class.__mro__ if name in vars(klass)), None)
        method = vars(owner).get(name) if owner is not None else None
        if owner is None or owner is QSTCache or not callable(method) or getattr(method, "_peft_qst_follows", False):
            continue
        setattr(owner, name, _following(name, method))


def _following(name: str, method):
    @functools.wraps(method)
    def layout_method(self, *args, **kwargs):
        halves = getattr(self, "__dict__", {}).get(_PAIRING_ATTR)
        if halves is None or id(self) in _halves_handled.get():
            return method(self, *args, **kwargs)
        # the method of a user's subclass may call the (also patched) method it overrides: the halves move once
        with _halves_applied_here(self):
            result = method(self, *args, **kwargs)
            for half in (*halves[0].values(), *halves[1].values(), halves.routing):
                if half is not None:
                    getattr(half, name)(*args, **kwargs)
        return result

    layout_method._peft_qst_follows = True
    return layout_method


def paired_cache(cache):
    """A `QSTCache` of a plain, non-empty backbone cache and the side halves an earlier forward recorded on it, else
    ``cache`` itself."""
    if cache is None or isinstance(cache, QSTCache):
        return cache
    halves = getattr(cache, "__dict__", {}).get(_PAIRING_ATTR)
    if halves is None or past_length(cache) == 0:
        return cache
    paired = QSTCache(cache, halves[0])
    paired.memory.update(halves[1])
    paired.routing = halves.routing
    return paired
