"""The side network: a narrow copy of the backbone's architecture that learns while the backbone stays frozen.

The side network is built from the base model's *own* transformers classes: the decoder trunk class (e.g.
``LlamaModel``) is instantiated with a shrunk config (hidden and FFN sizes divided by ``r``). That trunk's forward
then does all the architecture-specific work — attention masks, rotary embeddings, sliding windows, packed sequences,
its KV cache, its final norm — exactly as the backbone does, with no copied modeling code. QST adds three things
around it:

- downsamplers that bring each backbone hidden state from width d to d/r;
- a gated recurrence: before side block i runs, its input is mixed with the downsampled output of backbone block i,
  ``g = (1 - s_i) * down_i(h_i) + s_i * g`` (:class:`QSTSideBlock` wraps each side block to do this);
- an upsample d/r -> d and a per-channel output gate that adds the result to the backbone's final hidden state.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import uuid
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary
from transformers.activations import ACT2FN

try:  # builds real (not meta) side weights under PEFT's low_cpu_mem_usage; see QSTSideNetwork.__init__
    from peft.utils.integrations import _skip_init_on_device
except ImportError:  # pragma: no cover - older PEFT without the helper
    _skip_init_on_device = nullcontext

from .cache import cache_field
from .config import AUTO, QSTConfig
from .fast_path import (
    autocast_off,
    fast_mix,
    fast_side_forward,
    keep_cache_dtype,
    note_side_weights_loaded,
    packed_weights_for,
    sharded,
)
from .lm_head import mark_low_rank_update
from .per_call import call_state, hold_call_state
from .side_attention import SIDE_SDPA, mask_for_side_trunk, register_side_sdpa, side_attention_implementation

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


#: parts of the side trunk that only run on inputs it is never given, dropped once it is built
#: (:func:`drop_unreached_parts`): it is called with ``inputs_embeds`` only (the downsampled embedding output), never
#: with token ids, images or audio, and only its ``last_hidden_state`` is read. Phi-4 multimodal's image and audio
#: towers (``embed_tokens_extend``, run only on ``input_ids``: 870.5 M of the 885.9 M trainable parameters of its side
#: network at the config's defaults), Gemma 3n's per-layer token embedding (``embed_tokens_per_layer``, empty once
#: per-layer inputs are switched off) and a pooler (BigBird's, read into ``pooler_output`` only). Kept, they were
#: counted as trainable, saved and held in memory, and never got a gradient.
UNREACHED_TRUNK_PARTS = ("embed_tokens_extend", "embed_tokens_per_layer", "pooler")

#: parts of each side block that only run on encoder states (the cross-attention of the decoders of BART, mBART,
#: Marian, Pegasus, Blenderbot, PLBart, MVP, BigBird-Pegasus, TrOCR, Whisper and MusicGen, built whatever the config,
#: and of BERT-style decoders built with ``add_cross_attention``). The side trunk is never handed encoder states
#: (``encoder_hidden_states`` goes to the backbone only: ``peft_qst.layer._BACKBONE_ONLY_KWARGS``).
UNREACHED_BLOCK_PARTS = ("encoder_attn", "encoder_attn_layer_norm", "crossattention")


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


class QSTUnsupportedModelError(ValueError):
    """Raised by `get_peft_model` for a model QST cannot side-tune, naming the model type and the reason; or, for the
    few models where only running them shows it (blocks that pass several residual streams in an unknown layout, or
    loop), at their first forward."""


# --------------------------------------------------------------------------------------------------------------------
# Shrinking a config
# --------------------------------------------------------------------------------------------------------------------


def _uses_rotary(config) -> bool:
    return any(
        getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta", "rope_scaling")
    ) or getattr(config, "position_embedding_type", None) == "rotary"


def _num_heads(config) -> int:
    return int(getattr(config, decoder_attribute(config, "num_attention_heads")))


def is_state_space_model(config) -> bool:
    """Whether a config is a pure state-space model of the Mamba layout (Mamba, Falcon-Mamba, Mamba-2): no attention
    heads; each block's mixer widens the hidden state by ``expand`` (``intermediate_size``) and keeps a recurrent state
    of ``state_size`` per channel. Its side network shrinks those widths (:func:`_shrink_state_space`), not heads.
    RWKV and xLSTM, also without ``num_attention_heads``, have other layouts, which no rule covers."""
    try:
        heads = getattr(config, "num_attention_heads", None)
    except Exception:  # noqa: BLE001 - a heterogeneous config (dots3_note_text) refuses global access to a per-layer
        return False  # size: it has heads, which get_peft_model's checks refuse by name
    return heads is None and all(_is_int_width(getattr(config, name, None)) for name in ("state_size", "expand"))


#: config attributes holding the number of key/value heads (Falcon names it ``num_kv_heads``, DBRX's attention
#: sub-config ``kv_n_heads``)
KV_HEAD_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "kv_n_heads")


def _kv_head_attribute(config) -> Optional[str]:
    return next((name for name in KV_HEAD_ATTRIBUTES if getattr(config, name, None) is not None), None)


def _num_kv_heads(config) -> Optional[int]:
    name = _kv_head_attribute(config)
    return int(getattr(config, decoder_attribute(config, name))) if name is not None else None


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
    head_dim = getattr(config, "head_dim", None)
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


def unsupported_reason(config) -> Optional[str]:
    """Why QST cannot side-tune a model with this config whatever r is, or None."""
    hidden = int(config.hidden_size)
    for name in EMBEDDING_WIDTH_ATTRIBUTES:
        width = getattr(config, name, None)
        if width is not None and width != hidden:
            return (
                f"its {name}={width} differs from hidden_size={hidden}: its trunk projects embeddings in and hidden "
                "states out at another width, which QST does not support"
            )
    ngram = getattr(config, "ngram", None)
    if _is_int_width(ngram) and ngram > 0:
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


class ResidualStreams:
    """How a model's blocks pass several residual streams between them, where they do, and QST's single-stream view of
    them. The side network reads one hidden state of the trunk's width per block; these blocks hand on a stack:

    - hyper-connections stacked on a dimension after the sequence (DeepSeek-V4, HY-V4: ``hc_mult`` streams, blocks
      pass ``(batch, sequence, hc_mult, hidden)``): the view is the mean of the streams, which the trunk's input
      (the embeddings repeated into every stream) makes the embeddings themselves;
    - AltUp (Gemma 3n: ``altup_num_inputs`` streams, blocks pass ``(altup_num_inputs, batch, sequence, hidden)``):
      the view is the active stream (``altup_active_idx``), the one each block's attention and FFN compute on;
    - hyper-connections side by side along the hidden dimension (Qwen4-Exp: ``hc_count`` streams, blocks pass
      ``(batch, sequence, hc_count * hidden)``): the view is the mean of the streams.

    Any fixed view is sound: the downsampler that reads it is learned. The side trunk, built from the model's own
    classes, keeps the machinery at side width (its own streams, expanded from the side embeddings by its own forward
    and collapsed by its own output head): :meth:`expand` mixes a downsampled single-stream backbone state into every
    side stream."""

    def __init__(self, count: int, dim: int, width: int, active: Optional[int] = None):
        self.count, self.dim, self.width, self.active = count, dim, width, active

    @classmethod
    def of(cls, config) -> Optional["ResidualStreams"]:
        """The streams of a model with this config, or None for a single residual stream."""
        for name, dim in (("hc_mult", 2), ("altup_num_inputs", 0), ("hc_count", -1)):
            count = getattr(config, name, None)
            if _is_int_width(count) and count > 1:
                active = int(getattr(config, "altup_active_idx", 0) or 0) if dim == 0 else None
                return cls(count, dim=dim, width=int(config.hidden_size), active=active)
        return None

    def single(self, hidden: torch.Tensor) -> torch.Tensor:
        """The single-stream view of a backbone hidden state (unchanged where it holds one stream already)."""
        if self.dim == -1:  # streams side by side along the hidden dimension
            if hidden.dim() != 3 or hidden.shape[-1] != self.count * self.width:
                return hidden
            return hidden.unflatten(-1, (self.count, -1)).mean(dim=-2)
        if hidden.dim() != 4 or hidden.shape[self.dim] != self.count:
            return hidden
        if self.active is not None:
            return hidden.select(self.dim, self.active)
        return hidden.mean(dim=self.dim)

    def expand(self, down: torch.Tensor, side_hidden: torch.Tensor) -> torch.Tensor:
        """``down`` (one stream, or the per-channel gate) shaped to broadcast over the streams of the side trunk's
        hidden state."""
        if self.dim == -1:
            if side_hidden.shape[-1] != self.count * down.shape[-1]:
                return down
            return down.repeat(*([1] * (down.dim() - 1)), self.count)
        if side_hidden.dim() != 4 or down.dim() != 3:
            return down
        return down.unsqueeze(self.dim)

    def __repr__(self) -> str:
        return f"ResidualStreams(count={self.count}, dim={self.dim}, width={self.width}, active={self.active})"


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
    elif _uses_rotary(config):
        head_dim = side_hidden // heads
        factor = _partial_rotary_factor(config)
        rotary_dims = int(head_dim * factor)
        if rotary_dims < 2 or rotary_dims % 2:
            what = (
                "head dimension" if factor == 1.0 else f"rotary dimension ({head_dim} x partial_rotary_factor {factor})"
            )
            return f"r={r} gives an odd or too small side {what} ({rotary_dims}), which rotary embeddings cannot use"
    return None


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
    if _is_int_width(heads) and inner % heads:
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
    if _is_int_width(intermediate):
        side.intermediate_size = max(1, intermediate // r)
    rank = getattr(base_config, "time_step_rank", None)
    if _is_int_width(rank):
        side.time_step_rank = max(1, math.ceil(rank / r))
    heads = getattr(base_config, "num_heads", None)
    if _is_int_width(heads):
        side.head_dim = inner // heads
        groups = getattr(base_config, "n_groups", None)
        if _is_int_width(groups):
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
    side network is left as built, and :meth:`QSTSideNetwork._check_runs` refuses it if it does not run)."""
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
    side = copy.deepcopy(base_config)
    side_hidden = hidden // r
    side.hidden_size = side_hidden
    if state_space:
        _shrink_state_space(base_config, side, r)
        return _finish_side_config(base_config, side, dtype)
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
    elif not head_dim_is_derived and (getattr(base_config, "head_dim", None) is not None or _uses_rotary(base_config)):
        side.head_dim = side_hidden // heads
    if not latent_attention and _is_int_width(getattr(base_config, "v_head_dim", None)):
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
    if _is_int_width(getattr(base_config, "o_lora_rank", None)):
        # DeepSeek-V4's grouped output projection passes through a low-rank width (1024 beside a hidden size of 4096),
        # which like the latent attention's compressions is divided by r
        side.o_lora_rank = max(1, int(base_config.o_lora_rank) // r)
    key_heads, value_heads = (getattr(base_config, f"linear_num_{kind}_heads", None) for kind in ("key", "value"))
    if (
        qst_config.side_linear_heads == "divided" and _is_int_width(key_heads) and _is_int_width(value_heads)
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
        if _is_int_width(value) and value and value % hidden == 0:
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
    return _finish_side_config(base_config, side, dtype)


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
        if _is_int_width(value) and value:
            setattr(side, name, max(1, math.ceil(value / r)))
    for name in INNER_HEAD_COUNT_ATTRIBUTES:
        value = getattr(base_config, name, None)
        if _is_int_width(value) and value:
            setattr(side, name, max(1, value // r))
    if getattr(base_config, "index_n_heads", None) == _num_kv_heads(base_config) and _num_kv_heads(side):
        # one indexer head per key/value group (MiniMax-M3's indexer selects key blocks for each group)
        side.index_n_heads = _num_kv_heads(side)
    swa_heads, swa_kv_heads = (
        getattr(base_config, name, None) for name in ("swa_num_attention_heads", "swa_num_key_value_heads")
    )
    if _is_int_width(swa_heads) and _is_int_width(swa_kv_heads) and swa_kv_heads and swa_heads % swa_kv_heads == 0:
        side.swa_num_key_value_heads = max(1, swa_kv_heads // r)
        side.swa_num_attention_heads = side.swa_num_key_value_heads * (swa_heads // swa_kv_heads)
    per_layer = getattr(base_config, "num_attention_heads_per_layer", None)
    if isinstance(per_layer, (list, tuple)) and per_layer and all(_is_int_width(count) for count in per_layer):
        kv_heads = _num_kv_heads(side) or 1
        ratio = heads / _num_heads(base_config)
        side.num_attention_heads_per_layer = type(per_layer)(
            max(1, round(count * ratio / kv_heads)) * kv_heads for count in per_layer
        )
    mamba_heads = getattr(base_config, "mamba_num_heads", None)
    mamba_head_dim = getattr(base_config, "mamba_head_dim", None)
    groups_name = None
    if _is_int_width(mamba_heads) and mamba_heads and _is_int_width(mamba_head_dim) and mamba_head_dim:
        side.mamba_head_dim = max(1, mamba_head_dim // r)
        side_mamba_heads, groups_name = mamba_heads, "n_groups"
    ssm_width, ssm_heads = getattr(base_config, "mamba_d_ssm", None), getattr(base_config, "mamba_n_heads", None)
    if _is_int_width(ssm_width) and _is_int_width(ssm_heads) and ssm_heads and ssm_width % ssm_heads == 0:
        side_mamba_heads = side.mamba_n_heads = max(1, ssm_heads // r)
        side.mamba_d_ssm = side_mamba_heads * (ssm_width // ssm_heads)
        groups_name = "mamba_n_groups"
    groups = getattr(base_config, groups_name, None) if groups_name else None
    if _is_int_width(groups) and groups:
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
        if _is_int_width(value):
            setattr(target, name, max(1, value // r))
        elif isinstance(value, (list, tuple)) and value and all(_is_int_width(width) for width in value):
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
        if _is_ffn_width_attribute(name) and _is_int_width(getattr(side, name, None))
    }
    experts = [width for name, width in ffn.items() if "moe" in name or ("expert" in name and "shared" not in name)]
    widths = [int(side.hidden_size), *(experts or ffn.values())]
    if any(width % GROUPED_MM_ALIGNMENT for width in widths):
        side._experts_implementation = "eager"


def _is_int_width(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------------------------
# Downsamplers
# --------------------------------------------------------------------------------------------------------------------


class AdapterDownsample(nn.Sequential):
    """The paper's default downsampler: Linear d->rank, activation, Linear rank->d/r, LayerNorm."""

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str):
        super().__init__(
            nn.Linear(in_features, rank),
            ACT2FN[activation],
            nn.Linear(rank, out_features),
            nn.LayerNorm(out_features),
        )


class LoRADownsample(nn.Sequential):
    """A low-rank linear map d->rank->d/r without activation."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=False))


class PoolDownsample(nn.Module):
    """Max or average over each group of r consecutive channels; no trainable parameters."""

    def __init__(self, r: int, kind: str):
        super().__init__()
        self.r = r
        self.kind = kind

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        grouped = hidden.unflatten(-1, (-1, self.r))
        return grouped.amax(-1) if self.kind == "maxpool" else grouped.mean(-1)

    def extra_repr(self) -> str:
        return f"r={self.r}, kind={self.kind}"


def build_downsample(config: QSTConfig, in_features: int, out_features: int) -> nn.Module:
    if config.downsample == "adapter":
        return AdapterDownsample(in_features, out_features, config.downsample_rank, config.activation)
    if config.downsample == "lora":
        return LoRADownsample(in_features, out_features, config.downsample_rank)
    if config.downsample == "linear":
        return nn.Linear(in_features, out_features)
    return PoolDownsample(config.r, config.downsample)


# --------------------------------------------------------------------------------------------------------------------
# Parameters that start at a constant
# --------------------------------------------------------------------------------------------------------------------


class ConstantOffset(nn.Module):
    """Parametrization ``value = constant + offset``, with the stored ``offset`` starting at zero.

    Norm weights start at 1, gates at their configured value. Stored as such in bf16 (the default side dtype under a
    bf16 compute dtype, and what TRL casts trainable parameters of 4-bit models to), an optimizer update of about the
    learning rate (1e-3) is below bf16's resolution near 1 (2**-8 relative) and is lost: those parameters would never
    train. Stored as an offset from their starting value, they sit near zero, where bf16 keeps every update.
    """

    def __init__(self, constant: float):
        super().__init__()
        self.constant = float(constant)

    def forward(self, offset: torch.Tensor) -> torch.Tensor:
        return offset + self.constant

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value - self.constant

    def extra_repr(self) -> str:
        return f"constant={self.constant}"


def store_constant_parameters_as_offsets(module: nn.Module) -> int:
    """Reparametrize every vector parameter of ``module`` (and its children) that holds one nonzero value in all its
    entries — norm weights, gates — as a :class:`ConstantOffset`; returns how many were reparametrized.

    Only vectors of two entries or more: the constant is not saved with the adapter (the stored offset is), so it must
    be what every build of the same side network starts from. A vector of one entry holds "one value" whatever its
    initialisation drew: the attention sink of a side block with one head (gpt-oss, Flint) is drawn at random, and
    stored as an offset from that draw it reloaded onto another one (silently other logits)."""
    count = 0
    for child in list(module.modules()):
        for name, parameter in list(child._parameters.items()):
            if parameter is None or parameter.dim() != 1 or parameter.numel() < 2 or parameter.device.type == "meta":
                continue
            first = parameter.detach().flatten()[0]
            if first.item() == 0.0 or not bool(torch.all(parameter.detach() == first)):
                continue
            parametrize.register_parametrization(child, name, ConstantOffset(first.item()))
            _picklable_parametrized_class(child)
            count += 1
    return count


def _picklable_parametrized_class(module: nn.Module) -> None:
    """Let ``module``, parametrized by :func:`store_constant_parameters_as_offsets`, be pickled.

    ``register_parametrization`` moves the module to a class made for it alone (``ParametrizedLlamaRMSNorm``), which
    pickle cannot name, and whose ``__getstate__`` refuses: "Serialization of parametrized modules is only supported
    through state_dict()". So ``torch.save(model)``, ``pickle`` and anything that pickles a model (multiprocessing
    with spawn, Ray, joblib) failed on every QST model, where a LoRA PeftModel pickles. Pickled instead as its original
    class, its state and the names of its parametrized tensors, the module is rebuilt by
    :func:`_rebuild_parametrized` with the same parametrizations, offsets and parameter objects (``copy.deepcopy``
    keeps torch's own ``__deepcopy__`` for such classes)."""
    type(module).__reduce_ex__ = _reduce_parametrized
    _keep_output_recording(module)


def _keep_output_recording(module: nn.Module) -> None:
    """Register a parametrized transformers model (a side trunk with a constant vector of its own, ZAYA's
    ``input_hidden_states_scale``: ``ParametrizedZayaModel``) with transformers' output recorder under its new class.
    The recorder looks up what a model records (``_can_record_outputs``: router logits, attentions) by the model's
    class, registered when the model was built; under the parametrized class it found nothing, so the side trunk
    returned no router logits and a forward with ``output_router_logits`` was refused."""
    recordable = getattr(module, "_can_record_outputs", None)
    if recordable is None:
        return
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers release without the registry looks the recorded outputs up otherwise
        return
    _CAN_RECORD_REGISTRY[module] = recordable


def _reduce_parametrized(module: nn.Module, protocol: int):
    original_class = type(module).__bases__[0]
    # the state as the original class gives it (nn.Module's leaves out a compiled forward): the parametrized class's
    # own __getstate__ is the one that refuses
    state = original_class.__getstate__(module)
    return _rebuild_parametrized, (original_class, tuple(module.parametrizations)), state


def _rebuild_parametrized(original_class: type, tensor_names: tuple) -> nn.Module:
    """An empty instance of ``original_class`` under a parametrized class of its own, as ``register_parametrization``
    leaves a module, with a property per parametrized tensor; pickle then sets its state (its ``parametrizations``,
    which hold the stored offsets, among it). torch's own (private) helpers, the ones ``register_parametrization``
    calls, build the class, so it behaves as one made by it (deepcopy, ``is_parametrized``,
    ``remove_parametrizations``)."""
    module = original_class.__new__(original_class)
    parametrize._inject_new_class(module)
    for name in tensor_names:
        parametrize._inject_property(module, name)
    _picklable_parametrized_class(module)
    return module


class OutputGate(nn.Module):
    """The per-channel output gate ``a`` of ``h_L + a * up(side)``."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, update: torch.Tensor) -> torch.Tensor:
        return self.weight * update


# --------------------------------------------------------------------------------------------------------------------
# Copy heads
# --------------------------------------------------------------------------------------------------------------------


class CopyHead(nn.Module):
    """Attention from each position back to the sequence's tokens, adding their output embeddings to the hidden state.

    The side network's contribution ``a * up(side)`` lives in a d/r-dimensional subspace of the hidden state: enough
    to learn an answer's format, too narrow to name an arbitrary token of the vocabulary, which is what an answer that
    copies or rearranges the prompt needs. A copy head adds ``sum_h gate_h * sum_j softmax_j(q_h(i) . k_h(j)) *
    W_out[x_j]``: a mixture of the LM-head rows of the tokens ``x_j`` it attends to, which raises exactly those
    tokens' logits — a pointer, as in pointer-generator networks, built in hidden-state space so that the model's own
    LM head, loss and generate stay unchanged. Queries read the side output and the backbone's last hidden state at
    position i, keys the side output and the second-to-last backbone block's output at position j (both carry what the
    token means in context and where it stands). The gates start at zero: the adapted model starts at the pretrained
    output, and the gates' gradient opens the heads where copying lowers the loss.

    During cached generation, the keys and the token rows of past positions are kept in a cache of their own
    (``memory``, a transformers ``DynamicCache`` with one layer), which QSTCache reorders, crops and selects with the
    others.
    """

    def __init__(self, hidden: int, side_hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = nn.Linear(side_hidden + hidden, heads * head_dim, bias=False)
        self.key = nn.Linear(side_hidden + hidden, heads * head_dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(heads))

    def forward(
        self,
        side_out: torch.Tensor,
        query_hidden: torch.Tensor,
        key_hidden: torch.Tensor,
        token_rows: torch.Tensor,
        key_mask: torch.Tensor,
        memory=None,
    ) -> torch.Tensor:
        """``key_mask`` (batch, queries, keys incl. past) says which keys each query may see; returns (batch, queries,
        hidden) in ``token_rows``' dtype.

        Computed in the head's own dtype, with autocast off (its scores and softmax are float32 anyway): under an
        autocast to the other half dtype, its ``torch.cat`` of bf16 side outputs (under float16 autocast) or of the
        memory's float16 LM-head rows (a float16 checkpoint under bf16 autocast) failed ("Unexpected floating
        ScalarType in at::autocast::prioritize"), in training and generation alike."""
        with autocast_off(side_out.device):
            return self._forward(side_out, query_hidden, key_hidden, token_rows, key_mask, memory)

    def _forward(self, side_out, query_hidden, key_hidden, token_rows, key_mask, memory):
        batch, length, _ = side_out.shape
        dtype = self.query.weight.dtype
        side_out = side_out.to(dtype)
        query = self.query(torch.cat([side_out, query_hidden.to(dtype)], -1))
        key = self.key(torch.cat([side_out, key_hidden.to(dtype)], -1))
        query = query.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        key = key.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        # LM-head rows at unit RMS: a gate of g raises the copied token's logit by about g * sqrt(d) * |row|, so
        # that the gates reach useful values at ordinary learning rates whatever the embeddings' scale (raw rows
        # of SmolLM2 have norm ~3: a gate would need to grow to ~1, a thousand steps at lr 1e-3, to move a logit by 10)
        rows = token_rows.float()
        rows = (rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)).to(token_rows.dtype)
        rows = rows.unsqueeze(1)  # (batch, 1, length, hidden): one "head" of values, shared by the heads
        if memory is not None:
            key, rows = memory.update(key, rows, 0)
        scores = (query.float() @ key.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~key_mask.unsqueeze(1), float("-inf"))
        weights = (self.gate.float().view(1, -1, 1, 1) * scores.softmax(-1)).sum(1)  # (batch, queries, keys)
        return weights.to(rows.dtype) @ rows[:, 0]


def copy_key_mask(
    batch: int,
    length: int,
    past: int,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """Which keys (past + current positions) each current position's copy heads may attend to: earlier or same
    positions, not padding (a 2-D ``attention_mask``), and within the same sequence of a packed row (no attention mask,
    and a new sequence wherever ``position_ids`` do not go up by one: transformers' rule for the backbone's own
    attention, ``find_packed_sequence_indices``, so that the copy heads never read across a boundary the backbone
    keeps). A position always sees itself, so that a padding position has one key and no row of the softmax is
    empty."""
    total = past + length
    query_positions = torch.arange(past, total, device=device)
    key_positions = torch.arange(total, device=device)
    mask = (key_positions.view(1, -1) <= query_positions.view(-1, 1)).expand(batch, length, total)
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = mask & attention_mask[:, -total:].to(device=device, dtype=torch.bool).unsqueeze(1)
    elif (
        attention_mask is None and position_ids is not None and position_ids.dim() <= 2 and past == 0
        and position_ids.shape[-1] == length
    ):
        positions = position_ids.to(device).view(-1, length)
        steps = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
        segments = torch.cumsum((steps != 1).long(), dim=-1).expand(batch, length)
        mask = mask & (segments.unsqueeze(2) == segments.unsqueeze(1))
    return mask | (key_positions.view(1, -1) == query_positions.view(-1, 1))


# --------------------------------------------------------------------------------------------------------------------
# The side network
# --------------------------------------------------------------------------------------------------------------------


def num_blocks(config) -> int:
    """The number of decoder blocks of a model with ``config``: its ``num_hidden_layers``, except where the config of an
    encoder-decoder model maps that to the encoder's count (BART's family, Whisper: ``encoder_layers``), whose
    ``*ForCausalLM`` classes run the decoder alone, of ``decoder_layers`` blocks. The two counts differ on distilled
    models, the assistants these decoders run as (distil-whisper: 32 and 2; whisper-large-v3-turbo: 32 and 4): read
    as the encoder's, QST looked for a list of 32 blocks in the decoder and refused the model ("cannot find the list
    of 32 decoder blocks")."""
    return int(getattr(config, decoder_attribute(config, "num_hidden_layers")))


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


def find_layer_list(trunk: nn.Module, num_layers: int) -> tuple[nn.Module, str]:
    """The ``nn.ModuleList`` of decoder blocks inside a trunk, as (parent module, attribute name)."""
    candidates = []
    for name, module in trunk.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            candidates.append(name)
    if not candidates:
        lists = [(name, len(module)) for name, module in trunk.named_modules() if isinstance(module, nn.ModuleList)]
        outer = min(lists, key=lambda item: item[0].count("."), default=None)
        count = decoder_attribute(getattr(trunk, "config", None), "num_hidden_layers")  # Whisper's: decoder_layers
        raise QSTUnsupportedModelError(
            f"QST cannot find the decoder blocks of {type(trunk).__name__}: the side network reads the output of each "
            f"of its config.{count}={num_layers} blocks, but it holds no nn.ModuleList of {num_layers} "
            "modules" + (f" ({outer[0]!r} holds {outer[1]})" if outer is not None else "") + f". Where "
            f"{count} was changed after loading, set it back to the number of blocks the model has; a "
            "model that does not keep its blocks in one list, or that runs them more than once per forward and counts "
            "each run as a layer (HRM's two stacks, run in cycles), is not supported (see the README's supported "
            "architectures)."
        )
    name = min(candidates, key=lambda n: n.count("."))  # the outermost one: blocks, not sub-blocks
    parent_name, _, attr = name.rpartition(".")
    return trunk.get_submodule(parent_name) if parent_name else trunk, attr


def _execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device accelerate's dispatch hook (``AlignDevicesHook``, set by ``from_pretrained(device_map=...)``) runs
    this module on, or None for a module without one."""
    for hook in _accelerate_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def _accelerate_hooks(module: nn.Module):
    """The accelerate hooks on ``module`` itself, those a ``SequentialHook`` holds included, outermost first."""
    hooks = [getattr(module, "_hf_hook", None)]
    while hooks:
        hook = hooks.pop(0)
        if hook is not None:
            hooks.extend(getattr(hook, "hooks", ()))
            yield hook


def onloaded_tensor(module: nn.Module, name: str, root: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """``module``'s tensor ``name`` (e.g. ``"weight"``) where code reads it outside the module's forward: as it is,
    or, where accelerate offloads the module to the CPU or disk (``from_pretrained(device_map=...)`` with ``"cpu"`` or
    ``"disk"`` entries, ``cpu_offload``, ``disk_offload``), whose weights wait on the meta device and are loaded by its
    ``AlignDevicesHook`` only for the module's own forward, the stored value from the hook's weights map, on the hook's
    execution device. None where the tensor is on the meta device and no hook holds it.

    ``root``, a module that holds ``module`` (a decoder block), is searched too: accelerate's
    ``preload_module_classes`` (``dispatch_model``, ``load_checkpoint_and_dispatch``) puts one hook on a whole block,
    which loads its submodules' weights together (``place_submodules``), and the submodules have no hook of their own:
    the block's weights map holds their tensors under their names within the block."""
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
        return tensor
    owners = [(module, name, False)]
    path = next((p for p, m in root.named_modules() if m is module), None) if root is not None else None
    if path:  # the ancestors within root, innermost first, with the tensor's name relative to each
        parts = path.split(".")
        owners += [
            (root.get_submodule(".".join(parts[:depth])), ".".join([*parts[depth:], name]), True)
            for depth in range(len(parts) - 1, -1, -1)
        ]
    for owner, key, ancestor in owners:
        for hook in _accelerate_hooks(owner):
            weights_map = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights_map is None:
                continue
            if ancestor and not getattr(hook, "place_submodules", False):
                continue
            try:
                value = weights_map[key]
            except KeyError:
                continue
            device = getattr(hook, "execution_device", None)
            return value.to(device if device is not None else value.device, dtype=tensor.dtype)
    return None


def module_device(module: nn.Module) -> torch.device:
    """Device a module computes on: the execution device of an accelerate dispatch hook on it or inside it (with CPU
    or disk offload its weights wait on the meta device and the hook brings them there for each forward), else the
    device of its first parameter (or buffer); CPU for a module with neither."""
    for submodule in module.modules():
        device = _execution_device(submodule)
        if device is not None:
            return device
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _non_reentrant(checkpoint: Callable) -> bool:
    """Whether a block's checkpoint function is PyTorch's non-reentrant checkpoint, as transformers'
    ``gradient_checkpointing_enable()`` builds it (``functools.partial(checkpoint, use_reentrant=False)``, its default
    and TRL's)."""
    return isinstance(checkpoint, functools.partial) and checkpoint.keywords.get("use_reentrant") is False


# The backbone hidden state each side block that a checkpoint wrapper holds mixed in during a forward with gradients,
# by the block's input tensor (a weak key, by identity: the entry lives as long as the input, which the wrapper keeps
# for its recomputation in backward).
_BACKBONE_HIDDEN_BY_BLOCK_INPUT = WeakIdKeyDictionary()


class QSTSideBlock(nn.Module):
    """One side block with its downsampler and gate: ``block((1 - s) * down(h_i) + s * g)``.

    It stands in the side trunk's layer list where the plain block stood, so the trunk's own forward calls it with
    the trunk's own arguments (masks, position embeddings, cache). The backbone hidden state ``h_i`` it mixes in is
    handed over by :class:`QSTSideNetwork` for the duration of one forward, in this thread's call state (several
    threads may run the model at once).

    Under gradient checkpointing (``gradient_checkpointing_enable()``, TRL's default) the whole of it is checkpointed,
    downsampler and gate included, not only the wrapped block: backward then keeps, per layer, ``h_i`` (which the
    downsampler's weight gradient needs in any case) and the block's narrow input, and recomputes the rest. So memory
    grows with depth by little more than the hidden states the downsamplers need.
    """

    #: the side trunk's residual streams, where its blocks pass several (:class:`ResidualStreams`): the downsampled
    #: backbone state, one stream, is mixed into each
    streams: Optional[ResidualStreams] = None

    def __init__(
        self,
        block: nn.Module,
        downsample: nn.Module,
        width: int,
        gate_init: float,
        dropout: float,
        streams: Optional[ResidualStreams] = None,
    ):
        super().__init__()
        self.streams = streams
        # "wrapped": a wrapper in the trunk's list of blocks runs this block (a checkpoint wrapper, which may run it
        # again in backward); set with the backbone hidden state by QSTSideNetwork.forward
        hold_call_state(self, ("backbone_hidden", "wrapped"))
        self.block = block
        self.downsample = downsample
        self.gate_logit = nn.Parameter(torch.full((width,), math.log(gate_init / (1.0 - gate_init))))
        self.dropout = nn.Dropout(dropout)

    def __getattr__(self, name: str) -> Any:
        # trunks read attributes of their blocks (e.g. ``attention_type`` for hybrid sliding-window models). Private
        # names are not passed on: wrappers look for their own on a module (torch's ``CheckpointWrapper`` for
        # ``_checkpoint_wrapped_module``, which accelerate's FSDP2 wrap policy reads to see through it), and found
        # on the (wrapped) block they made this one look like the wrapper of a decoder layer: accelerate's FSDP2
        # activation checkpointing wrapped it too, and its recomputation ran it without its backbone hidden state.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block" or name.startswith("_"):
                raise
            return getattr(self.block, name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state = call_state(self)
        backbone_hidden = state.get("backbone_hidden")
        if backbone_hidden is None:
            # a checkpoint wrapper around this block (FSDP1's activation checkpointing wraps what PEFT's FSDP wrap
            # policy wraps, side blocks included) recomputes it in backward, outside QSTSideNetwork.forward: it takes
            # the backbone hidden state its forward mixed into the same input
            backbone_hidden = _BACKBONE_HIDDEN_BY_BLOCK_INPUT.get(hidden_states)
            if backbone_hidden is None:
                raise RuntimeError(
                    "QSTSideBlock was called outside QSTSideNetwork.forward, on an input no forward of it recorded. "
                    "A reentrant activation checkpoint around side blocks (torch.utils.checkpoint with "
                    "use_reentrant=True, checkpoint_wrapper with CheckpointImpl.REENTRANT) does this: it recomputes "
                    "them in backward on copies of their inputs, so the backbone hidden state they mixed in cannot be "
                    "found; so does a checkpoint applied to a side block in place rather than by a wrapper put in the "
                    "trunk's list of blocks. Use a non-reentrant wrapper (use_reentrant=False, "
                    "CheckpointImpl.NO_REENTRANT, as accelerate's FSDP activation checkpointing does) or the model's "
                    "activation_checkpointing_enable() (gradient_checkpointing_enable(), its deprecated name)."
                )
        elif state.get("wrapped") and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # only under a wrapper: the entry keeps the backbone hidden state until backward, which a pooling
            # downsampler, or one of another dtype or device, would not; in eval mode too, as a checkpoint wrapper
            # recomputes whether or not the model trains. Not in compiled code: Dynamo does not trace the weak
            # dictionary (a compiled training step would break its graph there); a checkpoint traced into a compiled
            # graph recomputes inside that graph, without calling this forward again.
            _BACKBONE_HIDDEN_BY_BLOCK_INPUT[hidden_states] = backbone_hidden
        block = self.block
        checkpointing = getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()
        if (
            checkpointing
            and not _non_reentrant(block._gradient_checkpointing_func)
            and not (hidden_states.requires_grad or backbone_hidden.requires_grad)
        ):
            # a reentrant checkpoint (use_reentrant=True, which TRL forces under DeepSpeed ZeRO-3) records a graph only
            # through inputs that require grad, not through the block's own parameters: the first side block after a
            # pooling downsampler ("maxpool", "avgpool", no parameters) gets only no-grad inputs, so its output carried
            # no gradient and no side block trained. Such a block keeps its activations, as the first adapted backbone
            # block of a hybrid does (QSTLayer._checkpoint_adapted_blocks)
            checkpointing = False
        filled_cache = any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "layer_past"))
        if not checkpointing or filled_cache:  # with a cache the block's own checkpointing drops it, as without QST
            return self._mix_and_run(hidden_states, backbone_hidden, *args, **kwargs)

        def run_unwrapped(hidden, backbone_hidden, *inner_args):
            # the block's own checkpointing stays off inside this one, in forward and in its recomputation
            block.gradient_checkpointing = False
            try:
                return self._mix_and_run(hidden, backbone_hidden, *inner_args, **kwargs)
            finally:
                block.gradient_checkpointing = True

        return block._gradient_checkpointing_func(run_unwrapped, hidden_states, backbone_hidden, *args)

    def _mix_and_run(self, hidden_states: torch.Tensor, backbone_hidden: torch.Tensor, *args, **kwargs):
        # the downsampler computes in its own dtype, not the block input's: blocks that keep their residual stream in
        # float32 (Mamba's residual_in_fp32, set in the published Mamba, Falcon-Mamba and Mamba-2 configs) hand the
        # next block a float32 input in a bf16 side network, and a bf16 downsampler fed that failed ("mat1 and mat2
        # must have the same dtype"): every bf16 Mamba model, and every side_dtype="bfloat16", was refused
        dtype = next((p.dtype for p in self.downsample.parameters()), hidden_states.dtype)
        down = self.dropout(self.downsample(backbone_hidden.to(hidden_states.device, dtype)))
        gate = torch.sigmoid(self.gate_logit)
        if self.streams is not None:
            down, gate = self.streams.expand(down, hidden_states), self.streams.expand(gate, hidden_states)
        mixed = (1.0 - gate) * down + gate * hidden_states
        return self.block(mixed, *args, **kwargs)


HALF_DTYPES = (torch.bfloat16, torch.float16)


def side_dtype_autocast(side: nn.Module, device: torch.device, dtype: torch.dtype):
    """The autocast the side network's general path runs under: one to its own dtype ``dtype`` where the caller's
    would not compute it as that dtype intends, else nothing entered (the caller's autocast, or none, as it is).

    - float32 weights beside a half-precision side network (norms a trainer kept in float32, as TRL's ORPO and CPO
      do, and that reload so: QSTModel._keep_weights_saved_in_float32) ran under the trainer's autocast; without one,
      a float32 norm's output met the next half-precision Linear and failed ("expected m1 and m2 to have the same
      dtype") in a forward with gradients, in training mode, or a generate the fast path does not run.
    - a half-precision side network under an autocast to the other half dtype (a bf16 side network, as TRL casts a
      4-bit model's, under a float16 autocast: ``Trainer(fp16=True)``'s on a GPU, one's own on the CPU; a float16 one
      under ``Trainer(bf16=True)``'s): its Linears computed in autocast's dtype, and the downsampler's LayerNorm (and
      a side trunk's own LayerNorms, GPT-2's or OPT's) met that input beside its own half-precision weights. CPU
      autocast leaves ``layer_norm`` out of its float32 list, and the CPU kernel takes half weights only with an input
      of their dtype: every training step, and every forward the fast path does not take, failed ("mixed dtype (CPU):
      expect parameter to have scalar type of Float"). CUDA autocast runs ``layer_norm`` in float32 and did not fail,
      but it rounded the side weights into the other half dtype for every Linear (bf16's range into float16's). On
      every device the side network now computes as under an autocast to its own dtype, which is what it computes
      under the matching autocast (that case, and a float32 side network under either autocast, unchanged). Its
      backward belongs outside the caller's autocast, as PyTorch asks of every backward: one run inside it can meet
      the side network's half gradients in a ``cat`` (the backward of GPT-2's split of its fused attention
      projection) and fail, as the fast path's ``torch.stack`` did in forward ("Unexpected floating ScalarType in
      at::autocast::prioritize").

    Entered only where it changes something: an autocast's entry costs about 30 times the check (see
    fast_path.autocast_off)."""
    if dtype not in HALF_DTYPES:
        return nullcontext()
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know: the meta device (shapes only), nothing to cast
        return nullcontext()
    if enabled:
        autocast_dtype = torch.get_autocast_dtype(device.type)
        other_half = autocast_dtype in HALF_DTYPES and autocast_dtype != dtype
        return torch.autocast(device.type, dtype=dtype) if other_half else nullcontext()
    if any(p.dtype == torch.float32 for p in side.parameters()):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def _unsupported_side_network(base_config, qst_config: QSTConfig, problem: str) -> QSTUnsupportedModelError:
    """The error for a side network that QST's shrink rules built for a model but that cannot be used."""
    heads = "" if qst_config.side_heads is None else f", side_heads={qst_config.side_heads}"
    error = QSTUnsupportedModelError(
        f"QST does not support this {base_config.model_type} model with r={qst_config.r}{heads}: the side network "
        f"built from its config by QST's shrink rules cannot be used: {problem}. Some models derive widths or head "
        "layouts from their hidden size in ways the rules do not cover; QSTConfig(side_heads=None) (the model's own "
        "heads) or another r may fit, otherwise the model is not supported (see the README's supported architectures)."
    )
    error.problem = problem  # for the error of side_heads="auto", which names its own remedies (model._update_layer)
    return error


def drop_unreached_parts(side: nn.Module) -> tuple[str, ...]:
    """Set the parts of ``side``'s trunk and blocks that its forward never runs (:data:`UNREACHED_TRUNK_PARTS`,
    :data:`UNREACHED_BLOCK_PARTS`) to None, as the token embedding is, and return their names inside ``side``. The
    models' forwards test these attributes for None or only reach them with inputs the side trunk is never given. An
    adapter saved while they were built holds their tensors: their random start, which never changed an output nor got a
    gradient; loading drops them (:func:`is_unreached_part`)."""
    dropped = []
    for name in UNREACHED_TRUNK_PARTS:
        if isinstance(getattr(side.trunk, name, None), nn.Module):
            setattr(side.trunk, name, None)
            dropped.append(f"trunk.{name}")
    for path, module in side.named_modules():
        if isinstance(module, QSTSideBlock):
            for name in UNREACHED_BLOCK_PARTS:
                if isinstance(getattr(module.block, name, None), nn.Module):
                    setattr(module.block, name, None)
                    dropped.append(f"{path}.block.{name}")
    return tuple(dropped)


def is_unreached_part(key: str, side_marker: str, unreached: tuple[str, ...]) -> bool:
    """Whether the saved tensor ``key`` belongs to a part of a side network that :func:`drop_unreached_parts` dropped
    (``unreached``, names inside the side network; ``side_marker``, ``".qst_side."`` with or without the adapter's name
    after it)."""
    _, found, inside = key.partition(side_marker)
    return bool(found) and any(inside.startswith(f"{part}.") for part in unreached)


class QSTSideNetwork(nn.Module):
    """Everything one QST adapter owns: the side trunk (blocks with downsamplers and gates), the downsampler of the
    embedding output, the upsample and the output gate.

    ``forward(hidden_states, **trunk_kwargs)`` takes the backbone's hidden states (embedding output, then each block's
    output, the last one after the final norm) and returns the side trunk's output (after the side final norm), its
    cache, and its routers' logits (mixture-of-experts side blocks, where the forward asks for ``output_router_logits``;
    else None). :meth:`mix` then combines the output with the backbone's final hidden state.
    """

    def __init__(self, base_trunk: nn.Module, base_config, qst_config: QSTConfig, dtype: torch.dtype):
        super().__init__()
        # Always real weights, also under PEFT's low_cpu_mem_usage (meta) context: the side network is small, and
        # which parameters start at a constant (see ConstantOffset) is read from their initial values.
        with _skip_init_on_device():
            self._build(base_trunk, base_config, qst_config, dtype)
        self._check_runs(base_config, qst_config)
        # weights loaded in place between two turns of a cache: the fast path checks them again (see the hook)
        self.register_load_state_dict_post_hook(note_side_weights_loaded)
        self.__dict__["_cache_identity"] = uuid.uuid4().hex  # see cache_identity

    #: what the inference fast path keeps on the side network (peft_qst/fast_path.py), derived from its parameters:
    #: left out of copies and pickles, which build their own from their own parameters. The packed weights hold a weak
    #: reference to the last generation cache, which pickle refuses ("cannot pickle 'weakref.ReferenceType' object":
    #: ``torch.save(model)`` failed after any ``generate``).
    _DERIVED_STATE = ("_packed_weights", "_parameter_list", "_position_weights")

    def __getstate__(self) -> dict:
        # a network unpickled from a version before identities (see cache_identity) draws one now, not at first use:
        # drawn lazily, a copy made before that use (deepcopy, torch.save) and the original drew different ones, and
        # a cache one of them filled was refused by the other
        self.cache_identity()
        state = dict(super().__getstate__())
        for name in self._DERIVED_STATE:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        # The side trunk's attention implementation (SIDE_SDPA) is registered with transformers when a side network is
        # built, in the process that builds it. One unpickled in another process (torch.load of a whole model, the
        # child of a multiprocessing spawn) was built elsewhere: every forward outside the inference fast path (any
        # training step) failed with "`qst_side_sdpa` is not a valid attention implementation".
        super().__setstate__(state)
        if getattr(getattr(self._modules.get("trunk"), "config", None), "_attn_implementation", None) == SIDE_SDPA:
            register_side_sdpa()

    def cache_layout(self) -> tuple:
        """What the shape of this side network's cache halves follows from, as sorted (name, value) pairs: the side
        trunk config's integer sizes (width, layers, attention and key-value heads, head size, window) and the copy
        heads'. Recorded on the halves a forward fills (:func:`peft_qst.layer.record_cache_layout`), so that a cache
        continued by another side network under the same adapter name (deleted and added again with another ``r``
        or ``side_heads``) is refused by name instead of failing inside attention, or continuing silently on the
        deleted network's history. Computed once: the side trunk's config does not change after it is built."""
        layout = self.__dict__.get("_cache_layout")
        if layout is None:
            # token ids are no sizes: a base model whose pad_token_id was set later continues a saved cache
            sizes = {
                k: v for k, v in self.trunk.config.to_dict().items() if type(v) is int and not k.endswith("_token_id")
            }
            if self.copy_head is not None:
                sizes.update(copy_heads=self.copy_head.heads, copy_head_dim=self.copy_head.head_dim)
            layout = self.__dict__["_cache_layout"] = tuple(sorted(sizes.items()))
        return layout

    def cache_identity(self) -> str:
        """Which side network this is, for the cache halves it fills: recorded on them with their layout
        (:func:`peft_qst.layer.record_cache_layout`), so that a cache continued by another network under the same
        adapter name and of the same shape (deleted and added again, or another folder loaded into the new name) is
        refused instead of attending silently to the deleted network's keys and values. A new network draws a fresh
        one; copies and pickles keep it (their weights are the same), and so do weights loaded into this network in
        place (a cache continues across an optimizer step or a checkpoint load, as with any model). A network built by
        loading a saved adapter takes its weights' digest instead (:meth:`identify_as_loaded`): loaded again from the
        same folder (another process, ``delete_adapter`` and ``load_adapter``), it continues a cache it filled.
        A network pickled before networks had an identity draws one at first use or copy, which its copies keep."""
        identity = self.__dict__.get("_cache_identity")
        if identity is None:
            identity = self.__dict__["_cache_identity"] = uuid.uuid4().hex
        return identity

    def identify_as_loaded(self, weights_digest: str) -> None:
        """Take the identity of the saved weights just loaded into this new network (see :meth:`cache_identity`)."""
        self.__dict__["_cache_identity"] = f"weights-sha256:{weights_digest}"

    def _check_runs(self, base_config, qst_config: QSTConfig) -> None:
        """Run the freshly built side network once on made-up hidden states (one row of 4 positions), so that a model
        whose config the shrink rules do not fully cover (a width or head layout derived from the hidden size under a
        name they do not know) is refused when the adapter is created, naming the model, instead of failing at its
        first forward. It runs in eval mode (no dropout: the random state is left alone) with gradients on (so the
        inference fast path keeps no packed weights); its training flags are restored."""
        if any(p.device.type == "meta" for p in self.parameters()):
            return
        device, dtype = self.upsample.weight.device, self.upsample.weight.dtype
        generator = torch.Generator().manual_seed(0)
        states = tuple(
            torch.randn(1, 4, int(base_config.hidden_size), generator=generator).to(device, dtype)
            for _ in range(len(self._blocks) + 1)
        )
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with torch.enable_grad():
                out = self(states, use_cache=False)[0]
            expected = (1, 4, self.upsample.in_features)
            problem = None if tuple(out.shape) == expected else f"an output of shape {tuple(out.shape)}, not {expected}"
        except Exception as error:  # noqa: BLE001 - any failure here is a model the rules do not cover
            problem = f"{type(error).__name__}: {error}"
        finally:
            for module, training in modes.items():
                module.training = training
        if problem is not None:
            raise _unsupported_side_network(base_config, qst_config, f"the side network does not run ({problem})")

    def _build(self, base_trunk: nn.Module, base_config, qst_config: QSTConfig, dtype: torch.dtype) -> None:
        num_layers = num_blocks(base_config)
        side_config = shrink_config(base_config, qst_config, dtype)
        hidden, side_hidden = int(base_config.hidden_size), int(side_config.hidden_size)

        try:
            trunk = type(base_trunk)(side_config)
        except Exception as error:  # noqa: BLE001 - the model's own checks of a config the shrink rules produced
            problem = f"{type(base_trunk).__name__} refuses its config ({type(error).__name__}: {error})"
            raise _unsupported_side_network(base_config, qst_config, problem) from error
        # the side trunk reads inputs_embeds only: drop its token embedding (a child of the trunk, or of its embeddings
        # module, as in RoBERTa-style models, whose embeddings module also adds positions to inputs_embeds)
        embedding = trunk.get_input_embeddings()
        for name, child in list(trunk.named_children()):
            # parts the backbone's trunk was built without (a pooler, which the *ForCausalLM class leaves out through
            # a constructor argument the side trunk's construction does not pass)
            if getattr(base_trunk, name, None) is None:
                setattr(trunk, name, None)
        for parent in list(trunk.modules()):
            for name, child in list(parent.named_children()):
                if child is embedding:
                    setattr(parent, name, None)

        side_parent, side_attr = find_layer_list(trunk, num_layers)
        side_blocks = getattr(side_parent, side_attr)
        wrapped = [
            QSTSideBlock(
                block,
                build_downsample(qst_config, hidden, side_hidden),
                side_hidden,
                qst_config.side_gate_init,
                qst_config.dropout,
                ResidualStreams.of(side_config),
            )
            for block in side_blocks
        ]
        setattr(side_parent, side_attr, nn.ModuleList(wrapped))
        # where the trunk finds its blocks: a wrapper put around one (activation checkpointing) replaces it there
        self._block_list = (side_parent, side_attr)
        self.trunk = trunk
        #: names of the parts dropped as never run (see drop_unreached_parts), whose tensors loading an older adapter
        #: leaves out
        self.unreached_parts = drop_unreached_parts(self)
        self.embed_downsample = build_downsample(qst_config, hidden, side_hidden)
        self.embed_dropout = nn.Dropout(qst_config.dropout)
        self.upsample = nn.Linear(side_hidden, hidden, bias=False)
        # zero, as LoRA's B: training starts exactly at the pretrained model's output
        nn.init.zeros_(self.upsample.weight)
        self.output_gate = OutputGate(hidden, qst_config.output_gate_init)
        self.copy_head = (
            CopyHead(hidden, side_hidden, qst_config.copy_heads, qst_config.copy_head_dim)
            if qst_config.copy_heads
            else None
        )

        self.backbone_lora = None
        if qst_config.backbone_lora_layers:
            from .backbone_lora import BackboneLoRA

            base_parent, base_attr = find_layer_list(base_trunk, num_layers)
            self.backbone_lora = BackboneLoRA(getattr(base_parent, base_attr), qst_config)

        from .pruning import initialise_side_network  # imported here: pruning.py imports this module

        initialise_side_network(self, base_trunk, base_config, side_config, qst_config)  # QSTConfig.init
        store_constant_parameters_as_offsets(self)
        # parameters take the side dtype; buffers (e.g. rotary inverse frequencies) keep their precision
        for parameter in self.parameters():
            parameter.data = parameter.data.to(dtype)
        self._blocks = list(wrapped)  # plain list: a view of the blocks, not a second registration
        self._trunk_params = set(inspect.signature(type(trunk).forward).parameters)
        self.place(base_trunk)

    def place(self, base_trunk: nn.Module) -> None:
        """Put each part of the side network on the device of the backbone part it reads from.

        Side block i goes where backbone block i is (it reads that block's output), the embedding downsampler where
        the embeddings are, and the side trunk's own final norm and rotary embedding, the upsample and the output gate
        where the last backbone block is. With a model spread over devices (``device_map="auto"``) the side network
        is spread the same way. Parameters still on the meta device (``low_cpu_mem_usage=True`` before the weights
        are loaded) are left alone.
        """
        if any(p.device.type == "meta" for p in self.parameters()):
            return
        num_layers = len(self._blocks)
        base_parent, base_attr = find_layer_list(base_trunk, num_layers)
        base_blocks = getattr(base_parent, base_attr)
        for side_block, base_block in zip(self._blocks, base_blocks):
            side_block.to(module_device(base_block))
        self.embed_downsample.to(module_device(base_trunk.get_input_embeddings()))
        last_device = module_device(base_blocks[-1])
        side_parent, side_attr = find_layer_list(self.trunk, num_layers)
        for name, child in self.trunk.named_children():
            if child is not None and not (side_parent is self.trunk and name == side_attr):
                child.to(last_device)
        self.upsample.to(last_device)
        self.output_gate.to(last_device)
        if self.copy_head is not None:
            self.copy_head.to(last_device)
        if self.backbone_lora is not None:
            self.backbone_lora.place(base_blocks, module_device)

    def forward(self, hidden_states: tuple[torch.Tensor, ...], cache=None, **trunk_kwargs):
        if len(hidden_states) != len(self._blocks) + 1:
            raise RuntimeError(
                f"QST expected {len(self._blocks) + 1} hidden states from the backbone, got {len(hidden_states)}."
            )
        if hidden_states[0].dim() != 3:
            # a 3-D input_ids runs through the backbone (its layers broadcast over the extra dimension); the side
            # network then computed other logits than for the same ids given as 2-D, or failed deep in the fast path
            raise ValueError(
                f"QST's side network reads hidden states of shape (batch, sequence, width), but the backbone returned "
                f"shape {tuple(hidden_states[0].shape)}. Pass input_ids and attention_mask of shape (batch, "
                "sequence), or inputs_embeds of shape (batch, sequence, hidden_size): for several rows, stack them "
                "along the batch dimension."
            )
        packed = packed_weights_for(self, trunk_kwargs, cache)
        if packed is not None:  # inference, Llama-style blocks (no experts, so no router logits): far fewer operations
            return (*fast_side_forward(self, packed, hidden_states, cache, **trunk_kwargs), None)
        dtype = self.upsample.weight.dtype
        if cache is not None:  # the fast path keeps its side cache in float32
            keep_cache_dtype(cache, dtype)
        # hidden states of blocks with backbone low-rank adapters carry gradients (into those adapters); the others
        # were computed under no_grad and carry none
        first = hidden_states[0]
        device = module_device(self.embed_downsample)
        with side_dtype_autocast(self, device, dtype):
            inputs = self.embed_dropout(self.embed_downsample(first.to(device, dtype)))
            run_by_trunk = getattr(*self._block_list)  # each block, or the wrapper put around it
            for block, runner, hidden in zip(self._blocks, run_by_trunk, hidden_states[1:]):
                state = call_state(block)
                state["backbone_hidden"] = hidden
                state["wrapped"] = runner is not block
            cache_name = "cache" if "cache" in self._trunk_params else "past_key_values"
            # a 4-D mask built for the backbone's attention, in the side trunk's form
            if "attention_mask" in trunk_kwargs:
                implementation = self.trunk.config._attn_implementation
                mask = trunk_kwargs["attention_mask"]
                trunk_kwargs["attention_mask"] = mask_for_side_trunk(mask, implementation, dtype)
            try:
                out = self.trunk(inputs_embeds=inputs, return_dict=True, **{cache_name: cache}, **trunk_kwargs)
            finally:
                for block in self._blocks:
                    call_state(block)["backbone_hidden"] = None
        # (a float32 final norm, or a residual stream kept in float32, gives a float32 output; the mix's upsample
        # computes in the side network's dtype)
        last = out.last_hidden_state.to(dtype)
        # the side routers' logits where the forward asks for them (output_router_logits): the model's own
        # load-balancing loss is computed from them (QSTLayer._forward_adapted)
        return last, out.get(cache_field(out)), out.get("router_logits")

    def mix(
        self,
        backbone_last: torch.Tensor,
        side_out: torch.Tensor,
        copy_inputs: Optional[dict] = None,
        low_rank_head: bool = True,
    ) -> torch.Tensor:
        """``h_L + a * up(side)`` (+ the copy heads' output); ``up`` and the copy gates start at zero, so an untrained
        adapter returns the backbone's output. ``copy_inputs`` (for an adapter with copy heads): the keyword
        arguments of :class:`CopyHead` other than ``side_out`` and ``query_hidden``. ``low_rank_head=False`` keeps
        autograd's own backward through the LM head: the caller hands the mixed tensor out (``output_hidden_states``),
        and a gradient with respect to it (``torch.autograd.grad(loss, out.hidden_states[-1])``) only exists on that
        path; the low-rank backward goes from the logits straight to the side output, gate and upsample."""
        compiling = torch.compiler.is_compiling()  # neither the fast path nor the low-rank head backward then
        if copy_inputs is None and not torch.is_grad_enabled() and not compiling:
            mixed = fast_mix(self, backbone_last, side_out)
            if mixed is not None:
                return mixed
        packed = None if compiling else self.__dict__.get("_packed_weights")
        if packed is not None:
            # a fast forward's output that the general mix below does not consume (copy heads): not kept on the
            # module until the next forward
            packed.last_output = None
        device = self.upsample.weight.device
        side_out = side_out.to(device)
        update = self.output_gate(self.upsample(side_out))
        if self.copy_head is not None:
            copied = self.copy_head(side_out, backbone_last.to(device), **copy_inputs)
            update = update + copied.to(update.dtype)
        mixed = backbone_last + update.to(backbone_last.device, backbone_last.dtype)
        if (
            low_rank_head
            and self.copy_head is None
            and torch.is_grad_enabled()
            and not backbone_last.requires_grad
            and side_out.requires_grad
            and backbone_last.device == device
            # under torch.compile the record, kept by tensor identity, is not used (see lm_head._low_rank_backward)
            and not compiling
            # under FSDP or ZeRO-3 the gate and upsample weights are shards outside their own forwards, where the
            # head's backward would read them: autograd's own backward then
            and not sharded(self)
        ):
            # the update is exactly a * (up s) on a constant h_L: the LM head can back-propagate through that
            # low-rank form instead of the full hidden width (peft_qst/lm_head.py)
            mark_low_rank_update(mixed, side_out, self.output_gate, self.upsample)
        return mixed
