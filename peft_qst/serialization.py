"""Integrity checks for saved QST adapters: safetensors only, never a pickle, and no silently corrupt weights.

PEFT writes ``adapter_model.safetensors`` and then ``adapter_config.json``. `QSTConfig.save_pretrained` records a
digest of the weights just written (:func:`weights_digest`) in that config. Every load of QST weights, whatever the
path (``PeftModel.from_pretrained`` with or without ``config=``, ``load_adapter`` into a new or an existing adapter
name, a trainer's ``resume_from_checkpoint`` and ``load_best_model_at_end``, a local folder or a Hub repository),
reads them with :func:`read_adapter_weights`: the safetensors file or an error (never ``adapter_model.bin``), a
readable header, and the digest recorded in the ``adapter_config.json`` beside the file compared with the tensors
actually read. The digest belongs to the folder, not to the config object in memory, so a config reused for another
model or a checkpoint of an adapter that trained on is judged by the file it comes with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Optional

import torch

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"


class QSTAdapterFileError(ValueError):
    """An adapter folder whose weights are missing, corrupt, or stored in a format QST refuses to read."""


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    h = hashlib.sha256()
    h.update(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(data)
    return h.hexdigest()


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order: two tensors swapped between names
    change it. Computed over the keys as they are in the file (PEFT renames them only after reading)."""
    total = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if isinstance(tensor, torch.Tensor):
            total.update(f"{name}|{_tensor_digest(tensor)}\n".encode())
    return total.hexdigest()


def _unnamed_weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest adapters saved before :func:`weights_digest` named the tensors recorded: the sorted per-tensor
    hashes without names. Accepted for those files only; it cannot tell two same-shaped tensors swapped."""
    total = hashlib.sha256()
    for item in sorted(_tensor_digest(t) for t in tensors.values() if isinstance(t, torch.Tensor)):
        total.update(item.encode())
    return total.hexdigest()


def digest_matches(tensors: Mapping[str, torch.Tensor], recorded: str) -> bool:
    return weights_digest(tensors) == recorded or _unnamed_weights_digest(tensors) == recorded


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity, in key order."""
    return [
        name for name in sorted(tensors)
        if isinstance(tensors[name], torch.Tensor) and tensors[name].is_floating_point()
        and not bool(torch.isfinite(tensors[name]).all())
    ]


#: the packages between a user's call and a warning of peft_qst: a load or save passes through PEFT, transformers (the
#: Trainer resuming or reloading its best checkpoint, its own load_adapter), TRL's trainers, accelerate and torch
_LIBRARIES = ("peft_qst", "peft", "transformers", "trl", "accelerate", "torch", "safetensors", "huggingface_hub")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the function calling this point at the user's code: the
    first frame outside the packages of :data:`_LIBRARIES`. A fixed count pointed into peft_qst's own wrappers (QST's
    loaders are PEFT's and transformers' methods wrapped, reached through a varying number of their frames), where
    the warning named a line of this package instead of the user's ``from_pretrained``, ``load_adapter``,
    ``save_pretrained`` or ``trainer.train()``, and Python's filters by module (``-W``, ``filterwarnings``) could not
    tell one caller from another. Where every frame is a library's (a script run from inside one), the outermost."""
    import sys

    folders = tuple(
        os.path.dirname(os.path.abspath(module.__file__)) + os.sep
        for module in (sys.modules.get(name) for name in _LIBRARIES)
        if getattr(module, "__file__", None)
    )

    def in_library(frame) -> bool:
        filename = frame.f_code.co_filename
        if filename.startswith("<") and frame.f_back is not None:
            # code a library generated and runs, named "<string>": a dataclass's __init__ (QSTConfig's, which runs
            # its checks through __post_init__ and is called by QSTConfig's own wrapper), a library's as its caller is
            return in_library(frame.f_back)
        return os.path.abspath(filename).startswith(folders)

    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and in_library(frame):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_not_finite(tensors: Mapping[str, torch.Tensor], what: str, done: str) -> None:
    """Warn, naming the tensors, when adapter weights hold NaN or infinite values. Such weights come from a training
    run that diverged, and every output of a model using them is NaN: the file itself is intact (its digest matches),
    so nothing refuses it, and without this the first sign was a NaN loss or an empty generation much later."""
    import warnings

    names = non_finite_names(tensors)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"The adapter weights {what} hold NaN or infinite values in {len(names)} of {len(tensors)} tensors "
            f"({shown}): the training run that produced them diverged, and the model's outputs with this adapter "
            f"will be NaN. {done} Find the step where the loss became NaN and train again from a checkpoint before "
            "it, with a lower learning rate, gradient clipping (max_grad_norm) or bf16 instead of fp16.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def check_readable(safetensors_path: str) -> None:
    """Parse every tensor entry of the safetensors header; a truncated or garbled file raises QSTAdapterFileError."""
    from safetensors import safe_open

    try:
        with safe_open(safetensors_path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)  # parses the tensor's entry in the header
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for I/O failures)
        raise QSTAdapterFileError(
            f"{safetensors_path} is truncated or corrupt and cannot be read ({type(err).__name__}: {err}). "
            "Save the adapter again, or download it again."
        ) from err


