"""``QSTConfig(init="pruned")``: side blocks that start from the backbone's own weights, pruned to the side width.

QST's paper initialises the side network at random. Ladder Side-Tuning (LST, Sung et al., NeurIPS 2022) instead
initialises each side block from the corresponding backbone block, keeping the most important channels by weight
magnitude. This module does that for the side networks of :mod:`peft_qst.side`: the side trunk is the backbone trunk's
own class with hidden and FFN sizes divided by ``r`` and the heads kept, so every side parameter has a backbone
parameter with the same name whose shape differs only along some dimensions. Each such dimension has a *role*
(residual channel, FFN neuron, query/key/value/output head dimension), read from the name of the module that holds
the parameter, and the side parameter is the backbone parameter indexed, along each dimension, by the indices kept
for that role.

The criterion (weight magnitude, computed from the dequantised backbone; a 4-bit backbone is dequantised one block at
a time, so the extra memory is one dense block):

- **Residual channels** (the ``d/r`` kept channels of the residual stream): one set for all blocks and the side
  trunk's final norm, because the residual stream must stay aligned from block to block. The importance of channel
  ``c`` is the sum, over every block, of the L2 norm of column ``c`` of each matrix that reads the residual stream
  (q/k/v, gate/up), of row ``c`` of each matrix that writes to it (o, down), and of the norms' effective scale at
  ``c``; each of these vectors is divided by its mean first, so that every matrix and norm counts equally (a fused
  matrix, Phi-3's ``qkv_proj`` or ``gate_up_proj``, counts as its parts). With ``downsample="linear"`` the
  downsamplers start as this channel selection (weight 1 at each kept channel).
- **FFN neurons**, per block: the ``I/r`` neurons with the largest product of the L2 norms of their gate row, up row
  and down column.
- **Attention**: heads are kept (the side trunk has the backbone's head counts); per head the side head dimension's
  worth of dimensions are kept. Query/key dimensions are chosen per key/value head group by the product of the summed
  query-row norms of the group's query heads and the key-row norm; value/output dimensions by the product of the
  value-row norm and the summed output-column norms. With rotary embeddings, dimensions are kept in rotary pairs
  ``(i, i + rotary_dim/2)``, identically for queries and keys, in their original order. The side trunk computes its
  rotary frequencies for its own (smaller) head dimension, so kept pair ``j`` rotates at the side's ``j``-th frequency
  rather than its original one: an approximation, as is every norm now normalising over the kept channels only.
  Where a block has per-head-dimension parameters shared by all heads (Qwen3 / Gemma 3 ``q_norm``/``k_norm``), one
  query/key dimension set is chosen for all heads (importance summed over groups).
- **Norms**: the kept channels' weights (in whatever parametrisation the model stores them, e.g. Gemma's ``1 + w``).

The upsample stays zero and the output gate as configured, so the adapted model still starts exactly at the
pretrained model's output; the downsamplers and gates (except a ``"linear"`` downsampler, above) keep their usual
initialisation.

Supported: the Llama-style layouts of :data:`PRUNABLE_MODEL_TYPES` (separate or fused q/k/v, gate/up/down projections,
rotate-half rotary embeddings). Other architectures are refused at `get_peft_model` time with an error naming the
model type: their rotary layout or module roles (GPT-2's transposed ``Conv1D`` ``c_attn``, fused query-key-value
layouts interleaved per head, mixture-of-experts blocks) are not mapped.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .fast_path import zero3_partitioned
from .side import QSTSideBlock, QSTUnsupportedModelError, find_layer_list, onloaded_tensor
from .side_config import FFN_SIZE_ATTRIBUTES, num_blocks, uses_rotary

#: model types whose decoder blocks follow the layouts mapped here (checked on the real modules as well)
PRUNABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

#: roles of a linear layer's output segments and of its input, by the layer's module name (weight is [out, in])
LINEAR_ROLES = {
    "q_proj": (("q",), "residual"),
    "k_proj": (("k",), "residual"),
    "v_proj": (("v",), "residual"),
    "qkv_proj": (("q", "k", "v"), "residual"),  # Phi-3: [q heads | k heads | v heads]
    "o_proj": (("residual",), "o"),
    "gate_proj": (("ffn",), "residual"),
    "up_proj": (("ffn",), "residual"),
    "gate_up_proj": (("ffn", "ffn"), "residual"),  # Phi-3: [gate | up], both indexed by the same neurons
    "down_proj": (("residual",), "ffn"),
}

#: norms over one head's dimensions, shared by all heads
HEAD_DIM_NORMS = ("q_norm", "k_norm")


def _refuse(model_type: str, reason: str) -> QSTUnsupportedModelError:
    """The refusal of ``init="pruned"`` for a ``model_type`` model, for ``reason``. The types pruning is mapped for
    are listed only where ``model_type`` is not one of them: the refusal of a mapped model for the state of its
    weights (8-bit, not loaded) or the side heads chosen said that pruning did not support, and did support, llama."""
    if model_type in PRUNABLE_MODEL_TYPES:
        return QSTUnsupportedModelError(
            f'QSTConfig(init="pruned") cannot start from this {model_type} model: {reason}. Or use init="random" '
            "(the default)."
        )
    return QSTUnsupportedModelError(
        f'QSTConfig(init="pruned") does not support the {model_type} model: {reason}. Use init="random" (the '
        f"default) for this model; pruned initialisation supports {', '.join(PRUNABLE_MODEL_TYPES)}."
    )


# --------------------------------------------------------------------------------------------------------------------
# Reading the backbone
# --------------------------------------------------------------------------------------------------------------------


def logical_shape(parameter: torch.Tensor) -> torch.Size:
    """Shape of the weight a parameter stands for (a bitsandbytes 4-bit weight is stored packed)."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        return torch.Size(quant_state.shape)
    return parameter.shape


