"""Which dtype a 4-bit base model should compute in on the machine at hand (:func:`recommended_compute_dtype`).

QLoRA recipes write ``bnb_4bit_compute_dtype=torch.bfloat16``, and QST's side network follows the compute dtype by
default. Where the hardware multiplies bfloat16 natively (GPUs since Ampere, CPUs with AVX512-BF16) that is the fast
choice. Elsewhere bfloat16 matmuls are emulated: on a 2-core AVX2-only CPU (AMD EPYC, no AVX-512) a QST training step
of 4-bit SmolLM2-135M took about 7x longer in bfloat16 than in float32 (``integration/bench_train.py`` with
``qst`` against ``qst:dtype=float32``; the table is in docs/performance.md). A QST run only ever trains the small side
network, and the backbone's 4-bit weights stay 4-bit whatever the compute dtype, so float32 there costs memory only
for the layers bitsandbytes leaves unquantized (embeddings, norms, the LM head).
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


def recommended_compute_dtype(device: Optional[Union[str, torch.device]] = None) -> torch.dtype:
    """The dtype to load a 4-bit base model in on ``device``: pass it as ``bnb_4bit_compute_dtype`` and as ``dtype``.

    Args:
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), a ``torch.device``, or None for ``"cuda"`` when a GPU is
            visible and ``"cpu"`` otherwise.

    Returns:
        - CUDA: ``torch.bfloat16`` where the GPU supports it natively (compute capability 8.0 and up), else
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
        raise ValueError(
            f"recommended_compute_dtype: {device!r} is not a device ({err}); pass 'cpu', 'cuda' or None"
        ) from None
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_multiplies_bfloat16() else torch.float32
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("recommended_compute_dtype: device 'cuda' was asked for, but torch sees no GPU "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); pass 'cpu' or None")
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16
