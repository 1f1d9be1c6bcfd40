"""Integrity checks for saved QST adapters: safetensors only, never a pickle, and no silently corrupt weights.

PEFT writes ``adapter_model.safetensors`` and then ``adapter_config.json``. `QSTConfig.save_pretrained` records a
digest of the weights just written (:func:`weights_digest`) in the config; when the weights are loaded back,
`QSTModel` recomputes it over the tensors actually read and refuses a mismatch. A truncated or garbled file is caught
even earlier, when the config is read from a local folder (:func:`check_adapter_folder`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


class QSTAdapterFileError(ValueError):
    """An adapter folder whose weights are missing, corrupt, or stored in a format QST refuses to read."""


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's dtype, shape and bytes, independent of key names and order.

    Key names are left out on purpose: PEFT renames keys on the way in (adapter names, auxiliary modules), and the set
    of keys is checked separately against the model.
    """
    per_tensor = []
    for tensor in tensors.values():
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        h = hashlib.sha256()
        h.update(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(data)
        per_tensor.append(h.hexdigest())
    total = hashlib.sha256()
    for item in sorted(per_tensor):
        total.update(item.encode())
    return total.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    from safetensors.torch import load_file

    return weights_digest(load_file(str(path)))


def check_adapter_folder(folder: str | os.PathLike) -> None:
    """Refuse a local adapter folder whose weights are pickled only, or whose safetensors file is unreadable."""
    folder = os.fspath(folder)
    safetensors_path = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(safetensors_path):
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
        return
    if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
        raise QSTAdapterFileError(
            f"{folder} holds only {PICKLE_NAME}, a pickle file; QST loads weights only from safetensors and never "
            "unpickles. Re-save the adapter with save_pretrained(..., safe_serialization=True)."
        )
