"""The side network's configuration: the base model's config with its widths divided by ``r``.

The side trunk is the backbone trunk's own class built from a shrunk config (:mod:`peft_qst.side`), so every width and
head layout of the side network is decided here, from the config alone: :func:`shrink_config` divides the hidden and
FFN sizes by ``r``, chooses the side blocks' attention heads (``side_heads``: :func:`resolve_side_heads`,
:func:`auto_side_heads`), rescales the widths that follow from the head width (rotary, multimodal rotary, Mamba heads,
LongRoPE factor lists) and the ranks and head counts inside the blocks, gives each layer the sizes its config sets
for it by the same rules (Gemma 4's: :func:`side_per_layer_config`), and refuses an ``r`` that fits no layout,
naming the values that fit. Kept apart from the network built from it, so that the rules read as one, and so that the
code that only needs a config's sizes (:mod:`peft_qst.signature`, ``QSTConfig.check_kwargs``) does not depend on the
network's module. Also here: the models no shrink rule can serve (:func:`unsupported_reason`,
:func:`unsupported_blocks_reason`), and where an encoder-decoder config keeps its decoder's sizes
(:func:`decoder_attribute`, :func:`num_blocks`), through which everything reads a size of the blocks QST side-tunes.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from .config import AUTO, QSTConfig
from .side_attention import side_attention_implementation

#: config attributes holding the width of token embeddings where it may differ from the hidden size (OPT, ELECTRA,
#: RoFormer, RemBERT)
EMBEDDING_WIDTH_ATTRIBUTES = ("word_embed_proj_dim", "embedding_size", "input_embedding_size")

#: config attributes holding a width that is a whole multiple of the hidden size, divided by r with it: Zamba's and
#: Zamba2's attention reads the block input concatenated with the embedding output (``attention_hidden_size`` = 2 d,
#: which their configs derive once; left at the backbone's, the side attention's norm met a narrower input);
#: RecurrentGemma's recurrent blocks run their RG-LRU at ``lru_width`` (d in the released models): kept, a side block's
#: recurrence was as wide as the backbone's, and its gates (heads x (lru_width / heads)^2) larger than the backbone's
HIDDEN_MULTIPLE_ATTRIBUTES = ("attention_hidden_size", "lru_width")

#: config attributes holding the FFN width; whichever the model defines is divided by r
FFN_SIZE_ATTRIBUTES = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")


def _is_ffn_width_attribute(name: str) -> bool:
    """Whether a config attribute holds an FFN width: the names above, and the variants mixture-of-experts and
    other models add (``moe_intermediate_size``, ``shared_expert_intermediate_size``, ``decoder_ffn_dim``,
    ``intermediate_size_mlp``, ...). Each is divided by r, so that a side expert is as much narrower than a backbone
    expert as a side FFN is than a backbone FFN."""
    return name in FFN_SIZE_ATTRIBUTES or name == "d_ff" or any(
        part in name for part in ("intermediate_size", "ffn_dim", "ffn_hidden_size")
    )


#: config attributes of multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...): its query/key/value head widths
#: are set by these, not by hidden_size / heads, and ``head_dim`` is the rotary width
MLA_ATTRIBUTE = "qk_rope_head_dim"
MLA_RANK_ATTRIBUTES = ("q_lora_rank", "kv_lora_rank")


# --------------------------------------------------------------------------------------------------------------------
# Shrinking a config
# --------------------------------------------------------------------------------------------------------------------


def uses_rotary(config) -> bool:
    return any(
        getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta", "rope_scaling")
    ) or getattr(config, "position_embedding_type", None) == "rotary"


def _num_heads(config) -> int:
    return int(global_size(config, decoder_attribute(config, "num_attention_heads")))


def is_state_space_model(config) -> bool:
    """Whether a config is a pure state-space model of the Mamba layout (Mamba, Falcon-Mamba, Mamba-2): no attention
    heads; each block's mixer widens the hidden state by ``expand`` (``intermediate_size``) and keeps a recurrent state
    of ``state_size`` per channel. Its side network shrinks those widths (:func:`_shrink_state_space`), not heads.
    RWKV and xLSTM, also without ``num_attention_heads``, have other layouts, which no rule covers."""
    try:
        heads = getattr(config, "num_attention_heads", None)
    except Exception:  # noqa: BLE001 - a heterogeneous config (dots3_note_text) refuses global access to a per-layer
        return False  # size: it has heads, which get_peft_model's checks refuse by name
    return heads is None and all(is_int_width(getattr(config, name, None)) for name in ("state_size", "expand"))


#: config attributes holding the number of key/value heads (Falcon names it ``num_kv_heads``, DBRX's attention
#: sub-config ``kv_n_heads``)
KV_HEAD_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "kv_n_heads")


def _kv_head_attribute(config) -> Optional[str]:
    return next((name for name in KV_HEAD_ATTRIBUTES if global_size(config, name) is not None), None)


def _num_kv_heads(config) -> Optional[int]:
    name = _kv_head_attribute(config)
    return int(global_size(config, decoder_attribute(config, name))) if name is not None else None


def _set_size(config, name: str, value) -> None:
    """Set a size attribute of a side config, on the decoder's counterpart too where the config maps ``name`` to the
    encoder's (:func:`decoder_attribute`): the decoder's is the one its ``*ForCausalLM`` builds, and the generic name
    then says the side's value to whatever reads it (the encoder is never built)."""
    setattr(config, name, value)
    counterpart = decoder_attribute(config, name)
    if counterpart != name:
        setattr(config, counterpart, value)


