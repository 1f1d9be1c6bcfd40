"""The side network's attention on CPUs: PyTorch's SDPA in float32.

Why it exists: a side block keeps the backbone's heads at 1/r of the width, so its head dimension is tiny (4 for
SmolLM2-135M at r=16). PyTorch's CPU flash-attention kernel is dominated at that size by its per-block softmax work,
not by the arithmetic, and it is slower in bfloat16 than in float32: on a 2-core CPU, forward + backward of the
side attention of SmolLM2-135M (batch 4, 256 tokens, 9 heads over 3 key/value heads, head dim 4) took 8.1 ms in
bfloat16 and 5.7 ms in float32, per layer; in a QST training step the 30 side attentions were 18% of the CPU time
(``integration/profile_train.py``), more than the backbone's attention. So on CPU the side trunk runs SDPA on
float32 copies of its queries, keys and values (a few hundred KB per layer) and casts the output back: the same
function, more precisely rounded. On other devices, or in float32 already, it is transformers' SDPA unchanged (GPU
kernels are fastest in half precision).

The side trunk selects it through its config's attention implementation (:data:`SIDE_SDPA`, registered with
transformers' ``AttentionInterface`` and, with SDPA's mask function, ``AttentionMaskInterface``) where the backbone
uses ``"sdpa"`` and the model family dispatches attention only through that interface (:data:`SIDE_SDPA_MODEL_TYPES`).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: the attention implementation name the side trunk's config gets
SIDE_SDPA = "qst_side_sdpa"

#: model families whose modelling code picks attention and masks only by ``config._attn_implementation`` through the
#: interfaces (no branch of their own on the name "sdpa"), so that a registered name behaves as "sdpa" does
SIDE_SDPA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def side_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    **kwargs,
):
    """transformers' ``sdpa_attention_forward`` on float32 copies of ``query``, ``key`` and ``value`` on CPU; the
    output is cast back to the query's dtype. Gradients flow through the casts."""
    if query.device.type != "cpu" or query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    output, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, **kwargs
    )
    return output.to(dtype), weights


def register_side_sdpa() -> None:
    """Make :data:`SIDE_SDPA` a known attention implementation (idempotent)."""
    ALL_ATTENTION_FUNCTIONS.register(SIDE_SDPA, side_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SIDE_SDPA, sdpa_mask)


def side_attention_implementation(base_config) -> str:
    """The attention implementation of the side trunk built from ``base_config``: :data:`SIDE_SDPA` where the
    backbone uses SDPA in a family listed in :data:`SIDE_SDPA_MODEL_TYPES`, else the backbone's own (eager when
    unset), so that the side trunk runs the same code paths as the backbone."""
    implementation = getattr(base_config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa" and base_config.model_type in SIDE_SDPA_MODEL_TYPES:
        register_side_sdpa()
        return SIDE_SDPA
    return implementation


def mask_for_side_trunk(attention_mask, implementation: str, dtype: torch.dtype):
    """The attention mask the backbone was given, in the form the side trunk's attention ``implementation`` reads.

    A 4-D mask (``generate`` with a static cache builds one per step, for the backbone's attention implementation;
    a caller may pass one) is used by transformers as it is, and the side trunk gets the backbone's. Where the side
    trunk's implementation is another (``side.trunk.set_attn_implementation("eager")`` on an SDPA backbone), SDPA's
    boolean mask reached eager attention, which adds the mask to its scores: allowed positions got +1 and masked ones
    +0, so every padding position and every unfilled slot of the static cache was attended, without an error. A
    boolean mask for an implementation whose masks are additive (eager's) is turned into that form here, as
    transformers' ``eager_mask`` builds it: 0 where attended, the dtype's minimum elsewhere. Every other mask is
    returned as it is (SDPA reads both forms)."""
    if isinstance(attention_mask, dict):  # per layer kind (sliding-window models)
        return {kind: mask_for_side_trunk(mask, implementation, dtype) for kind, mask in attention_mask.items()}
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        and attention_mask.dtype == torch.bool
        and ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is eager_mask
    ):
        zero = torch.zeros((), device=attention_mask.device, dtype=dtype)
        return torch.where(attention_mask, zero, torch.finfo(dtype).min)
    return attention_mask
