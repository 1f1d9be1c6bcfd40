"""`QSTConfig`: the configuration of a Quantized Side Tuning adapter.

Only plain values live here, validated the moment the config is built, so that a bad value fails where the user
wrote it and not as a shape error deep inside a forward pass. Whether a value fits a *particular* model (does ``r``
divide its hidden size and head layout?) is checked by `get_peft_model`, which has the model at hand
(see :mod:`peft_qst.side_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig


class QSTPeftType(str):
    """The ``peft_type`` of QST adapters: the string ``"QST"`` that behaves like a member of PEFT's `PeftType` enum.

    `PeftType` is a closed ``str`` enum, so an out-of-tree method cannot add a member; a plain string works as a key of
    PEFT's lookup tables and compares equal to ``"QST"`` read back from ``adapter_config.json``. PEFT, transformers
    and TRL also read ``peft_type.value`` (error messages, transformers' adapter loading, hotswapping) and parse
    ``str(peft_type)`` as ``"PeftType.NAME"`` (``get_model_status``, TRL's teacher sync); a bare string broke both
    (``'str' object has no attribute 'value'``; ``peft_types={'default': ''}``). It is written to JSON as ``"QST"``.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"

    def __repr__(self) -> str:
        return f"<PeftType.{self.value}: {self.value!r}>"

    def __reduce__(self):
        return (QSTPeftType, (self.value,))


PEFT_TYPE = QSTPeftType("QST")

DOWNSAMPLE_KINDS = ("adapter", "linear", "lora", "maxpool", "avgpool")
SIDE_DTYPES = ("float32", "bfloat16", "float16")
INIT_KINDS = ("random", "pruned")
#: the ``task_type`` values QST supports (PEFT's, less ``"SEQ_2_SEQ_LM"``: encoder-decoder models are refused)
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

#: values of ``side_linear_heads`` (see QSTConfig)
SIDE_LINEAR_HEADS = ("divided", "backbone")
#: values of ``side_inner_widths`` (see QSTConfig)
SIDE_INNER_WIDTHS = ("divided", "backbone")
#: ``side_heads`` value that picks the head count from the model (see QSTConfig)
AUTO = "auto"


def _activation_names() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted(ACT2FN.keys())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: ``base_model_signature`` entries (see ``peft_qst.signature.model_signature``) that name a model type
_SIGNATURE_TYPES = ("model_type", "text_model_type")
#: its entries that count something (``intermediate_size`` may also be a list: one FFN width per layer)
_SIGNATURE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "vocab_size", "state_size", "num_heads", "n_groups")
#: the entries every version recorded: a signature without them checks nothing of the model it is loaded onto
_SIGNATURE_REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")


#: the entries of a ``base_model_fingerprint`` that are not sampled values: the rows they were drawn from, and the
#: ``name_or_path`` of the checkpoint they were read from (PEFT keeps an adapter's first ``base_model_name_or_path``
#: when it is loaded onto another checkpoint and saved again, while the fingerprint then describes that other one)
FINGERPRINT_METADATA = ("rows", "name_or_path")


def _fingerprint_problem(fingerprint: Any) -> Optional[str]:
    """What is wrong with a ``base_model_fingerprint`` (None where nothing is): ``{"rows": int, "name_or_path": str,
    kind: [[row, column, value], ...], ...}`` (see ``peft_qst.fingerprint.base_model_fingerprint``)."""
    if not isinstance(fingerprint, dict):
        return f"it is {fingerprint!r} (of type {type(fingerprint).__name__}) where a dict is expected"
    for kind, entries in fingerprint.items():
        if kind == "rows":
            if not (_is_int(entries) and entries > 0):
                return f"its rows is {entries!r}, where a positive int is expected"
        elif kind == "name_or_path":
            if not isinstance(entries, str):
                return f"its name_or_path is {entries!r}, where a string is expected"
        elif not isinstance(entries, list) or not all(
            isinstance(entry, list) and len(entry) == 3 and _is_int(entry[0]) and _is_int(entry[1])
            and entry[0] >= 0 and entry[1] >= 0 and _is_number(entry[2])
            for entry in entries
        ):
            return f"its {kind} is not a list of [row, column, value] entries"
    return None


def _signature_problem(signature: Any) -> Optional[str]:
    """What is wrong with a ``base_model_signature`` (None where nothing is). Loading compares it entry by entry with
    the model's own, so a value of another type than ``get_peft_model`` records never matches (the string ``"64"``
    against 64 was refused as "hidden_size 64 against 64"), and a signature without its entries compares nothing (an
    empty one loaded onto any model)."""
    if not isinstance(signature, dict):
        return (f"it is {signature!r} (of type {type(signature).__name__}) where a dict of the base model's type and "
                "sizes is expected (e.g. {'model_type': 'llama', 'hidden_size': 4096, 'num_hidden_layers': 32, ...})")
    missing = [name for name in _SIGNATURE_REQUIRED if name not in signature]
    if missing:
        return f"it lacks {', '.join(missing)}, which every QST adapter records"
    if signature.get("sizes_of", "decoder") != "decoder":
        return (f"its sizes_of is {signature['sizes_of']!r} where \"decoder\" is expected (recorded where the model's "
                "config maps its sizes to the encoder's: they are its decoder's)")
    for name in _SIGNATURE_TYPES:
        if name in signature and not isinstance(signature[name], str):
            return (f"its {name} is {signature[name]!r} (of type {type(signature[name]).__name__}) where a model type "
                    "(a string, e.g. \"llama\") is expected")
    for name in _SIGNATURE_SIZES:
        value = signature.get(name)
        # the type alone: a size of another value is another model, which loading reports as a difference
        per_layer = name == "intermediate_size" and isinstance(value, list) and value
        if name in signature and not (_is_int(value) and value >= 0) and not (
            per_layer and all(_is_int(v) and v >= 0 for v in value)
        ):
            expected = "an integer" + (" (or a list of them, one per layer)" if name == "intermediate_size" else "")
            return f"its {name} is {value!r} (of type {type(value).__name__}) where {expected} is expected"
    per_layer = signature.get("per_layer_sizes", {})
    if not isinstance(per_layer, dict) or not all(
        isinstance(name, str) and isinstance(values, list) and all(_is_layer_size(v) for v in values)
        for name, values in per_layer.items()
    ):
        return (f"its per_layer_sizes is {per_layer!r} where a dict of sizes set per layer, each a list of one integer "
                "(or None) per layer, is expected (e.g. {'head_dim': [256, 512]})")
    return None


def _is_layer_size(value: Any) -> bool:
    """Whether ``value`` is one layer's entry of a signature's ``per_layer_sizes``: an integer, None (a layer without
    the size), or a list of integers (a layer's own list of widths)."""
    if isinstance(value, list):
        return all(_is_int(v) and v >= 0 for v in value)
    return value is None or (_is_int(value) and value >= 0)


def checked_side_dtype(side_dtype):
    """``QSTConfig.side_dtype`` as the config keeps it: a torch dtype (``torch.bfloat16``, as transformers' ``dtype=``
    takes it) as its name, so that ``adapter_config.json`` stays JSON; a value that is none of ``SIDE_DTYPES`` (nor
    None) is refused naming them."""
    if isinstance(side_dtype, torch.dtype):
        side_dtype = str(side_dtype).removeprefix("torch.")
    if side_dtype is not None and side_dtype not in SIDE_DTYPES:
        raise ValueError(
            f"QSTConfig.side_dtype={side_dtype!r} is invalid: choose one of {', '.join(SIDE_DTYPES)} (or the torch "
            "dtype), or None to follow the model's compute dtype."
        )
    return side_dtype


@dataclass
class QSTConfig(PeftConfig):
    """Configuration of a QST (Quantized Side Tuning, Zhang et al., ACL 2024) adapter.

    The pretrained model (4-bit or not) runs frozen under ``torch.no_grad()``. A small *side network* — one block per
    backbone block, built from the model's own transformers classes with hidden and FFN sizes divided by ``r`` —
    reads every backbone hidden state through a downsampler and a learnable gate, and its output is upsampled and
    gated into the backbone's final hidden state, in front of the model's own frozen LM head. Only the side network
    is trained and saved. The hidden states are those of transformers' ``output_hidden_states``: the embedding
    output, then each block's output, the last one after the trunk's final norm (the state the side output is added
    to; the paper's reference code feeds the last side block the last block's output before that norm).

    Use it wherever a `LoraConfig` would go: ``get_peft_model(model, QSTConfig(task_type="CAUSAL_LM"))``, or
    ``SFTTrainer(..., peft_config=QSTConfig(...))``. Learning rate: start at 1e-3 (AdamW), as the project's quality
    harness and examples train the side network (1e-3 to 2e-3); on the harness 3e-3 was no better, and 5e-4 and
    QLoRA's common 2e-4 were worse (README, "Learning rate").

    Args:
        r (`int`): Reduction factor. The side network's hidden and FFN sizes are the backbone's divided by ``r``; the
            number of attention heads is set by ``side_heads``. ``r`` must divide the model's hidden size into whole
            heads (of an even dimension, for rotary models); `get_peft_model` lists the values that fit when one does
            not. Paper default: 16.
        side_heads (`int`, `"auto"` or None): Number of attention heads of the side blocks. ``"auto"`` (the
            default): the head count whose head dimension is closest to the backbone's, by ratio (heads about as wide
            as the backbone's, as LST's structural pruning keeps whole heads): 1 head of dimension 36 for SmolLM2-135M
            at r=16, 2 heads of 128 for LLaMA-2-7B; where the model's own class refuses that side network or it does
            not run (DiffLlama's even key/value heads), the other counts that fit ``r`` are tried in the same order,
            the backbone's own last. `get_peft_model` writes the number it chose into the config, so a saved adapter
            records it. None: the backbone's own numbers of attention and key/value heads, as in the paper's
            reference code, so the head dimension is the backbone's divided by ``r`` (4 for SmolLM2 at r=16).
            Measured on SmolLM2-135M (docs/performance.md): the same accuracy and eval loss as the paper's layout
            within what a seed moves (three seeds), and a training step 16% shorter on a 2-core CPU (attention at
            head dimension 4 costs far more than its arithmetic). The key/value heads keep the backbone's grouping
            where it divides (else one). A number must divide the side hidden size ``d / r``. `init="pruned"` keeps
            the backbone's heads: ``"auto"`` then means None, and any other count is refused.
        side_linear_heads (`str`): The linear-attention (Gated DeltaNet) heads of the side blocks, for models that
            have them (Qwen3-Next, Qwen3.5, OLMo-Hybrid, Qwen4-Exp). ``"divided"`` (the default): the model's key and
            value head counts divided by r (at least one key head, as many value heads per key head as the model's),
            their widths kept, as for attention heads. ``"backbone"``: the model's counts, so the side blocks' linear
            attention is as wide as the model's and its recurrent state as large (an ``adapter_config.json`` written
            before this option existed loads so, as it was trained). Ignored for other models.
        side_inner_widths (`str`): Widths inside the side blocks that do not follow the hidden size, for the models
            that have them: the hyper-connection mixing rank (Qwen4-Exp's ``hc_lowrank``), the query heads of a
            sparse-attention indexer (Qwen4-Exp's ``indexer_n_heads``), the rank of a Mamba mixer's time-step
            projection (Jamba's and Zamba's ``mamba_dt_rank``), the LAuReL rank (Gemma 3n's ``laurel_rank``) and
            Nemotron-H's Mamba head width and groups (``mamba_head_dim``, ``n_groups``). ``"divided"`` (the default):
            divided by r (head and group counts: heads kept narrower, or counts divided, as for attention heads).
            ``"backbone"``: the model's, so these parts of the side blocks are as wide as the backbone's (an
            ``adapter_config.json`` written before this option existed loads so, as it was trained). Ignored for
            other models.
        downsample (`str`): How each backbone hidden state (width d) is brought down to the side width d/r:
            ``"adapter"`` (the paper's best: Linear d->rank, activation, Linear rank->d/r, LayerNorm),
            ``"lora"`` (Linear d->rank->d/r, no activation), ``"linear"`` (one Linear d->d/r),
            ``"maxpool"`` / ``"avgpool"`` (pool each group of r channels; no trainable parameters).
        downsample_rank (`int`): Bottleneck width of the ``"adapter"`` and ``"lora"`` downsamplers (paper: 16).
        activation (`str`): Activation of the ``"adapter"`` downsampler, any name in transformers' ``ACT2FN``.
        dropout (`float`): Dropout on each downsampled hidden state during training, in [0, 1).
        side_gate_init (`float`): Initial value, in (0, 1), of the per-channel gates of the side recurrence
            ``g = (1 - s) * down(h_i) + s * g``: how much of the side network's own state each block keeps.
            0.9 and 0.98 did not learn better than 0.5 in the quality harness (docs/quality.md). `get_peft_model`
            refuses a value whose gate is exactly 1 or 0 in the side network's dtype (0.999 in bfloat16), where the
            gates and the side blocks' downsamplers would get no gradient; so does the first training forward after
            a cast of the untrained side network to such a dtype (TRL's SFTTrainer casts a quantized model's to bf16).
        output_gate_init (`float`): Initial value of the per-channel output gate ``a`` in
            ``h_out = h_L + a * up(side)``. The upsample ``up`` starts at zero (as LoRA's B matrix does), so the
            adapted model starts exactly at the pretrained model's output whatever ``a`` is, while ``up`` gets a
            full gradient from the first step. With ``a`` at 1 that gradient is not scaled down; zero-initialising
            ``a`` instead (with a random ``up``) scales every gradient into the side network by ``a`` and learned far
            slower in our first trials. Zero itself is refused: with ``up`` at zero too, neither would get a
            gradient; so is, by `get_peft_model`, a value that is zero or infinite in the side network's dtype
            (1e-8 or 1e5 in float16).
        init (`str`): How the side blocks' own weights start. ``"random"`` (the paper): the model's own random
            initialisation. ``"pruned"`` (LST, Sung et al. 2022): each side block starts from the corresponding
            backbone block's weights, keeping the most important residual channels, FFN neurons and per-head
            dimensions by weight magnitude (the criterion is documented in :mod:`peft_qst.pruning`); a 4-bit backbone
            is dequantised one block at a time. Either way the upsample starts at zero, so training starts exactly
            at the pretrained model's output. `get_peft_model` refuses ``"pruned"`` for an architecture whose
            weights it cannot map onto the side blocks, naming the model type.
        copy_heads (`int`): Number of copy heads (0: none, the paper's QST). A copy head attends from each position to
            the earlier tokens of the sequence and adds the *output embeddings* (LM-head rows) of the tokens it
            attends to into the final hidden state: a pointer that can put any prompt token into the answer, which
            the side network's narrow output (a d/r-dimensional subspace) cannot express. Queries and keys are
            computed from the side network's output and the backbone's last hidden states; each head's output gate
            starts at zero, so training still starts exactly at the pretrained output. Needs ``input_ids`` and an
            LM head (``task_type="CAUSAL_LM"``).
        copy_head_dim (`int`): Query/key width of each copy head.
        backbone_lora_layers (`int` or `float`): Number of top backbone blocks that also get low-rank adapters (0:
            none, the paper's QST), or a fraction of the model's depth strictly between 0 and 1 (``2 / 3``: the top
            two thirds, whatever the model's number of blocks), which `get_peft_model` rounds to a whole number of
            blocks (at least one) and writes into the config, so the saved adapter records the count. Every linear
            layer of the last ``k`` blocks (routers built as linear subclasses, Phi-MoE's and Llama 4's, excepted; a
            plain linear inside a router module is adapted) gets a LoRA delta trained together with the side
            network: full-width changes right before the LM head, which the side network's narrow output cannot make.
            Gradients then enter the backbone above block ``L - k`` only; the blocks below still run
            under ``torch.no_grad()``, so the cost grows with ``k``, not with the model's depth. Measured on
            SmolLM2-135M with the quality harness (docs/quality.md), with ``backbone_lora_r=64``: ``k`` = 16 of 30
            blocks scored 1.3 and 4.6 points below QLoRA at equal steps (two seeds) and 9.6 above it at equal
            wall-clock (one seed); ``k`` = 20 scored 2.1, 0.8 and 7.9 points below and 2.5 above at equal steps (four
            seeds, 2.1 below on their mean) and 7-9 above at equal wall-clock (three seeds); ``k`` = 24 scored 0.9
            points below on the same four seeds' mean and 3-9 above at equal wall-clock (four seeds), where the
            paper's QST (``k`` = 0) stays far below on tasks that copy or compute content from the prompt. Gradient
            checkpointing reaches these blocks too; without it they keep their activations for backward. With
            ``output_router_logits`` (mixture-of-experts models) the routers of these blocks, which route LoRA-adapted
            states and carry a gradient, are balanced in ``aux_loss`` together with the side routers.
        backbone_lora_r (`int`): Rank of those adapters.
        backbone_lora_alpha (`float`): Their scaling numerator (the delta is scaled by alpha / rank, as in LoRA).
        side_dtype (`str`, *optional*): dtype of the side network: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or
            the torch dtype, stored as its name).
            Default (None): the model's compute dtype (``bnb_4bit_compute_dtype`` for a bitsandbytes 4-bit model,
            else the model's dtype), float32 where that is float16 (float16 weights do not train under fp16 mixed
            precision's gradient scaler).
        target_modules (`str`, *optional*): Name of the decoder trunk to wrap. Found automatically
            (``model.get_decoder()``); set it only for a model where that fails. Not LoRA's list of layers:
            `get_peft_model` refuses a value left over from a `LoraConfig` (``"all-linear"``, ``["q_proj",
            "v_proj"]``), which names no trunk.
        modules_to_save (`list[str]`, *optional*): Modules outside the decoder trunk to train and save besides the
            side network, e.g. an LM head (``["lm_head"]``) or a classification head (set automatically for
            ``task_type`` ``"SEQ_CLS"``, ``"TOKEN_CLS"`` and ``"QUESTION_ANS"``). Modules inside the trunk
            (embeddings, norms) are refused: the trunk runs frozen under ``torch.no_grad()``. Each entry matches
            the modules whose names end with it (as PEFT matches them); one that matches no module (a typo) is
            refused by `get_peft_model`, naming close module names: PEFT would skip it, training nothing for it.
        trainable_token_indices (`list[int]` or `dict`, *optional*): LoRA's option for training the embeddings of
            some tokens, which TRL sets when its chat-template cloning adds tokens. Ignored with a warning: the token
            embeddings lie inside the decoder trunk, which runs frozen; added tokens keep their initial embeddings.
        base_model_signature (`dict`, *optional*): Filled in by `get_peft_model`: the model type, hidden size,
            number of layers, attention and key/value heads, head dimension, FFN width and vocabulary size of the
            model the adapter was built for (of the decoder where the config maps them to the encoder's, as
            Whisper's and the BART family's do: ``"sizes_of": "decoder"``). Loading refuses a model that differs in
            any of them.
        adapter_weights_sha256 (`str`, *optional*): Filled in by `save_pretrained`: a digest of the saved weights,
            checked when they are loaded so that a corrupt file fails loudly.
        base_model_fingerprint (`dict`, *optional*): Filled in by `save_pretrained`: sampled entries of the base
            model's token embeddings (and untied LM head); loading warns where the model's differ (another
            checkpoint of the same architecture and sizes).
        peft_qst_version (`str`, *optional*): Filled in by `save_pretrained`: the peft-qst version that wrote the
            file. Loading warns when it is newer than the installed version, whose reading of the file may differ.
    """

    r: int = field(default=16, metadata={"help": "Reduction factor of the side network's hidden and FFN sizes."})
    side_heads: Optional[Union[int, str]] = field(
        default="auto",
        metadata={
            "help": "Attention heads of the side blocks; 'auto': heads about as wide as the backbone's, None: the "
            "backbone's head count (the paper)."
        },
    )
    side_linear_heads: str = field(
        default="divided",
        metadata={
            "help": "Linear-attention (Gated DeltaNet) heads of the side blocks: 'divided' (the model's counts / r) or "
            "'backbone' (the model's counts, as adapters saved before this option existed have)."
        },
    )
    side_inner_widths: str = field(
        default="divided",
        metadata={
            "help": "Widths inside the side blocks that do not follow the hidden size (hc_lowrank, indexer heads, "
            "mamba_dt_rank, laurel_rank, Nemotron-H's Mamba heads): 'divided' (by r) or 'backbone' (the model's, as "
            "adapters saved before this option existed have)."
        },
    )
    downsample: str = field(
        default="adapter", metadata={"help": f"Downsampler of each hidden state, one of {DOWNSAMPLE_KINDS}."}
    )
    downsample_rank: int = field(default=16, metadata={"help": "Bottleneck width of 'adapter'/'lora' downsamplers."})
    activation: str = field(default="silu", metadata={"help": "Activation of the 'adapter' downsampler."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on downsampled hidden states, in [0, 1)."})
    side_gate_init: float = field(default=0.5, metadata={"help": "Initial side-recurrence gate value, in (0, 1)."})
    output_gate_init: float = field(default=1.0, metadata={"help": "Initial per-channel output gate value."})
    init: str = field(
        default="random", metadata={"help": f"Initialisation of the side blocks, one of {INIT_KINDS}."}
    )
    copy_heads: int = field(default=0, metadata={"help": "Number of copy heads (0: none, the paper's QST)."})
    copy_head_dim: int = field(default=32, metadata={"help": "Query/key width of each copy head."})
    backbone_lora_layers: Union[int, float] = field(
        default=0,
        metadata={
            "help": "Number of top backbone blocks with low-rank adapters (0: none), or a fraction of the depth in "
            "(0, 1)."
        },
    )
    backbone_lora_r: int = field(default=16, metadata={"help": "Rank of the backbone low-rank adapters."})
    backbone_lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator of those adapters."})
    side_dtype: Optional[str] = field(
        default=None, metadata={
            "help": f"dtype of the side network, one of {SIDE_DTYPES}; None: the compute dtype (float32 for float16)."
        }
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the decoder trunk to wrap; found automatically when None."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. a classification head."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "LoRA's option for training the embeddings of some tokens (TRL sets it when it adds chat tokens); "
            "ignored with a warning: the embeddings lie in the frozen trunk."
        },
    )
    base_model_signature: Optional[dict] = field(
        default=None, metadata={"help": "Set by get_peft_model: the base model this adapter fits."}
    )
    adapter_weights_sha256: Optional[str] = field(
        default=None, metadata={"help": "Set by save_pretrained: digest of the saved adapter weights."}
    )
    # beside base_model_signature, not in it: every entry of the signature must match, so a key there would make
    # earlier versions (and the comparison) refuse a file that has it; an unknown top-level key is dropped with PEFT's
    # warning by an earlier version
    base_model_fingerprint: Optional[dict] = field(
        default=None, metadata={
            "help": "Set by save_pretrained: sampled entries of the base model's token embeddings, to warn when the "
            "adapter is loaded onto another checkpoint of the same shapes."
        }
    )

    peft_qst_version: Optional[str] = field(
        default=None, metadata={"help": "Set by save_pretrained: the peft-qst version that wrote the file."}
    )

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Called by ``from_pretrained`` on the attributes read from an ``adapter_config.json``. A file written
        before ``side_heads`` existed has no such key: its side blocks have the model's heads (None), not what
        today's default would choose; one written before ``side_linear_heads`` existed has side blocks with the
        model's linear-attention heads (``"backbone"``), and one written before ``side_inner_widths`` existed has side
        blocks with the model's inner widths (``"backbone"``). One written for a model whose config maps its sizes to
        the encoder's (BART's family, Whisper) before QST read the decoder's has side blocks with the decoder's heads
        whatever its ``side_heads`` says (None; see ``peft_qst.side_config.signature_predates_decoder_sizes``)."""
        from .side_config import signature_predates_decoder_sizes

        kwargs = super().check_kwargs(**kwargs)
        if "side_heads" not in kwargs or signature_predates_decoder_sizes(kwargs.get("base_model_signature")):
            kwargs["side_heads"] = None
        if "side_linear_heads" not in kwargs:
            kwargs["side_linear_heads"] = "backbone"
        if "side_inner_widths" not in kwargs:
            kwargs["side_inner_widths"] = "backbone"
        return kwargs

    def __post_init__(self):
        # before PEFT's own check, whose "Invalid task type: 'causal_lm'" named neither the field nor (read from an
        # adapter_config.json) the file
        self._validate_task_type()
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._validate()

    def _validate_task_type(self) -> None:
        task_type = getattr(self.task_type, "value", self.task_type)
        if task_type == "SEQ_2_SEQ_LM":
            # PEFT would wrap a decoder-only model in PeftModelForSeq2SeqLM without a word, and the adapter saved from
            # it names AutoModelForSeq2SeqLM, which cannot load a decoder-only base model
            raise ValueError(
                "QSTConfig.task_type='SEQ_2_SEQ_LM' is invalid: QST side-tunes decoder-only models, and "
                "encoder-decoder models (T5, BART, ...) are not supported. For a decoder-only model use "
                "task_type='CAUSAL_LM' (or 'SEQ_CLS', 'TOKEN_CLS', 'QUESTION_ANS', 'FEATURE_EXTRACTION'); for an "
                "encoder-decoder model use LoRA."
            )
        if task_type is not None and task_type not in TASK_TYPES:
            near = task_type.strip().upper() if isinstance(task_type, str) else None
            hint = f" (PEFT matches the name exactly: did you mean {near!r}?)" if near in TASK_TYPES else ""
            raise ValueError(
                f"QSTConfig.task_type={task_type!r} is invalid{hint}: choose one of "
                f"{', '.join(repr(name) for name in TASK_TYPES)} (a causal LM: 'CAUSAL_LM'), or None."
            )

    def _validate(self) -> None:
        if not _is_int(self.r) or self.r < 1:
            raise ValueError(
                f"QSTConfig.r={self.r!r} is invalid: r is the reduction factor of the side network and must be a "
                "positive integer (paper default 16)."
            )
        if self.side_linear_heads not in SIDE_LINEAR_HEADS:
            raise ValueError(
                f"QSTConfig.side_linear_heads={self.side_linear_heads!r} is invalid: it must be one of "
                f"{SIDE_LINEAR_HEADS} ('divided': the model's linear-attention head counts divided by r, the default; "
                "'backbone': the model's counts, as adapters saved before this option existed have)."
            )
        if self.side_inner_widths not in SIDE_INNER_WIDTHS:
            raise ValueError(
                f"QSTConfig.side_inner_widths={self.side_inner_widths!r} is invalid: it must be one of "
                f"{SIDE_INNER_WIDTHS} ('divided': the side blocks' inner widths divided by r, the default; 'backbone': "
                "the model's, as adapters saved before this option existed have)."
            )
        if self.side_heads not in (None, AUTO) and (not _is_int(self.side_heads) or self.side_heads < 1):
            raise ValueError(
                f"QSTConfig.side_heads={self.side_heads!r} is invalid: it must be a positive integer (the side blocks' "
                f"number of attention heads), {AUTO!r} (heads about as wide as the model's) or None (the model's "
                "head count)."
            )
        if self.downsample not in DOWNSAMPLE_KINDS:
            raise ValueError(
                f"QSTConfig.downsample={self.downsample!r} is invalid: choose one of {', '.join(DOWNSAMPLE_KINDS)}."
            )
        if not _is_int(self.downsample_rank) or self.downsample_rank < 1:
            raise ValueError(
                f"QSTConfig.downsample_rank={self.downsample_rank!r} is invalid: it must be a positive integer "
                "(paper default 16)."
            )
        activations = _activation_names()
        if self.activation not in activations:
            raise ValueError(
                f"QSTConfig.activation={self.activation!r} is invalid: choose one of {', '.join(activations)}."
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"QSTConfig.dropout={self.dropout!r} is invalid: it must be a number in [0, 1).")
        if not _is_number(self.side_gate_init) or not 0.0 < self.side_gate_init < 1.0:
            raise ValueError(
                f"QSTConfig.side_gate_init={self.side_gate_init!r} is invalid: it must be a number strictly between "
                "0 and 1 (it is a sigmoid gate's initial value)."
            )
        if not _is_number(self.output_gate_init) or self.output_gate_init == 0:
            # zero is a saddle point: the output is a * up(side) with up starting at zero, so the gradient of a
            # (up(side)) and that of up (scaled by a) are both zero: that path never trains (without copy heads or
            # backbone LoRA, the only way the side network reaches the output)
            raise ValueError(
                f"QSTConfig.output_gate_init={self.output_gate_init!r} is invalid: it must be a finite, nonzero "
                "number (default 1.0). The side network's output is gated as a * up(side) with the upsample up "
                "starting at zero, so with the gate a at zero too neither gets a gradient: that output never "
                "trains."
            )
        if self.init not in INIT_KINDS:
            raise ValueError(
                f"QSTConfig.init={self.init!r} is invalid: choose \"random\" (the paper's random side blocks) or "
                "\"pruned\" (side blocks start from the backbone's weights, pruned to the side width)."
            )
        if not _is_int(self.copy_heads) or self.copy_heads < 0:
            raise ValueError(
                f"QSTConfig.copy_heads={self.copy_heads!r} is invalid: it must be a non-negative integer (0: no copy "
                "heads)."
            )
        if not _is_int(self.copy_head_dim) or self.copy_head_dim < 1:
            raise ValueError(
                f"QSTConfig.copy_head_dim={self.copy_head_dim!r} is invalid: it must be a positive integer."
            )
        layers = self.backbone_lora_layers
        whole = _is_int(layers) and layers >= 0
        fraction = isinstance(layers, float) and 0 < layers < 1
        if not (whole or fraction):
            raise ValueError(
                f"QSTConfig.backbone_lora_layers={layers!r} is invalid: give a non-negative integer (the number of top "
                "backbone blocks with low-rank adapters; 0: none) or a fraction of the model's depth strictly between "
                "0 and 1 (e.g. 0.5 for the top half)."
            )
        if not _is_int(self.backbone_lora_r) or self.backbone_lora_r < 1:
            raise ValueError(
                f"QSTConfig.backbone_lora_r={self.backbone_lora_r!r} is invalid: it must be a positive integer."
            )
        if not _is_number(self.backbone_lora_alpha) or self.backbone_lora_alpha <= 0:
            raise ValueError(
                f"QSTConfig.backbone_lora_alpha={self.backbone_lora_alpha!r} is invalid: it must be a positive number."
            )
        self.side_dtype = checked_side_dtype(self.side_dtype)
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, (list, tuple, set))
            and all(isinstance(name, str) and name.strip() for name in self.modules_to_save)
        ):
            # a bare string reached PEFT, which matches each of its characters as a module name ("lm_head": every
            # module whose name ends in "l", the wrapped trunk "model" among them) and failed with "modules_to_save
            # cannot be applied to modules of type QSTLayer"; an empty name, a suffix of every module name, failed
            # so too; other values failed deeper still
            example = [self.modules_to_save] if isinstance(self.modules_to_save, str) else ["lm_head"]
            raise ValueError(
                f"QSTConfig.modules_to_save={self.modules_to_save!r} is invalid: give a list of module names "
                "(non-empty strings), e.g. "
                f"modules_to_save={example!r}, or None."
            )
        if self.target_modules is not None and not (
            isinstance(self.target_modules, str)
            or (isinstance(self.target_modules, (list, set)) and all(isinstance(n, str) for n in self.target_modules))
        ):
            # a list holding a non-string failed inside PEFT with "'int' object has no attribute 'split'"
            raise ValueError(
                f"QSTConfig.target_modules={self.target_modules!r} is invalid: give the name of the decoder trunk "
                "(a string, or a list of module names), or None to find it automatically."
            )
        if not isinstance(self.inference_mode, bool):
            # any truthy value ("false" read from a hand-edited file among them) froze the adapter: nothing trained
            raise ValueError(
                f"QSTConfig.inference_mode={self.inference_mode!r} is invalid: give True (the adapter frozen, for "
                "inference) or False (trainable, the default)."
            )
        digest = self.adapter_weights_sha256
        if digest is not None and not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
            # loading compared it with the weights' digest and blamed the weights file ("corrupt or replaced")
            raise ValueError(
                f"QSTConfig.adapter_weights_sha256={digest!r} is invalid: it is the SHA-256 digest (64 hexadecimal "
                "digits) of the adapter weights that save_pretrained records beside them, and loading checks the "
                "weights against it, so another value means an adapter_config.json edited by hand or damaged: "
                "restore the file from where the adapter came from, or save the adapter again. Building a "
                "QSTConfig yourself, leave it None."
            )
        fingerprint_problem = (
            None if self.base_model_fingerprint is None else _fingerprint_problem(self.base_model_fingerprint)
        )
        if fingerprint_problem:
            raise ValueError(
                f"QSTConfig.base_model_fingerprint is invalid: {fingerprint_problem}. save_pretrained records it "
                "(sampled entries of the base model's token embeddings, as [row, column, value]) and loading compares "
                "it with the model the adapter is loaded onto, so another value means an adapter_config.json edited "
                "by hand or damaged: restore the file, delete the entry (nothing is compared then), or save the "
                "adapter again. Building a QSTConfig yourself, leave it None."
            )
        self._check_writer_version()
        problem = None if self.base_model_signature is None else _signature_problem(self.base_model_signature)
        if problem is not None:
            raise ValueError(
                f"QSTConfig.base_model_signature is invalid: {problem}. It records the base model the adapter was "
                "made on (get_peft_model fills it in, save_pretrained writes it to adapter_config.json) and loading "
                "checks the model against it, so a value get_peft_model does not write means an adapter_config.json "
                "edited by hand or damaged: restore the file from where the adapter came from, or save the adapter "
                "again (PeftModel.save_pretrained) from the model it was trained with. Building a QSTConfig yourself, "
                "leave it None. Nothing was loaded."
            )

    def _check_writer_version(self) -> None:
        """Refuse a ``peft_qst_version`` that is not a version, and warn when the file was written by a newer
        peft-qst than the installed one: PEFT drops (with its warning) options this version does not know, and a
        newer version may read or save a field in a way this one does not, so the adapter may not load as it was
        saved."""
        from packaging.version import InvalidVersion, Version

        from . import __version__
        from .serialization import user_stacklevel

        written = self.peft_qst_version
        if written is None:
            return
        try:
            newer = Version(written) > Version(__version__)
        except (InvalidVersion, TypeError):
            raise ValueError(
                f"QSTConfig.peft_qst_version={written!r} is invalid: save_pretrained records there the peft-qst "
                "version (e.g. '0.1.0') that wrote the adapter, so another value means an adapter_config.json edited "
                "by hand or damaged: restore the file, or delete the entry. Building a QSTConfig yourself, leave it "
                "None."
            ) from None
        if newer:
            warnings.warn(
                f"This QST adapter was saved by peft-qst {written}, newer than the installed peft-qst {__version__}: "
                "options or formats added since may be read differently or dropped (PEFT warns of the keys it "
                "drops). Upgrade peft-qst (pip install -U peft-qst) to load it as it was saved.",
                # the user's line that loaded (a fixed count named QSTConfig.__post_init__, inside this package)
                stacklevel=user_stacklevel(),
            )

    # ---------------------------------------------------------------------------------------------------------------
    # saving and loading
    # ---------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json``; when the adapter's weights were just written beside it (as
        ``PeftModel.save_pretrained`` does, weights first), record their digest so that loading can detect a
        corrupt file, and warn when they hold NaN or infinite values (a diverged run)."""
        import json
        import os

        from peft.utils import CONFIG_NAME

        from safetensors.torch import load_file

        from . import __version__
        from .serialization import SAFETENSORS_NAME, warn_if_not_finite, weights_digest

        super().save_pretrained(save_directory, **kwargs)
        # the digest describes the weights beside this file, never a digest carried over in memory from a folder
        # this config was once read from
        weights_path = os.path.join(save_directory, SAFETENSORS_NAME)
        config_path = os.path.join(save_directory, CONFIG_NAME)
        with open(config_path) as handle:
            saved = json.load(handle)
        saved["adapter_weights_sha256"] = None
        saved["peft_qst_version"] = __version__
        if os.path.isfile(weights_path):
            tensors = load_file(weights_path)
            saved["adapter_weights_sha256"] = weights_digest(tensors)
            warn_if_not_finite(tensors, f"saved to {weights_path}", "They were saved as they are.")
        with open(config_path, "w") as handle:
            handle.write(json.dumps(saved, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config; for a local folder, first make sure its weights are safetensors and readable."""
        import os

        from .serialization import check_adapter_folder

        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isdir(folder):
            check_adapter_folder(folder)
        # a value _validate refuses is reported naming the file by PEFT's from_pretrained, which this calls
        # (peft_qst.registration._name_the_file_in_config_refusals)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def _refuse_lora_options(dataclass_init):
    """``QSTConfig``'s constructor, refusing LoRA's options by name. A QLoRA script switched to QST by renaming
    ``LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, bias="none", ...)`` got Python's bare "unexpected keyword
    argument 'lora_alpha'", which names the problem but not the fix, and says nothing of the option it kept: ``r``,
    LoRA's rank there, is the side network's reduction factor here."""

    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        own = {f.name for f in dataclasses.fields(QSTConfig)}
        lora_only = sorted(name for name in kwargs if name not in own and name in _lora_option_names())
        if lora_only:
            # worded as Python's own error, which PEFT's loading of a config file written by a newer version looks
            # for to drop the keys it does not know with a warning (a future QST option may share a LoRA name)
            raise TypeError(
                f"QSTConfig got an unexpected keyword argument {lora_only[0]!r}: LoRA options side tuning does not "
                f"have ({', '.join(lora_only)}). QST trains a side "
                "network beside the frozen model, not low-rank updates of its layers: drop them. Note that r is the "
                "side network's reduction factor (hidden and FFN sizes divided by r; 16 by default, the paper's), "
                "not a LoRA rank: leave it out unless you mean that. The optional LoRA on the top blocks "
                "(backbone_lora_layers) takes backbone_lora_r and backbone_lora_alpha."
            )
        dataclass_init(self, *args, **kwargs)

    return __init__


def _lora_option_names() -> set:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


QSTConfig.__init__ = _refuse_lora_options(QSTConfig.__init__)
