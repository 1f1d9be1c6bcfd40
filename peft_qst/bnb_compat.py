"""Keep a 4-bit backbone unchanged by ``state_dict()`` on CPUs where bitsandbytes repacks it for inference.

On a CPU with AVX512-BF16, bitsandbytes (0.49+) converts a ``Linear4bit`` weight into a CPU-only layout the first time
the layer runs in eval mode without gradients (``Linear4bit.forward`` -> ``_convert_weight_packed_for_cpu``): the
nibbles are reordered (losslessly) and the quantization state is rewritten (a double-quantized ``absmax`` is
dequantized, and ``absmax`` becomes a transposed ``[K / blocksize, N]`` bfloat16 matrix). ``Linear4bit.
_save_to_state_dict`` converts back in place (``_convert_weight_packed_for_cpu_inverse``) before saving, and that
inverse is lossy: a nested ``absmax`` is re-quantized from its bfloat16 rounding, and a plain ``absmax`` keeps the
transposed layout, so the next eval forward assigns block scales to the wrong blocks. Every ``model.state_dict()``
after an eval forward therefore changes the frozen backbone in memory (on 4-bit SmolLM2-135M the logits moved by up
to 15.8 with double quantization, 42 without).

That is exactly what QST users run into: PEFT's ``save_pretrained`` (``get_peft_model_state_dict``) and trainer
checkpoints call ``model.state_dict()``, typically after ``trainer.evaluate()``, and QST's promise is a frozen
backbone. So at injection QST registers a state-dict pre-hook and post-hook on every ``Linear4bit`` of the model: the
pre-hook remembers the packed weight and the quantization state's fields, bitsandbytes then unpacks and saves as it
always does, and the post-hook puts the packed weight and the very same quantization-state object back, field for
field. What ``state_dict()`` returns is what bitsandbytes returns, except that a plain (not double-quantized)
``absmax`` is written back in its standard flat layout instead of the transposed one.

The hooks act only when a layer is in the packed CPU layout at the time of the call; without bitsandbytes, or
without that layout (GPUs, CPUs without AVX512-BF16, training mode, never run in eval), nothing changes. No upstream
report of the state_dict side was found; the same CPU packing also breaks ``model.to(device)``
(bitsandbytes-foundation/bitsandbytes#2078, fix proposed in #2083).
"""

from __future__ import annotations

import torch
from torch import nn

#: set on a Linear4bit once its state-dict hooks are registered, so injecting a second adapter does not add more
_PROTECTED_ATTR = "_qst_state_dict_keeps_cpu_packing"
#: where the pre-hook leaves (packed weight data, quantization-state fields, keep_vars) for the post-hook
_SNAPSHOT_ATTR = "_qst_cpu_packed_snapshot"
#: a Linear4bit's own ``support_avx512bf16_for_cpu``, kept while backbone adapters hold it in the standard layout
_OWN_PACKING_ATTR = "_qst_own_support_avx512bf16_for_cpu"
#: the packed quantization state's fields of a Linear4bit that :func:`keep_unpacked_for_backward` unpacked, and the
#: quantization state and block scales the unpacking left, for :func:`allow_cpu_packing_again` to put back exactly
_PACKED_FIELDS_ATTR = "_qst_packed_quant_state_fields"
#: set on a Linear4bit once its forward pre-hook of :func:`unpack_4bit_layers_when_differentiated` is registered
_GRAD_HOOK_ATTR = "_qst_unpacks_when_differentiated"


def _linear4bit_class():
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # bitsandbytes absent or unusable here: there is nothing to protect
        return None
    return Linear4bit


def _is_cpu_packed(module: nn.Module) -> bool:
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return quant_state is not None and bool(getattr(quant_state, "packing_format_for_cpu", False))