def _dequantise_cpu_packed(packed: torch.Tensor, quant_state, block_n: int = 32) -> torch.Tensor:
    """Dequantise a ``Linear4bit`` weight that bitsandbytes has repacked for its CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) rewrites a 4-bit weight the first time its layer runs in eval mode
    without gradients (``bitsandbytes.functional._convert_weight_packed_for_cpu``): the 4-bit codes are reordered in
    tiles of ``block_n`` output rows, and ``absmax`` becomes a transposed ``[in / blocksize, out]`` bfloat16 matrix
    (already dequantised when it was double-quantised). ``dequantize_4bit`` does not read that layout (it returns wrong
    values), and bitsandbytes' own inverse conversion works in place; this undoes the reordering on a copy: the codes,
    looked up in the codebook, times the block scales the packed kernel itself computes with."""
    out_features, in_features = (int(size) for size in quant_state.shape)
    nibbles = packed.reshape(-1, block_n)
    codes = torch.cat([nibbles & 0xF, (nibbles >> 4) & 0xF], dim=-1)  # each byte: low nibble first 32, high last 32
    codes = codes.reshape(out_features // block_n, in_features // 2, block_n, 2).transpose(1, 2)
    codes = codes.reshape(out_features, in_features).long()
    scales = quant_state.absmax.float().T.repeat_interleave(quant_state.blocksize, dim=1)
    return quant_state.code.float().to(codes.device)[codes] * scales


def dequantised(parameter: torch.Tensor, model_type: str) -> torch.Tensor:
    """The parameter as a dense float32 tensor; a bitsandbytes 4-bit weight is dequantised (also when bitsandbytes
    has repacked it for its CPU kernel, see :func:`_dequantise_cpu_packed`)."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            return _dequantise_cpu_packed(parameter.data, quant_state)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(parameter.data, quant_state).float()
    if type(parameter).__name__ == "Int8Params" or parameter.dtype in (torch.int8, torch.uint8):
        raise _refuse(
            model_type,
            "its weights are 8-bit integers (bitsandbytes load_in_8bit); pruning reads dense, bitsandbytes 4-bit and "
            "torchao-quantized weights",
        )
    if parameter.device.type == "meta":
        raise _refuse(
            model_type,
            "its weights are not loaded (meta device, and no accelerate offload hook holds them); build the adapter "
            "on a loaded or dispatched model",
        )
    if type(parameter) not in (torch.Tensor, nn.Parameter):
        return _dequantised_subclass(parameter, model_type)
    return parameter.detach().float()


def _dequantised_subclass(parameter: torch.Tensor, model_type: str) -> torch.Tensor:
    """A weight held as a tensor subclass: torchao's quantized weights (``quantize_`` or transformers'
    ``TorchAoConfig``: ``Int8Tensor``, ``Float8Tensor``, ...) implement the module's ``F.linear`` but not the
    transposes, reductions and indexing pruning does (``NotImplementedError: Int8Tensor dispatch: ...
    aten.permute``), so they are read through their own ``dequantize()``; a subclass without a working one is
    refused by name."""
    dequantize = getattr(parameter, "dequantize", None)
    dense = None
    if callable(dequantize):
        try:
            with torch.no_grad():
                dense = dequantize()
        except Exception:  # noqa: BLE001 - refused below, naming the weight's class
            dense = None
    if isinstance(dense, torch.Tensor) and type(dense) is torch.Tensor and dense.shape == parameter.shape:
        return dense.detach().float()
    raise _refuse(
        model_type,
        f"its weights are {type(parameter).__name__} tensors, which pruning cannot read as dense weights (no working "
        "dequantize()); pruning reads dense, bitsandbytes 4-bit and torchao-quantized weights",
    )


def _norm_scale(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Effective per-channel scale of a norm layer (``w`` for Llama's RMSNorm, ``1 + w`` for Gemma's): the norm of a
    vector of ones for an RMS norm; the weight itself for a mean-centring LayerNorm (a vector of ones centres to 0)."""
    if isinstance(module, nn.LayerNorm) or getattr(module, "bias", None) is not None:
        return weight.abs()
    try:
        with torch.no_grad():
            probe = module(torch.ones(1, weight.numel(), dtype=weight.dtype, device=weight.device))
    except (TypeError, ValueError, RuntimeError):  # a norm with another calling convention: use its weight
        return weight.abs()
    probe = probe.detach().float().flatten()
    return probe.abs() if probe.numel() == weight.numel() else weight.float().abs()


