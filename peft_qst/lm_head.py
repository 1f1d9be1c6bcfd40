"""The frozen LM head under QST: a fast matmul path for one-token inputs, and a low-rank backward in training.

**One-token inputs.**

During generation the causal-LM forward computes logits for the last position only: ``lm_head(hidden[:, -1:, :])``.
After a prompt of T tokens that slice is a ``(batch, 1, d)`` view with the strides of the ``(batch, T, d)`` tensor.
With such strides and a weight that does not require gradients (frozen, as under any PEFT adapter), ``F.linear`` on
CPU (torch 2.13) goes through a batched matmul that copies the whole weight first: measured for SmolLM2's 49152 x 576
bf16 LM head, 72 ms instead of 3.4 ms, for every prefill of every ``generate`` call (the base model, whose weights
require gradients, is not affected). The same values with standard strides take the fast path, so a forward pre-hook
gives such inputs standard strides (a copy of ``batch x d`` values) when no gradient is being recorded.

**Training: the backward through the LM head in low rank.** The hidden state QST hands to the LM head is
``h_L + a * (U s)``: the backbone's last hidden state (a constant: no gradient), plus the side output ``s`` (width
d/r) upsampled by ``U`` (d x d/r) and gated per channel by ``a``. Autograd back-propagates the logits' gradient ``G``
(tokens x vocabulary) through the head weight ``W`` (vocabulary x d) at the full width first, ``G W``: as many
operations as the head's forward (for SmolLM2, 1024 tokens x 49152 x 576, about 6% of a CPU training step). Since
only ``s``, ``a`` and ``U`` need gradients, the same gradients follow from products of width d/r:
``P = W^T (G^T s)`` (d x d/r), ``dU = a * P``, ``da = rowsum(U * P)``, ``ds = G (W (a * U))`` -- about 5 times fewer
operations at r=16, the same values up to rounding. :func:`mark_low_rank_update` records that structure for the mixed
hidden state (``QSTSideNetwork.mix`` does, where it holds: no copy heads, no gradient into the backbone, one device,
and the mixed state not handed out by ``output_hidden_states=True``, where a gradient with respect to it is asked for),
and a forward hook on the head wraps the logits of exactly that tensor in :class:`LowRankHeadGradient`; a sliced
input, a head that trains, a quantized head (a torchao tensor-subclass weight), code that ``torch.compile`` traces,
or anything else keeps autograd's own backward. On a CPU whose bfloat16 or float16 matmuls PyTorch emulates, the
products of such logits run in float32, over pieces of the vocabulary (:func:`_backward_dtype` says why).
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from torch import nn

#: set on an LM head once the hooks are registered, holding their handles (so unload() can remove them)
_HANDLE_ATTR = "_qst_restride_handle"
_LOW_RANK_HANDLE_ATTR = "_qst_low_rank_handle"

#: id of a mixed hidden state whose update is ``a * (U s)`` on a constant -> (weak reference to it, s, output gate,
#: upsample). Kept beside the tensor rather than as an attribute on it, so that copying or saving the tensor cannot
#: drag the side network's modules along (``torch.load(weights_only=True)`` would refuse such a file); an entry is
#: removed when its tensor is freed.
_low_rank_records: dict = {}


def mark_low_rank_update(mixed: torch.Tensor, side_out: torch.Tensor, output_gate: nn.Module, upsample: nn.Module):
    """Record that ``mixed`` = constant + ``output_gate(upsample(side_out))``, for as long as ``mixed`` lives."""
    key = id(mixed)
    _low_rank_records[key] = (weakref.ref(mixed), side_out, output_gate, upsample)
    weakref.finalize(mixed, _low_rank_records.pop, key, None)


def _low_rank_record(tensor: Optional[torch.Tensor]) -> Optional[tuple]:
    entry = _low_rank_records.get(id(tensor)) if tensor is not None else None
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1:]


#: elements of one float32 piece of the LM head (and of the logits' gradient) in the CPU backward below: 64 MB
_CPU_FLOAT32_ELEMENTS = 1 << 24


def _backward_dtype(grad: torch.Tensor) -> torch.dtype:
    """The dtype of the low-rank backward's products: the logits' own, but float32 for bfloat16 or float16 logits on
    a CPU where PyTorch has no oneDNN kernel for that dtype (x86 CPUs without AVX-512, such as AVX2-only ones). There
    it computes reduced-precision matmuls in a generic loop whose speed depends on the operands' layout: measured on a
    2-core AMD EPYC (torch 2.13), the three products for SmolLM2's 49152 x 576 head and 1024 tokens took 6.2 s in
    bfloat16 and 0.18 s in float32, and a 2-block DeepSeek-V4-Flash step spent 8.6 of its 10 s in them. Converting
    the head to float32 piece by piece costs a copy of it per backward, 64 MB at a time. Where oneDNN computes the
    dtype (AVX-512 CPUs, and those with AMX or Arm's BF16 extension), the products stay in it."""
    if grad.device.type == "cpu" and grad.dtype in (torch.bfloat16, torch.float16):
        if not _cpu_matmul_is_native(grad.dtype):
            return torch.float32
    return grad.dtype


@functools.lru_cache(maxsize=None)
def _cpu_matmul_is_native(dtype: torch.dtype) -> bool:
    """Whether PyTorch multiplies CPU matrices of ``dtype`` (bfloat16 or float16) with oneDNN kernels (it checks the
    CPU: AVX-512, AMX, or Arm's BF16 extension), rather than with its generic loop."""
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or a version without the check
        return False


class LowRankHeadGradient(torch.autograd.Function):
    """Identity on the logits in forward; in backward, the gradients of the side output, the output gate and the
    upsample weight computed through their low-rank products (see the module docstring), none for the logits'
    original graph (which only led to those three)."""

    @staticmethod
    def forward(ctx, logits, side_out, gate, up, head_weight):
        ctx.save_for_backward(side_out, gate, up, head_weight)
        # a detached alias (no copy), not ``view_as``: autograd forbids in-place changes to a view a custom Function
        # returns ("Output 0 of LowRankHeadGradient is a view and is being modified inplace"), and user code may edit
        # the logits in place (``logits.div_(temperature)``, ``logits[..., banned] = -inf``), as it can F.linear's
        return logits.detach()

    @staticmethod
    def backward(ctx, grad_logits):
        side_out, gate, up, head_weight = ctx.saved_tensors
        grad = grad_logits.reshape(-1, grad_logits.shape[-1])  # (tokens, vocabulary)
        dtype = _backward_dtype(grad)
        side = side_out.reshape(-1, side_out.shape[-1]).to(dtype)  # (tokens, r')
        gate32, up32 = gate.float(), up.float()  # (d,), (d, r')
        need_projection = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        gated_up = (gate32.unsqueeze(1) * up32).to(dtype)  # diag(a) U: (d, r')
        projected = side_grad = None
        # in one piece where the logits' dtype is kept; in float32, pieces of the vocabulary (the sums over it add up)
        vocabulary, width = head_weight.shape
        rows = vocabulary if dtype == grad.dtype else max(1, _CPU_FLOAT32_ELEMENTS // (width + grad.shape[0]))
        for start in range(0, vocabulary, rows):
            grad_piece = grad[:, start:start + rows].to(dtype)  # (tokens, rows)
            weight = head_weight[start:start + rows].to(dtype)  # (rows, d)
            # the products are written with the wide gradient as the right operand ((s^T G) W, not W^T (G^T s)): the
            # same values, and the CPU matmul kernels handle that layout faster (2-core Xeon, SmolLM2's head, batch
            # 4 x 256 tokens: 34.5 -> 26.8 ms for the three products)
            if need_projection:
                # P[k, j] = sum_tokens (G W)[n, k] s[n, j], computed as ((s^T G) W)^T
                piece = ((side.t() @ grad_piece) @ weight).t().float()  # (d, r')
                projected = piece if projected is None else projected + piece
            if ctx.needs_input_grad[1]:
                gated_columns = weight @ gated_up  # W diag(a) U: (rows, r')
                piece = (gated_columns.t() @ grad_piece.t()).t()  # (tokens, r')
                side_grad = piece if side_grad is None else side_grad + piece
        d_side = d_gate = d_up = None
        if ctx.needs_input_grad[2]:
            d_gate = (up32 * projected).sum(1).to(gate.dtype)
        if ctx.needs_input_grad[3]:
            d_up = (gate32.unsqueeze(1) * projected).to(up.dtype)
        if ctx.needs_input_grad[1]:
            d_side = side_grad.reshape(side_out.shape).to(side_out.dtype)
        return None, d_side, d_gate, d_up, None


def _low_rank_backward(module: nn.Module, args: tuple, output):
    if not torch.is_grad_enabled() or not args or not isinstance(output, torch.Tensor):
        return None
    if torch.compiler.is_compiling():
        # records are found by tensor identity: in code torch.compile traces, the lookup made a graph break and the
        # compiled hook was guarded on the identity of that step's hidden state, so it recompiled at every training
        # step (until Dynamo's recompile limit). Compiled training takes autograd's backward through the head (the
        # same gradients up to rounding); QSTSideNetwork.mix records nothing there either
        return None
    hidden = args[0]
    if not isinstance(hidden, torch.Tensor):
        return None
    source, record = hidden, _low_rank_record(hidden)
    if record is None:
        source = hidden._base
        record = _low_rank_record(source)
    if record is None:
        return None
    # the whole mixed tensor (transformers passes hidden[:, slice(0, None)], a view of all of it), not a slice
    if (hidden.shape, hidden.stride(), hidden.data_ptr()) != (source.shape, source.stride(), source.data_ptr()):
        return None
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if type(module) is not nn.Linear or weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if not _is_plain_tensor(weight):
        # a quantized head that stays an nn.Linear (torchao's quantize_ swaps the weight for a tensor subclass such
        # as Int8Tensor) implements F.linear, which its forward used, but not the plain matmuls of the low-rank
        # backward ("Int8Tensor dispatch: ... unimplemented operator aten.mm"): autograd's backward through the
        # head's own F.linear computes the same gradients
        return None
    side_out, output_gate, upsample = record
    if output.shape[:-1] != hidden.shape[:-1] or side_out.shape[:-1] != hidden.shape[:-1]:
        return None
    if not (weight.device == hidden.device == side_out.device == output.device):
        return None
    return LowRankHeadGradient.apply(output.detach(), side_out, output_gate.weight, upsample.weight, weight)


def _is_plain_tensor(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a dense tensor (or a parameter holding one), not a tensor subclass such as a torchao
    quantized weight, whose operators beyond the module's own forward may be missing."""
    return type(weight) in (torch.Tensor, nn.Parameter)


def _has_standard_strides(tensor: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(tensor.shape), reversed(tensor.stride())):
        if stride != expected:
            return False
        expected *= size
    return True


def _restride_one_token_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    if not args or torch.is_grad_enabled():
        return None
    hidden = args[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3 or _has_standard_strides(hidden):
        return None
    return (hidden.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


def install_lm_head_hooks(model: nn.Module) -> bool:
    """Register the hooks on ``model``'s output embeddings (once): the one-token restride and the low-rank backward;
    returns whether a head was found."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return False
    if getattr(head, _HANDLE_ATTR, None) is None:
        setattr(head, _HANDLE_ATTR, head.register_forward_pre_hook(_restride_one_token_input))
    if getattr(head, _LOW_RANK_HANDLE_ATTR, None) is None:
        setattr(head, _LOW_RANK_HANDLE_ATTR, head.register_forward_hook(_low_rank_backward))
    return True


def uninstall_lm_head_hooks(model: nn.Module) -> None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for attr in (_HANDLE_ATTR, _LOW_RANK_HANDLE_ATTR):
        handle = getattr(head, attr, None) if isinstance(head, nn.Module) else None
        if handle is not None:
            handle.remove()
            delattr(head, attr)
