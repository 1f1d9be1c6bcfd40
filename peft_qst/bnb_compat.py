"""Keep a 4-bit backbone unchanged by ``state_dict()`` on CPUs where bitsandbytes repacks it for inference, and run
its training-mode forwards, and those a gradient goes through, on the standard layout there
(:func:`route_4bit_layers_by_mode`).

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

import copy
import functools
import weakref
from typing import Callable, Optional

import torch
from torch import nn

#: set on a Linear4bit once its state-dict hooks are registered, so injecting a second adapter does not add more
_PROTECTED_ATTR = "_qst_state_dict_keeps_cpu_packing"
#: where the pre-hook leaves (packed weight data, quantization-state fields, keep_vars) for the post-hook
_SNAPSHOT_ATTR = "_qst_cpu_packed_snapshot"
#: set on a Linear4bit once the forward hooks of :func:`route_4bit_layers_by_mode` are registered
_ROUTING_HOOK_ATTR = "_qst_routes_by_mode"
#: a Linear4bit's standard layout from just before bitsandbytes packed it: (weight data, a quantization-state object
#: of its own holding the standard fields, the :class:`_PackedState` it belongs to), kept on models with trainable
#: parameters for training-mode forwards and forwards whose input requires a gradient
_STANDARD_LAYOUT_ATTR = "_qst_standard_layout"
#: on a model without trainable parameters, and on a layer ``unload()`` released, only the standard quantization state
#: of a layer bitsandbytes packed: (a quantization-state object of its own holding the standard fields, the
#: :class:`_PackedState` it belongs to), from which the standard layout is rebuilt exactly once the model trains (the
#: 4-bit codes unpack losslessly, the block scales do not)
_STANDARD_STATE_ATTR = "_qst_standard_quant_state"
#: the packed layout (weight data, quantization-state object) while a forward runs the kept standard one
_PACKED_DURING_CALL_ATTR = "_qst_packed_layout_during_call"


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


class _PackedState:
    """The packed quantization-state object of a layer's weight that a kept standard layout or state belongs to,
    compared by identity: a weight replaced or re-quantized since has another, and its kept layout is dropped.

    It follows ``copy.deepcopy`` to the copy's weight. bitsandbytes' ``Params4bit.__deepcopy__`` copies the weight's
    quantization state without deepcopy's memo, so the kept layout's reference, copied through the memo, pointed to an
    object no weight held: a deep copy made after an eval forward lost its kept layouts, ran its training-mode forwards
    on the packed kernel and rebuilt the standard layout for its gradient-carrying calls with block scales rounded to
    bfloat16 (a tiny hybrid adapting every block: gradients up to 2.9% off a never-evaluated model's, the loss 1.5e-4).
    The weight itself is copied through the memo (deepcopy hands both the copy's own weight, whichever it reaches
    first), so the copy of this refers to that weight's quantization state. Pickling needs none of this (the pickle's
    memo keeps the weight's quantization state one object); the weight is referred to weakly, so that a kept layout
    does not keep a replaced weight in memory. One its weight does not hold now is copied and pickled alike, with its
    own quantization state (see ``__deepcopy__``)."""

    __slots__ = ("quant_state", "_weight")

    def __init__(self, weight: Optional[torch.Tensor], quant_state=None) -> None:
        """The quantization state ``weight`` holds now, or ``quant_state`` (a stale one, or one being unpickled)."""
        self.quant_state = weight.quant_state if quant_state is None else quant_state
        self._weight = weakref.ref(weight) if weight is not None else None

    def belongs_to(self, weight) -> bool:
        return getattr(weight, "quant_state", None) is self.quant_state

    def _weight_now(self) -> Optional[torch.Tensor]:
        return self._weight() if self._weight is not None else None

    def __deepcopy__(self, memo) -> "_PackedState":
        weight = self._weight_now()
        if weight is not None and self.belongs_to(weight):
            copied = copy.deepcopy(weight, memo)
            if getattr(copied, "quant_state", None) is None:
                # a weight unpickled by torch.load is a plain Parameter, whose deep copy loses its attributes: it gets
                # its quantization state back through the memo, the object the copy's layer holds (bitsandbytes keeps
                # one on the layer and its weight; see _give_weight_its_quant_state for layers with no kept layout)
                copied.quant_state = copy.deepcopy(self.quant_state, memo)
            return _PackedState(copied)
        # not the weight's now, as pickled: its own quantization state through the memo. Where a training-mode call
        # raised between the layer's pre- and post-hook, the weight holds the standard layout and the packed one
        # waits on the layer to be swapped back by the next call, after which this belongs to the weight again. The
        # copy took this as stale (a new object()), so its kept layouts were dropped at that next call and rebuilt
        # with block scales rounded to bfloat16 (gradients 1.2e-4 off the original's on a tiny model); a pickled copy
        # kept them. A weight re-quantized since holds another state for good: this belongs to it in neither.
        copied = copy.deepcopy(weight, memo) if weight is not None else None
        return _PackedState(copied, copy.deepcopy(self.quant_state, memo))

    def __reduce__(self):
        return _PackedState, (self._weight_now(), self.quant_state)


def _belongs(packed, weight) -> bool:
    """Whether a kept layout or state (its :class:`_PackedState`) still belongs to ``weight``. A model pickled
    (``torch.save(model)``) by peft-qst before :class:`_PackedState` keeps the packed quantization-state object itself
    there, which unpickling leaves the weight's, as it was: such a model failed every training-mode forward and
    ``unload()`` with "'QuantState' object has no attribute 'belongs_to'"."""
    if isinstance(packed, _PackedState):
        return packed.belongs_to(weight)
    return getattr(weight, "quant_state", None) is packed


def _inverse_packing(data: torch.Tensor, quant_state) -> tuple:
    """bitsandbytes' inverse of the CPU packing, which rebinds the fields of ``quant_state`` it changes (the 4-bit
    codes exactly, the block scales to bfloat16 rounding), with a plain ``absmax`` moved back to the standard flat
    layout, which bitsandbytes' inverse leaves transposed. Returns the standard weight data and ``quant_state``."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, quant_state = _convert_weight_packed_for_cpu_inverse(data, quant_state)
    absmax = quant_state.absmax
    if absmax.dim() == 2 and absmax.shape[1] == quant_state.shape[0]:  # plain absmax, left transposed
        quant_state.absmax = absmax.T.reshape(-1).float().contiguous()
    return data, quant_state


