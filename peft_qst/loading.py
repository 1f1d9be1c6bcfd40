"""How a saved QST adapter is read into a model, whichever loader reads it: the load in progress, the names its
keys carry, the dtypes its weights keep, and the warnings its checks find.

A load runs through several layers (PeftModel's ``from_pretrained`` and ``load_adapter``, transformers'
``load_adapter``, PEFT's ``set_peft_model_state_dict``,
:meth:`~peft_qst.model.QSTModel._remap_adapter_state_dict_for_load`), and the checks that run deep inside them need to
know which adapter is being read and with what options: the wrappers in ``registration`` set that here
(:data:`loading_adapter`, :data:`reading_saved_adapter`). Warnings about the adapter wait until the load succeeded
(:func:`warn_once_loaded`, :func:`warned_once_loaded`), so that a refused load does not also warn about an adapter it
never loaded.
"""

from __future__ import annotations

import functools
import warnings
from contextvars import ContextVar

import torch
from torch import nn

from .config import QSTConfig
from .serialization import user_stacklevel
from .side import HALF_DTYPES


#: (PeftModel, adapter name, ignore_mismatched_sizes) while ``PeftModel.load_adapter`` runs (set by its wrapper in
#: registration.py): the weights PEFT is about to read are for that adapter, loaded with those options
loading_adapter: ContextVar = ContextVar("peft_qst_loading_adapter", default=None)

#: True while a saved adapter is being loaded (``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers'
#: ``load_adapter``; set by their wrappers in registration.py): the config PEFT injects is the saved one, whose
#: ``modules_to_save`` is checked against the weights read with it
#: (:func:`~peft_qst.modules_to_save.check_saved_modules_to_save_present`), not as a new adapter's, also where it
#: records no ``base_model_signature`` (a hand-written or older config)
reading_saved_adapter: ContextVar = ContextVar("peft_qst_reading_saved_adapter", default=False)

#: while a saved adapter is being loaded (set by the outermost load wrapper, :func:`warned_once_loaded`): the warnings
#: its checks found, as (message, category), given only once the load succeeded
_pending_load_warnings: ContextVar = ContextVar("peft_qst_pending_load_warnings", default=None)


#: the prefix of a PeftModel's parameter names (``base_model.model.`` + the transformers model's own): saved adapter
#: keys carry it, the names of a model that no PeftModel wraps (``inject_adapter_in_model``) do not
PEFT_MODEL_PREFIX = "base_model.model."


def wrapped_by_peft_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameter names carry :data:`PEFT_MODEL_PREFIX` (a PeftModel, not an injected model)."""
    return any(name.startswith(PEFT_MODEL_PREFIX) for name, _ in model.named_parameters())


def with_peft_model_prefix(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with PeftModel's ``"base_model.model."`` prefix on its keys where ``model`` is a PeftModel and
    none of them has it. Weights taken with ``get_peft_model_state_dict`` from a model that ``inject_adapter_in_model``
    adapted (a custom loop's model, no PeftModel around it) lack the prefix: ``set_peft_model_state_dict`` takes it off
    for such a model but does not put it back for a PeftModel, and every weight was refused as missing and unexpected
    ("saved from a different QST configuration"), or, for a module saved whole (``modules_to_save``), PEFT failed with
    a bare KeyError. The keys name the same weights. Run in PEFT's ``set_peft_model_state_dict`` before it gives
    those modules' keys the adapter's name (``registration``), and in
    :meth:`~peft_qst.model.QSTModel._remap_adapter_state_dict_for_load` for a ``set_peft_model_state_dict`` bound before
    ``import peft_qst``."""
    prefixed = any(key.startswith(PEFT_MODEL_PREFIX) for key in state_dict)
    if state_dict and not prefixed and wrapped_by_peft_model(model):
        return {PEFT_MODEL_PREFIX + key: value for key, value in state_dict.items()}
    return state_dict


