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

This module holds those layers (the downsamplers, the output gate, the copy heads, and the parametrization that stores
parameters starting at a constant as offsets) and the network that assembles and runs them (:class:`QSTSideNetwork`,
:class:`QSTSideBlock`): where each part goes (on its backbone part's device, accelerate's offload included), the
residual streams of blocks that pass several, the autocast it computes under, and the trunk parts it never runs. The
side trunk's config, from which all its widths and heads follow, is derived in :mod:`peft_qst.side_config`, which
needs no network. The layer classes stay here, beside the network, because pickles of a whole model (``torch.save``)
name them by this module.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import uuid
from contextlib import nullcontext
from types import SimpleNamespace
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
from .config import QSTConfig
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
from .side_attention import SIDE_SDPA, mask_for_side_trunk, register_side_sdpa
from .side_config import block_count_attribute, is_int_width, num_blocks, shrink_config

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


class QSTUnsupportedModelError(ValueError):
    """Raised by `get_peft_model` for a model QST cannot side-tune, naming the model type and the reason; or, for the
    few models where only running them shows it (blocks that pass several residual streams in an unknown layout, or
    loop), at their first forward."""


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
            if is_int_width(count) and count > 1:
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


def check_gate_inits_fit(config: QSTConfig, dtype: torch.dtype, cast_from: Optional[torch.dtype] = None) -> None:
    """Refuse a ``side_gate_init`` or ``output_gate_init`` that the side network's dtype turns into a value
    ``QSTConfig`` refuses, before the model changes.

    ``QSTConfig`` checks the values as numbers: a side gate strictly between 0 and 1, a finite, nonzero output gate. The
    side network computes them in its dtype: the side gates as the sigmoid of their logit, the output gate as stored
    (both offsets from the constant, added in that dtype, see :class:`ConstantOffset`). In bfloat16 (the default side
    dtype of a 4-bit model with bf16 compute) a side gate of 0.999 is exactly 1: ``(1 - s) * down(h)`` is zero, so the
    side blocks read only the embedding output, never the backbone blocks' outputs, and the gates and the blocks'
    downsamplers never got a gradient (the sigmoid's derivative ``s * (1 - s)`` is zero too); training ran on, without a
    word. An output gate of 1e-8 is 0 in float16 (the saddle point ``output_gate_init=0`` is refused for: neither the
    gate nor the upsample gets a gradient), and one of 1e5 is infinite there (NaN outputs from the first forward).

    ``cast_from``: the dtype the side network was built in, where its parameters were cast to ``dtype`` after that
    (:meth:`QSTSideNetwork.check_gates_after_a_cast`); ``side_dtype`` then does not help, as the cast overrides it."""
    def in_dtype(value: float) -> torch.Tensor:  # as computed: a stored offset of zero plus the float32 constant
        return torch.zeros((), dtype=dtype) + torch.tensor(float(value), dtype=torch.float32).item()

    name = short = str(dtype).removeprefix("torch.")
    finfo = torch.finfo(dtype)
    fix = ', or side_dtype="float32"' if dtype != torch.float32 and cast_from is None else ""
    if cast_from is not None:
        name += (
            f", which its parameters were cast to after it was built in {str(cast_from).removeprefix('torch.')}, as "
            "TRL's SFTTrainer casts the trainable parameters of a quantized model to bfloat16 whatever side_dtype says"
        )
    gate = torch.sigmoid(in_dtype(math.log(config.side_gate_init / (1.0 - config.side_gate_init))))
    if not 0.0 < gate.item() < 1.0:
        raise ValueError(
            f"QSTConfig.side_gate_init={config.side_gate_init!r} is {gate.item():g} in the side network's dtype "
            f"({name}): a sigmoid gate of exactly {gate.item():g} "
            + ("shuts the side blocks off from the backbone blocks' outputs (they would read the embedding output "
               "alone), and neither the gates nor the blocks' downsamplers would get a gradient" if gate.item() == 1.0
               else "never keeps the side network's own state, and the gates would get no gradient")
            + f". Choose a value {finfo.smallest_normal:g} <= side_gate_init <= {1 - finfo.eps / 2:.10g} for {short} "
            f"(the default is 0.5){fix}."
        )
    output = in_dtype(config.output_gate_init)
    if output.item() == 0.0 or not torch.isfinite(output):
        raise ValueError(
            f"QSTConfig.output_gate_init={config.output_gate_init!r} is {output.item():g} in the side network's dtype "
            f"({name}): "
            + ("with the upsample starting at zero, neither the gate nor the upsample would get a gradient"
               if output.item() == 0.0 else "the adapted model's outputs would be NaN from the first forward")
            + f". Choose a magnitude between {finfo.smallest_normal:g} and {finfo.max:g} for {short} (the default is "
            f"1.0){fix}."
        )


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
        padding = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        if padding.shape[-1] < total:
            # a mask over fewer than past + new tokens (one over the new tokens alone, beside a filled cache): as
            # transformers reads it for the backbone's attention (``prepare_padding_mask``), its columns are the first
            # positions and the rest are masked. It failed here ("The size of tensor a (8) must match the size of
            # tensor b (2)"), or, one column wide, was broadcast over every key, where the base model runs
            padding = nn.functional.pad(padding, (0, total - padding.shape[-1]))
        mask = mask & padding.unsqueeze(1)
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