def _state_copy(quant_state):
    """A quantization-state object of its own with (a shallow copy of) the fields of ``quant_state``. bitsandbytes'
    packing and its inverse rebind the fields they change, so the kept standard state stays standard while the layer's
    is packed."""
    state = type(quant_state).__new__(type(quant_state))
    vars(state).update(vars(quant_state))
    return state


def _standard_layout(module: nn.Module) -> Optional[tuple]:
    """The standard layout kept for this packed layer (weight data, its own quantization-state object), or None; a
    kept layout that no longer belongs to the layer (its weight replaced, moved, or no longer packed) is dropped."""
    kept = vars(module).get(_STANDARD_LAYOUT_ATTR)
    if kept is None:
        return None
    data, standard_state, packed = kept
    weight = module.weight
    if not _belongs(packed, weight) or weight.device != data.device or not _is_cpu_packed(module):
        vars(module).pop(_STANDARD_LAYOUT_ATTR)
        return None
    return data, standard_state


def _swap_layout(module: nn.Module, data: torch.Tensor, quant_state) -> tuple:
    """Give the layer's weight this data and this quantization-state object; returns the ones it had.

    Objects are swapped, not contents: bitsandbytes' ``MatMul4Bit`` keeps the quantization-state object and a view of
    the weight data for its backward, which runs after the post-hook has swapped the packed layout back. The view
    keeps the standard data (``weight.data = ...`` rebinds the parameter, not the view) and the kept state object is
    never changed, so the backward dequantizes the standard layout the forward ran."""
    weight = module.weight
    # none on the plain Parameter of a deep copy of a model read back by torch.load, where a call had raised mid-way:
    # the packed layout swapped back there is the whole of what the weight needs
    previous = (weight.data, getattr(weight, "quant_state", None))
    weight.data = data
    weight.quant_state = quant_state
    return previous


def _give_weight_its_quant_state(module: nn.Module) -> None:
    """Give the layer's weight back the quantization state the layer holds, where the weight lost it: a whole model
    loaded by ``torch.load`` holds plain ``Parameter`` weights with a ``quant_state`` attribute, which
    ``copy.deepcopy`` of the model does not copy. bitsandbytes gives it back in ``Linear4bit.forward``, after this
    hook, which read it: a deep copy of a loaded 4-bit QST model failed its first call with "'Parameter' object has no
    attribute 'quant_state'". (bitsandbytes' own repair also asserts the 4-bit shape, which a CPU-packed weight has
    not.)"""
    weight = module.weight
    if getattr(weight, "quant_state", None) is None and getattr(module, "quant_state", None) is not None:
        weight.quant_state = module.quant_state