def _refuse_pickle_only(where: str) -> QSTAdapterFileError:
    return QSTAdapterFileError(
        f"{where} holds no {SAFETENSORS_NAME}: QST loads weights only from safetensors and never unpickles "
        f"{PICKLE_NAME}. Re-save the adapter with save_pretrained (it writes safetensors)."
    )


def check_adapter_folder(folder: str | os.PathLike) -> None:
    """Refuse a local adapter folder whose weights are pickled only, or whose safetensors file is unreadable."""
    folder = os.fspath(folder)
    safetensors_path = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(safetensors_path):
        check_readable(safetensors_path)
    elif os.path.isfile(os.path.join(folder, PICKLE_NAME)):
        raise _refuse_pickle_only(folder)


def _locate(model_id: str, filename: str, hub_kwargs: dict, required: bool) -> Optional[str]:
    """``filename`` of the adapter at ``model_id`` (a local folder, or a Hub repository through the download cache,
    with PEFT's hub arguments: subfolder, revision, token, cache_dir, ...); None when absent and not ``required``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    subfolder = hub_kwargs.get("subfolder")
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
        if required:
            if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
                raise _refuse_pickle_only(folder)
            raise QSTAdapterFileError(f"{folder} holds no {filename}: it is not a saved QST adapter.")
        return None
    try:
        return hf_hub_download(model_id, filename, **hub_kwargs)
    except LocalEntryNotFoundError as err:
        if not required:
            return None
        if _cached(model_id, PICKLE_NAME, hub_kwargs):
            raise _refuse_pickle_only(f"The Hub repository {model_id!r}") from err
        raise QSTAdapterFileError(
            f"{filename} of {model_id!r} is not in the local Hugging Face cache and cannot be downloaded now "
            f"({err}). QST reads only {SAFETENSORS_NAME}: if the repository holds only {PICKLE_NAME}, re-save the "
            "adapter with save_pretrained and upload it again."
        ) from err
    except EntryNotFoundError as err:
        if not required:
            return None
        raise _refuse_pickle_only(f"The Hub repository {model_id!r}") from err


def _cached(model_id: str, filename: str, hub_kwargs: dict) -> bool:
    """Whether the Hub cache holds ``filename`` of ``model_id`` (looked up, never opened)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(model_id, filename, **{**hub_kwargs, "local_files_only": True})
    except (EntryNotFoundError, OSError, ValueError):
        return False
    return True


def download_kwargs(hub_kwargs: dict) -> dict:
    """PEFT's hub arguments as ``hf_hub_download`` takes them: PEFT passes the legacy ``use_auth_token`` on, where
    ``hf_hub_download`` takes ``token=``."""
    hub_kwargs = dict(hub_kwargs)
    legacy_token = hub_kwargs.pop("use_auth_token", None)
    if legacy_token is not None and hub_kwargs.get("token") is None:
        hub_kwargs["token"] = legacy_token
    return hub_kwargs


def damaged_config_error(file: str, problem: str) -> QSTAdapterFileError:
    """The refusal of an ``adapter_config.json`` beside a QST adapter's weights that cannot be read as a PEFT config
    (``problem``: not JSON, no JSON object, no ``peft_type``)."""
    return QSTAdapterFileError(
        f"{file} cannot be read as the config of the QST adapter saved beside it ({problem}): the file was damaged "
        "or edited by hand. Restore it from where the adapter came from, or save the adapter again "
        "(PeftModel.save_pretrained writes it, with \"peft_type\": \"QST\"). Nothing was loaded."
    )