def keeps_float32_weights(config: QSTConfig, dtype: torch.dtype, upsample_dtype: torch.dtype) -> bool:
    """Whether float32 weights of a side network whose upsample is ``upsample_dtype`` stay float32 under the rule's
    ``dtype``: where ``side_dtype`` is unset, the rule is a half dtype and the upsample (the weight the side network
    computes in the dtype of) is one too. Such a side network was saved with some weights kept in float32 on purpose:
    TRL's ORPO and CPO trainers (``peft_module_casting_to_bf16`` under ``bf16=True`` on a 4-bit model) cast every
    module named ``norm`` to float32, so its norm weights and the downsamplers' LayerNorms trained in float32 beside a
    bf16 side network. Rounded to bf16 on reload, they lost their training below bf16's resolution and the reloaded
    adapter's logits differed from the trained model's (by 0.004 after three steps on a tiny 4-bit Llama), where a
    LoRA adapter (float32, as PEFT keeps it) reloads exactly. A side network saved in one dtype still takes the
    rule's (float32 loaded onto a bf16 model: bf16 throughout), and a ``side_dtype`` that is set is the dtype of
    every weight."""
    return config.side_dtype is None and dtype in HALF_DTYPES and upsample_dtype in HALF_DTYPES


def keep_weights_saved_in_float32(
    model: nn.Module, config: QSTConfig, marker: str, remapped: dict[str, torch.Tensor], loaded: set[str]
) -> None:
    """Before PEFT copies the file's tensors into the side network: the weights of a half-precision side network
    that the file holds in float32 (see :func:`keeps_float32_weights`) are made float32 first, so that the copy
    keeps every bit of them (``load_state_dict`` copies into the parameter's own dtype). A load with
    ``low_cpu_mem_usage=True`` assigns the file's tensors whole, and ``_cast_adapter_dtype`` leaves them float32.

    Every other weight of the file is brought to its parameter's dtype here, as the copy would do:
    ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)`` called directly (after ``inject_adapter_in_model``,
    as PEFT's docs pair them) assigns the tensors as they are and has no ``_cast_adapter_dtype`` after it, so a side
    network saved in float32 and loaded onto a bf16 model stayed float32 (and one saved in bf16 from a 4-bit model
    stayed bf16 on a float32 model), computing otherwise than ``PeftModel.from_pretrained`` of the same folder."""
    parameters = dict(model.named_parameters())
    for key in loaded:
        parameter = parameters.get(key)
        if parameter is None or parameter.device.type == "meta" or remapped[key].dtype != torch.float32:
            continue
        upsample = remapped.get(key[: key.index(marker) + len(marker)] + "upsample.weight")
        if upsample is not None and keeps_float32_weights(config, parameter.dtype, upsample.dtype):
            parameter.data = parameter.data.float()
    for key in loaded:  # (after the loop above, which reads the upsample's dtype as saved)
        parameter = parameters.get(key)
        if (
            parameter is not None and parameter.device.type != "meta" and parameter.is_floating_point()
            and remapped[key].is_floating_point() and remapped[key].dtype != parameter.dtype
        ):
            remapped[key] = remapped[key].to(parameter.dtype)


def warn_once_loaded(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn about the adapter being loaded once its load succeeded (:func:`warned_once_loaded`), at the user's line;
    at once where no load wrapper runs. Given where the check finds it, a warning preceded every refusal later in the
    same load (the weights' digest, names, shapes, foreign tensors), telling of an adapter that was then not loaded."""
    pending = _pending_load_warnings.get()
    if pending is None:
        warnings.warn(message, category, stacklevel=user_stacklevel())
    elif (message, category) not in pending:
        pending.append((message, category))


def warned_once_loaded(load):
    """``load`` (a load wrapper: ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers'
    ``load_adapter``) collecting the warnings of :func:`warn_once_loaded` and giving them, once each, only where it
    returns; a refused load drops them. Within another load (``from_pretrained`` calls ``load_adapter``) the outer
    one gives them."""

    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        if _pending_load_warnings.get() is not None:
            return load(*args, **kwargs)
        pending = []
        token = _pending_load_warnings.set(pending)
        try:
            result = load(*args, **kwargs)
        finally:
            _pending_load_warnings.reset(token)
        for message, category in pending:
            warnings.warn(message, category, stacklevel=user_stacklevel())
        return result

    return wrapper
