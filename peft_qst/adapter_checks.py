"""Whether a saved QST adapter's file and config fit the model and the adapter they are loaded into.

A side network's weights load by name and shape, and many mistakes give the same names and shapes: a config of another
activation, head layout or gate start (given with ``config=``, or an existing adapter a trainer resumes into), a file
written by another PEFT method or before an option existed, tensors that belong to no part of the adapter and would be
written over the frozen base model. The checks here run before PEFT touches the model (:func:`check_saved_adapter_fits`,
called by the load wrappers in ``registration``; :func:`foreign_tensors` also from
:meth:`~peft_qst.model.QSTModel._remap_adapter_state_dict_for_load`), and refuse such a load naming the cause and the
fix.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .config import AUTO, PEFT_TYPE, QSTConfig
from .fingerprint import warn_if_base_model_differs
from .layer import SIDE_ATTR, is_side_network_key, layers_holding
from .loading import PEFT_MODEL_PREFIX
from .modules_to_save import TASK_HEADS, check_saved_modules_to_save_present
from .serialization import QSTAdapterFileError
from .side_config import shrink_config, signature_predates_decoder_sizes
from .signature import model_signature
from .vocabulary import (
    named_token_embeddings,
    check_shared_embeddings_kept,
    check_token_embeddings_fit,
    warn_added_token_embeddings_not_saved,
)


def _saved_beside_the_adapter(model: nn.Module, adapter_name: str, state_keys) -> set[str]:
    """The state keys besides the side network that an adapter saved by ``save_pretrained`` may hold: those of the
    modules saved whole with adapter ``adapter_name`` (``modules_to_save``; as saved and as PEFT's wrappers map them for
    loading), those of the head its task class saves (:data:`~peft_qst.modules_to_save.TASK_HEADS`, which transformers'
    ``load_adapter`` with ``peft_config=`` loads into the model's own head), and those of the model's input and output
    token embeddings, which PEFT saves with ``save_embedding_layers`` (and sets that itself when they were resized) and
    loads into the model's own."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    def plain(name: str) -> str:
        return name.replace("_fsdp_wrapped_module.", "")

    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
                keys.update((f"{plain(name)}.{saved}", f"{plain(name)}.{loaded}"))
    config = getattr(model, "peft_config", {}).get(adapter_name)
    task_type = getattr(config, "task_type", None)
    heads = TASK_HEADS.get(getattr(task_type, "value", task_type), ())
    names = [name for name, _ in named_token_embeddings(model)] + [
        plain(name) for name, _ in model.named_modules(remove_duplicate=False)
        if name and name.rpartition(".")[2] in heads
    ]
    keys.update(key for key in state_keys for name in names if key.startswith(f"{name}."))
    return keys


def foreign_tensors(model: nn.Module, adapter_name: str, keys, state_keys) -> list[str]:
    """The keys among ``keys`` (of a file read for QST adapter ``adapter_name``, injected into ``model`` whose state
    has ``state_keys``) that belong neither to a side network nor to what :func:`_saved_beside_the_adapter` allows.
    Loading writes every key that names a weight of the model into it (PEFT with ``strict=False``, transformers by
    name), so a tensor named for a backbone layer or its norm went silently over the frozen base model that every
    adapter and ``disable_adapter`` share; a key naming nothing was silently dropped. Side keys are left to the
    checks of the side network's own names and shapes."""
    prefix = PEFT_MODEL_PREFIX
    state_keys = set(state_keys)
    prefixed = any(key.startswith(prefix) for key in state_keys)
    allowed = _saved_beside_the_adapter(model, adapter_name, state_keys)
    return sorted(
        key for key in keys
        if not is_side_network_key(key) and key not in allowed
        and (prefixed or key.removeprefix(prefix) not in allowed)
    )


def refuse_foreign_tensors(adapter_name: str, foreign: list[str]) -> QSTAdapterFileError:
    return QSTAdapterFileError(
        f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: it holds {len(foreign)} tensors "
        f"that belong neither to the adapter's side network nor to a module saved whole with it (modules_to_save) "
        f"nor to the token embeddings PEFT saves beside an adapter (e.g. {foreign[:3]}). Loading would write them "
        "over the frozen base model's weights of the same names, which every adapter and disable_adapter share (or "
        "drop them, where the model has none). The file was written by something other than save_pretrained or was "
        "altered: save or download the adapter again; nothing was loaded."
    )


def refuse_qst_weights_in_other_adapter(config, adapter_name: str, tensors: dict) -> None:
    """Weights of a QST adapter (its side network's, under ``qst_side``) loaded into an adapter of another PEFT method:
    a LoRA model's ``load_adapter(qst_folder, "default")``, as a trainer resuming from the wrong run's checkpoint
    does, or ``PeftModel.from_pretrained(base, qst_folder, config=LoraConfig(...))``. PEFT loaded none of them, kept
    the adapter's own weights and returned without an error (for a new adapter, fresh ones, with a warning of
    missing keys only): the converse of the refusal in :func:`check_saved_config_matches`."""
    side = [key for key in tensors if is_side_network_key(key)]
    if not side:
        return
    kind = getattr(config.peft_type, "value", config.peft_type)
    raise QSTAdapterFileError(
        f"The weights loaded into {kind} adapter {adapter_name!r} were saved by a QST adapter (side-network weights, "
        f"e.g. {side[0]!r}), not a {kind} one: PEFT would load none of them and leave the adapter as it was. Load "
        "the folder as what it is, into a model without adapters or one holding QST adapters "
        "(PeftModel.from_pretrained(base_model, folder) without config=, after import peft_qst), or load a folder "
        f"saved from a {kind} adapter. Nothing was loaded."
    )


#: QSTConfig fields that decide what an adapter's weights compute without changing their names or shapes: the
#: activation of the "adapter" downsampler, the pooling kind of a parameter-free one, the side blocks' head layout
#: (with as many key/value heads as query heads, every head count gives the same shapes), the backbone low-rank
#: adapters' scaling, the modules saved whole beside the side network (without them in the adapter's
#: modules_to_save, a saved ``lm_head.weight`` is loaded over the frozen base model's own LM head), and the starting
#: values of the output gate and the side gates, which are saved as offsets from them (``ConstantOffset``: a saved
#: output gate read beside ``output_gate_init=2.0`` instead of 1.0 is 1.0 larger). Weights loaded into a side network
#: built with other values would load without an error and compute something else.
_COMPUTATION_FIELDS = (
    "downsample", "activation", "side_heads", "backbone_lora_alpha", "modules_to_save", "side_gate_init",
    "output_gate_init",
)
#: the fields of _COMPUTATION_FIELDS holding numbers, compared as such (JSON's 16.0 against a config's 16)
_NUMBER_FIELDS = ("backbone_lora_alpha", "side_gate_init", "output_gate_init")


def _predates_decoder_sizes(saved_signature, config: QSTConfig, model: Optional[nn.Module] = None) -> bool:
    """:func:`~peft_qst.side_config.signature_predates_decoder_sizes`, or, for a model type transformers does not
    register (remote code), one without ``"sizes_of"`` where the model's signature records it: that of ``model``, else
    of the model ``config`` is bound to (a file's ``side_heads`` is set to None when it is bound there:
    ``QSTModel._bind_config_to_model``)."""
    if signature_predates_decoder_sizes(saved_signature):
        return True
    bound = config.base_model_signature
    if model is not None:
        try:
            bound = model_signature(model)
        except Exception:  # noqa: BLE001 - a model binding refuses: binding it reports why
            return False
    return (
        isinstance(saved_signature, dict) and "sizes_of" not in saved_signature
        and isinstance(bound, dict) and "sizes_of" in bound
    )


def _computation_differences(saved_config: dict, config: QSTConfig, model: Optional[nn.Module] = None) -> dict:
    """The fields of :data:`_COMPUTATION_FIELDS` in which the ``adapter_config.json`` saved with the weights and the
    config of the adapter they are loaded into differ, as {field: (saved, adapter's)}; a field the file does not hold
    (written by an earlier version) is not compared, nor one that cannot matter (the activation of another downsampler,
    the scaling of backbone adapters there are none of)."""
    differences = {}
    for name in _COMPUTATION_FIELDS:
        if name not in saved_config:
            continue
        saved, here = saved_config[name], getattr(config, name, None)
        if name == "activation" and config.downsample != "adapter":
            continue
        if name == "backbone_lora_alpha" and not config.backbone_lora_layers:
            continue
        if name == "side_heads" and saved == AUTO:
            continue  # a config written by hand, never bound to a model: "auto" means what binding this one chose
        if name == "side_heads" and _predates_decoder_sizes(saved_config.get("base_model_signature"), config, model):
            continue  # means None, the model's heads (check_saved_config_matches refused any other count)
        if name == "modules_to_save":
            # PEFT's task classes add their head names to the list (order and repeats vary, and a config given to
            # transformers' load_adapter lacks them): compare the sets, with the task's heads on both sides
            task_type = getattr(config, "task_type", None)
            heads = TASK_HEADS.get(getattr(task_type, "value", task_type), ())
            saved, here = sorted(set(saved or ()) | set(heads)), sorted(set(here or ()) | set(heads))
        elif name in _NUMBER_FIELDS and isinstance(saved, (int, float)) and isinstance(here, (int, float)):
            saved, here = float(saved), float(here)
        if saved != here:
            differences[name] = (saved, here)
    return differences


def check_saved_adapter_fits(peft_model: nn.Module, adapter_name: str, tensors: dict, saved_config: dict) -> None:
    """Before PEFT touches the model: the file read for ``adapter_name`` holds every module saved whole with the
    adapter (``modules_to_save``; PEFT would fail on the first one missing with a bare KeyError), and the weights were
    saved by an adapter that computes what ``adapter_name`` computes. The adapter's config comes from the folder when
    ``PeftModel.from_pretrained`` reads it there, but not when it is given (``config=``) or when the adapter already
    exists (``load_adapter`` into its name, as trainers do to resume a checkpoint): a config of another activation,
    pooling kind, head layout, backbone-adapter scaling, ``modules_to_save`` or gate start builds a side network the
    weights load into without an error (:data:`_COMPUTATION_FIELDS`). An ``adapter_config.json`` written before
    ``side_heads`` existed means the model's head count."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    config = peft_model.peft_config[adapter_name]
    entries = saved_config.get("modules_to_save", config.modules_to_save) if saved_config else config.modules_to_save
    check_saved_modules_to_save_present(peft_model, adapter_name, entries, tensors)
    check_saved_config_matches(peft_model.peft_config[adapter_name], adapter_name, saved_config)
    check_width_options_of_earlier_files(peft_model, adapter_name, saved_config, tensors)
    check_token_embeddings_fit(peft_model, tensors)
    check_shared_embeddings_kept(peft_model, adapter_name, tensors)
    warn_added_token_embeddings_not_saved(peft_model, adapter_name, saved_config, tensors)
    missing = []
    for name, module in peft_model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = name.removeprefix("_fsdp_wrapped_module.")
            keys = (f"{name}.{key}" for key in module.adapter_state_dict_load_map(adapter_name))
            missing += [key for key in keys if key not in tensors]
    if missing:
        raise QSTAdapterFileError(
            f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: it lacks {len(missing)} weights "
            f"of the modules saved whole with the adapter (modules_to_save), e.g. {missing[:3]}. It was saved with "
            "another modules_to_save or task_type; nothing was loaded."
        )
    warn_if_base_model_differs(peft_model, adapter_name, saved_config)


#: options that narrowed parts of the side blocks, with "divided" as their default: an ``adapter_config.json`` written
#: before one existed holds side blocks of the model's widths there (``QSTConfig.check_kwargs`` reads it "backbone")
_WIDTH_OPTIONS = ("side_linear_heads", "side_inner_widths")


def check_width_options_of_earlier_files(
    peft_model: nn.Module, adapter_name: str, saved_config: dict, tensors: dict
) -> None:
    """Weights whose ``adapter_config.json`` predates ``side_linear_heads`` or ``side_inner_widths``, loaded into an
    adapter built with ``"divided"`` (today's default: a training script's ``QSTConfig(...)`` resuming a checkpoint
    saved before, or ``config=``), on a model whose side blocks the option narrows: the shapes cannot fit, and the
    refusal said only "saved from a different base model or QST configuration", naming neither the option nor the
    fix. Refused naming them; models the option does not change load as before. Only where a saved side tensor does
    not fit its parameter (``tensors``): a config can hold a width attribute its blocks do not build (MiniMax-M3's
    ``index_n_heads`` without sparse layers), which the option changes in the side config but in no side block, and
    such files loaded, and load, as they are.

    ``peft_model`` is a PeftModel, or a transformers model that transformers' ``load_adapter(..., peft_config=...)``
    injected the adapter into: the file's keys carry ``base_model.model.`` and module names of the latter do not, so
    both are compared without it."""
    config = peft_model.peft_config[adapter_name]
    options = [name for name in _WIDTH_OPTIONS
               if saved_config and name not in saved_config and getattr(config, name, "backbone") != "backbone"]
    if not options:
        return
    layers = layers_holding(peft_model, adapter_name)
    if not layers:
        return
    prefix = PEFT_MODEL_PREFIX
    shapes = {
        f"{name}.{SIDE_ATTR}.{key}".removeprefix(prefix): tuple(value.shape)
        for name, layer in layers
        for key, value in layer.qst_side[adapter_name].state_dict().items()
    }
    if not any(tuple(tensor.shape) != shapes.get(key.removeprefix(prefix), tuple(tensor.shape))
               for key, tensor in tensors.items()):
        return
    layer = layers[0][1]
    base_config = layer.get_base_layer().config
    try:
        built = shrink_config(base_config, config, torch.float32).to_dict()
        changed = []
        for name in options:
            as_saved = copy.copy(config)
            setattr(as_saved, name, "backbone")
            if shrink_config(base_config, as_saved, torch.float32).to_dict() != built:
                changed.append(name)
    except Exception:  # noqa: BLE001 - the adapter was built from this config: the shape check reports the rest
        return
    if changed:
        settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
        fix = ", ".join(f'{name}="backbone"' for name in changed)
        raise QSTAdapterFileError(
            f"The adapter_config.json saved with these weights predates {' and '.join(changed)}: its side blocks "
            f"have the model's widths there (\"backbone\"), but adapter {adapter_name!r} was built with {settings}, "
            f"which narrows them on this {getattr(base_config, 'model_type', 'model')} model. Build the adapter with "
            f"QSTConfig(..., {fix}) to load or resume it, or load the folder without a config of your own "
            "(PeftModel.from_pretrained without config=, transformers' load_adapter without peft_config=: the file is "
            "then read with QSTConfig.from_pretrained). Nothing was loaded."
        )


def check_saved_config_matches(
    config: QSTConfig, adapter_name: str, saved_config: dict, model: Optional[nn.Module] = None
) -> None:
    """The ``adapter_config.json`` saved with the weights (``saved_config``, {} where there is none) describes an
    adapter that computes what ``config``, the config of adapter ``adapter_name`` they are loaded into, computes.
    ``model``: the model a ``config`` not bound yet is for (whether the file predates the decoder sizes of a config of
    remote code: :func:`_predates_decoder_sizes`).

    Weights saved by another PEFT method (a LoRA folder given a ``QSTConfig`` with ``config=``, or loaded into an
    existing QST adapter, as a trainer resuming from the wrong checkpoint does) were refused as a QST file that
    "predates side_heads", with the advice to set ``side_heads=None``, which only led to another wrong diagnosis
    ("saved from a different QST configuration"): they are refused naming the method the file says."""
    saved_type = saved_config.get("peft_type") if saved_config else None
    if isinstance(saved_type, str) and saved_type.strip().upper() != PEFT_TYPE:
        raise QSTAdapterFileError(
            f"The weights loaded into QST adapter {adapter_name!r} were saved by a {saved_type} adapter (the "
            "peft_type of the adapter_config.json beside them), not a QST one: they cannot be loaded into a side "
            "network. Load a folder saved from a QST adapter, or load this one as what it is, without a QSTConfig "
            "(PeftModel.from_pretrained(base_model, folder) without config=, into a model holding no QST adapter). "
            "Nothing was loaded."
        )
    if saved_config and config.side_heads is not None and (
        "side_heads" not in saved_config
        or _predates_decoder_sizes(saved_config.get("base_model_signature"), config, model)
    ):
        what = (
            "side_heads" if "side_heads" not in saved_config
            else "the decoder head count of this model type (QST set side_heads on its encoder, which the side "
            f"network does not build; the file's side_heads={saved_config['side_heads']!r} was not applied)"
        )
        raise QSTAdapterFileError(
            f"The adapter_config.json saved with these weights predates {what}: its side blocks have the model's "
            f"head count, but adapter {adapter_name!r} was built with side_heads={config.side_heads!r}. Load the "
            "folder without config= (PeftModel.from_pretrained reads it with QSTConfig.from_pretrained), or set "
            "config.side_heads = None. Nothing was loaded."
        )
    differences = _computation_differences(saved_config, config, model) if saved_config else {}
    if differences:
        listed = ", ".join(f"{name}={saved!r} (adapter {adapter_name!r}: {here!r})" for name, (saved, here) in
                           differences.items())
        raise QSTAdapterFileError(
            f"The checkpoint does not fit QST adapter {adapter_name!r}: it was saved by a QST adapter with {listed} "
            "(weights that fit by name and shape would compute something else). Load the folder without a config of "
            "your own (PeftModel.from_pretrained without config=, transformers' load_adapter without peft_config=: "
            "the adapter is then built from the adapter_config.json beside the weights), load it under a new adapter "
            "name, or build the adapter with the saved values; nothing was loaded."
        )
