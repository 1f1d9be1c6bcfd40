"""An inference fast path for Llama-style side networks.

Why it exists: a side block is a decoder block 1/r as wide as the backbone's, so its arithmetic is tiny, but run
through the transformers modules it costs as many small operations as a backbone block: about 60 per block (separate
q/k/v projections, a six-op RMSNorm in float32 and back, rotary embeddings, module calls, the downsampler and the gate)
plus the Python around them. Decoding on a CPU, where a step of the 4-bit SmolLM2-135M takes about 22 ms, those ~1,800
dispatches made QST generation 42-72% slower than the base model's.

Under ``torch.no_grad()`` this module computes the same function with far fewer, cheaper operations:

- the downsamplers of all layers run as one batched computation over the stacked hidden states, with the gates'
  ``(1 - s_i)`` applied to all at once, so each block's input mixing is one ``addcmul``;
- each block's q/k/v projections and rotary ``rotate_half`` (a signed channel permutation, so linear) are one matmul,
  with the RMSNorm weight and the attention scaling folded into its weights and the RMS denominator applied to its
  result (two operations, :func:`_denominator`); rotary embeddings are then one multiply and one ``addcmul``; the
  gate/up projections are one matmul; the output and down projections add their residual in the same ``addmm``;
- one decode token attends with two batched matmuls and a softmax (cheaper than SDPA's kernel at head dim 4), its
  key and value are appended to a plain ``DynamicCache``'s layers directly, and the loop over blocks does no
  Python-level tensor indexing (at these sizes a ``t[:, :k]`` costs as much as a small matmul): about 20 tensor
  operations per block, called through local names, under ``torch.inference_mode()`` (views and splits skip
  autograd's tracking);
- plain rotary embeddings are computed per query/key column from the positions (``cos(position * inv_freq)``)
  instead of through the rotary module;
- everything runs in float32 whatever the side dtype, with autocast off (:func:`autocast_off`) (on CPUs small
  float32 matmuls are several times faster than bfloat16 ones, and float32 is at least as precise as the bf16 path,
  whose norms and attention accumulate in float32 too; a float64 side network, which float32 would round, takes the
  general path); the side network's own transformers ``DynamicCache`` holds float32 keys and values
  (:func:`keep_cache_dtype` converts when a generation moves between the two paths), so generate reorders, crops and
  selects it as before;
- the output upsample and output gate are one ``addmm`` onto the backbone's last hidden state (:func:`fast_mix`).

The packed weights are built once and rebuilt when any side parameter may have changed (an optimizer step, fused or
not, ``load_adapter``, a move to another device, an update through ``param.data``): see :func:`weights_key`. That is
checked at the start of every sequence and at every forward without a cache, not at the decoding steps that continue
a cache the weights were checked for (it walks every side parameter, a few percent of a decoding step).

It applies to side trunks of the Llama block structure (``llama``, ``mistral`` and ``qwen2`` without sliding windows)
on one device, with a 2-D attention mask over the past and new tokens or none, outside training mode unless the side
network has no dropout; packed sequences (no mask, restarting position ids), 4-D masks, masks per layer type (a dict)
and 2-D masks of another length (which transformers pads), other keyword arguments, other architectures, gradients,
side networks that FSDP or DeepSpeed ZeRO-3 shards (:func:`sharded`), and the copy heads' mix take the general path
through the transformers modules. Outputs equal the general path's to
floating-point rounding (tests/test_fast_path.py); :func:`fast_path_disabled` switches it off. Code that
``torch.compile`` traces takes the general path too (tests/test_torch_compile.py).
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
import torch.nn.functional as F
import transformers.activations
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer

#: model types whose decoder block this path reproduces (pre-norm RMSNorm, rotary attention with q/k/v/o projections,
#: gated MLP with gate/up/down projections, no q/k norms)
FAST_PATH_MODEL_TYPES = ("llama", "mistral", "qwen2")

#: activation modules that compute plain SiLU (``hidden_act`` "silu": transformers' own class; "swish": torch's)
_SILU_MODULES = (torch.nn.SiLU,) + tuple(
    cls for cls in (getattr(transformers.activations, "SiLUActivation", None),) if isinstance(cls, type)
)

#: trunk keyword arguments the fast path understands; any other (packed-sequence metadata, output flags) falls back
_UNDERSTOOD_KWARGS = {"attention_mask", "position_ids", "cache_position", "use_cache"}


def _uses_sliding_window(config) -> bool:
    if getattr(config, "sliding_window", None) is None:
        return False
    if getattr(config, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any(kind != "full_attention" for kind in layer_types)
    return True


def supports_fast_path(side) -> bool:
    """Whether a :class:`~peft_qst.side.QSTSideNetwork` has the block structure this module reproduces."""
    config = side.trunk.config
    if config.model_type not in FAST_PATH_MODEL_TYPES or _uses_sliding_window(config):
        return False
    if getattr(config, "hidden_act", None) not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        return False
    block = side._blocks[0].block
    attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    needed = [
        (attention, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (mlp, ("gate_proj", "up_proj", "down_proj")),
        (block, ("input_layernorm", "post_attention_layernorm")),
    ]
    if any(owner is None or not all(hasattr(owner, name) for name in names) for owner, names in needed):
        return False
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
        return False
    return True


class PackedSideWeights:
    """The side network's weights laid out for :func:`fast_side_forward`; built from the live parameters."""

    def __init__(self, side, key: tuple) -> None:
        blocks = side._blocks
        first = blocks[0].block
        config = side.trunk.config
        self.key = key
        self.dtype = side.upsample.weight.dtype
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(first.self_attn.head_dim)
        self.scaling = float(first.self_attn.scaling)
        width = int(config.hidden_size)
        self.eps_sum = width * float(first.input_layernorm.variance_epsilon)  # see _denominator
        self.final_eps_sum = width * float(side.trunk.norm.variance_epsilon)
        # the activation as a plain function: a module call costs more than SiLU's arithmetic at these sizes
        act = first.mlp.act_fn
        self.act = torch._C._nn.silu if type(act) in _SILU_MODULES else act.forward
        self.q_width = self.heads * self.head_dim
        self.kv_width = self.kv_heads * self.head_dim
        self.qk_width = self.q_width + self.kv_width
        # how one block's projection splits: [q k | rot(q) rot(k) | v], then [q | k]
        self.qkv_split = [self.qk_width, self.qk_width, self.kv_width]
        self.q_k_split = [self.q_width, self.kv_width]
        ffn = int(first.mlp.gate_proj.out_features)
        self.gate_up_split = [ffn, ffn]
        with torch.no_grad(), autocast_off(side.upsample.weight.device):
            self.downsample = _stack_downsamplers([side.embed_downsample] + [b.downsample for b in blocks])
            # the sigmoid in float32 too: computed in the side dtype, a bf16 side network's gates and (1 - gate) were
            # rounded to bfloat16, the one rounding to the side dtype in the fast path (its side output 0.4% off the
            # float32 computation of the same weights, its logits 1e-3 off on a tiny 4-bit Llama)
            gates = torch.stack([torch.sigmoid(b.gate_logit.float()) for b in blocks]).unsqueeze(1)
            self.gates = gates  # (layers, 1, side width): broadcast over tokens
            self.keep = 1.0 - gates
            self.layers = [self._pack_block(b.block) for b in blocks]
            self.final_norm = side.trunk.norm.weight.detach().float() * float(side.trunk.norm.weight.numel()) ** 0.5
            # the upsample with the output gate folded in: ``a * (W s) = (diag(a) W) s``
            self.upsample = side.upsample.weight.detach().float().t() * side.output_gate.weight.detach().float()
            self.last_output = None  # (the output fast_side_forward returned, the same in float32)
            # computed in float32 whatever the side dtype: as precise as the bf16 path's float32 norms and attention
            # accumulation or more, and on CPUs small float32 matmuls are several times faster than bfloat16 ones
            for name in ("downsample", "gates", "keep", "layers", "final_norm", "upsample"):
                setattr(self, name, _as_float32(getattr(self, name)))
            self.layers = [tuple(layer) for layer in self.layers]
            self.gate_rows = list(self.gates.unbind(0))  # per layer, indexed without a tensor op
            # the RMS denominators' epsilon terms (see _denominator), as tensors on the weights' device
            device = self.gates.device
            self.root_eps = torch.tensor(math.sqrt(self.eps_sum), device=device)
            self.final_root_eps = torch.tensor(math.sqrt(self.final_eps_sum), device=device)
            self.column_inv_freq = _column_inv_freq(side.trunk.rotary_emb, self.heads + self.kv_heads, device)
        self.checked_cache = None  # weak reference to the side cache these weights were last checked for

    def _pack_block(self, block) -> list:
        """One block's weights as (in, out) matrices with the cheap parts of the block folded in:

        - the RMSNorm weights scale the rows of the projection that follows them (``(n * w) @ W = n @ (diag(w) W)``);
        - the attention scaling multiplies the query columns;
        - rotary embeddings need ``rotate_half(q)`` next to ``q``: ``rotate_half`` permutes and negates channels, so
          it is a linear map too, and its columns are computed by the same matmul as q, k and v.
        """
        attention, mlp = block.self_attn, block.mlp
        root_width = float(block.input_layernorm.weight.numel()) ** 0.5  # see _denominator
        norm1 = block.input_layernorm.weight.detach().float() * root_width
        norm2 = block.post_attention_layernorm.weight.detach().float() * root_width

        def columns(linear, scale: float = 1.0):
            weight = linear.weight.detach().float().t() * scale
            bias = None if linear.bias is None else linear.bias.detach().float() * scale
            return weight, bias

        def rotate_half(matrix, heads):
            per_head = matrix.unflatten(-1, (heads, self.head_dim))
            half = self.head_dim // 2
            return torch.cat((-per_head[..., half:], per_head[..., :half]), -1).flatten(-2)

        q_w, q_b = columns(attention.q_proj, self.scaling)
        k_w, k_b = columns(attention.k_proj)
        v_w, v_b = columns(attention.v_proj)
        qkv_w = torch.cat([q_w, k_w, rotate_half(q_w, self.heads), rotate_half(k_w, self.kv_heads), v_w], 1)
        qkv_b = None
        if q_b is not None:
            qkv_b = torch.cat([q_b, k_b, rotate_half(q_b, self.heads), rotate_half(k_b, self.kv_heads), v_b])
        gate_w, gate_b = columns(mlp.gate_proj)
        up_w, up_b = columns(mlp.up_proj)
        o_w, o_b = columns(attention.o_proj)
        down_w, down_b = columns(mlp.down_proj)
        # a list, not a tuple, so that _as_float32 converts it; turned into a tuple for unpacking in the loop
        return [
            (norm1.unsqueeze(1) * qkv_w).contiguous(),
            qkv_b,
            o_w.contiguous(),
            o_b,
            (norm2.unsqueeze(1) * torch.cat([gate_w, up_w], 1)).contiguous(),
            None if gate_b is None else torch.cat([gate_b, up_b]),
            down_w.contiguous(),
            down_b,
            int(attention.layer_idx),
        ]