def _route_by_mode(model_ref: Callable[[], Optional[nn.Module]], module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of :func:`route_4bit_layers_by_mode`."""
    _packed_again_after_call(module)  # left over where a call raised before its post-hook ran
    _give_weight_its_quant_state(module)
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or x.device.type != "cpu":
        return
    if module.training or x.requires_grad:
        standard = _standard_layout(module)
        if standard is None and _is_cpu_packed(module):
            # packed with no layout kept: on a model loaded for inference, or adapted again after unload() (their
            # standard quantization state kept, should they be made trainable), or before QST was injected, where the
            # packed kernel has no backward for a gradient-carrying call
            kept = vars(module).pop(_STANDARD_STATE_ATTR, None)
            kept_state = kept[0] if kept is not None and _belongs(kept[1], module.weight) else None
            if kept_state is not None or x.requires_grad:
                standard = _keep_layout_rebuilt_from_packed(module, kept_state)
        if standard is not None:
            vars(module)[_PACKED_DURING_CALL_ATTR] = _swap_layout(module, *standard)
        return
    packs_now = module.support_avx512bf16_for_cpu and not _is_cpu_packed(module)  # Linear4bit.forward's condition
    if packs_now and _STANDARD_LAYOUT_ATTR not in vars(module):
        model = model_ref()
        standard_state = _state_copy(module.weight.quant_state)
        packed = _PackedState(module.weight)  # the same object once packed: bitsandbytes packs it in place
        if model is not None and any(parameter.requires_grad for parameter in model.parameters()):
            vars(module)[_STANDARD_LAYOUT_ATTR] = (module.weight.data, standard_state, packed)
        else:
            # an adapter loaded for inference: not the 4-bit codes a second time, but the standard quantization state
            # (the block scales, small beside the codes), should the model be made trainable later
            vars(module)[_STANDARD_STATE_ATTR] = (standard_state, packed)


def _keep_layout_rebuilt_from_packed(module: nn.Module, standard_state=None) -> tuple:
    """Keep, and return, a standard layout for a packed layer that has none, rebuilt from its packed one: the 4-bit
    codes exactly (they unpack losslessly), with ``standard_state``, the standard quantization state kept when the
    layer was packed on a model without trainable parameters, exactly; without one, the block scales to bfloat16
    rounding, so the gradients are off a never-packed model's by that rounding.

    Without the kept state a model loaded for inference and made trainable after an eval forward (``requires_grad_``
    by hand, a second adapter loaded with ``is_trainable=True``) ran its training-mode forwards on the packed kernel,
    and the calls whose input carries a gradient on a layout rebuilt with block scales rounded to bfloat16: a hybrid
    adapting every block got gradients 4% off a never-evaluated model's."""
    data, rebuilt_state = _inverse_packing(module.weight.data, _state_copy(module.weight.quant_state))
    state = rebuilt_state if standard_state is None else standard_state
    vars(module)[_STANDARD_LAYOUT_ATTR] = (data, state, _PackedState(module.weight))
    return data, state


def _packed_again_after_call(module: nn.Module, *_) -> None:
    """Forward post-hook of :func:`route_4bit_layers_by_mode`: the packed layout back after a call that ran the
    kept standard one (also called where a call raised before this hook ran)."""
    swapped = vars(module).pop(_PACKED_DURING_CALL_ATTR, None)
    if swapped is not None:
        _swap_layout(module, *swapped)


def route_4bit_layers_by_mode(model: nn.Module) -> int:
    """Run every bitsandbytes ``Linear4bit`` of a QST model on the layout its mode needs, on CPUs with AVX512-BF16.

    bitsandbytes packs a layer for its CPU inference kernel at the first eval-mode forward without gradients, and
    keeps it packed. That kernel is fast for the few rows of a decoding step, slow for many, and has no backward. So:

    * **Training-mode forwards** (the frozen backbone of every training step, under ``no_grad``): once an eval
      forward had packed the layers (``Trainer.evaluate``, ``eval_on_start``, a generation before training, as in the
      quickstart and ``examples/sft_trl.py``), every later training step ran the packed kernel: a 4-bit SmolLM2 QST
      step of 4 x 256 tokens took 1.9x longer (``integration/bench_train.py`` with ``qst:eval_first=true``,
      docs/quality.md, "bitsandbytes on CPU"). On a model with trainable parameters the pre-hook now keeps each
      layer's standard layout from just before it is packed (the same 4-bit codes again: the 4-bit weights take twice
      their memory from the first eval forward on), and a training-mode forward runs on it, the post-hook putting the
      packed layout back. Training steps then compute exactly what they compute without any eval forward in between
      (also what makes a resumed run equal an uninterrupted one that evaluated). Eval-mode forwards are bitsandbytes'
      own, packed, as for the base model never adapted: ``disable_adapter()`` stays bit for bit the base model.
    * **Layers a gradient goes through** (a BERT-style decoder's LM head, ``cls.predictions.transform.dense``, which
      QST differentiates through): the packed kernel's output has no backward, and the next training step after an
      eval forward failed ("a view of a leaf Variable that requires grad is being used in an in-place operation",
      from adding the bias in place; a layer without a bias would have passed no gradient on). A call whose input
      requires a gradient runs the kept standard layout too, in either mode, and its backward dequantizes that layout
      (see :func:`_swap_layout`): the gradients of a model never run in eval, bit for bit, while eval forwards stay
      on the packed kernel, so ``disable_adapter()`` and a reloaded adapter stay bit for bit the base model and the
      trained model (unpacked for good instead, the layer ran the standard kernel in eval too, 0.010-0.018 off both in
      the 4-bit architecture sweep). A packed layer with no kept layout (packed before QST was injected, as in that
      sweep) gets one rebuilt from its packed layout the first time its input requires a gradient: the 4-bit codes
      exactly, the block scales to bfloat16 rounding, so its gradients are off a never-packed model's by that rounding.
    * **The blocks of a hybrid** (``backbone_lora_layers``), whose backbone adapters are differentiated through their
      frozen 4-bit layers: their training-mode forwards and every call whose input carries a gradient (in either mode
      every layer fed by a lower adapted layer's delta) run the standard layout, so backward dequantizes what the
      forward ran (bitsandbytes' backward through a packed layer dequantizes it as if it were standard: the backbone
      adapters' gradients were 40-90% off after one eval forward). The layers that read the lowest adapted block's
      input, computed under ``no_grad``, pass no gradient back (their deltas are computed from that input, apart
      from the layer's output), so in eval they run packed, as every eval forward without gradients does. Before,
      the hybrid kept its blocks' layers unpacked for good: while it was loaded, ``disable_adapter()``,
      ``"__base__"`` rows and the other adapters were off the base model by bfloat16 rounding (0.004 on a tiny
      Llama), and its own eval forwards and generation ran the slower standard kernel.

    Models without trainable parameters (an adapter loaded for inference) keep only each packed layer's standard
    quantization state, from which a training-mode call or one whose input requires a gradient rebuilds the standard
    layout exactly, should the model be made trainable later (:func:`_keep_layout_rebuilt_from_packed`). Idempotent;
    returns how many layers got the hooks now (0 without bitsandbytes). :func:`stop_routing_4bit_layers` takes it
    all off again."""
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    # the hooks refer to the model weakly (the model holds them) but must survive pickling (torch.save(model) failed
    # with "cannot pickle 'weakref.ReferenceType' object"), and a deep copy's hooks must ask the copy, not the original
    from .layer import _ModelReference  # layer.py imports this module

    model_ref = _ModelReference(model)
    count = 0
    for module in model.modules():
        if isinstance(module, linear4bit) and not getattr(module, _ROUTING_HOOK_ATTR, False):
            module.register_forward_pre_hook(functools.partial(_route_by_mode, model_ref))
            module.register_forward_hook(_packed_again_after_call)
            setattr(module, _ROUTING_HOOK_ATTR, True)
            count += 1
    return count


def stop_routing_4bit_layers(model: nn.Module) -> int:
    """Undo :func:`route_4bit_layers_by_mode` (``unload()``, which promises the base model back without QST's hooks):
    the forward hooks come off, and so does each layer's kept standard layout, which held the 4-bit weights a second
    time; a layer left in the standard layout by a call that raised gets its packed one back. Left on,
    the model ``unload()`` returned kept both, and its training-mode forwards went on running the kept layout.

    A packed layer keeps its standard quantization state (as a model loaded for inference does: the block scales, small
    beside the 4-bit codes; bitsandbytes never reads it), so that QST injected again (``get_peft_model``,
    ``PeftModel.from_pretrained(..., is_trainable=True)`` on the returned model) rebuilds the standard layout exactly.
    Dropped with the layout, the block scales could only be rebuilt from the packed ones, rounded to bfloat16: a tiny
    hybrid adapting every block, reloaded as trainable on a base model evaluated before ``unload()``, trained with
    gradients up to 2.9% off a never-evaluated model's. Returns how many layers were released."""
    released = 0
    for module in model.modules():
        if not vars(module).pop(_ROUTING_HOOK_ATTR, False):
            continue
        _packed_again_after_call(module)
        if _standard_layout(module) is not None:  # still the layer's: its quantization state outlives the routing
            _, standard_state, packed = vars(module).pop(_STANDARD_LAYOUT_ATTR)
            vars(module)[_STANDARD_STATE_ATTR] = (standard_state, packed)
        for hooks, ours in ((module._forward_pre_hooks, _is_routing_pre_hook),
                            (module._forward_hooks, lambda hook: hook is _packed_again_after_call)):
            for key in [key for key, hook in hooks.items() if ours(hook)]:
                del hooks[key]
        released += 1
    return released


def _is_routing_pre_hook(hook) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _route_by_mode