def config_file_problem(file: str) -> Optional[str]:
    """What makes ``file`` (an ``adapter_config.json``) unreadable as a PEFT config: not JSON, no JSON object, or no
    ``peft_type`` (a file truncated, emptied or edited by hand); None where it reads."""
    try:
        with open(file, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"it is not valid JSON: {error}"
    if not isinstance(content, dict):
        return "it holds no JSON object"
    if "peft_type" not in content:
        return "it has no peft_type"
    return None


def _holds_side_network_weights(safetensors_path: str) -> bool:
    """Whether the (readable) safetensors file holds a QST side network's weights, read from its header."""
    from safetensors import safe_open

    from .layer import is_side_network_key

    with safe_open(safetensors_path, framework="pt") as handle:
        return any(is_side_network_key(key) for key in handle.keys())


def read_adapter_weights(model_id: str, device, hub_kwargs: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of the QST adapter at ``model_id`` and the ``adapter_config.json`` saved with them ({} when the
    folder has none), after the checks above: safetensors only, readable, and equal to the recorded digest."""
    from safetensors.torch import load_file

    hub_kwargs = download_kwargs(hub_kwargs)
    weights_path = _locate(model_id, SAFETENSORS_NAME, hub_kwargs, required=True)
    check_readable(weights_path)
    config_path = _locate(model_id, CONFIG_NAME, hub_kwargs, required=False)
    saved_config = {}
    if config_path is not None:
        # damaged beside the weights of an adapter being loaded as QST: loading into an existing adapter (a trainer
        # resuming) reads no config before this, and failed with a bare JSONDecodeError or AttributeError, or was
        # refused for a config "predating side_heads" where peft_type was missing
        problem = config_file_problem(config_path)
        if problem is not None and _holds_side_network_weights(weights_path):
            raise damaged_config_error(config_path, problem)
        if problem is None:  # (another method's weights: refused by their names, as without a config)
            with open(config_path, encoding="utf-8") as handle:
                saved_config = json.load(handle)
    if isinstance(device, torch.device):
        device = str(device)
    tensors = load_file(weights_path, device="cpu" if device in (None, "mps") else device)
    recorded = saved_config.get("adapter_weights_sha256")
    if recorded is not None and not digest_matches(tensors, recorded):
        raise QSTAdapterFileError(
            f"The adapter weights read from {weights_path} do not match the digest recorded in the "
            f"{CONFIG_NAME} beside them when they were saved: the file is corrupt or was replaced. Save or download "
            "the adapter again."
        )
    warn_if_not_finite(tensors, f"read from {weights_path}", "They were loaded as they are.")
    return tensors, saved_config


def saved_tensor_shapes(model_id: str, hub_kwargs: dict) -> dict[str, list[int]]:
    """The names and shapes of the tensors in the safetensors file of the adapter at ``model_id``, read from its
    header alone (nothing is loaded or checked: :func:`read_adapter_weights` does that when the weights are loaded);
    {} where there is no readable file, which that read then reports."""
    from safetensors import safe_open

    try:
        path = _locate(os.fspath(model_id), SAFETENSORS_NAME, download_kwargs(hub_kwargs), required=False)
        if path is None:
            return {}
        with safe_open(path, framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception:  # noqa: BLE001 - the load's own read reports what is wrong with the file
        return {}


def rename_as_peft_does(tensors: Mapping[str, torch.Tensor], key_mapping: Optional[Mapping[str, str]], where: str):
    """The weights read from ``where`` with the names PEFT's ``load_peft_weights(..., key_mapping=...)`` gives them:
    the PeftModel prefix (``base_model.model.``, else ``base_model.``) taken off, the first pattern of
    ``key_mapping`` (a regex, in the mapping's order) that matches replaced as ``re.subn`` does, the prefix put back.
    QST applies it to the tensors its reader has already read and checked: PEFT's own renaming reads the file a second
    time, unchecked, so a file replaced after the check was returned as it was (and, with the safetensors file gone, a
    pickle beside it was unpickled). Two weights renamed to one name are refused (PEFT kept the last one, silently
    dropping a weight)."""
    if not key_mapping:
        return dict(tensors)
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise QSTAdapterFileError(
                f"key_mapping renames the weights of a saved PeftModel, whose names start with 'base_model.', but "
                f"{key!r} in {where} does not: the file was not written by save_pretrained. Load it without "
                "key_mapping, or save the adapter again with save_pretrained."
            )
        name = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            new_name, replaced = re.subn(pattern, replacement, name)
            if replaced:
                name = new_name
                break
        name = prefix + name
        if name in renamed:
            raise ValueError(
                f"key_mapping renames both {origin[name]!r} and {key!r} of {where} to {name!r}: one of the two "
                "weights would be lost. Make the patterns of key_mapping tell the two apart."
            )
        renamed[name], origin[name] = tensor, key
    return renamed
