"""Which dtype a 4-bit base model should compute in on the machine at hand (:func:`recommended_compute_dtype`).

QLoRA recipes write ``bnb_4bit_compute_dtype=torch.bfloat16``, and QST's side network follows the compute dtype by
default. Where the hardware multiplies bfloat16 natively (GPUs since Ampere, CPUs with AVX512-BF16) that is the fast
choice. Elsewhere bfloat16 matmuls are emulated: on a 2-core AVX2-only CPU (AMD EPYC, no AVX-512) a QST training step
of 4-bit SmolLM2-135M took 5.2x as long in bfloat16 as in float32, 4.8x with the steps alternating in one process
(``integration/bench_train.py`` with ``qst`` against ``qst:dtype=float32``; the table is in docs/performance.md). A
QST run only ever trains the small side network, and the backbone's 4-bit weights stay 4-bit whatever the compute
dtype, so float32 there costs memory only for the layers bitsandbytes leaves unquantized (embeddings, norms, the LM
head).
"""

from __future__ import annotations

from typing import Optional, Union

import torch


def _cpu_multiplies_bfloat16() -> bool:
    """True on CPUs where bitsandbytes finds AVX512-BF16 (its native bfloat16 kernels run there)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # no bitsandbytes (or one without the CPU backend): no 4-bit model to load either
        return False
    return bool(has_avx512bf16())


def recommended_compute_dtype(device: Optional[Union[str, torch.device, int]] = None) -> torch.dtype:
    """The dtype to load a 4-bit base model in on ``device``: pass it as ``bnb_4bit_compute_dtype`` and as ``dtype``.

    Args:
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``, or a GPU index ``N``), a ``torch.device``, or None for
            ``"cuda"`` when a GPU is visible and ``"cpu"`` otherwise. ``"meta"`` computes nothing and is refused.

    Returns:
        - CUDA: ``torch.bfloat16`` where that GPU supports it natively (compute capability 8.0 and up), else
          ``torch.float16`` (the QLoRA paper's choice on older GPUs; train with a loss scaler, e.g. ``fp16=True``);
        - CPU: ``torch.bfloat16`` on CPUs with AVX512-BF16, else ``torch.float32``: without it PyTorch and
          bitsandbytes emulate bfloat16 and a training step takes several times longer (module docstring);
        - any other device type: ``torch.bfloat16``, the usual QLoRA setting (not measured here).

    Example::

        import peft_qst

        compute_dtype = peft_qst.recommended_compute_dtype()
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(name, quantization_config=bnb_config, dtype=compute_dtype)
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
            # torch.device(0) is the current accelerator's device 0 (as device_map={"": 0}); without one it fails
            raise ValueError(
                f"recommended_compute_dtype: device {device} is a GPU index, but torch sees no GPU ({err}); "
                "pass 'cpu' or None"
            ) from None
        raise ValueError(
            f"recommended_compute_dtype: {device!r} is not a device ({err}); pass 'cpu', 'cuda' or None"
        ) from None
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_multiplies_bfloat16() else torch.float32
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"recommended_compute_dtype: device {str(device)!r} was asked for, but torch sees no GPU "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); pass 'cpu' or None")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"recommended_compute_dtype: device {str(device)!r} was asked for, but torch sees "
                             f"{torch.cuda.device_count()} GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        if torch.version.hip:  # ROCm GPUs all compute bfloat16 (as torch.cuda.is_bf16_supported says)
            return torch.bfloat16
        # the capability of the GPU asked for: torch.cuda.is_bf16_supported() answers for the current device only,
        # so "cuda:1" got the answer of cuda:0 on a machine with two kinds of GPU
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.bfloat16 if torch.cuda.get_device_capability(index)[0] >= 8 else torch.float16
    if device.type == "meta":
        # a model built on the meta device (accelerate's init_empty_weights, a lazy load) has no compute device yet;
        # "bfloat16" would be the wrong answer for an AVX2-only CPU it is then loaded on
        raise ValueError("recommended_compute_dtype: the 'meta' device holds no data and computes nothing; pass the "
                         "device the model will run on ('cpu', 'cuda' or None for this machine's)")
    return torch.bfloat16