def _loaded_or(value: Optional[torch.Tensor], parameter: torch.Tensor) -> torch.Tensor:
    """``value`` (a weight read through accelerate's offload hook), or the parameter itself where no hook held it (a
    meta parameter is then refused by :func:`dequantised`)."""
    return value if value is not None else parameter


def _block_parameters(block: nn.Module):
    """(full name, leaf module name, module, parameter) of every parameter of a block."""
    for module_name, module in block.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            yield full, module_name.rpartition(".")[2], module, name, parameter


# --------------------------------------------------------------------------------------------------------------------
# Roles and sizes
# --------------------------------------------------------------------------------------------------------------------


class _Layout:
    """Sizes of each role in the backbone and in the side network, from the two configs."""

    def __init__(self, base_config, side_config):
        self.model_type = base_config.model_type
        heads = int(base_config.num_attention_heads)
        kv_heads = int(getattr(base_config, "num_key_value_heads", None) or heads)
        hidden, side_hidden = int(base_config.hidden_size), int(side_config.hidden_size)
        head_dim = int(getattr(base_config, "head_dim", None) or hidden // heads)
        side_head_dim = int(getattr(side_config, "head_dim", None) or side_hidden // heads)
        ffn = next(
            (getattr(base_config, n) for n in FFN_SIZE_ATTRIBUTES if isinstance(getattr(base_config, n, None), int)),
            None,
        )
        side_ffn = next(
            (getattr(side_config, n) for n in FFN_SIZE_ATTRIBUTES if isinstance(getattr(side_config, n, None), int)),
            None,
        )
        self.heads, self.kv_heads, self.head_dim, self.side_head_dim = heads, kv_heads, head_dim, side_head_dim
        self.sizes = {  # role -> (backbone size, side size)
            "residual": (hidden, side_hidden),
            "q": (heads * head_dim, heads * side_head_dim),
            "o": (heads * head_dim, heads * side_head_dim),
            "k": (kv_heads * head_dim, kv_heads * side_head_dim),
            "v": (kv_heads * head_dim, kv_heads * side_head_dim),
            "qk_dim": (head_dim, side_head_dim),
        }
        if ffn is not None and side_ffn is not None:
            self.sizes["ffn"] = (int(ffn), int(side_ffn))
        factor = 1.0
        if uses_rotary(base_config):
            rope = getattr(base_config, "rope_parameters", None) or {}
            factor = float(rope.get("partial_rotary_factor", 1.0) or 1.0) if isinstance(rope, dict) else 1.0
            self.rotary_dim, self.side_rotary_dim = int(head_dim * factor), int(side_head_dim * factor)
        else:
            self.rotary_dim = self.side_rotary_dim = 0
        if side_head_dim > head_dim:
            raise _refuse(
                self.model_type,
                f"the side head dimension ({side_head_dim}) is larger than the model's ({head_dim}), so it cannot "
                "be a selection of the model's head dimensions",
            )
        if self.side_rotary_dim > self.rotary_dim or (side_head_dim - self.side_rotary_dim) > (
            head_dim - self.rotary_dim
        ):
            raise _refuse(self.model_type, "the side head's rotary part does not fit in the model head's")

    def dim_roles(self, leaf: str, kind: str, ndim: int, position: int, base_size: int) -> Optional[tuple[str, ...]]:
        """Roles of the segments of dimension ``position`` of a parameter, or None when no rule applies."""
        if leaf in LINEAR_ROLES:
            out_roles, in_role = LINEAR_ROLES[leaf]
            if kind == "bias" and ndim == 1:
                return out_roles
            if kind == "weight" and ndim == 2:
                return out_roles if position == 0 else (in_role,)
            return None
        if ndim == 1 and kind in ("weight", "bias"):
            if leaf in HEAD_DIM_NORMS and base_size == self.head_dim:
                return ("qk_dim",)
            if base_size == self.sizes["residual"][0] and leaf not in HEAD_DIM_NORMS:
                return ("residual",)
        return None


def _no_counterpart(base_block: nn.Module, where: str, full: str) -> str:
    """Why a side parameter has no backbone parameter of its name. Usually the backbone module is there but is a
    quantized layer of another library that keeps its weight in other attributes (HQQ's ``HQQLinear`` holds ``W_q``
    and its scales, not ``weight``): say so, rather than that the module is missing."""
    module_name, _, kind = full.rpartition(".")
    try:
        owner = base_block.get_submodule(module_name) if module_name else base_block
    except AttributeError:
        owner = None
    if owner is not None and not isinstance(getattr(owner, kind, None), torch.Tensor):
        return (
            f"its {where}.{module_name} is a {type(owner).__name__}, which holds no {kind!r} parameter pruning could "
            "read (a quantized layer that stores its weight in another form); pruning reads dense, bitsandbytes 4-bit "
            "and torchao-quantized weights"
        )
    return f"the side parameter {where}.{full} has no backbone counterpart"


def _plan_block(layout: _Layout, side_block: nn.Module, base_block: nn.Module, where: str) -> dict:
    """For every parameter of a side block: the roles of each of its dimensions (None where it is not shrunk)."""
    base = {full: (leaf, kind, p) for full, leaf, _m, kind, p in _block_parameters(base_block)}
    plan = {}
    for full, leaf, module, kind, parameter in _block_parameters(side_block):
        if full not in base:
            raise _refuse(layout.model_type, _no_counterpart(base_block, where, full))
        base_shape = logical_shape(base[full][2])
        side_shape = parameter.shape
        if len(base_shape) != len(side_shape):
            raise _refuse(layout.model_type, f"{where}.{full} has shape {tuple(base_shape)} in the model but "
                                             f"{tuple(side_shape)} in the side block")
        roles = []
        for position, (base_size, side_size) in enumerate(zip(base_shape, side_shape)):
            dim_roles = layout.dim_roles(leaf, kind, len(side_shape), position, base_size)
            if dim_roles is None or any(role not in layout.sizes for role in dim_roles):
                if base_size != side_size:
                    raise _refuse(
                        layout.model_type,
                        f"no rule maps dimension {position} of {where}.{full} ({type(module).__name__}, "
                        f"{tuple(base_shape)} in the model, {tuple(side_shape)} in the side block) onto the model's",
                    )
                roles.append(None)
                continue
            expected = tuple(sum(layout.sizes[role][i] for role in dim_roles) for i in (0, 1))
            if expected != (base_size, side_size):
                raise _refuse(
                    layout.model_type,
                    f"dimension {position} of {where}.{full} has {base_size} entries in the model and {side_size} in "
                    f"the side block, not the {expected[0]} and {expected[1]} its roles {dim_roles} imply",
                )
            roles.append(dim_roles)
        plan[full] = tuple(roles)
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------------------------------


def _slice_norms(tensor: torch.Tensor, position: int) -> torch.Tensor:
    """L2 norm of each slice of ``tensor`` along dimension ``position`` (over all other dimensions), on the CPU: the
    importances and kept indices are small vectors, whatever device each block is on."""
    moved = tensor.movedim(position, 0)
    return moved.reshape(moved.shape[0], -1).norm(dim=1).cpu()


def _segments(layout: _Layout, roles: tuple[str, ...], norms: torch.Tensor):
    """Split a vector along a fused dimension into its role segments."""
    start = 0
    for role in roles:
        size = layout.sizes[role][0]
        yield role, norms[start:start + size]
        start += size


def _residual_importance(layout, plan, dense, modules) -> torch.Tensor:
    """Residual-channel importance of one block (see the module docstring). A fused matrix counts as its parts (Phi-3's
    ``qkv_proj`` as q, k and v, its ``gate_up_proj`` as gate and up), as the separate matrices of the same weights in
    the Llama layout do: one norm over the whole fused column gave other channels (6 of 64 differed on a tiny model)."""
    total = torch.zeros(layout.sizes["residual"][0])
    for full, roles in plan.items():
        tensor = dense[full]
        for position, dim_roles in enumerate(roles):
            if dim_roles != ("residual",):
                continue
            if tensor.dim() == 1:
                if full.endswith(".bias") or full == "bias":
                    continue
                module, weight = modules[full]
                vectors = [_norm_scale(module, weight.detach()).cpu()]
            else:
                other = 1 - position
                parts = [tensor]
                if roles[other] is not None and len(roles[other]) > 1:
                    parts = tensor.split([layout.sizes[role][0] for role in roles[other]], dim=other)
                vectors = [_slice_norms(part, position) for part in parts]
            for values in vectors:
                mean = values.mean()
                if mean > 0:
                    total += values / mean
    return total


def _block_importance(layout: _Layout, plan: dict, dense: dict) -> dict:
    """FFN-neuron and per-head-dimension importances of one block, from its 2-D weights."""
    products = {}  # role -> list of per-index norm vectors to multiply
    for full, roles in plan.items():
        tensor = dense[full]
        if tensor.dim() != 2:
            continue
        for position, dim_roles in enumerate(roles):
            if dim_roles is None or dim_roles == ("residual",):
                continue
            for role, norms in _segments(layout, dim_roles, _slice_norms(tensor, position)):
                products.setdefault(role, []).append(norms)

    def combined(role):
        vectors = products.get(role)
        if not vectors:
            return None
        out = torch.ones_like(vectors[0])
        for vector in vectors:
            out = out * vector
        return out

    heads, kv_heads, head_dim = layout.heads, layout.kv_heads, layout.head_dim
    group = heads // kv_heads

    def per_group(role, count):
        vector = combined(role)
        if vector is None:
            return torch.ones(kv_heads, head_dim)
        vector = vector.reshape(count, head_dim)
        return vector.reshape(kv_heads, group, head_dim).sum(1) if count == heads else vector

    return {
        "ffn": combined("ffn"),
        "qk": per_group("q", heads) * per_group("k", kv_heads),
        "vo": per_group("v", kv_heads) * per_group("o", heads),
    }


def _top(importance: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest entries of the last dimension, in increasing order."""
    return importance.topk(count, dim=-1).indices.sort(dim=-1).values


def _qk_dims(layout: _Layout, importance: torch.Tensor) -> torch.Tensor:
    """Kept query/key dimensions per key/value group ([groups, side head dim]), in rotary pairs."""
    rotary, side_rotary = layout.rotary_dim, layout.side_rotary_dim
    parts = []
    if side_rotary:
        half = rotary // 2
        pairs = _top(importance[:, :half] + importance[:, half:rotary], side_rotary // 2)
        parts += [pairs, pairs + half]
    passthrough = layout.side_head_dim - side_rotary
    if passthrough:
        parts.append(_top(importance[:, rotary:], passthrough) + rotary)
    return torch.cat(parts, dim=-1)


def _block_indices(layout: _Layout, plan: dict, dense: dict, residual: torch.Tensor) -> dict:
    importance = _block_importance(layout, plan, dense)
    shared_qk = any(roles and ("qk_dim",) in roles for roles in plan.values())
    qk = importance["qk"]
    if shared_qk:  # q_norm/k_norm act on every head alike: one dimension set for all heads
        qk = qk.sum(0, keepdim=True).expand(layout.kv_heads, -1)
    qk_dims = _qk_dims(layout, qk)
    vo_dims = _top(importance["vo"], layout.side_head_dim)
    head_dim, group = layout.head_dim, layout.heads // layout.kv_heads
    kv_offsets = torch.arange(layout.kv_heads).unsqueeze(1) * head_dim
    q_offsets = torch.arange(layout.heads).unsqueeze(1) * head_dim
    indices = {
        "residual": residual,
        "k": (kv_offsets + qk_dims).flatten(),
        "v": (kv_offsets + vo_dims).flatten(),
        "q": (q_offsets + qk_dims.repeat_interleave(group, 0)).flatten(),
        "o": (q_offsets + vo_dims.repeat_interleave(group, 0)).flatten(),
        "qk_dim": qk_dims[0],
    }
    if importance["ffn"] is not None:
        indices["ffn"] = _top(importance["ffn"], layout.sizes["ffn"][1])
    return indices


def _dimension_index(layout: _Layout, roles: tuple[str, ...], indices: dict) -> torch.Tensor:
    parts, offset = [], 0
    for role in roles:
        parts.append(indices[role] + offset)
        offset += layout.sizes[role][0]
    return torch.cat(parts)


def _copy_selected(side_block, plan, dense, indices, layout) -> None:
    side_parameters = {full: p for full, _l, _m, _k, p in _block_parameters(side_block)}
    for full, roles in plan.items():
        value = dense[full]
        for position, dim_roles in enumerate(roles):
            if dim_roles is not None:
                index = _dimension_index(layout, dim_roles, indices).to(value.device)
                value = value.index_select(position, index)
        target = side_parameters[full]
        with torch.no_grad():
            target.copy_(value.to(target.device, target.dtype))


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def _trunk_parts(side_network, base_trunk, base_config):
    num_layers = num_blocks(base_config)
    base_parent, base_attr = find_layer_list(base_trunk, num_layers)
    side_parent, side_attr = find_layer_list(side_network.trunk, num_layers)
    base_blocks = list(getattr(base_parent, base_attr))
    side_blocks = [wrapped.block for wrapped in getattr(side_parent, side_attr)]
    # the trunk's own parameters outside the blocks that the side trunk keeps (its final norm)
    side_rest = _TrunkRest(side_network.trunk, side_parent, side_attr)
    base_rest = _TrunkRest(base_trunk, base_parent, base_attr)
    return base_blocks, side_blocks, base_rest, side_rest


class _TrunkRest(nn.Module):
    """A view of a trunk's parameters that are not in its block list (final norm; embeddings are skipped)."""

    def __init__(self, trunk: nn.Module, blocks_parent: nn.Module, blocks_attr: str):
        super().__init__()
        try:
            embedding = trunk.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # the side trunk's embedding was dropped
            embedding = None
        skip = {id(getattr(blocks_parent, blocks_attr)), id(embedding)}
        for name, child in trunk.named_children():
            if child is not None and id(child) not in skip and any(True for _ in child.parameters()):
                self.add_module(name, child)


def select_indices(side_network, base_trunk, base_config, side_config) -> list[dict]:
    """The indices ``init="pruned"`` keeps, per block: ``{"residual", "ffn", "q", "k", "v", "o", "qk_dim"}`` (each a
    LongTensor of backbone indices along that role's dimension); the residual set is the same for every block.
    Raises a ``QSTUnsupportedModelError`` naming the model type where no rule maps the model's weights."""
    return _prune(side_network, base_trunk, base_config, side_config, copy=False)


def initialise_side_network(side_network, base_trunk, base_config, side_config, qst_config) -> None:
    """Initialise the side network's blocks as ``qst_config.init`` says (called once the side network is built,
    before its constant-valued parameters are reparametrized). ``"random"``: nothing to do (the trunk class's own
    initialisation). ``"pruned"``: see the module docstring."""
    if qst_config.init != "pruned":
        return
    residual = _prune(side_network, base_trunk, base_config, side_config, copy=True)[0]["residual"]
    if qst_config.downsample == "linear":
        # the downsampled backbone states enter the residual stream: start as the same channel selection
        downsamplers = [side_network.embed_downsample] + [
            block.downsample for block in side_network.trunk.modules() if isinstance(block, QSTSideBlock)
        ]
        with torch.no_grad():
            for linear in downsamplers:
                linear.weight.zero_()
                linear.weight[torch.arange(residual.numel()), residual.to(linear.weight.device)] = 1.0
                if linear.bias is not None:
                    linear.bias.zero_()


def _refuse_zero3_partitioned(base_trunk: nn.Module) -> None:
    """Pruning reads every backbone weight outside the backbone's forward. Where DeepSpeed ZeRO-3 partitioned them
    when the model was loaded (``from_pretrained`` enters ``deepspeed.zero.Init`` once the Trainer's
    ``TrainingArguments(deepspeed=...)`` or accelerate's ZeRO-3 plugin is set up), each is an empty placeholder and
    every rank holds a slice: the shape checks failed on ``(0,)`` and blamed the model type. Gathering the whole trunk
    on every rank would undo what ZeRO-3 is used for, so this is refused, naming the way round it."""
    if zero3_partitioned(base_trunk):
        raise QSTUnsupportedModelError(
            'QSTConfig(init="pruned") reads the backbone\'s weights, but DeepSpeed ZeRO-3 has partitioned them '
            "(the model was loaded under deepspeed.zero.Init, as from_pretrained does once TrainingArguments(deepspeed="
            "...) or accelerate's ZeRO-3 plugin is set up): each rank holds only a slice. Load the model and call "
            "get_peft_model before setting up ZeRO-3 (deepspeed.initialize, which the Trainer calls, partitions the "
            'adapted model afterwards), or use init="random" (the default).'
        )


def _prune(side_network, base_trunk, base_config, side_config, copy: bool) -> list[dict]:
    model_type = base_config.model_type
    _refuse_zero3_partitioned(base_trunk)
    if model_type not in PRUNABLE_MODEL_TYPES:
        raise _refuse(model_type, "its block layout (module roles and rotary layout) is not mapped")
    layout = _Layout(base_config, side_config)
    if layout.heads % layout.kv_heads:
        raise _refuse(model_type, f"{layout.heads} attention heads do not split into {layout.kv_heads} groups")
    base_blocks, side_blocks, base_rest, side_rest = _trunk_parts(side_network, base_trunk, base_config)
    # every mapping is checked before anything is read or written
    plans = [_plan_block(layout, s, b, f"layer {i}") for i, (s, b) in enumerate(zip(side_blocks, base_blocks))]
    rest_plan = _plan_block(layout, side_rest, base_rest, "trunk")

    def dense_of(block, plan):
        # a block accelerate offloads (device_map "cpu"/"disk" entries) keeps its weights on the meta device outside
        # its forward: they are read from the offload hook's weights map (onloaded_tensor) as its forward reads them
        # (with preload_module_classes, one hook on the whole block holds them: onloaded_tensor's root)
        parameters = {full: (m, _loaded_or(onloaded_tensor(m, k, root=block) if p.device.type == "meta" else p, p))
                      for full, _l, m, k, p in _block_parameters(block)}
        return (
            {full: dequantised(parameters[full][1], model_type) for full in plan},
            {full: parameters[full] for full in plan},  # (module, weight as loaded), for the norms' scales
        )

    # pass 1: the residual channels, from every block (one dequantised at a time) and the final norm
    residual_importance = torch.zeros(layout.sizes["residual"][0])
    for block, plan in [*zip(base_blocks, plans), (base_rest, rest_plan)]:
        dense, modules = dense_of(block, plan)
        residual_importance += _residual_importance(layout, plan, dense, modules)
        del dense
    residual = _top(residual_importance, layout.sizes["residual"][1])

    # pass 2: per block, the FFN neurons and head dimensions, then the copy
    selected = []
    for side_block, base_block, plan in zip(side_blocks, base_blocks, plans):
        dense, _ = dense_of(base_block, plan)
        indices = _block_indices(layout, plan, dense, residual)
        if copy:
            _copy_selected(side_block, plan, dense, indices, layout)
        selected.append(indices)
        del dense
    if copy:
        dense, _ = dense_of(base_rest, rest_plan)
        _copy_selected(side_rest, rest_plan, dense, {"residual": residual}, layout)
    return selected
