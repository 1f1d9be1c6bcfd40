"""Helpers shared by the benchmarks and the quality harness: RSS from ``/proc/self/status``, its high-water mark and
how to reset it, the CPU model for the tables, randomly initialised checkpoints of a given shape (speed and
memory do not depend on the weights' values), and the check of an ``--output`` path before a long run."""

from __future__ import annotations

import os
import platform


def add_overwrite_output_argument(parser) -> None:
    """``--overwrite-output``: what ``check_output_path`` asks for before it lets a run replace an existing file."""
    parser.add_argument("--overwrite-output", action="store_true",
                        help="replace the --output file if it exists (default: refuse it)")


def check_output_path(parser, path, overwrite: bool = False) -> None:
    """``parser.error`` now for an ``--output`` that cannot be written, not after the minutes of the run; and for one
    that exists, unless ``overwrite``: a results file of an earlier run (a recorded table's JSON) is not replaced by a
    rerun that reused its name."""
    if not path:
        return
    if os.path.isdir(path):
        parser.error(f"--output {path} is a folder: pass a file path")
    if os.path.exists(path) and not overwrite:
        parser.error(f"--output {path} already exists: pass --overwrite-output to replace it, or another path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        parser.error(f"cannot write --output {path}: {err}")
    if not os.access(folder, os.W_OK):
        parser.error(f"cannot write --output {path}: {folder} is not writable")


def versions() -> dict:
    """The Python, library and platform versions a sweep writes beside its results."""
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform()}


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (e.g. ``VmRSS``, ``VmHWM``, ``RssFile``); None where there is no /proc."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The RSS high-water mark of this process (since start, or since the last :func:`reset_peak_rss`)."""
    kb = status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_random_model(config_kwargs: dict, path: str, device: str) -> None:
    """Save a randomly initialised LlamaForCausalLM (bf16, safetensors) with the given config to ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **config_kwargs)
    torch.manual_seed(0)
    with torch.device(device):  # on a GPU, initialising 7B parameters takes seconds instead of minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