def find_layer_list(trunk: nn.Module, num_layers: int) -> tuple[nn.Module, str]:
    """The ``nn.ModuleList`` of decoder blocks inside a trunk, as (parent module, attribute name).

    A list inside an element of another list (a block's sublayers) is not the block list, whatever its length: where
    the block count was misread (LongCat-Flash's ``num_hidden_layers`` counts two sublayers per block), a one-block
    model's lists of two sublayers were taken for its blocks, and QST side-tuned its first block's attention modules."""
    lists = {name: len(module) for name, module in trunk.named_modules() if isinstance(module, nn.ModuleList)}

    def inside_a_list(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:end]) in lists for end in range(1, len(parts) - 1))

    candidates = [name for name, length in lists.items() if length == num_layers and not inside_a_list(name)]
    if not candidates:
        outer = min(lists.items(), key=lambda item: item[0].count("."), default=None)
        count = block_count_attribute(getattr(trunk, "config", None))  # Whisper's: decoder_layers
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
      do, and that reload so: loading.keep_weights_saved_in_float32) ran under the trainer's autocast; without one,
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
        hidden = int(base_config.hidden_size)
        problem = self._construction_run_problem(hidden)
        if problem is None:
            return
        dtype = self.upsample.weight.dtype
        if dtype in HALF_DTYPES and copy.deepcopy(self).float()._construction_run_problem(hidden) is None:
            # MiniMax in bf16: its lightning attention multiplies its float32 decay buffers into bf16 states with
            # matmul, which does not promote. The head count and r are not the problem: "auto" tries no others
            name = str(dtype).removeprefix("torch.")
            heads = "" if qst_config.side_heads is None else f", side_heads={qst_config.side_heads}"
            error = QSTUnsupportedModelError(
                f"QST cannot build this {base_config.model_type} model's side network in {name} (r={qst_config.r}"
                f"{heads}): it does not run in {name} ({problem}), and runs in float32. Use "
                "QSTConfig(side_dtype=\"float32\"): the side network in float32, the frozen model in its own dtype."
                + (
                    # a saved adapter's config (its file records no side dtype, or this one): PEFT reads the file's
                    # values over any given to from_pretrained, so the way in is a config of one's own
                    " Loading a saved adapter, read its config (config = QSTConfig.from_pretrained(folder)), set "
                    "config.side_dtype = \"float32\" and pass it: PeftModel.from_pretrained(model, folder, "
                    "config=config)."
                    if qst_config.adapter_weights_sha256 is not None else ""
                )
            )
            error.runs_in_float32 = True
            raise error
        raise _unsupported_side_network(base_config, qst_config, f"the side network does not run ({problem})")

    def _construction_run_problem(self, hidden_size: int) -> Optional[str]:
        """What went wrong running this side network once on made-up hidden states (see :meth:`_check_runs`), or
        None. It runs in eval mode with gradients on; its training flags are restored."""
        device, dtype = self.upsample.weight.device, self.upsample.weight.dtype
        generator = torch.Generator().manual_seed(0)
        states = tuple(
            torch.randn(1, 4, hidden_size, generator=generator).to(device, dtype) for _ in range(len(self._blocks) + 1)
        )
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with torch.enable_grad():
                out = self(states, use_cache=False)[0]
            expected = (1, 4, self.upsample.in_features)
            return None if tuple(out.shape) == expected else f"an output of shape {tuple(out.shape)}, not {expected}"
        except Exception as error:  # noqa: BLE001 - any failure here is a model the rules do not cover
            return f"{type(error).__name__}: {error}"
        finally:
            for module, training in modes.items():
                module.training = training

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
        # the gate inits and the dtype check_gate_inits_fit checked them in (see check_gates_after_a_cast)
        self.__dict__["_gate_inits"] = (qst_config.side_gate_init, qst_config.output_gate_init, dtype)
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
        input_device = module_device(base_trunk.get_input_embeddings())
        self.embed_downsample.to(input_device)
        # the trunk's own tensors (not a child's) meet its inputs_embeds: Zaya's input_hidden_states_bias and scale.
        # Left where the side network was built, they were on another device than the states (the meta device, a GPU)
        # (moved as Module.to moves them, in place where the devices allow it; not the children, placed below)
        self.trunk._apply(lambda tensor: tensor.to(input_device), recurse=False)
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
        packed = packed_weights_for(self, trunk_kwargs, cache, hidden_states[0].shape[1])
        if packed is not None:  # inference, Llama-style blocks (no experts, so no router logits): far fewer operations
            return (*fast_side_forward(self, packed, hidden_states, cache, **trunk_kwargs), None)
        dtype = self.upsample.weight.dtype
        gate_inits = self.__dict__.get("_gate_inits")
        if gate_inits is not None and gate_inits[2] != dtype and torch.is_grad_enabled():
            self.check_gates_after_a_cast(dtype)
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

    def check_gates_after_a_cast(self, dtype: torch.dtype) -> None:
        """:func:`check_gate_inits_fit` again, at the first forward with gradients after the side network's parameters
        were cast to another dtype than the one it was built (and its gate inits checked) in, while its gates are
        still at their inits (every offset zero). TRL's SFTTrainer casts the trainable parameters of a quantized model
        to bfloat16 after ``get_peft_model``, whatever ``side_dtype`` says: on a 4-bit model with float32 or float16
        compute (a float32 side network), ``side_gate_init=0.999`` passed the check and became a gate of exactly 1,
        and the side blocks' gates and downsamplers never moved, silently, as the check is there to prevent. A
        trained adapter cast so is left alone (its gates are its training's). Once per dtype."""
        if torch.compiler.is_compiling():
            return
        side_gate_init, output_gate_init, built_in = self.__dict__["_gate_inits"]
        gates = [(block, "gate_logit") for block in self._blocks] + [(self.output_gate, "weight")]
        if all(
            parametrize.is_parametrized(module, name)
            and not bool(getattr(module.parametrizations, name).original.detach().any())
            for module, name in gates
        ):
            inits = SimpleNamespace(side_gate_init=side_gate_init, output_gate_init=output_gate_init)
            check_gate_inits_fit(inits, dtype, cast_from=built_in)
        self.__dict__["_gate_inits"] = (side_gate_init, output_gate_init, dtype)

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