#: counts parameter (re)registrations anywhere (``setattr``, ``register_parameter``, ``load_state_dict(assign=True)``)
_registrations = 0


def _count_registration(module, name, parameter):
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)

#: counts optimizer steps anywhere in the process. Fused optimizers (``AdamW(fused=True)``, transformers' and TRL's
#: default ``optim="adamw_torch_fused"``) write parameters without bumping their version counters, so the versions
#: alone would miss their updates and the fast path would keep computing with the weights from before training.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)

#: counts adapter weights loaded into existing parameters (``load_adapter``, as trainers resume or reload the best
#: checkpoint; ``load_state_dict`` of a side network or of a model holding one, which ``set_peft_model_state_dict``
#: and accelerate's ``load_state`` call): they are copied in place, which the version counters record but the check of
#: a continued cache (below) does not read
_adapter_loads = 0


def note_adapter_loaded() -> None:
    """Called after adapter weights were loaded into a model, by the loading wrappers in `registration` and by every
    side network's ``load_state_dict`` post-hook (:func:`note_side_weights_loaded`)."""
    global _adapter_loads
    _adapter_loads += 1


def note_side_weights_loaded(module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of each side network: the load ran through it (``model.load_state_dict``,
    ``set_peft_model_state_dict``, accelerate's ``load_state``), so its weights may have been copied in place. Without
    it, the next turn of a cache continued after such a load ran on the packed weights from before the load (the
    general path runs on the loaded ones). A module-level function, so that the model still pickles."""
    note_adapter_loaded()


def _counters() -> tuple:
    """What changes with every optimizer step, parameter registration and adapter load: O(1) to read."""
    return (_registrations, _optimizer_steps, _adapter_loads)


def autocast_off(device: torch.device):
    """Autocast switched off for ``device``'s type, around the fast path's packing and arithmetic. The fast path
    computes in float32 by design (see the module docstring); under autocast, its ``torch.stack`` of the side weights
    or of the backbone's hidden states failed where those are in the other half dtype than autocast's ("Unexpected
    floating ScalarType in at::autocast::prioritize"), so an eval-mode forward or ``generate`` failed where the base
    model ran: a bf16 side network (TRL casts a 4-bit model's to bf16) under float16 autocast (``fp16=True``), a
    float16 checkpoint under ``Trainer(bf16=True)``. Nothing to enter where autocast is off (a decoding step's
    usual case: entering costs about 30 times the check)."""
    if not torch.is_autocast_enabled(device.type):
        return nullcontext()
    return torch.autocast(device.type, enabled=False)


def _as_float32(value):
    if isinstance(value, torch.Tensor):
        return value.detach().float().contiguous()
    if isinstance(value, dict):
        return {key: _as_float32(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_float32(item) for item in value]
    return value


def _column_inv_freq(rotary, heads: int, device) -> Optional[torch.Tensor]:
    """The rotary inverse frequency of every query/key column, (1, (heads + kv heads) * head_dim), so that a forward
    gets its cos/sin per column as ``cos(position * column_inv_freq)``: four operations instead of the rotary module
    call and the expansion of its output to the columns. Only for the plain rotary embedding (``rope_type``
    "default", no attention scaling), whose frequencies never change; None for the others (scaled, dynamic), which the
    rotary module computes. Same arithmetic as the module (``position.float() * inv_freq`` in float32, then cos and
    sin), so the same values."""
    if getattr(rotary, "rope_type", None) != "default" or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return None
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        return None
    inv_freq = inv_freq.detach().to(device=device, dtype=torch.float32)
    return torch.cat((inv_freq, inv_freq)).repeat(heads).unsqueeze(0).contiguous()


def weights_key(side) -> tuple:
    """Changes whenever a side parameter is updated in place (a load, an in-place op: the version counter), an
    optimizer steps (fused ones leave the version counters as they are), a parameter gets new storage (a move,
    ``param.data = ...``) or is replaced by a new Parameter (a registration), or its values change in a way none of
    those record: an update through ``param.data`` (a hand-written SGD step, an EMA, weight surgery), which bumps no
    version counter. For the last, the key holds a weighted sum of each parameter in float64 (float32 on MPS, which
    has no float64), element ``i`` weighted ``1 + i / 2**24`` (:func:`_position_weights`): a plain sum missed an edit
    that moves values without changing their sum (rows permuted, a square matrix transposed, a rotary layout converted
    through ``param.data.copy_``), and the fast path kept computing with the weights from before it. One product and
    one reduction per parameter and one device sync, about 4 ms for SmolLM2-135M's 489 side tensors on a CPU, once per
    sequence.

    The key is ``(counters, parameter state)``: the counters of optimizer steps, parameter registrations and adapter
    loads (O(1) to read, :func:`_counters`), and the parameters' sums, storage and versions (the costly part)."""
    cached = side.__dict__.get("_parameter_list")
    if cached is None or cached[0] != _registrations:
        cached = (_registrations, list(side.parameters()))
        side.__dict__["_parameter_list"] = cached
    params = cached[1]
    if not params:
        return (_counters(), ())
    with torch.no_grad():
        device = params[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        longest = max(p.numel() for p in params)
        weights = {where: _position_weights(side, longest, where, dtype) for where in {p.device for p in params}}
        sums = torch.stack(
            [torch.dot(p.detach().reshape(-1).to(dtype), weights[p.device][: p.numel()]).to(device) for p in params]
        ).tolist()
    return (_counters(), (tuple(sums),) + tuple((p.data_ptr(), p._version) for p in params))


def _position_weights(side, length: int, device, dtype) -> torch.Tensor:
    """At least ``length`` position weights ``1 + i * step`` for :func:`weights_key`'s weighted sums: distinct (a step
    of 2**-24 in float64, exactly represented for far more elements than a parameter holds; 2**-22 in float32 on MPS)
    and about 1 for the first 2**24 elements, so that each element counts about as much as in a plain sum (whose
    float64 rounding does not lose a small update). Kept on the side network, per (device, dtype), as its parameter
    list is: a module-level cache held the longest weights any model had needed, on every device, after the model
    was gone."""
    caches = side.__dict__.setdefault("_position_weights", {})
    cached = caches.get((device, dtype))
    if cached is None or cached.numel() < length:
        step = 2.0 ** -24 if dtype == torch.float64 else 2.0 ** -22
        cached = torch.arange(length, device=device, dtype=dtype).mul_(step).add_(1.0)
        caches[(device, dtype)] = cached
    return cached


def _stack_downsamplers(downsamplers: list) -> dict:
    """All downsamplers as stacked weights: one batched computation instead of one module call per layer."""
    from .side import AdapterDownsample, LoRADownsample, PoolDownsample

    first = downsamplers[0]
    if isinstance(first, AdapterDownsample):
        return {
            "kind": "adapter",
            "w1": torch.stack([d[0].weight.t() for d in downsamplers]),
            "b1": torch.stack([d[0].bias for d in downsamplers]).unsqueeze(1),
            "act": first[1],
            "w2": torch.stack([d[2].weight.t() for d in downsamplers]),
            "b2": torch.stack([d[2].bias for d in downsamplers]).unsqueeze(1),
            "ln_w": torch.stack([d[3].weight for d in downsamplers]).unsqueeze(1),
            "ln_b": torch.stack([d[3].bias for d in downsamplers]).unsqueeze(1),
            "ln_eps": float(first[3].eps),
        }
    if isinstance(first, LoRADownsample):
        return {
            "kind": "lora",
            "w1": torch.stack([d[0].weight.t() for d in downsamplers]),
            "w2": torch.stack([d[1].weight.t() for d in downsamplers]),
        }
    if isinstance(first, PoolDownsample):
        return {"kind": first.kind, "r": first.r}
    return {
        "kind": "linear",
        "w1": torch.stack([d.weight.t() for d in downsamplers]),
        "b1": torch.stack([d.bias for d in downsamplers]).unsqueeze(1),
    }


def _downsample_all(packed: dict, stacked: torch.Tensor) -> torch.Tensor:
    """(layers + 1, tokens, d) -> (layers + 1, tokens, d / r)."""
    kind = packed["kind"]
    if kind == "adapter":
        down = packed["act"](torch.baddbmm(packed["b1"], stacked, packed["w1"]))
        down = torch.baddbmm(packed["b2"], down, packed["w2"])
        down = F.layer_norm(down, down.shape[-1:], eps=packed["ln_eps"])
        return torch.addcmul(packed["ln_b"], down, packed["ln_w"])
    if kind == "lora":
        return torch.bmm(torch.bmm(stacked, packed["w1"]), packed["w2"])
    if kind == "linear":
        return torch.baddbmm(packed["b1"], stacked, packed["w1"])
    grouped = stacked.unflatten(-1, (-1, packed["r"]))
    return grouped.amax(-1) if kind == "maxpool" else grouped.mean(-1)


_enabled = True


@contextmanager
def fast_path_disabled():
    """Run QST side networks through the transformers modules only, e.g. to compare the two paths."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _is_deterministic_in_training_mode(side) -> bool:
    """No dropout anywhere: the eval-mode computation is also the training-mode one."""
    if float(getattr(side.trunk.config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    return all(module.p == 0 for module in side.modules() if isinstance(module, torch.nn.Dropout))


def fsdp_managed(module) -> bool:
    """Whether FSDP shards this module's parameters (``FullyShardedDataParallel`` or ``fully_shard`` wraps it or a
    module around it: torch marks every module it manages with ``_is_fsdp_managed_module``). Its parameters then hold
    their full values only inside the forward of the FSDP unit that holds them: outside it they are shards (DTensors
    under FSDP2, flat views under FSDP1). Code that reads the side network's weights outside their modules' forwards
    (the packed weights of the fast path, the LM head's low-rank backward) must leave such a side network alone."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def zero3_partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions this module's parameters (``deepspeed.initialize`` with stage 3, or
    ``deepspeed.zero.Init``, as the Trainer and accelerate set it up): every parameter then carries a ``ds_id``, and
    outside the forward (and backward) of the module that owns it, its ``data`` is an empty placeholder while each
    rank keeps a slice elsewhere. DeepSpeed gathers a parameter in its module's hooks; within a forward called through
    the DeepSpeed engine it also gathers one read from elsewhere, but not in calls on the model itself
    (``model.generate``, as the Trainer and TRL generate under ZeRO-3). Code that reads the side network's weights
    outside their modules' forwards must then leave it alone, as under FSDP (:func:`fsdp_managed`). DeepSpeed
    partitions all of a model's parameters or none, so the first one tells."""
    first = next(module.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


def sharded(module) -> bool:
    """Whether FSDP or DeepSpeed ZeRO-3 shards this module's parameters, so that they hold their full values only
    inside their own modules' forwards (:func:`fsdp_managed`, :func:`zero3_partitioned`)."""
    return fsdp_managed(module) or zero3_partitioned(module)


def fsdp2_unit(module) -> bool:
    """Whether ``fully_shard`` made this module an FSDP2 unit of its own (an ``FSDPModule``, which can be gathered
    with ``unshard()`` and given further forward methods); the flag test first keeps this cheap for unsharded models."""
    if not fsdp_managed(module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def packed_weights_for(side, trunk_kwargs: dict, cache=None, length: Optional[int] = None
                       ) -> Optional[PackedSideWeights]:
    """The packed weights to run this forward on the fast path, or None where the general path must run it.
    ``length``: the forward's new tokens per row, where known (a 2-D mask must cover the past and those).

    Whether the side parameters changed since the weights were packed is checked at the start of each sequence, and
    at every forward without a cache; a forward that continues a cache these weights were checked for (the decoding
    steps of one generation) reuses them unchecked: its cached keys and values were computed with them. An optimizer
    step, a parameter registration or an adapter load since the check (three counters) makes even such a forward
    check again; other in-place writes between two turns of one cache (``param.data`` edits, a direct
    ``set_peft_model_state_dict``) are seen at the next sequence, not within the continued cache.
    """
    if not _enabled or torch.is_grad_enabled() or torch.compiler.is_compiling() or sharded(side):
        # under torch.compile the general path runs: the compiler fuses it, and what decides here whether packed
        # weights still hold (the counters of optimizer steps, the parameters' sums) is Python state that the compiled
        # code would be specialised on, so every optimizer step recompiled the side network's frames
        return None
    if side.upsample.weight.dtype == torch.float64:
        # the fast path computes in float32, which suits float32, bfloat16 and float16 side networks but would round
        # a float64 one (``model.double()``, a float64 default dtype) to float32's precision, silently: ~1e-7
        # instead of ~1e-16 off the general path's logits; whoever asks for float64 gets the general path
        return None
    # "never": another block structure; "eval": only in eval mode (dropout); "always": also in training mode
    when = side.__dict__.get("_fast_path_when")
    if when is None:
        if not supports_fast_path(side):
            when = "never"
        else:
            when = "always" if _is_deterministic_in_training_mode(side) else "eval"
        side.__dict__["_fast_path_when"] = when
    if when == "never" or (when == "eval" and side.training):
        return None
    if not set(trunk_kwargs) <= _UNDERSTOOD_KWARGS:
        return None
    if cache is not None and not isinstance(cache, DynamicCache):
        return None  # a static (preallocated) side cache: the general path runs it, as transformers' modules do
    mask = trunk_kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        # a 4-D mask, or one per layer type (a dict, which transformers' models accept and its
        # create_masks_for_generate builds for configs with layer types, Qwen2's included): the general path hands it
        # to the side trunk's modules as it is (``mask.dim()`` on a dict failed here with an AttributeError)
        return None
    past = cache.get_seq_length() if cache is not None else 0
    if mask is not None and length is not None and mask.shape[-1] != past + length:
        # a 2-D mask over other than the past and new tokens (one over the new tokens alone, beside a filled cache):
        # transformers reads its columns as the first positions and masks the rest, as the backbone did; the fast path
        # read its last columns, and failed on a one-token step ("shape '[2, 1, 1, 7]' is invalid") or silently
        # attended to other positions than the backbone and the general path
        return None
    positions = trunk_kwargs.get("position_ids")
    if mask is None and positions is not None and positions.shape[-1] > 1:
        # without a mask, position ids that restart mark packed sequences (TRL's packing, padding-free batches):
        # the general path separates them
        if not bool((positions[..., 1:] - positions[..., :-1] == 1).all()):
            return None
    packed = side.__dict__.get("_packed_weights")
    if (
        packed is not None
        and cache is not None
        and packed.checked_cache is not None
        and packed.checked_cache() is cache
        and past > 0
        # no optimizer step, parameter registration or adapter load since the check (O(1) to see): a cache continued
        # after a training step (the next turn of a chat) must run its new tokens on the new weights, as the general
        # path does, not on the weights its earlier tokens were computed with
        and packed.key[0] == _counters()
    ):
        return packed
    key = weights_key(side)
    if packed is not None and packed.key[1] == key[1]:
        # at most the counters moved (an optimizer stepping another model, say, while this one generates): the
        # values, versions and storage of every side parameter are as packed, so the packed weights still hold
        packed.key = key
    if packed is None or packed.key != key:
        if len({p.device for p in side.parameters()}) != 1:
            return None  # spread over devices (device_map): the general path places each block
        packed = PackedSideWeights(side, key)
        side.__dict__["_packed_weights"] = packed
    packed.checked_cache = None if cache is None else weakref.ref(cache)
    return packed


def _denominator(hidden: torch.Tensor, root_eps: torch.Tensor) -> torch.Tensor:
    """The RMSNorm denominator without its factor sqrt(width), which is folded into the next projection with the norm's
    weight: ``x * rsqrt(mean(x^2) + eps) = sqrt(n) * x / sqrt(sum(x^2) + n * eps)``, and ``sqrt(sum(x^2) + n * eps)``
    is ``hypot(||x||, sqrt(n * eps))``: two operations instead of the five of the plain formula, which is what counts
    at these sizes."""
    return torch.linalg.vector_norm(hidden, dim=-1, keepdim=True).hypot_(root_eps)


def _attention_mask(attention_mask, batch: int, length: int, past: int, device):
    """Boolean (batch, 1, length, past + length) mask, or None where no position needs masking; and for a decoding
    step (one token per row), None or a (batch, 1) float32 tensor that is 0 on the rows that see no position.

    It is the general path's (transformers' SDPA mask): each position sees the earlier and its own non-padding
    positions. Padding positions' outputs are read: question answering's start/end logits of every position enter its
    loss, token classification returns them. A padding position with no non-padding position before it (left padding)
    sees nothing, and SDPA gives it zeros, as in the general path. A decoding step's one-token rows are attended by a
    softmax, which gives NaN for a row that sees nothing (a row of padding alone: an empty prompt in a batch of
    one-token prompts, or a row masked out with all its past): such a row sees itself in the mask, to keep the softmax
    finite, and the returned factor zeroes its attention output, as SDPA does in the general path. (It saw itself and
    kept that output before: the padding row's logits, and so the tokens generate chose for it, differed from the
    general path's and the base model's.)"""
    total = past + length
    if attention_mask is not None:
        attention_mask = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        if length == 1:
            # one read from the device for both questions: does every row see every position, does any see none
            visible = attention_mask.sum(-1)
            fewest = int(visible.min())
            if fewest == total:
                return None, None
            seen = (visible > 0).to(torch.float32).unsqueeze(1) if fewest == 0 else None
            # the query is the last position: it sees exactly the positions its row's mask keeps (and an empty row
            # itself, see above)
            keys = torch.arange(total, device=device).view(1, -1)
            mask = attention_mask if seen is None else attention_mask | ((keys == total - 1) & (visible == 0)[:, None])
            return mask.reshape(batch, 1, 1, total), seen
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and length == 1:
        return None, None
    queries = torch.arange(past, total, device=device).view(-1, 1)
    keys = torch.arange(total, device=device).view(1, -1)
    mask = keys <= queries  # (length, total)
    if attention_mask is not None:
        mask = mask.unsqueeze(0) & attention_mask.unsqueeze(1)
    else:
        mask = mask.unsqueeze(0).expand(batch, -1, -1)
    return mask.unsqueeze(1), None


def keep_cache_dtype(cache, dtype: torch.dtype) -> None:
    """Cast the side cache's filled layers to ``dtype`` where they hold another: the fast path keeps its keys and
    values in float32, the general path in the side dtype, and a generation may switch between them.

    Static layers (``generate(cache_implementation="static")``, a ``StaticCache`` passed in) are left as they are:
    only the general path fills them (:func:`packed_weights_for` leaves a static side cache to it), and their
    preallocated tensors take the dtype of the first keys written, which is not always the side dtype. Under an
    autocast to another dtype (a float32 side network under the bf16 or fp16 autocast a Trainer evaluates in) the keys
    are autocast's dtype: cast to the side dtype at the next step, the layer's storage no longer took them
    ("index_copy_(): self and source expected to have the same dtype"), and static-cache generation failed where the
    base model's ran (tests/test_generation.py)."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, StaticLayer):
            continue
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dtype != dtype and keys.numel():
            layer.keys = keys.to(dtype)
            layer.values = layer.values.to(dtype)


def _plain_float32_layers(cache, layers: int) -> Optional[list]:
    """The cache's layers if it is a plain ``DynamicCache`` (no offloading) whose layers are filled ``DynamicLayer``s
    holding float32 keys and values, else None."""
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False) or len(cache.layers) < layers:
        return None
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dtype != torch.float32:
            return None
    return cache.layers


#: at most this many tokens (batch x length) in a forward, the fast path runs on one thread (see fast_side_forward)
ONE_THREAD_TOKENS = 64


def fast_side_forward(side, packed: PackedSideWeights, hidden_states: tuple, cache, **trunk_kwargs):
    """The side trunk's output (after its final norm) and its cache, as ``QSTSideNetwork.forward`` returns them.

    Decoding steps (at most :data:`ONE_THREAD_TOKENS` tokens) run with one intra-op thread: their operations are far
    too small to split, and with several threads each one still pays for waking and joining the others (measured on a
    2-core CPU: a decoding step of the side network of SmolLM2-135M took 6% (batch 4) to 19% (batch 1) longer with 2
    threads than with 1). The thread count is process-wide, so it is set back as soon as the side network returns.

    It runs under ``torch.inference_mode()`` (the fast path only runs where gradients are off anyway): views, splits
    and concatenations skip autograd's view and version tracking, which made a decoding step of SmolLM2-135M's side
    network about 14% shorter. What leaves it as inference tensors -- the side cache's keys and values, the side
    output -- is only read afterwards (by the mix, by later steps, by generate's cache reordering and cropping, all
    of which make new tensors); a later forward with gradients that continues such a cache works, since
    concatenating to an inference tensor saves nothing of it for backward (tests/test_fast_path.py).
    """
    batch, length = hidden_states[0].shape[:2]
    with torch.inference_mode(), autocast_off(packed.gates.device):
        if batch * length > ONE_THREAD_TOKENS or (torch.get_num_threads() == 1 and not _sections_open()):
            return _fast_side_forward(side, packed, hidden_states, cache, **trunk_kwargs)
        with _one_thread_section():
            return _fast_side_forward(side, packed, hidden_states, cache, **trunk_kwargs)


#: the thread count to restore and how many sections run on one thread now (several Python threads may generate at once)
_one_thread = {"saved": None, "sections": 0}
_one_thread_lock = threading.Lock()
#: with OpenMP (PyTorch's default CPU backend) the intra-op thread count is each Python thread's own
#: (``omp_set_num_threads``, ``mkl_set_num_threads_local``): each thread then saves and restores its own count
_PER_THREAD_COUNT = "parallel backend: openmp" in torch.__config__.parallel_info().lower()
_own = threading.local()


def _sections_open() -> bool:
    return bool(getattr(_own, "sections", 0)) if _PER_THREAD_COUNT else bool(_one_thread["sections"])


@contextmanager
def _one_thread_section():
    """One intra-op thread while any section is open; the first section to open saves the thread count and the last
    to close sets it back, so that overlapping sections (generation in several Python threads) cannot leave the
    process on one thread. Where the count is per thread (OpenMP), that holds per thread: a thread that opened a
    section gets its own count back when it closes it, whatever other threads do meanwhile (one process-wide saved
    count, restored by the last thread to close, left every other overlapping thread on one thread for good)."""
    if _PER_THREAD_COUNT:
        sections = getattr(_own, "sections", 0)
        if not sections:
            _own.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _own.sections = sections + 1
        try:
            yield
        finally:
            _own.sections -= 1
            if not _own.sections:
                torch.set_num_threads(_own.saved)
        return
    with _one_thread_lock:
        if not _one_thread["sections"]:
            _one_thread["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _one_thread["sections"] += 1
    try:
        yield
    finally:
        with _one_thread_lock:
            _one_thread["sections"] -= 1
            if not _one_thread["sections"]:
                torch.set_num_threads(_one_thread["saved"])


def _fast_side_forward(side, packed: PackedSideWeights, hidden_states: tuple, cache, attention_mask=None,
                       position_ids=None, cache_position=None, use_cache=None):
    """See :func:`fast_side_forward`.

    Written for few operations per block, since at decoding sizes each costs more than its arithmetic: a block is
    about 20 tensor operations (one token per row: two batched matmuls and a softmax for attention, against the cache
    transformers keeps; several tokens: SDPA), with no Python-level tensor indexing in the loop.
    """
    dtype = packed.dtype
    batch, length, width = hidden_states[0].shape
    tokens = batch * length
    device = packed.gates.device
    if use_cache and cache is None:
        cache = DynamicCache(config=side.trunk.config)
        packed.checked_cache = weakref.ref(cache)  # filled with the weights just checked (packed_weights_for)
    past = cache.get_seq_length() if cache is not None else 0
    decoding = length == 1
    # decoding steps append to the layers of a plain DynamicCache directly (one torch.cat each for keys and values,
    # which is all DynamicLayer.update does, without the two method calls around it)
    direct_layers = _plain_float32_layers(cache, len(packed.layers)) if decoding and past else None
    if past and direct_layers is None:
        keep_cache_dtype(cache, torch.float32)
    if position_ids is None:
        position_ids = torch.arange(past, past + length, device=device).unsqueeze(0)

    layers = len(hidden_states) - 1
    stacked = torch.stack(hidden_states).to(device=device, dtype=torch.float32).view(layers + 1, tokens, width)
    down = _downsample_all(packed.downsample, stacked)  # (layers + 1, tokens, side width)
    keep_down = (packed.keep * down[1:]).unbind(0)  # (1 - s_i) * down_i(h_i)
    gate_rows = packed.gate_rows

    x = down[0]
    heads, kv_heads, head_dim = packed.heads, packed.kv_heads, packed.head_dim
    # rotary factors for the q and k columns of each token, (tokens, qk width): q * cos + rotate_half(q) * sin
    if packed.column_inv_freq is not None:
        angles = position_ids.reshape(-1, 1).float() * packed.column_inv_freq
        if angles.shape[0] != tokens:  # one row of position ids for the whole batch
            angles = angles.expand(batch, length, -1).reshape(tokens, -1)
        cos, sin = angles.cos(), angles.sin()
    else:
        cos, sin = side.trunk.rotary_emb(x, position_ids)  # (1 or batch, length, head_dim)
        per_column = (batch, length, heads + kv_heads, head_dim)
        cos = cos.unsqueeze(2).expand(per_column).reshape(tokens, -1)
        sin = sin.unsqueeze(2).expand(per_column).reshape(tokens, -1)
    mask, seen_rows = _attention_mask(attention_mask, batch, length, past, device)
    group = heads // kv_heads
    score_bias = None  # decoding with padding: -inf on the keys each row must not see, added by the scores' matmul
    if decoding and mask is not None:
        hidden = (~mask).expand(batch, kv_heads, 1, past + length).reshape(batch * kv_heads, 1, past + length)
        score_bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, float("-inf"))
    qkv_split, q_k_split = packed.qkv_split, packed.q_k_split
    root_eps, act, gate_up_split = packed.root_eps, packed.act, packed.gate_up_split
    # local names for what the loop calls: each global or attribute lookup costs about as much as a tiny operation's
    # arithmetic here (the RMS denominators are _denominator, inlined)
    mm, addmm, addcmul, bmm, cat = torch.mm, torch.addmm, torch.addcmul, torch.bmm, torch.cat
    norm = torch.linalg.vector_norm
    for index, (qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b, layer_idx) in enumerate(packed.layers):
        x = addcmul(keep_down[index], gate_rows[index], x)
        projected = mm(x, qkv_w).div_(norm(x, dim=-1, keepdim=True).hypot_(root_eps))
        if qkv_b is not None:
            projected += qkv_b
        # (split_with_sizes: Tensor.split is a Python wrapper around it)
        qk, rotated, value = projected.split_with_sizes(qkv_split, 1)
        query, key = addcmul(qk * cos, rotated, sin).split_with_sizes(q_k_split, 1)
        if decoding:  # one token per row: (batch, kv heads, 1, head_dim) is the row's memory as it is
            key = key.view(batch, kv_heads, 1, head_dim)
            value = value.view(batch, kv_heads, 1, head_dim)
            if direct_layers is not None:
                layer = direct_layers[layer_idx]
                layer.keys = key = cat((layer.keys, key), -2)
                layer.values = value = cat((layer.values, value), -2)
            elif cache is not None:
                key, value = cache.update(key, value, layer_idx)
            # the query heads that share each key/value head, against that head's keys (bmm: torch.matmul would
            # spend more on broadcasting 4-D shapes than on the arithmetic)
            rows, keys = batch * kv_heads, key.shape[-2]
            query, key = query.reshape(rows, group, head_dim), key.reshape(rows, keys, head_dim).transpose(1, 2)
            scores = bmm(query, key) if score_bias is None else torch.baddbmm(score_bias, query, key)
            attended = bmm(scores.softmax(-1), value.reshape(rows, keys, head_dim)).view(batch, -1)
            if seen_rows is not None:  # rows of padding alone attend to nothing: output 0, as SDPA's
                attended = attended.mul_(seen_rows)
        else:
            query = query.view(batch, length, heads, head_dim).transpose(1, 2)
            key = key.view(batch, length, kv_heads, head_dim).transpose(1, 2)
            value = value.view(batch, length, kv_heads, head_dim).transpose(1, 2)
            if cache is not None:
                key, value = cache.update(key, value, layer_idx)
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=1.0, is_causal=mask is None, enable_gqa=group > 1,
            ).transpose(1, 2).reshape(tokens, -1)
        x = addmm(x, attended, o_w)
        if o_b is not None:
            x += o_b
        gate_up = mm(x, gate_up_w).div_(norm(x, dim=-1, keepdim=True).hypot_(root_eps))
        if gate_up_b is not None:
            gate_up += gate_up_b
        gate, up = gate_up.split_with_sizes(gate_up_split, 1)
        x = addmm(x, act(gate).mul_(up), down_w)
        if down_b is not None:
            x += down_b
    out32 = x.div(_denominator(x, packed.final_root_eps)).mul_(packed.final_norm)
    out = out32.to(dtype).view(batch, length, -1)
    packed.last_output = (out, out32)
    return out, cache


def fast_mix(side, backbone_last: torch.Tensor, side_out: torch.Tensor) -> Optional[torch.Tensor]:
    """``h_L + a * up(side)`` in one matmul, from the float32 output of the fast forward that returned ``side_out``;
    None where ``side_out`` came from elsewhere (the general path computes the mix then)."""
    packed = side.__dict__.get("_packed_weights")
    # read once: another thread's forward of this side network may replace it at any moment (threads generating at
    # once). Read twice, a replacement between the check and the read mixed in that forward's side output instead
    # (silently other logits where the shapes matched), or its mix's reset failed this one with a TypeError
    last = packed.last_output if packed is not None else None
    if last is None or last[0] is not side_out:
        return None
    out32 = last[1]
    if packed.last_output is last:
        packed.last_output = None
    flat = backbone_last.reshape(-1, backbone_last.shape[-1]).to(out32.device, torch.float32)
    with autocast_off(out32.device):
        mixed = torch.addmm(flat, out32, packed.upsample)
    return mixed.to(backbone_last.device, backbone_last.dtype).view(backbone_last.shape)