def _remember_cpu_packing(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: keep what bitsandbytes' ``_save_to_state_dict`` is about to unpack in place."""
    if not _is_cpu_packed(module):
        return
    quant_state = module.weight.quant_state
    # the inverse conversion only rebinds attributes of the quantization state (and builds a new weight tensor), so
    # a shallow copy of its fields and a reference to the packed data are enough to restore it exactly
    setattr(module, _SNAPSHOT_ATTR, (module.weight.data, dict(quant_state.__dict__), keep_vars))


def _restore_cpu_packing(module: nn.Module, destination: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: put the packed weight and its quantization state back as they were before the call."""
    snapshot = module.__dict__.pop(_SNAPSHOT_ATTR, None)
    if snapshot is None:
        return
    packed_data, packed_fields, keep_vars = snapshot
    quant_state = module.weight.quant_state
    unpacked_absmax = destination.get(prefix + "weight.absmax")
    if (
        unpacked_absmax is not None
        and not getattr(quant_state, "nested", False)
        and unpacked_absmax.dim() == 2
        and unpacked_absmax.shape[1] == quant_state.shape[0]
    ):
        # bitsandbytes leaves a plain absmax as the packed [K / blocksize, N] matrix; its own format (what
        # from_pretrained and dequantize_4bit read) is the flat row-major [N * K / blocksize] vector of the weight's
        # blocks, in the absmax dtype quantize_4bit writes (float32)
        flat = unpacked_absmax.T.reshape(-1).float()
        destination[prefix + "weight.absmax"] = flat if keep_vars else flat.detach()
    module.weight.data = packed_data
    # restore the same object (the module and its weight both refer to it), not a copy
    quant_state.__dict__.clear()
    quant_state.__dict__.update(packed_fields)
    module.weight.quant_state = quant_state


def keep_4bit_weights_through_state_dict(model: nn.Module) -> int:
    """Make ``model.state_dict()`` leave every bitsandbytes ``Linear4bit`` of ``model`` exactly as it was (see the
    module docstring). Idempotent; returns how many layers were newly protected (0 without bitsandbytes)."""
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, linear4bit) or getattr(module, _PROTECTED_ATTR, False):
            continue
        module.register_state_dict_pre_hook(_remember_cpu_packing)
        module.register_state_dict_post_hook(_restore_cpu_packing)
        setattr(module, _PROTECTED_ATTR, True)
        count += 1
    return count


def keep_unpacked_for_backward(modules) -> int:
    """Keep these bitsandbytes ``Linear4bit`` layers out of the CPU packed layout, unpacking any that already are.

    Gradients through a packed layer are wrong: bitsandbytes' backward dequantizes the weight as if it were in the
    standard layout (measured on a 4-bit tiny Llama, the LoRA gradients of ``backbone_lora_layers`` blocks changed by
    40-90% after one eval forward had packed their layers). Plain QST never differentiates through the backbone; the
    layers of the blocks that carry ``backbone_lora_layers`` adapters do, so they must stay unpacked. The inverse
    conversion keeps the 4-bit codes exactly and the block scales to bfloat16 rounding (a plain ``absmax`` is moved
    back to the standard flat layout, which bitsandbytes' own inverse leaves transposed). The packed state's fields are
    kept (the bfloat16 block scales, small beside the 4-bit codes), so that :func:`allow_cpu_packing_again` packs
    the layer back exactly as it was. Returns how many layers were unpacked now.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # a bitsandbytes without the CPU packed layout: nothing to do
        return 0
    unpacked = 0
    for module in modules:
        if not isinstance(module, linear4bit):
            continue
        if _OWN_PACKING_ATTR not in vars(module):  # what allow_cpu_packing_again puts back
            setattr(module, _OWN_PACKING_ATTR, module.support_avx512bf16_for_cpu)
        module.support_avx512bf16_for_cpu = False  # the repack condition of Linear4bit.forward
        if not _is_cpu_packed(module):
            continue
        packed_fields = dict(module.weight.quant_state.__dict__)  # the inverse rebinds the fields it changes
        data, quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, module.weight.quant_state)
        absmax = quant_state.absmax
        if absmax.dim() == 2 and absmax.shape[1] == quant_state.shape[0]:  # plain absmax, left transposed
            quant_state.absmax = absmax.T.reshape(-1).float().contiguous()
        module.weight.data = data
        module.weight.quant_state = quant_state
        setattr(module, _PACKED_FIELDS_ATTR, (packed_fields, quant_state, quant_state.absmax))
        unpacked += 1
    return unpacked


def _pack_as_before(module: nn.Module) -> None:
    """Put a layer :func:`keep_unpacked_for_backward` unpacked back into the packed layout it had, exactly: the 4-bit
    codes are repacked (lossless), and the quantization state gets its packed fields back. Repacked by its next eval
    forward instead, a double-quantized layer's block scales came from their re-quantization, and the base model's
    logits (``disable_adapter()``, the other adapters', ``unload()``'s model) stayed off the never-adapted model's by
    bfloat16 rounding after the hybrid adapter was deleted (0.003 on a tiny Llama), also after a refused
    ``load_adapter`` of one. Left alone where the layer's weight was replaced or moved off the CPU since."""
    kept = vars(module).pop(_PACKED_FIELDS_ATTR, None)
    if kept is None:
        return
    packed_fields, unpacked_state, unpacked_absmax = kept
    quant_state = getattr(module.weight, "quant_state", None)
    if (
        quant_state is not unpacked_state
        or quant_state.absmax is not unpacked_absmax
        or _is_cpu_packed(module)
        or module.weight.device.type != "cpu"
    ):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    data, quant_state = _convert_weight_packed_for_cpu(module.weight.data, quant_state)
    quant_state.__dict__.clear()
    quant_state.__dict__.update(packed_fields)
    module.weight.data = data
    module.weight.quant_state = quant_state


def _unpack_when_differentiated(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: a packed layer whose input carries a gradient is unpacked for good before it runs."""
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad and _is_cpu_packed(module):
        keep_unpacked_for_backward([module])


def unpack_4bit_layers_when_differentiated(model: nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` differentiable after an eval forward has packed it.

    QST differentiates through whatever lies between the mixed final hidden state and the loss. That is usually an
    unquantized LM head, but some heads hold 4-bit layers of their own: the BERT-style decoders' ``cls.predictions.
    transform.dense`` (bert, roberta, electra, ernie, ... with ``is_decoder=True``). Once an eval forward has packed
    such a layer (``Trainer.evaluate``, a ``generate``), bitsandbytes runs it through its inference kernel, which has
    no backward: the next training step failed ("a view of a leaf Variable that requires grad is being used in an
    in-place operation", from adding the bias in place), and a layer without a bias would have passed no gradient on.
    This pre-hook unpacks such a layer (:func:`keep_unpacked_for_backward`) the first time its input requires a
    gradient; from then on it runs bitsandbytes' standard kernel, in training and in eval. Layers that never see a
    gradient (the whole frozen backbone under plain QST) are not touched. Idempotent; returns how many layers got the
    hook now (0 without bitsandbytes)."""
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, linear4bit) and not getattr(module, _GRAD_HOOK_ATTR, False):
            module.register_forward_pre_hook(_unpack_when_differentiated)
            setattr(module, _GRAD_HOOK_ATTR, True)
            count += 1
    return count


def allow_cpu_packing_again(modules) -> int:
    """Undo :func:`keep_unpacked_for_backward` on these layers once no backbone adapter differentiates through them
    (its adapter deleted, or the model unloaded): each gets its own ``support_avx512bf16_for_cpu`` back, so it runs
    bitsandbytes' CPU inference kernel again, as the base model does. Left off, the layers stayed on the slower
    standard kernel, and the base model's outputs (``disable_adapter()``, the model ``unload()`` hands back) differed
    from the same model never adapted by bfloat16 rounding. A layer that was packed when it was kept unpacked is packed
    again as it was (:func:`_pack_as_before`). Returns how many layers were given their setting back."""
    restored = 0
    for module in modules:
        if _OWN_PACKING_ATTR in vars(module):
            module.support_avx512bf16_for_cpu = vars(module).pop(_OWN_PACKING_ATTR)
            _pack_as_before(module)
            restored += 1
    return restored