def side_head_counts(config, side_heads: Optional[int]) -> tuple[int, Optional[int]]:
    """The side blocks' numbers of attention heads and key/value heads (None: the config has no separate count).

    ``side_heads`` None keeps the backbone's counts (the paper's reference code). Otherwise the side trunk gets
    ``side_heads`` query heads and as many key/value heads as keep the backbone's grouping (query heads per key/value
    head) where that divides, else one: SmolLM2's 9 heads / 3 key/value heads become 3 / 1, or 1 / 1.
    """
    heads, kv_heads = _num_heads(config), _num_kv_heads(config)
    if side_heads is None:
        return heads, kv_heads
    if kv_heads is None:
        return side_heads, None
    group = max(1, heads // kv_heads)
    side_kv = side_heads // group if side_heads % group == 0 else 1
    return side_heads, max(1, side_kv)


def _backbone_head_dim(config) -> int:
    head_dim = global_size(config, "head_dim")
    return int(head_dim) if head_dim else int(config.hidden_size) // _num_heads(config)


def auto_side_heads(config, r: int) -> Optional[int]:
    """``side_heads="auto"``: of the head counts that fit the side hidden size ``d / r``, the one whose head dimension
    is closest to the backbone's by ratio (ties: the wider heads); None where none fits (``r`` itself does not fit).

    By ratio, not by difference: where the side width has few divisors, the fitting head dimensions lie far apart, and
    the nearest by difference can be the narrowest. Falcon-7B (4544 = 71 heads of 64) at r=16 has 284 channels, whose
    even head dimensions are 284, 142, 4 and 2: 4 is 60 from 64 and 142 is 78 away, so a difference picked 71 heads of
    4 (the paper's layout, which "auto" exists to avoid; a side training step took 3.3x as long as with 2 heads of
    142), where by ratio 142 (2.2x wider) is nearer than 4 (16x narrower).

    Why not the model's head count, as the paper's reference code keeps it: that divides the head dimension by ``r``
    (4 for SmolLM2-135M, 8 for LLaMA-2-7B at r=16), and attention at such widths costs far more than its arithmetic:
    on a 2-core CPU a QST training step of SmolLM2-135M took 2.21 s with its 9 side heads of 4 and 1.86 s with one
    head of 36, for the same accuracy on the quality harness over three seeds (docs/performance.md)."""
    candidates = auto_side_head_candidates(config, r)
    return candidates[0] if candidates else None


def auto_side_head_candidates(config, r: int) -> list[Optional[int]]:
    """The side head counts ``side_heads="auto"`` tries, in order: every count that fits the side hidden size ``d / r``,
    by closeness of its head dimension to the backbone's (see :func:`auto_side_heads`, the first), then None (the
    model's own numbers of heads) where that fits and is not already among them. The first is the one "auto" means;
    `get_peft_model` builds the next only where the model's own class refuses the side network of the one before or
    it does not run (DiffLlama needs an even number of key/value heads, which one side head of its grouping does not
    give; Kolibri 1.1 rounds keys and values in blocks of 16 channels, which 8-wide side heads do not fill)."""
    if is_state_space_model(config):
        return []  # no attention heads to choose
    fitting = _fitting_side_heads(config, r)
    if not fitting:
        return []
    side_hidden, target = int(config.hidden_size) // r, _backbone_head_dim(config)
    ordered: list[Optional[int]] = sorted(
        fitting, key=lambda heads: (abs(math.log(side_hidden / heads / target)), heads)
    )
    own = _num_heads(config)
    same_as_own = own in fitting and side_head_counts(config, own) == side_head_counts(config, None)
    if not same_as_own and _shrink_problem(config, r, None) is None:
        ordered.append(None)
    return ordered


def resolve_side_heads(config, qst_config: QSTConfig) -> Optional[int]:
    """The ``side_heads`` a QST config means for a model: ``"auto"`` resolved (None under ``init="pruned"``, which keeps
    the model's heads), anything else as it is."""
    if qst_config.side_heads != AUTO:
        return qst_config.side_heads
    if qst_config.init == "pruned" or is_state_space_model(config):
        return None
    return auto_side_heads(config, qst_config.r)


#: per-layer attributes of a heterogeneous config (``per_layer_config``) that the side network keeps as they are: the
#: attention windows (every other per-layer size is a width or a head count, which the shrink rules rescale)
KEPT_PER_LAYER_ATTRIBUTES = frozenset({"sliding_window", "attention_chunk_size"})


def global_size(config, name: str, default=None):
    """A config's value of ``name`` for the layers that do not override it: on a heterogeneous config (transformers'
    ``per_layer_config``), where reading a size set per layer raises (AmbiguousGlobalPerLayerAttributeError), the
    global value the other layers keep; elsewhere ``getattr``. The shrink rules size the side network from these, and
    the layers that override them from their own values (:func:`side_per_layer_config`)."""
    if not isinstance(config, type) and getattr(config, "is_heterogeneous", False) is True:
        return config._getattr_without_heterogeneous_validation(name, default)
    return getattr(config, name, default)


def per_layer_sizes(config) -> dict[str, list]:
    """The sizes a heterogeneous config sets per layer, other than the windows the side network keeps
    (:data:`KEPT_PER_LAYER_ATTRIBUTES`), as {name: [value of layer 0, layer 1, ...]}; empty for other configs. Gemma 4
    at its config's defaults: ``{"head_dim": [256, 256, 256, 256, 256, 512, ...]}`` (its full-attention layers have
    heads of ``global_head_dim``), and ``num_key_value_heads`` too where ``attention_k_eq_v`` gives them
    ``num_global_key_value_heads``."""
    names = sorted(set(getattr(config, "per_layer_attributes", None) or ()) - KEPT_PER_LAYER_ATTRIBUTES)
    if not names:
        return {}
    layers = config.per_layer_config
    return {name: [getattr(layers[index], name) for index in range(len(layers))] for name in names}


def _rescaled_per_layer(config, name: str) -> bool:
    """Whether the shrink rules rescale per-layer size ``name`` layer by layer (:func:`side_per_layer_config`): a head
    width (``head_dim``, outside multi-head latent attention, whose head widths do not follow the side width), a
    key/value head count, or an FFN width."""
    if name == "head_dim":
        return global_size(config, MLA_ATTRIBUTE) is None
    return name in KV_HEAD_ATTRIBUTES or _is_ffn_width_attribute(name)


def per_layer_widths_reason(config) -> Optional[str]:
    """Why QST cannot side-tune a model whose config sets sizes per layer (transformers' heterogeneous configs,
    ``per_layer_config``) that no shrink rule rescales layer by layer, or None.

    Head widths, key/value head counts and FFN widths set per layer are rescaled layer by layer
    (:func:`side_per_layer_config`): Gemma 4 at its config's defaults gives its full-attention layers heads of
    ``global_head_dim`` = 512 beside the others' ``head_dim`` = 256 (and, with ``attention_k_eq_v``, their own number of
    key/value heads). Before they were, such a model crashed inside QST reading ``config.head_dim``
    (AmbiguousGlobalPerLayerAttributeError), then was refused. Other sizes set per layer (a number of attention heads,
    which the side blocks choose once for all layers, ``side_heads``; a hidden size; the head widths of multi-head
    latent attention) are still refused, naming them."""
    sizes = per_layer_sizes(config)
    refused = [name for name in sizes if not _rescaled_per_layer(config, name)]
    if not refused:
        return None
    values = ", ".join(f"{name} in {sorted(set(sizes[name]), key=repr)}" for name in refused)
    return (
        f"its config sets {', '.join(refused)} per layer (per_layer_config: {values}), and QST's shrink rules rescale "
        "layer by layer only head widths (head_dim, outside multi-head latent attention), key/value head counts and "
        "FFN widths; the side network is built from one value of each other size per model"
    )


def _per_layer_head_dim_problem(config, side_head_dim: int) -> Optional[str]:
    """Why a side head of ``side_head_dim`` (the side width of the layers that keep the config's ``head_dim``) does not
    scale to the head widths a heterogeneous config sets per layer, or None: each such layer's side heads are as much
    wider or narrower than the others' as the model's (Gemma 4's full-attention heads of 512 beside 256 give side heads
    twice as wide), which must be a whole number of channels, and an even one where the model uses rotary
    embeddings."""
    widths = per_layer_sizes(config).get("head_dim")
    if not widths or not _rescaled_per_layer(config, "head_dim"):
        return None
    reference = _backbone_head_dim(config)
    for index, width in enumerate(widths):
        if not is_int_width(width) or width == reference:
            continue
        side = width * side_head_dim / reference
        if side != int(side) or side < 1:
            return (
                f"its side head dimension of {side_head_dim} does not scale to layer {index}'s head_dim {width} (the "
                f"others' is {reference}): {side_head_dim} x {width} / {reference} is not a whole number of channels"
            )
        if uses_rotary(config) and int(side) % 2:
            return (
                f"its side head dimension of {side_head_dim} scales to an odd one ({int(side)}) for layer {index}'s "
                f"head_dim {width} (the others' is {reference}), which rotary embeddings cannot use"
            )
    return None


def side_per_layer_config(base_config, side, r: int, side_heads: Optional[int]) -> dict[int, dict]:
    """The ``per_layer_config`` of the side network of a heterogeneous model: each layer's sizes by the rules the
    config's global ones took, so that the side network has the backbone's per-layer structure at 1/r of its widths.

    A head width set per layer keeps its ratio to the side head width of the other layers (Gemma 4's full-attention
    heads of 512 beside 256: side heads twice as wide as the others', checked whole and even by
    :func:`_per_layer_head_dim_problem`); a key/value head count set per layer follows ``side_heads`` as the global one
    does (:func:`side_head_counts` with that layer's grouping); an FFN width set per layer is divided by r; the windows
    (:data:`KEPT_PER_LAYER_ATTRIBUTES`) are kept. Empty for a homogeneous config."""
    names = sorted(set(getattr(base_config, "per_layer_attributes", None) or ()))
    if not names:  # homogeneous (transformers marks a config heterogeneous even where no layer overrides a size)
        return {}
    layers = base_config.per_layer_config
    reference_head_dim = _backbone_head_dim(base_config) if "head_dim" in names else None
    overrides: dict[int, dict] = {}
    for index in range(len(layers)):
        layer, values = layers[index], {}
        for name in names:
            value = getattr(layer, name)
            if name in KEPT_PER_LAYER_ATTRIBUTES or value is None:
                values[name] = value
            elif name == "head_dim":
                values[name] = int(value) * _backbone_head_dim(side) // reference_head_dim
            elif name in KV_HEAD_ATTRIBUTES:
                values[name] = side_head_counts(layer, side_heads)[1]
            elif is_int_width(value):
                values[name] = max(1, value // r)
            else:  # a list of FFN widths (per layer of a layer): divided one by one, as _divide_ffn_widths does
                values[name] = type(value)(max(1, width // r) for width in value)
        overrides[index] = values
    return overrides


def _without_per_layer_sizes(config):
    """A heterogeneous config as a homogeneous one, every layer at the global sizes (those of the layers that do not
    override them), for the shrink rules to read and copy; ``config`` itself where it is homogeneous. The layers'
    own sizes are set on the side config afterwards (:func:`_set_per_layer_sizes`)."""
    if not getattr(config, "per_layer_attributes", None):
        return config
    reference = copy.copy(config)  # as transformers' per_layer_config[i] builds a layer's config
    reference.__dict__.pop("_heterogeneity_spec", None)
    return reference


def _set_per_layer_sizes(base_config, side, r: int, side_heads: Optional[int]):
    """``side`` with the per-layer sizes of a heterogeneous ``base_config`` (:func:`side_per_layer_config`)."""
    overrides = side_per_layer_config(base_config, side, r, side_heads)
    if overrides:
        side.per_layer_config = overrides
    return side


#: config attributes that say a model runs a range of its blocks several times in each forward: (the first looped
#: block, the end of the range or the number of blocks in it, whether that is a count, the number of passes)
LOOPED_BLOCK_ATTRIBUTES = (
    ("loop_layer_index_start", "loop_layer_index_end", False, "loop_num_passes"),  # Inkling2-Loop
    ("n_input_layers", "n_recurrent_layers", True, "n_recurrent_loops"),  # Dory
)


def looped_blocks_reason(config) -> Optional[str]:
    """Why QST cannot side-tune a model whose config has it run some of its blocks more than once per forward, or None.

    The side network reads each block's output once, and a block run in several passes has one output per pass. Such
    a model was refused only at its first forward (:meth:`~peft_qst.layer.QSTLayer.forward` counts the hidden states
    the blocks returned: more than blocks), after ``get_peft_model`` had built a side network, and a training script had
    set up its trainer, for nothing. A config whose range holds no block, or with one pass, runs each block once. The
    count at the first forward stays, for models whose configs do not say that they loop."""
    for start_name, span_name, span_is_count, passes_name in LOOPED_BLOCK_ATTRIBUTES:
        start, span, passes = (getattr(config, name, None) for name in (start_name, span_name, passes_name))
        if not all(is_int_width(value) for value in (start, span, passes)) or passes <= 1:
            continue
        looped = range(max(start, 0), min(start + span if span_is_count else span, num_blocks(config)))
        if len(looped):
            return (
                f"its config has it run blocks {looped.start} to {looped.stop - 1} (of {num_blocks(config)}) "
                f"{passes} times in each forward ({start_name}={start}, {span_name}={span}, {passes_name}={passes}), "
                "and QST's side network reads the output of each block once, where a looped block has one per pass. "
                "Use LoRA for this model"
            )
    return None


def unsupported_reason(config) -> Optional[str]:
    """Why QST cannot side-tune a model with this config whatever r is, or None."""
    reason = per_layer_widths_reason(config) or looped_blocks_reason(config)
    if reason is not None:
        return reason
    hidden = int(config.hidden_size)
    for name in EMBEDDING_WIDTH_ATTRIBUTES:
        width = getattr(config, name, None)
        if width is not None and width != hidden:
            return (
                f"its {name}={width} differs from hidden_size={hidden}: its trunk projects embeddings in and hidden "
                "states out at another width, which QST does not support"
            )
    ngram = getattr(config, "ngram", None)
    if is_int_width(ngram) and ngram > 0:
        # ProphetNet's causal LM: its LM head reads the predicting streams (outputs[1]) and never last_hidden_state.
        # Built, its side network's output was added to a state no logit depends on: the first training step's loss
        # had no gradient (the side network's first run had failed before that, on the streams its blocks pass)
        return (
            f"its causal LM computes its logits from the decoder's {ngram} n-gram predicting streams "
            "(last_hidden_state_ngram, which its blocks carry after the main stream along the sequence), not from the "
            "last hidden state QST's side network adds its output to, so no side network could change a logit. Use "
            "LoRA for this model"
        )
    return None


def unsupported_blocks_reason(blocks: nn.ModuleList) -> Optional[str]:
    """Why QST cannot side-tune a model whose decoder blocks are ``blocks``, whatever r is, or None.

    Reversible blocks (Reformer's RevNet layers, which define ``backward_pass``) pass two residual streams, and their
    trunk runs them inside an autograd Function that records no graph in forward and recomputes each block's input
    from its output in backward. A side trunk of the same class runs its blocks so too: the downsampled backbone
    state QST mixes into each side block's input would get no gradient and break that recomputation. No shrink rule
    mends that (before this check, the side network's config was refused first, for its axial position embeddings,
    and with those narrowed its blocks refused the single hidden state a side block hands on)."""
    block = next(iter(blocks), None)
    if block is not None and callable(getattr(type(block), "backward_pass", None)):
        return (
            f"its blocks are reversible ({type(block).__name__} defines backward_pass: RevNet residuals, two streams "
            "per block), run inside an autograd Function that records no graph and recomputes each block's input "
            "from its output in backward; a side network of the same classes could not mix the backbone's hidden "
            "states into its blocks and be trained. Use LoRA for this model"
        )
    return None


def _fitting_r_values(config, side_heads=None, limit: int = 64) -> list[int]:
    """The r values up to ``limit`` that shrink this config with ``side_heads`` (a count, None or ``"auto"``)."""
    if side_heads == AUTO:
        return [r for r in range(1, limit + 1) if auto_side_heads(config, r) is not None]
    return [r for r in range(1, limit + 1) if _shrink_problem(config, r, side_heads) is None]


def _fitting_side_heads(config, r: int) -> list[int]:
    side_hidden = int(config.hidden_size) // r
    return [h for h in range(1, side_hidden + 1) if _shrink_problem(config, r, h) is None]


def _shrink_problem(config, r: int, side_heads: Optional[int] = None) -> Optional[str]:
    """Why ``r`` (with ``side_heads`` attention heads, None: the model's) cannot shrink this config, or None."""
    if is_state_space_model(config):
        return _state_space_problem(config, r, side_heads)
    hidden = int(config.hidden_size)
    heads = side_heads or _num_heads(config)
    if hidden % r:
        return f"r={r} does not divide hidden_size={hidden}"
    side_hidden = hidden // r
    if side_hidden % heads:
        whose = f"side_heads={heads}" if side_heads else f"the model's {heads} attention heads"
        return f"r={r} gives a side hidden size of {side_hidden}, which does not split into {whose}"
    mamba = _mamba_head_attributes(config)
    if mamba is not None:
        count, inner = int(getattr(config, mamba[0])), _side_mamba_width(config, side_hidden)
        if inner % count:
            return (
                f"r={r} gives a side Mamba width of {inner} (mamba_expand x {side_hidden}), which the model's {count} "
                f"Mamba heads ({mamba[0]}) do not split into equal heads"
            )
    sections = _mrope_section(config)
    if sections is not None and _side_mrope_section(config, side_hidden // heads) is not None:
        factor = _partial_rotary_factor(config)
        if int(side_hidden // heads * factor) // 2 < len(sections):
            return (
                f"r={r} gives a side head dimension of {side_hidden // heads}, too small for the model's "
                f"{len(sections)} multimodal rotary sections (mrope_section {sections})"
            )
    rotary_dim = _rotary_dim(config)
    if rotary_dim is not None:
        side_rotary = _side_rotary_dim(config, side_hidden // heads)
        if side_rotary < 2:
            return (
                f"r={r} gives a side head dimension of {side_hidden // heads}, too small for the model's rotary "
                f"fraction (rotary_dim {rotary_dim} of head dimension {_backbone_head_dim(config)})"
            )
    elif uses_rotary(config):
        head_dim = side_hidden // heads
        factor = _partial_rotary_factor(config)
        rotary_dims = int(head_dim * factor)
        if rotary_dims < 2 or rotary_dims % 2:
            what = (
                "head dimension" if factor == 1.0 else f"rotary dimension ({head_dim} x partial_rotary_factor {factor})"
            )
            return f"r={r} gives an odd or too small side {what} ({rotary_dims}), which rotary embeddings cannot use"
    problem = _per_layer_head_dim_problem(config, side_hidden // heads)
    return f"r={r} gives a side hidden size of {side_hidden} in {heads} heads, and {problem}" if problem else None


def _state_space_problem(config, r: int, side_heads: Optional[int]) -> Optional[str]:
    """:func:`_shrink_problem` for a pure state-space model (:func:`is_state_space_model`)."""
    hidden = int(config.hidden_size)
    if side_heads is not None:
        return (
            f"side_heads={side_heads} sets the side blocks' attention heads, and this state-space model has none "
            f"(leave side_heads at its default, {AUTO!r}, or None)"
        )
    if hidden % r:
        return f"r={r} does not divide hidden_size={hidden}"
    heads = getattr(config, "num_heads", None)
    inner = int(config.expand) * (hidden // r)
    if is_int_width(heads) and inner % heads:
        return (
            f"r={r} gives a side Mamba width of {inner} (expand x {hidden // r}), which the model's {heads} Mamba "
            "heads (num_heads) do not split into equal heads"
        )
    return None


def _shrink_state_space(base_config, side, r: int) -> None:
    """The rules for a pure state-space model (Mamba, Falcon-Mamba, Mamba-2), beside hidden_size / r: the mixer's
    inner width is divided by r, as FFN widths are (``expand`` kept): Mamba's and Falcon-Mamba's mixers read
    ``intermediate_size``, which is divided, and not ``expand``, which a published config may contradict
    (falcon-mamba-7b's says ``expand`` 16 beside an ``intermediate_size`` of 8192, 2 x 4096: taken as ``expand`` x the
    side width, its side mixers were 8 times too wide, 3.2% of the model instead of about 1/r^2); Mamba-2's mixer
    derives it as ``expand`` x the hidden size, which follows the side width. The rank of its time-step projection
    (``time_step_rank``) is divided by r, as FFN widths are; Mamba-2's heads keep their number, as the hybrids' Mamba
    heads do (:data:`MAMBA_HEAD_ATTRIBUTES`), and narrow to tile the side's inner width (``head_dim``), and its groups
    of B/C projections (``n_groups``, each ``state_size`` wide, which do not follow the hidden size) are divided by r,
    to a divisor of the head count, so that the side stays about 1/r^2 of the backbone. The state size and the
    convolution kernel, which set how much history a channel keeps and not a width, are kept. Checked by
    :func:`_state_space_problem`."""
    side_hidden = int(side.hidden_size)
    inner = int(base_config.expand) * side_hidden
    intermediate = getattr(base_config, "intermediate_size", None)
    if is_int_width(intermediate):
        side.intermediate_size = max(1, intermediate // r)
    rank = getattr(base_config, "time_step_rank", None)
    if is_int_width(rank):
        side.time_step_rank = max(1, math.ceil(rank / r))
    heads = getattr(base_config, "num_heads", None)
    if is_int_width(heads):
        side.head_dim = inner // heads
        groups = getattr(base_config, "n_groups", None)
        if is_int_width(groups):
            side.n_groups = math.gcd(heads, max(1, groups // r))


def _config_attribute_names(config) -> list[str]:
    """The attributes a config object holds (its own, not the class's)."""
    return [name for name in vars(config) if not name.startswith("_")]


def _partial_rotary_factor(config) -> float:
    """The fraction of each head's channels that rotary embeddings rotate (``rope_parameters``), 1.0 where unset."""
    return float((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) or 1.0)


def _rotary_dim(config) -> Optional[int]:
    """GPT-J/CodeGen's ``rotary_dim`` (the channels of each head that are rotated), or None where the model has none
    (multi-head latent attention sets its rotary width otherwise)."""
    value = getattr(config, "rotary_dim", None)
    if isinstance(value, int) and value and getattr(config, MLA_ATTRIBUTE, None) is None:
        return value
    return None


def _side_rotary_dim(config, side_head_dim: int) -> int:
    """``rotary_dim`` (GPT-J, CodeGen: the channels of each head that are rotated) for a side head: the same fraction
    of it, rounded down to an even number."""
    fraction = int(config.rotary_dim) / _backbone_head_dim(config)
    return int(side_head_dim * fraction) // 2 * 2


def _mrope_section(config) -> Optional[list[int]]:
    """Multimodal rotary sections (Qwen2-VL, Qwen2.5-VL, Qwen3.5: how many rotary frequencies follow the temporal,
    height and width position of a token), or None where the model has none."""
    sections = (getattr(config, "rope_parameters", None) or {}).get("mrope_section")
    return [int(s) for s in sections] if isinstance(sections, (list, tuple)) and sections else None


def _side_mrope_section(config, side_head_dim: int) -> Optional[list[int]]:
    """The multimodal rotary sections for a side head of ``side_head_dim``: the backbone's (which add up to half its
    rotated head width) scaled to half the side head's rotated width, each at least one frequency; the rounding
    remainder goes to the sections that lost most. The side trunk gets the backbone's 3-D position ids, so its
    rotary follows the image's height and width as the backbone's does, in the same proportions. None where the model
    has no sections, or where they do not add up to half its rotated width (a layout these rules do not know: the
    side network is left as built, and :meth:`~peft_qst.side.QSTSideNetwork._check_runs` refuses it if it does not
    run)."""
    sections = _mrope_section(config)
    if sections is None:
        return None
    factor = _partial_rotary_factor(config)
    if int(_backbone_head_dim(config) * factor) // 2 != sum(sections):
        return None
    target = int(side_head_dim * factor) // 2
    if target == sum(sections):
        return sections
    if target < len(sections):
        return [1] * len(sections)  # too narrow; _shrink_problem names it
    exact = [s * target / sum(sections) for s in sections]
    scaled = [max(1, int(e)) for e in exact]
    step = 1 if sum(scaled) < target else -1  # -1: the minimum of one frequency each took more than the remainder
    order = sorted(range(len(sections)), key=lambda i: step * (scaled[i] - exact[i]))
    i = 0
    while sum(scaled) != target:
        index = order[i % len(order)]
        if scaled[index] + step >= 1:
            scaled[index] += step
        i += 1
    return scaled


#: (head-count, head-width) attribute names of Mamba mixers whose heads tile ``mamba_expand * hidden_size``: Bamba's
#: and GraniteMoeHybrid's, and Zamba2's (whose mixer reshapes its ``mamba_expand`` x d channels into ``n_mamba_heads``
#: heads of ``mamba_headdim``: left at the backbone's width, the side mixer's reshape failed)
MAMBA_HEAD_ATTRIBUTES = (("mamba_n_heads", "mamba_d_head"), ("n_mamba_heads", "mamba_headdim"))


def _mamba_head_attributes(config) -> Optional[tuple[str, str]]:
    """(head-count, head-width) attribute names of a hybrid model's Mamba mixers whose heads must tile
    ``mamba_expand * hidden_size`` (:data:`MAMBA_HEAD_ATTRIBUTES`), or None."""
    if getattr(config, "mamba_d_ssm", None) is not None:  # Falcon-H1: its own inner width, independent of d
        return None
    for count, width in MAMBA_HEAD_ATTRIBUTES:
        if getattr(config, count, None) and getattr(config, width, None) not in (None, "auto"):
            return count, width
    return None


def _side_mamba_width(config, side_hidden: int) -> int:
    return int(getattr(config, "mamba_expand", 2)) * side_hidden


def _set_token_id(config, name: str, value) -> None:
    try:
        setattr(config, name, value)
    except Exception:  # strict (dataclass-validated) configs refuse None for an int field
        setattr(config, name, 0)


#: rope parameters that hold one factor per rotary frequency (LongRoPE: Phi-3-128k, Phi-3.5, Phi-4-mini)
ROPE_FACTOR_LISTS = ("short_factor", "long_factor")


def _resample_factors(factors: list, length: int) -> list:
    """``factors`` (one per backbone rotary frequency) at ``length`` side frequencies. Side frequency i of n is
    ``base ** (-i / n)``, the backbone's frequency ``j = i * len(factors) / n`` of its ``len(factors)``: the factor is
    read there, interpolated linearly between the two neighbouring entries, so the side network rotates each of its
    channel pairs at the rate the backbone uses for that frequency."""
    count = len(factors)
    resampled = []
    for index in range(length):
        position = min(index * count / length, count - 1)
        low = int(position)
        high = min(low + 1, count - 1)
        weight = position - low
        resampled.append(float(factors[low]) * (1 - weight) + float(factors[high]) * weight)
    return resampled


def _resample_rope_factor_lists(base_config, side, side_head_dim: int) -> None:
    """LongRoPE's per-frequency factor lists have one entry per rotary frequency of a head (rotary width / 2), and
    transformers refuses a config whose lists do not match its head width. A side head narrower (or wider) than the
    backbone's (``side_heads`` "auto" where no head count keeps the backbone's width, e.g. Phi-4-mini's 128-wide
    heads at r=16 give 96-wide side heads; ``side_heads=None``) gets the lists resampled to its own frequencies (see
    :func:`_resample_factors`), so that it follows the backbone's scaling rather than being refused."""
    parameters = getattr(side, "rope_parameters", None)
    if not isinstance(parameters, dict):
        return
    # per-layer-type parameters (Gemma 3: {"sliding_attention": {...}, "full_attention": {...}}) or one set
    groups = [v for v in parameters.values() if isinstance(v, dict)] if "rope_type" not in parameters else [parameters]
    for group in groups:
        lists = [name for name in ROPE_FACTOR_LISTS if isinstance(group.get(name), (list, tuple))]
        if not lists:
            continue
        partial = group.get("partial_rotary_factor", getattr(base_config, "partial_rotary_factor", None))
        length = int(side_head_dim * float(partial if partial is not None else 1.0)) // 2
        for name in lists:
            if len(group[name]) != length and length > 0:
                group[name] = _resample_factors(list(group[name]), length)


def _auto_heads_alternative(base_config, qst_config: QSTConfig) -> str:
    """The working alternative to name when the model's own heads (``side_heads=None``, or ``init="pruned"``, which
    keeps them) do not fit ``r``: side heads chosen by ``"auto"``, which fit far more r values. Without it the refusal
    of a model whose head count fits no r at all (gpt-oss-20b: 2880 channels in 64 heads of 45, an odd dimension at
    every r) listed no values and no way out."""
    r, hidden = qst_config.r, int(base_config.hidden_size)
    auto = auto_side_heads(base_config, r) if hidden % r == 0 else None
    if auto is not None:
        fits = f"fits r={r} ({auto} head{'s' if auto > 1 else ''} of {hidden // r // auto})"
    else:
        fits = f"fits r in {_fitting_r_values(base_config, AUTO)}"
    if qst_config.init == "pruned":
        return (
            f" init='pruned' keeps the model's heads; with init='random', side_heads={AUTO!r} (the default) {fits}."
        )
    return f" side_heads={AUTO!r} (the default: heads about as wide as the model's) {fits}."


def _not_a_lora_rank(r: int, fitting: list) -> str:
    """The reminder a refused ``r`` ends with. QLoRA scripts set ``r`` (64 in many recipes), and one switched to QST
    by renaming ``LoraConfig`` to ``QSTConfig`` keeps it: ``r=64`` then reads as a reduction factor, and on small models
    (SmolLM2-135M: 576 / 64 = 9 channels) it fits no head layout. The list of fitting values alone did not say that
    the value came from the LoRA line, nor that leaving it out is the fix. Nothing where ``r`` is the default or
    itself in ``fitting``: then something else is refused (``side_heads`` set on a state-space model, whose ``fitting``
    is listed without heads), and telling to leave a fitting ``r`` out said the wrong value was at fault."""
    default = QSTConfig.__dataclass_fields__["r"].default
    if r == default or r in fitting:
        return ""
    reminder = " Note that r is the side network's reduction factor here, not a LoRA rank"
    if default in fitting:
        return f"{reminder}: leave it out to use the default, {default} (the paper's), which fits this model."
    return f"{reminder}."


def shrink_config(base_config, qst_config: QSTConfig, dtype: torch.dtype):
    """Return the config of the side trunk: the base config with hidden and FFN sizes divided by ``r``.

    Rules (they follow from the config, not from a per-model table):
    - hidden size d -> d / r; every attribute that holds an FFN width is divided by r (at least 1), expert widths of
      mixture-of-experts models included (the number of experts is kept);
    - the numbers of attention and key/value heads follow ``side_heads`` (:func:`resolve_side_heads`,
      :func:`side_head_counts`: by default the count whose head dimension is closest to the backbone's; None keeps
      the backbone's counts), so the head dimension becomes (d / r) / heads; an explicit ``head_dim`` is rewritten
      accordingly;
    - widths that follow from the head width are rescaled with it: GPT-J's ``rotary_dim`` (the same fraction of a side
      head), the Mamba head width of hybrid models (Bamba) so that the heads tile ``mamba_expand`` x the side width,
      a value head width set apart from ``head_dim`` (MiMo-V2-Flash's ``v_head_dim``: the same ratio to a side head);
      multi-head latent attention (DeepSeek-V2/V3) keeps its head widths and divides its low-rank compressions by r;
      per-layer token inputs (Gemma 3n/4), which need token ids, are switched off;
    - widths inside the blocks that follow none of these rules (low ranks, indexer and linear-attention head counts,
      Mamba widths set apart from the hidden size) are divided by r too (``side_inner_widths``,
      :func:`_divide_inner_widths`);
    - pure state-space models (Mamba, Falcon-Mamba, Mamba-2) have no heads: their mixers' widths follow the side
      width instead (:func:`_shrink_state_space`);
    - the vocabulary is dropped (the side trunk reads downsampled hidden states, never token ids) and embeddings are
      untied; the quantization config is removed (the side network is never quantized);
    - everything else (layer count, layer types, sliding windows, rope parameters, norms, attention implementation)
      is kept, so the side trunk runs the same code paths as the backbone; only per-frequency rope factor lists
      (LongRoPE) are resampled to a side head of another width (:func:`_resample_rope_factor_lists`).
    """
    r, side_heads = qst_config.r, resolve_side_heads(base_config, qst_config)
    auto = qst_config.side_heads == AUTO and qst_config.init != "pruned"
    hidden = int(base_config.hidden_size)
    state_space = is_state_space_model(base_config)
    if state_space:  # no heads: "auto" means none
        problem = _shrink_problem(base_config, r, side_heads)
        if problem is not None:
            fitting = _fitting_r_values(base_config, None)
            raise ValueError(
                f"QSTConfig.r={r}, side_heads={qst_config.side_heads!r} cannot be used with this "
                f"{base_config.model_type} model: {problem}. Values of r that fit this model: {fitting}."
                + _not_a_lora_rank(r, fitting)
            )
    elif auto and side_heads is None:  # "auto" found no head count for this r
        problem = (
            f"r={r} does not divide hidden_size={hidden}"
            if hidden % r
            else f"r={r} gives a side hidden size of {hidden // r}, which no number of heads splits into heads of an "
            "even dimension (rotary embeddings need one)"
        )
        layered = None if hidden % r else _per_layer_head_dim_problem(base_config, hidden // r)
        if layered is not None:  # head widths set per layer (Gemma 4's): each layer's side heads must be whole too
            problem += f" that scales to every layer's own head_dim: with one side head, {layered}"
    else:
        problem = _shrink_problem(base_config, r, side_heads)
    if not state_space and problem is not None:
        fitting = _fitting_r_values(base_config, AUTO if auto else side_heads)
        message = (
            f"QSTConfig.r={r} cannot be used with this {base_config.model_type} model: {problem}. "
            f"Values of r that fit this model{f' with side_heads={side_heads}' if side_heads else ''}: {fitting}."
        )
        if side_heads and hidden % r == 0:
            message += f" Values of side_heads that fit r={r}: {_fitting_side_heads(base_config, r)}."
        elif side_heads is None and not auto:  # "auto" itself found no count: naming it as the way out says nothing
            message += _auto_heads_alternative(base_config, qst_config)
        raise ValueError(message + _not_a_lora_rank(r, fitting))
    layered = base_config  # a heterogeneous config: its layers' own sizes are set last (_set_per_layer_sizes)
    base_config = _without_per_layer_sizes(base_config)
    side = copy.deepcopy(base_config)
    side_hidden = hidden // r
    side.hidden_size = side_hidden
    if state_space:
        _shrink_state_space(base_config, side, r)
        return _set_per_layer_sizes(layered, _finish_side_config(base_config, side, dtype), r, side_heads)
    heads, kv_heads = side_head_counts(base_config, side_heads)
    if side_heads is not None:
        _set_size(side, "num_attention_heads", heads)
        if kv_heads is not None:
            _set_size(side, _kv_head_attribute(base_config), kv_heads)
    head_dim_is_derived = isinstance(getattr(type(base_config), "head_dim", None), property)
    latent_attention = getattr(base_config, MLA_ATTRIBUTE, None) is not None
    if latent_attention:
        # multi-head latent attention: the head widths (qk_nope/qk_rope/v_head_dim, and head_dim, the rotary width)
        # do not follow hidden_size and are kept; its low-rank query and key/value compressions are divided by r
        for name in MLA_RANK_ATTRIBUTES:
            value = getattr(base_config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(side, name, max(1, value // r))
    elif not head_dim_is_derived and (getattr(base_config, "head_dim", None) is not None or uses_rotary(base_config)):
        side.head_dim = side_hidden // heads
    if not latent_attention and is_int_width(getattr(base_config, "v_head_dim", None)):
        # a value head width set apart from head_dim (MiMo-V2-Flash: values of 128 beside queries and keys of 192)
        # follows the side head width in the same ratio; kept, the side blocks' values were as wide as the backbone's
        ratio = (side_hidden // heads) / _backbone_head_dim(base_config)
        side.v_head_dim = max(1, round(int(base_config.v_head_dim) * ratio))
    if _rotary_dim(base_config) is not None:
        side.rotary_dim = _side_rotary_dim(base_config, side_hidden // heads)
    sections = _side_mrope_section(base_config, side_hidden // heads)
    if sections is not None:
        side.rope_parameters = dict(side.rope_parameters, mrope_section=sections)
    mamba = _mamba_head_attributes(base_config)
    if mamba is not None:  # checked in _shrink_problem: the heads tile the side's Mamba width
        count, width = mamba
        setattr(side, width, _side_mamba_width(base_config, side_hidden) // int(getattr(base_config, count)))
    mlp_types = getattr(base_config, "mlp_layer_types", None)
    if isinstance(mlp_types, (list, tuple)) and "hash_moe" in mlp_types:
        # experts chosen by token id (DeepSeek-V4's hash-routed layers look them up from input_ids), which the side
        # trunk never sees: its side layers route with a learned router, as the model's other expert layers do
        side.mlp_layer_types = ["moe" if kind == "hash_moe" else kind for kind in mlp_types]
    if is_int_width(getattr(base_config, "o_lora_rank", None)):
        # DeepSeek-V4's grouped output projection passes through a low-rank width (1024 beside a hidden size of 4096),
        # which like the latent attention's compressions is divided by r
        side.o_lora_rank = max(1, int(base_config.o_lora_rank) // r)
    key_heads, value_heads = (getattr(base_config, f"linear_num_{kind}_heads", None) for kind in ("key", "value"))
    if (
        qst_config.side_linear_heads == "divided" and is_int_width(key_heads) and is_int_width(value_heads)
        and key_heads and value_heads % key_heads == 0
    ):
        # Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5, Qwen4-Exp, OLMo-Hybrid): its head widths do not follow
        # hidden_size, and with the backbone's head counts kept the side blocks' linear attention was as wide as the
        # backbone's (Qwen4-Exp: 32 value heads of 128 beside a 128-wide side block, 63 M of its 354 M trainable
        # parameters, and a recurrent state as large as the backbone's). As for attention heads, the widths are kept
        # and the counts divided by r (at least 1 key head), with as many value heads per key head as the backbone's
        side.linear_num_key_heads = max(1, key_heads // r)
        side.linear_num_value_heads = side.linear_num_key_heads * (value_heads // key_heads)
    if qst_config.side_inner_widths == "divided":
        _divide_inner_widths(base_config, side, r, heads)
    if getattr(base_config, "hidden_size_per_layer_input", None):
        # per-layer inputs (Gemma 3n/4) are looked up from token ids, which the side trunk never sees
        side.hidden_size_per_layer_input = 0
    if getattr(base_config, "ple_layer_ids", None):
        # Qwen4-Exp's per-layer n-gram embeddings, likewise looked up from token ids (recovered from the embeddings
        # where only inputs_embeds are given, and the side trunk has no embedding to recover them from)
        side.ple_layer_ids = []
    for name in HIDDEN_MULTIPLE_ATTRIBUTES:
        value = getattr(base_config, name, None)
        if is_int_width(value) and value and value % hidden == 0:
            setattr(side, name, value // hidden * side_hidden)
    for name in EMBEDDING_WIDTH_ATTRIBUTES:
        # a separate embedding width (OPT's word_embed_proj_dim) projects in and out of the trunk; the side trunk reads
        # no embeddings and writes no logits, so its embedding width is its hidden width (no projections)
        if getattr(base_config, name, None) is not None:
            setattr(side, name, side_hidden)
    ffn_names = dict.fromkeys([*FFN_SIZE_ATTRIBUTES, *_config_attribute_names(base_config)])
    _divide_ffn_widths(base_config, side, r, ffn_names)
    _shrink_block_sub_configs(base_config, side, r, kv_heads)
    _resample_rope_factor_lists(base_config, side, side_hidden // heads)
    return _set_per_layer_sizes(layered, _finish_side_config(base_config, side, dtype), r, side_heads)


#: ranks and widths inside a block that do not follow hidden_size, divided by r (rounded up) under
#: ``side_inner_widths="divided"``: Qwen4-Exp's hyper-connection mixing (hc_count x d -> hc_lowrank -> hc_count x d),
#: Gemma 3n's LAuReL residual (d -> laurel_rank -> d), Jamba's and Zamba's Mamba time-step projection
#: (``mamba_dt_rank``, d / 16 of the backbone, which pure Mamba models divide as ``time_step_rank``:
#: :func:`_shrink_state_space`), Zamba2's shared-block adapters (``adapter_rank``) and Zaya's router MLP
#: (``router_hidden_size``: 256 beside a 128-wide side block) and A.X-K2's gated norm (d -> gated_norm_rank -> d)
INNER_RANK_ATTRIBUTES = (
    "hc_lowrank", "laurel_rank", "mamba_dt_rank", "adapter_rank", "router_hidden_size", "gated_norm_rank"
)

#: head counts of block parts whose head width does not follow hidden_size, divided by r (at least 1) with their
#: widths kept, as attention heads are (``side_heads``): sparse-attention indexers (Qwen4-Exp's ``indexer_n_heads``,
#: the ``index_n_heads`` of DeepSeek-V3.2, GLM-MoE-DSA, DeepSeek-V4, HY-V4, MiniMax-M3, A.X-K) and the linear attention
#: of Kimi Linear and Bailing-hybrid (``linear_num_heads``)
INNER_HEAD_COUNT_ATTRIBUTES = ("indexer_n_heads", "index_n_heads", "linear_num_heads")


def _divide_inner_widths(base_config, side, r: int, heads: int) -> None:
    """The widths inside a side block that follow neither hidden_size nor an FFN or attention-head rule
    (``side_inner_widths="divided"``). Kept, each made its part of the side block as wide as the backbone's, about
    1/r of it instead of 1/r^2 (Qwen4-Exp: ``hc_lowrank`` 320 and its indexer's 16 query heads of 256, 29.8 M of its
    293.7 M side network at its published shape; Kimi Linear: 32 linear-attention heads of 128 beside a 144-wide
    side block). Ranks (:data:`INNER_RANK_ATTRIBUTES`) are divided by r, rounded up; head counts
    (:data:`INNER_HEAD_COUNT_ATTRIBUTES`) are divided by r, at least 1, their widths kept (an indexer's is set by
    its rotary embedding); an indexer with a head per key/value head (MiniMax-M3's) keeps one per side key/value
    head. The sliding-window layers' own heads (Inkling's ``swa_num_attention_heads`` and
    ``swa_num_key_value_heads``) are divided as the linear attention's are (at least 1 key/value head, as many query
    heads per key/value head as the model's); per-layer head counts (Laguna's ``num_attention_heads_per_layer``)
    follow the side blocks' attention heads (``heads``) in the model's proportion. Mamba mixers whose channels are
    not derived from hidden_size: Nemotron-H's (``mamba_num_heads`` x ``mamba_head_dim``) keep their head count and
    narrow each head by r, as Mamba-2's side mixers do; Falcon-H1's (``mamba_d_ssm``, heads of ``mamba_d_head``, 8
    wide in the released models) divide their head count by r instead. Both divide their B/C groups by r to a
    divisor of the head count (:func:`_shrink_state_space`)."""
    for name in INNER_RANK_ATTRIBUTES:
        value = getattr(base_config, name, None)
        if is_int_width(value) and value:
            setattr(side, name, max(1, math.ceil(value / r)))
    for name in INNER_HEAD_COUNT_ATTRIBUTES:
        value = getattr(base_config, name, None)
        if is_int_width(value) and value:
            setattr(side, name, max(1, value // r))
    if getattr(base_config, "index_n_heads", None) == _num_kv_heads(base_config) and _num_kv_heads(side):
        # one indexer head per key/value group (MiniMax-M3's indexer selects key blocks for each group)
        side.index_n_heads = _num_kv_heads(side)
    swa_heads, swa_kv_heads = (
        getattr(base_config, name, None) for name in ("swa_num_attention_heads", "swa_num_key_value_heads")
    )
    if is_int_width(swa_heads) and is_int_width(swa_kv_heads) and swa_kv_heads and swa_heads % swa_kv_heads == 0:
        side.swa_num_key_value_heads = max(1, swa_kv_heads // r)
        side.swa_num_attention_heads = side.swa_num_key_value_heads * (swa_heads // swa_kv_heads)
    per_layer = getattr(base_config, "num_attention_heads_per_layer", None)
    if isinstance(per_layer, (list, tuple)) and per_layer and all(is_int_width(count) for count in per_layer):
        kv_heads = _num_kv_heads(side) or 1
        ratio = heads / _num_heads(base_config)
        side.num_attention_heads_per_layer = type(per_layer)(
            max(1, round(count * ratio / kv_heads)) * kv_heads for count in per_layer
        )
    mamba_heads = getattr(base_config, "mamba_num_heads", None)
    mamba_head_dim = getattr(base_config, "mamba_head_dim", None)
    groups_name = None
    if is_int_width(mamba_heads) and mamba_heads and is_int_width(mamba_head_dim) and mamba_head_dim:
        side.mamba_head_dim = max(1, mamba_head_dim // r)
        side_mamba_heads, groups_name = mamba_heads, "n_groups"
    ssm_width, ssm_heads = getattr(base_config, "mamba_d_ssm", None), getattr(base_config, "mamba_n_heads", None)
    if is_int_width(ssm_width) and is_int_width(ssm_heads) and ssm_heads and ssm_width % ssm_heads == 0:
        side_mamba_heads = side.mamba_n_heads = max(1, ssm_heads // r)
        side.mamba_d_ssm = side_mamba_heads * (ssm_width // ssm_heads)
        groups_name = "mamba_n_groups"
    groups = getattr(base_config, groups_name, None) if groups_name else None
    if is_int_width(groups) and groups:
        setattr(side, groups_name, math.gcd(side_mamba_heads, max(1, groups // r)))


def _finish_side_config(base_config, side, dtype: torch.dtype):
    """What every side config gets once its widths are set: no vocabulary or token ids, untied embeddings, no
    quantization config, the side network's dtype and attention implementation (see :func:`shrink_config`)."""
    side.vocab_size = 1
    for name in ("bos_token_id", "eos_token_id"):
        if hasattr(side, name):
            _set_token_id(side, name, None)
    if hasattr(side, "pad_token_id"):
        # RoBERTa-style embeddings number positions from the padding index: keep one (inside the side's vocabulary
        # of 1, as the side trunk reads no token ids) where the model has one
        _set_token_id(side, "pad_token_id", 0 if isinstance(getattr(base_config, "pad_token_id", None), int) else None)
    side.tie_word_embeddings = False
    if hasattr(side, "quantization_config"):
        del side.quantization_config
    side.dtype = dtype
    side._attn_implementation = side_attention_implementation(base_config)  # SDPA in float32 on CPU where it can
    _avoid_misaligned_grouped_experts(base_config, side)
    return side


def _divide_ffn_widths(source, target, r: int, names) -> None:
    """Each of ``names`` that holds an FFN width in config ``source`` set on ``target`` divided by r (at least 1); a
    width per layer (Gemma 3n's ``intermediate_size`` list) is divided layer by layer. Left as it was, Gemma 3n's side
    FFNs kept the backbone's widths (8192 beside a 128-wide side block at r=16)."""
    for name in names:
        value = getattr(source, name, None)
        if not _is_ffn_width_attribute(name):
            continue
        if is_int_width(value):
            setattr(target, name, max(1, value // r))
        elif isinstance(value, (list, tuple)) and value and all(is_int_width(width) for width in value):
            setattr(target, name, type(value)(max(1, width // r) for width in value))


def _shrink_block_sub_configs(base_config, side, r: int, kv_heads: Optional[int]) -> None:
    """Sub-configs that configure parts of every block rather than a tower of their own (DBRX's ``attn_config`` and
    ``ffn_config``: no layers of their own) take the rules the config took: a ``hidden_size`` that mirrors the model's
    becomes the side's, FFN widths are divided by r, and a key/value head count equal to the model's becomes the side's.
    DBRX's experts read ``ffn_config.hidden_size`` and ``ffn_hidden_size`` and its attention ``attn_config.kv_n_heads``,
    not the top-level copies, so its side network kept the backbone's expert widths and key/value heads and did not run
    ("mat1 and mat2 shapes cannot be multiplied"). Towers (vision, audio) are left alone: they are models of their own,
    with a ``model_type`` (block parts have none) and layers. A layer count alone did not tell: Phi-4 multimodal's audio
    tower counts its layers as ``num_blocks``, and its widths were divided, which changed the shapes of the unused tower
    the side trunk builds (adapters saved before no longer loaded)."""
    hidden, base_kv = int(base_config.hidden_size), _num_kv_heads(base_config)
    for name in getattr(base_config, "sub_configs", None) or {}:
        sub = getattr(side, name, None)
        if not hasattr(sub, "to_dict") or getattr(sub, "model_type", None):
            continue
        if getattr(sub, "num_hidden_layers", None) is not None:
            continue
        if getattr(sub, "hidden_size", None) == hidden:
            sub.hidden_size = int(side.hidden_size)
        _divide_ffn_widths(sub, sub, r, _config_attribute_names(sub))
        kv_name = _kv_head_attribute(sub)
        if kv_name is not None and kv_heads is not None and getattr(sub, kv_name) == base_kv:
            setattr(sub, kv_name, kv_heads)


#: width multiple that keeps every row of a bf16/fp16 (and float32) expert matrix a multiple of 16 bytes
GROUPED_MM_ALIGNMENT = 8


def _avoid_misaligned_grouped_experts(base_config, side) -> None:
    """Run the side trunk's experts with transformers' ``"eager"`` implementation (a loop over the experts a batch
    routes to) where its widths do not suit ``"grouped_mm"``, the default for mixture-of-experts models.

    ``torch._grouped_mm`` (CPU and CUDA) requires every stride to be a multiple of 16 bytes: widths that are multiples
    of 8 in bf16/fp16. A backbone's widths are; d / r need not be: gpt-oss-20b's 2880 at r=16 gives 180-wide side
    experts (360 bytes a row in bf16), whose first forward failed with "strides should be multiple of 16 bytes", so
    a bf16 gpt-oss-20b (its usual dtype) was refused at the default QSTConfig (r=32 failed in float32 too). The side
    experts are small; the loop costs little beside the backbone. The expert width is the FFN width named for experts
    where the config has one (``moe_intermediate_size``: DeepSeek, Qwen MoE, whose dense FFNs do not run grouped), else
    every FFN width (Mixtral and gpt-oss size their experts by ``intermediate_size``)."""
    if getattr(base_config, "_experts_implementation", None) != "grouped_mm":
        return
    ffn = {
        name: int(getattr(side, name))
        for name in _config_attribute_names(side)
        if _is_ffn_width_attribute(name) and is_int_width(getattr(side, name, None))
    }
    experts = [width for name, width in ffn.items() if "moe" in name or ("expert" in name and "shared" not in name)]
    widths = [int(side.hidden_size), *(experts or ffn.values())]
    if any(width % GROUPED_MM_ALIGNMENT for width in widths):
        side._experts_implementation = "eager"


def is_int_width(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------------------------
# The decoder's sizes
# --------------------------------------------------------------------------------------------------------------------


#: model types whose ``num_hidden_layers`` counts more than the blocks they keep in their list, with the config
#: attribute that counts the blocks. Each LongCat-Flash block holds two attention sublayers (and two cache layers), and
#: its config derives ``num_hidden_layers`` as 2 x ``num_layers`` (transformers' own hidden-state recorder counts
#: ``num_layers``). Read as the block count, QST refused a model at its config's defaults ("no nn.ModuleList of 56
#: modules") and, where a block's lists of two sublayers happened to match (a one-block model), side-tuned those
#: sublayers instead.
BLOCK_COUNT_ATTRIBUTES = {"longcat_flash": "num_layers"}


def num_blocks(config) -> int:
    """The number of decoder blocks of a model with ``config``: its ``num_hidden_layers``, except where the config of an
    encoder-decoder model maps that to the encoder's count (BART's family, Whisper: ``encoder_layers``), whose
    ``*ForCausalLM`` classes run the decoder alone, of ``decoder_layers`` blocks. The two counts differ on distilled
    models, the assistants these decoders run as (distil-whisper: 32 and 2; whisper-large-v3-turbo: 32 and 4): read
    as the encoder's, QST looked for a list of 32 blocks in the decoder and refused the model ("cannot find the list
    of 32 decoder blocks"). Where ``num_hidden_layers`` counts sublayers, the attribute that counts blocks
    (:data:`BLOCK_COUNT_ATTRIBUTES`)."""
    return int(getattr(config, block_count_attribute(config)))


def block_count_attribute(config) -> str:
    """The config attribute that holds the number of decoder blocks (:func:`num_blocks`)."""
    name = BLOCK_COUNT_ATTRIBUTES.get(getattr(config, "model_type", None))
    if name is not None and getattr(config, name, None) is not None:
        return name
    return decoder_attribute(config, "num_hidden_layers")


def decoder_attribute(config, name: str) -> str:
    """The attribute of ``config`` (a config or config class) that holds size ``name`` for the decoder blocks QST
    side-tunes: ``name`` itself, except where the config of an encoder-decoder family maps it to the encoder's
    (``attribute_map``: BART's family and Whisper map ``num_hidden_layers`` and ``num_attention_heads``, Whisper also
    ``num_key_value_heads``, to ``encoder_layers`` and ``encoder_attention_heads``), whose ``*ForCausalLM`` runs the
    decoder alone: then its ``decoder_`` counterpart (``decoder_layers``, ``decoder_attention_heads``). Read and set
    through the generic names, the side network's head count (``side_heads``) went to the encoder, which the side
    trunk does not build, and its decoder kept the backbone's heads."""
    mapped = (getattr(config, "attribute_map", None) or {}).get(name)
    if isinstance(mapped, str) and mapped.startswith("encoder_"):
        counterpart = "decoder_" + mapped.removeprefix("encoder_")
        if hasattr(config, counterpart):
            return counterpart
    return name


#: the sizes model signatures record that a config may map to its encoder's (see :func:`decoder_attribute`)
DECODER_SIZES = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def sizes_mapped_to_encoder(config) -> bool:
    """Whether ``config`` (a config or config class) maps any of :data:`DECODER_SIZES` to its encoder's, so that QST
    reads the decoder's instead (:func:`decoder_attribute`)."""
    return any(decoder_attribute(config, name) != name for name in DECODER_SIZES)


def signature_predates_decoder_sizes(signature) -> bool:
    """Whether a ``base_model_signature`` read from a file was recorded before QST read the decoder's sizes of configs
    that map them to the encoder's (:func:`decoder_attribute`): one of such a model type without the ``sizes_of``
    entry that versions since record. Its counts are the encoder's (the generic names'), and its side blocks have the
    backbone decoder's heads whatever its ``side_heads`` says (that count went to the side config's encoder): such a
    file is read as ``side_heads=None`` (``QSTConfig.check_kwargs``), the layout its weights were trained in, which
    loads them to the logits they were saved with (a head count is no part of the weights' shapes). Only the model
    types transformers registers are known from the file alone; a config of remote code that maps its sizes so is
    told by the model it is loaded onto (``peft_qst.adapter_checks._predates_decoder_sizes``,
    ``_bind_config_to_model``)."""
    if not isinstance(signature, dict) or "sizes_of" in signature:
        return False
    model_type = signature.get("text_model_type", signature.get("model_type"))
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return False
    return sizes_mapped_to_encoder(CONFIG_MAPPING[model_type])

