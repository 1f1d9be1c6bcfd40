"""Low-rank adapters on the top backbone blocks, trained together with the side network (``backbone_lora_layers``).

Side tuning alone keeps the whole backbone frozen and out of autograd; its output enters the model only through the
side network's narrow upsample (a d/r-dimensional subspace of the final hidden state). LoRA on the last ``k`` backbone
blocks adds what that cannot: full-width changes of the representation right before the LM head. Gradients then enter
the backbone, but only above block ``L - k``: the blocks below still run under ``torch.no_grad()`` and record nothing
for backward, so memory and backward time grow with ``k``, not with the depth of the model.

Every ``nn.Linear`` inside those blocks (bitsandbytes' ``Linear4bit`` is one) gets ``y += (x A^T B^T) * alpha / rank``
through a forward hook, with ``B`` zero-initialised as in LoRA, so training starts at the pretrained output. The
adapter matrices belong to the QST adapter (they live in its :class:`~peft_qst.side.QSTSideNetwork`, are saved and
loaded with it, and carry ``qst_`` in their names); the hooks ask the QST layer which adapter, if any, adapts the
current forward and which rows of the batch it owns.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .config import QSTConfig
from .side import QSTUnsupportedModelError


class LowRankDelta(nn.Module):
    """``x -> (x A^T) B^T * alpha / rank``, with ``A`` initialised as PEFT's LoRA does and ``B`` at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling


def resolve_backbone_lora_layers(backbone_lora_layers: int | float, num_layers: int) -> int:
    """The number of top blocks ``QSTConfig.backbone_lora_layers`` asks for on a model of ``num_layers`` blocks: a
    count as it is, a fraction of the depth rounded to the nearest whole block (halves up), at least one (a fraction
    in (0, 1) asks for some adapters, never for none)."""
    if isinstance(backbone_lora_layers, float):
        return max(1, math.floor(backbone_lora_layers * num_layers + 0.5))
    return backbone_lora_layers


def _key(name: str) -> str:
    # ModuleDict keys cannot contain dots
    return name.replace(".", "__")


def top_block_linears(blocks: nn.ModuleList, num_top: int) -> Iterator[tuple[int, str, nn.Linear]]:
    """(block index, name inside the block, module) of every linear layer in the last ``num_top`` blocks: every
    ``nn.Linear`` (bitsandbytes' quantized layers and model-specific subclasses such as Falcon's included) except the
    mixture-of-experts routers that subclass it (Phi-MoE's, Llama 4's): they return routing weights, not a projection
    to add a delta to; and block-diagonal grouped projections that subclass it (DeepSeek-V4's ``o_a_proj``,
    ``n_groups`` blocks of ``in_features`` -> ``out_features / n_groups``): the output of one is not that of an
    ``in_features`` -> ``out_features`` projection, and a delta of that shape failed to add to it ("The size of tensor
    a (1024) must match the size of tensor b (8192)"); and the time-step projection of Mamba-style mixers
    (:func:`_is_read_by_weight`)."""
    for index in range(len(blocks) - num_top, len(blocks)):
        for name, module in blocks[index].named_modules():
            if _is_linear_projection(module) and not _is_read_by_weight(blocks[index], name):
                yield index, name, module


def _is_linear_projection(module: nn.Module) -> bool:
    groups = getattr(module, "n_groups", None)
    grouped = isinstance(groups, int) and groups > 1
    return isinstance(module, nn.Linear) and "Router" not in type(module).__name__ and not grouped


def _is_read_by_weight(block: nn.Module, name: str) -> bool:
    """Whether the linear layer ``name`` of ``block`` is one its mixer never calls, reading its weight instead: the
    ``dt_proj`` of Mamba-style mixers (Mamba, Falcon-Mamba, Jamba: ``dt_proj.weight @ time_step``, its bias added
    inside the scan). A forward hook on it never runs, so a delta there never changed the output and never got a
    gradient: trainable parameters that did nothing."""
    parent, _, attr = name.rpartition(".")
    return attr == "dt_proj" and hasattr(block.get_submodule(parent) if parent else block, "A_log")


def is_time_step_delta(key: str) -> bool:
    """Whether the saved tensor ``key`` belongs to a delta on a Mamba-style ``dt_proj``, which peft-qst put there
    before :func:`_is_read_by_weight` left those layers out (a hybrid adapter of a Mamba, Falcon-Mamba or Jamba model
    saved by it holds two per adapted block). Its hook never ran and it got no gradient, so it holds its start, a
    zero delta (``lora_B`` starts at zero): dropped on load, the adapter computes what it computed when saved."""
    owner, _, leaf = key.rpartition(".")
    return ".backbone_lora.deltas." in key and leaf in ("lora_A", "lora_B") and owner.endswith("dt_proj")


#: a routed expert built as a module of its own: ``experts.<i>`` (Mixtral-style), ``experts.expert_<i>`` (Switch)
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.(expert_)?\d+(\.|$)")


def token_rows(
    rows: torch.Tensor, seq_len: Optional[int], tokens: torch.Tensor, index: int, name: str
) -> torch.Tensor:
    """The mask of an ``adapter_names`` batch's rows ``rows`` (one bool per row) over the tokens ``tokens`` that the
    backbone's linear layer ``name`` of block ``index`` reads, shaped to scale the delta computed from them.

    Most layers read their block's layout, batch first (``(batch, sequence, hidden)``, or multi-head latent
    attention's ``(batch, 1, sequence, rank)``): the mask runs along the first dimension. Some read the batch's
    tokens flattened row by row to ``(batch * sequence, hidden)``: the shared experts of mixture-of-experts blocks
    (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE, Llama 4, ERNIE 4.5-MoE, Cohere2-MoE, ...), the linear layers inside router
    modules (DBRX, JetMoE, Hunyuan-MoE), OPT's ``fc1`` and ``fc2``; token ``t`` then belongs to row ``t // sequence``.
    The row mask applied along their first dimension failed there ("The size of tensor a (14) must match the size of
    tensor b (2)"). Routed experts that are modules of their own (``experts.<i>``) read the tokens routed to them,
    gathered in expert order: no mask can tell their rows apart, even where their number happens to match, so such a
    layer, like any whose first dimension is neither, is refused, naming the way out. (transformers' own routed
    experts hold their weights in grouped tensors, not ``nn.Linear`` layers, and take no backbone adapter.)
    """
    batch = rows.shape[0]
    leading = tokens.shape[0] if tokens.dim() > 1 else None
    if _ROUTED_EXPERT.search(name) is None:
        if leading == batch:
            return rows.view(-1, *([1] * (tokens.dim() - 1)))
        if seq_len is not None and tokens.dim() == 2 and leading == batch * seq_len:
            return rows.repeat_interleave(seq_len).view(-1, 1)
    raise QSTUnsupportedModelError(
        f"QST cannot give the rows of this adapter_names batch their own backbone adapters in {name!r} of block "
        f"{index}: that layer reads tokens of shape {tuple(tokens.shape)}, neither one entry per row (batch of "
        f"{batch}) first nor the batch's tokens flattened row by row ({batch} x {seq_len}), so which row each token "
        "comes from is unknown (a routed expert reads the tokens routed to it, in expert order). Run the rows of each "
        "hybrid adapter (backbone_lora_layers) in a batch of their own."
    )


class BackboneLoRA(nn.Module):
    """The low-rank deltas of one QST adapter, keyed by block index and the linear layer's name inside the block."""

    def __init__(self, blocks: nn.ModuleList, config: QSTConfig):
        super().__init__()
        self.first_block = len(blocks) - config.backbone_lora_layers
        self.deltas = nn.ModuleDict()
        for index, name, module in top_block_linears(blocks, config.backbone_lora_layers):
            if str(index) not in self.deltas:
                self.deltas[str(index)] = nn.ModuleDict()
            self.deltas[str(index)][_key(name)] = LowRankDelta(
                module.in_features, module.out_features, config.backbone_lora_r, config.backbone_lora_alpha
            )
        if not len(self.deltas):
            raise ValueError(
                f"QSTConfig.backbone_lora_layers={config.backbone_lora_layers} found no nn.Linear layer in the top "
                "backbone blocks of this model to adapt; use backbone_lora_layers=0."
            )

    def delta(self, index: int, name: str) -> Optional[LowRankDelta]:
        per_block = self.deltas[str(index)] if str(index) in self.deltas else None
        return per_block[_key(name)] if per_block is not None and _key(name) in per_block else None

    def place(self, blocks: nn.ModuleList, device_of: Callable[[nn.Module], torch.device]) -> None:
        for index, per_block in self.deltas.items():
            per_block.to(device_of(blocks[int(index)]))
