"""`QSTModel`: the PEFT tuner that injects Quantized Side Tuning into a transformers model.

It finds the model's decoder trunk, checks that the model and the config fit together (before touching anything), and
replaces the trunk by a :class:`~peft_qst.layer.QSTLayer` (a bare trunk, which is the root model itself, is wrapped
whole: see :data:`ROOT_TRUNK`); :func:`remove_injected_adapters` puts it back. Binding a config to a model compares
the base-model signature it records (:mod:`peft_qst.signature`). On loading, the tuner maps a saved adapter's weights
onto its side network and refuses those whose names, shapes or kinds do not fit. The other checks of a saved adapter
have modules of their own: the base model's weights (:mod:`peft_qst.fingerprint`), its token embeddings and
vocabulary (:mod:`peft_qst.vocabulary`), the file and config against the adapter they load into
(:mod:`peft_qst.adapter_checks`), the state a load in progress shares (:mod:`peft_qst.loading`) and the weights'
digest (:mod:`peft_qst.serialization`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from .adapter_checks import foreign_tensors, refuse_foreign_tensors
from .backbone_lora import is_time_step_delta, resolve_backbone_lora_layers
from .bnb_compat import keep_4bit_weights_through_state_dict, route_4bit_layers_by_mode, stop_routing_4bit_layers
from .config import AUTO, QSTConfig, checked_side_dtype
from .fingerprint import base_model_fingerprint, original_vocabulary_rows
from .layer import (
    BASE_ADAPTER_NAME,
    CONTINUOUS_BATCHING_REFUSAL,
    SIDE_ATTR,
    QSTLayer,
    layers_holding,
    model_class_name,
)
from .lm_head import install_lm_head_hooks, uninstall_lm_head_hooks
from .loading import (
    keep_weights_saved_in_float32,
    keeps_float32_weights,
    loading_adapter,
    reading_saved_adapter,
    with_peft_model_prefix,
)
from .loss import install_chunked_loss, uninstall_chunked_loss
from .modules_to_save import (
    TASK_HEADS,
    check_modules_to_save_before_trunk,
    check_modules_to_save_match,
    check_modules_to_save_outside,
    check_modules_to_save_unquantized,
    modules_to_save_entries,
    names_an_entry,
)
from .per_call import call_state, held_call_state
from .serialization import QSTAdapterFileError, user_stacklevel
from .side import QSTUnsupportedModelError, check_gate_inits_fit, find_layer_list, is_unreached_part
from .side_config import (
    auto_side_head_candidates,
    block_count_attribute,
    decoder_attribute,
    global_size,
    is_state_space_model,
    num_blocks,
    resolve_side_heads,
    shrink_config,
    side_head_counts,
    unsupported_blocks_reason,
    unsupported_reason,
)
from .signature import model_signature, signature_differences, text_config_of
from .vocabulary import saved_adapter_copies_of_embeddings, token_embeddings_named_as_in


#: the QSTConfig fields get_peft_model fills in for the model it binds the config to
_BOUND_FIELDS = ("base_model_signature", "target_modules", "side_heads", "backbone_lora_layers")
#: the model tags QST adds (they end up in the model cards PEFT and the trainers write), and the model attribute that
#: keeps (the tags QST added, whether the model had tags of its own) so that undoing the injection takes them off again
_QST_TAGS = ("qst", "peft-qst")
_TAGS_ADDED = "_qst_tags_added"
#: where a bound config keeps those fields as they were before binding (an instance attribute, never saved)
_AS_WRITTEN = "_qst_as_written"
#: whether a PEFT task class wraps the model a tuner adapts (a tuner attribute; False for inject_adapter_in_model)
_TASK_CLASS_WRAPS = "_qst_task_class_wraps"


#: ``target_modules`` of an adapter on a bare decoder trunk (as ``AutoModel`` loads it, for
#: task_type="FEATURE_EXTRACTION"). PEFT injects by replacing a child module and never targets the root model, which
#: such a trunk is; so the tuner wraps the root itself in a QSTLayer (``PeftModel.base_model.model``) and PEFT targets
#: the wrapped trunk by its name there. The value also tells such an adapter apart from one saved from a model with a
#: head around the trunk (target_modules="model"), whose saved weight names and head modules differ.
ROOT_TRUNK = "base_layer"


def is_bare_trunk(model: nn.Module) -> bool:
    """Whether ``model`` is itself a decoder trunk (it takes inputs_embeds and holds no module that does), or the
    QSTLayer the tuner wrapped such a trunk in."""
    if isinstance(model, QSTLayer):
        return True
    return _takes_inputs_embeds(model) and not any(
        _takes_inputs_embeds(module) for module in model.modules() if module is not model
    )


def find_trunk_name(model: nn.Module) -> str:
    """Module name of the decoder trunk to wrap (an already wrapped one counts) in a model with a head around its
    trunk. A bare trunk (:func:`is_bare_trunk`), the model itself, is not looked up here:
    :meth:`QSTModel._bind_config_to_model` wraps it as ``ROOT_TRUNK`` before it would call this."""
    for name, module in model.named_modules():
        if isinstance(module, QSTLayer):
            return name
    get_decoder = getattr(model, "get_decoder", None)
    trunk = get_decoder() if callable(get_decoder) else None
    if trunk is None or trunk is model or not _takes_inputs_embeds(trunk):
        # transformers' get_decoder() returns the model itself for some (Llama 4, Mllama: their base_model_prefix
        # names no attribute) and an output projection named "decoder" for others (ModernBERT-decoder): then the
        # trunk is the model's base model under one of the usual names
        names = (getattr(model, "base_model_prefix", ""), "model", "transformer")
        candidates = [getattr(model, name, None) for name in names]
        trunk = next(
            (c for c in candidates if isinstance(c, nn.Module) and c is not model and _takes_inputs_embeds(c)), trunk
        )
    if trunk is None or trunk is model:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise QSTUnsupportedModelError(
            f"QST cannot find the decoder trunk of this {model_type} model ({type(model).__name__}): QST wraps the "
            "module that maps embeddings to the final hidden state (model.get_decoder()). Pass a *ForCausalLM or "
            "*ForSequenceClassification model, or set QSTConfig(target_modules=<trunk module name>)."
        )
    for name, module in model.named_modules():
        if module is trunk:
            return name
    raise QSTUnsupportedModelError(
        f"The decoder trunk of {type(model).__name__} (model.get_decoder()) is not one of its submodules, so QST "
        "cannot put the side network in its place. Set QSTConfig(target_modules=<trunk module name>)."
    )


#: composite (multimodal) model types whose language model QST side-tunes, each checked end to end with images
#: (tests/test_multimodal.py). Their composite model merges the image features into ``inputs_embeds`` and calls its
#: language model on them (with the 1-D positions of a text model, or the multimodal rotary positions of Qwen2-VL,
#: Qwen3-VL, Qwen3.5 and GLM-4.1V, which the side trunk, of the same class, is handed too); the side network reads that
#: trunk's hidden states, so it sees the image (and video) tokens; the side output is added to the trunk's final hidden
#: state, before the composite model's LM head. Qwen3-VL's language model also adds visual features to its hidden
#: states after its first blocks (deepstack): the side network reads them in the backbone states that follow, and its
#: trunk is not handed them (``peft_qst.layer._BACKBONE_ONLY_KWARGS``).
#: Fuyu has no vision tower: it projects its image patches linearly into ``inputs_embeds``.
SUPPORTED_COMPOSITE_TYPES = (
    "llava", "idefics3", "smolvlm", "paligemma", "gemma3", "mistral3", "qwen2_vl", "qwen2_5_vl", "llava_next",
    "llava_next_video", "llava_onevision", "idefics2", "internvl", "aya_vision", "got_ocr2", "glm4v", "qwen3_vl",
    "qwen3_vl_moe", "lfm2_vl", "qwen3_5", "qwen3_5_moe", "vipllava", "video_llava", "deepseek_vl", "cohere2_vision",
    "glm4v_moe", "llava_onevision1_5", "janus", "ovis2", "fuyu",
)


#: why some composite types are not among them: their language model takes image inputs beyond inputs_embeds, which
#: a side network reading its hidden states would not follow
_COMPOSITE_REASONS = {
    "mllama": "its language model cross-attends to the vision states in dedicated layers (cross_attention_states)",
    "gemma3n": "its language model, whose several residual streams (AltUp) QST reads as it does gemma3n_text's, takes "
    "per-layer inputs the composite model computes from the token ids and hands in (per_layer_inputs), which a side "
    "network reading its hidden states would not follow; load the language model alone (gemma3n_text)",
}


def _takes_inputs_embeds(module: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _is_causal(model_config, trunk: nn.Module) -> bool:
    """Whether the trunk's attention is causal. BERT-family classes run either way and their config says which
    (``is_decoder``; XLM: ``causal``); other models' attention modules say it with their ``is_causal`` flags (all False:
    an encoder-only model). A config's ``is_decoder=False`` alone does not decide: GPT-NeoX's carries it and is causal;
    where no attention module has a flag (BigBird, RoFormer, Megatron-BERT), it does."""
    if getattr(model_config, "is_decoder", None) is True:
        return True
    if isinstance(getattr(model_config, "causal", None), bool):
        return model_config.causal
    flags = {m.is_causal for m in trunk.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if flags:
        return flags != {False}
    if getattr(model_config, "is_decoder", None) is not False:
        return True
    return _attends_only_backwards(trunk, model_config)


def _attends_only_backwards(trunk: nn.Module, model_config) -> bool:
    """Run the trunk on two 4-token sequences that differ in their last token only: causal attention gives the first
    three positions the same hidden states. Only for the few models whose flags and config leave it open (BERT-style
    models with ``is_decoder=False``, GPT-NeoX-Japanese), in the mode the model is in, with the random state kept."""
    embeddings = trunk.get_input_embeddings() if hasattr(trunk, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":
        return True
    vocab = int(getattr(model_config, "vocab_size", weight.shape[0]) or weight.shape[0])
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]], device=weight.device) % vocab
    outputs = []
    for row in ids:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(0)
            outputs.append(trunk(input_ids=row[None], return_dict=True).last_hidden_state[0, :3].float())
    return torch.allclose(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def _sublayers_per_block(model_config) -> Optional[tuple[str, int]]:
    """Where a config's ``num_hidden_layers`` counts sublayers and another attribute the blocks (LongCat-Flash's
    ``num_layers``: :data:`~peft_qst.side_config.BLOCK_COUNT_ATTRIBUTES`): that attribute and the sublayers per block,
    else None. A signature records ``num_hidden_layers``, which such a config derives and its config.json does not
    hold; the block count is what the user can compare."""
    count = block_count_attribute(model_config)
    if count == decoder_attribute(model_config, "num_hidden_layers"):
        return None
    blocks, sublayers = num_blocks(model_config), getattr(model_config, "num_hidden_layers", None)
    if not isinstance(sublayers, int) or blocks <= 0 or sublayers % blocks:
        return None
    return count, sublayers // blocks


def _layers(count, per_block: Optional[tuple[str, int]], decoder: bool = False) -> str:
    """A recorded ``num_hidden_layers`` as the blocks it stands for (:func:`_sublayers_per_block`) or as layers."""
    if per_block is None or not isinstance(count, int):
        return f"{count} {'decoder ' if decoder else ''}layers"
    name, sublayers = per_block
    blocks = count // sublayers
    return f"{blocks} block{'s' * (blocks != 1)} ({name}={blocks}, num_hidden_layers={count})"


def _describe(signature: dict, per_block: Optional[tuple[str, int]] = None) -> str:
    text = signature.get("text_model_type")
    return (
        f"a {signature.get('model_type')} model"
        + (f" with a {text} language model" if text else "")
        + f" (hidden_size={signature.get('hidden_size')}, "
        f"{_layers(signature.get('num_hidden_layers'), per_block, signature.get('sizes_of') == 'decoder')}, "
        f"{signature.get('num_attention_heads')} attention heads)"
    )


def _difference(name: str, recorded_value, model_value, per_block: Optional[tuple[str, int]]) -> str:
    """One entry of a signature mismatch: LongCat-Flash's block counts beside the derived num_hidden_layers, which
    alone (4 against 2 for adapters of 2 and 1 blocks) named a value neither config.json holds."""
    listed = f"{name} {recorded_value} against {model_value}"
    if name == "num_hidden_layers" and per_block is not None and isinstance(recorded_value, int):
        count, sublayers = per_block
        listed += f" ({count} {recorded_value // sublayers} against {model_value // sublayers})"
    return listed


def _check_copy_head_support(model: nn.Module, model_type: str) -> None:
    """Copy heads add rows of the model's LM head: it needs one, as a plain (not quantized) weight matrix."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    weight = getattr(head, "weight", None)
    hidden = int(text_config_of(model.config).hidden_size)
    # quantization first: a bitsandbytes 4-bit weight is stored packed, as a (rows x columns / 2, 1) tensor (uint8, or
    # the bnb_4bit_quant_storage dtype), so the shape check below would blame a missing LM head for it
    if isinstance(weight, torch.Tensor) and (
        not weight.dtype.is_floating_point
        or type(weight).__name__ == "Params4bit"
        or getattr(weight, "quant_state", None) is not None
    ):
        raise QSTUnsupportedModelError(
            f"QSTConfig.copy_heads needs the LM head's weight unquantized, but it is {type(weight).__name__} "
            f"({weight.dtype}). Keep lm_head out of quantization (bitsandbytes does by default), or use copy_heads=0."
        )
    # DeepSpeed ZeRO-3 (``deepspeed.zero.Init``, which ``from_pretrained`` enters under the Trainer's or accelerate's
    # ZeRO-3 config) leaves an empty placeholder in ``weight`` and the weight's own shape in ``ds_shape``; the copy
    # heads' lookup gathers the weight (layer._head_rows)
    shape = getattr(weight, "ds_shape", None) if isinstance(weight, torch.Tensor) else None
    shape = tuple(shape) if shape is not None else tuple(getattr(weight, "shape", ()))
    if head is None or not isinstance(weight, torch.Tensor) or len(shape) != 2 or shape[1] != hidden:
        raise QSTUnsupportedModelError(
            f"QSTConfig.copy_heads needs a model with an LM head ({model_class_name(model)}, a {model_type} model, has "
            "none of the usual shape): copy heads add LM-head rows. Use an *ForCausalLM model, or copy_heads=0."
        )


def _check_composite_model(model_type: str, config: QSTConfig) -> None:
    """A composite (multimodal) model: QST side-tunes its language model where the type was checked end to end with
    images (:data:`SUPPORTED_COMPOSITE_TYPES`), and refuses the others, whose language models may take inputs the
    side network would have to follow too (cross-attention to image states in Mllama, per-layer inputs computed from
    the token ids in Gemma 3n, several text models in one) and would otherwise silently ignore."""
    if model_type not in SUPPORTED_COMPOSITE_TYPES:
        reason = _COMPOSITE_REASONS.get(model_type)
        raise QSTUnsupportedModelError(
            f"QST does not support the {model_type} model as a whole: it is a composite (multimodal) model whose "
            "language model has its own config (text_config), and QST side-tunes the language model of the "
            f"composite types checked with images only ({', '.join(SUPPORTED_COMPOSITE_TYPES)})"
            + (f"; {reason}, which the side network would not follow" if reason else "")
            + ". Load its language model alone (with the text model's *ForCausalLM class) and side-tune that."
        )
    if config.copy_heads:
        raise QSTUnsupportedModelError(
            f"QSTConfig.copy_heads cannot be used with the {model_type} model: a composite (multimodal) model calls "
            "its language model with inputs_embeds (the image features merged into the token embeddings), never "
            "with the token ids copy heads look up. Use copy_heads=0."
        )


def _check_composite_trunk(model_type: str, trunk: nn.Module, text_config) -> None:
    """The wrapped trunk of a composite model must be its language model: the side network is built from the trunk's
    class and config, and sized from the text config."""
    trunk_config = getattr(trunk, "config", None)
    if getattr(trunk_config, "model_type", None) != text_config.model_type or getattr(
        trunk_config, "hidden_size", None
    ) != getattr(text_config, "hidden_size", None):
        raise QSTUnsupportedModelError(
            f"QST side-tunes the language model of a {model_type} model, but the module it would wrap "
            f"({type(trunk).__name__}) is not it (its config is not the model's text_config). Leave "
            "QSTConfig.target_modules None, so that QST wraps model.get_decoder()."
        )


def _target_modules_hint(model: nn.Module, config: QSTConfig) -> str:
    """For a target_modules set by hand (often left over from a LoraConfig): what the field means for QST."""
    if not config.target_modules:
        return ""
    try:
        found = f" (here {find_trunk_name(model)!r})"
    except Exception:  # noqa: BLE001 - only a hint; the error being raised says what failed
        found = ""
    return (
        " For QST, target_modules names the decoder trunk the side network runs beside, found automatically"
        f"{found}, not the layers LoRA adapts: leave it None."
    )


class _RowRouting:
    """The forward pre-hook that hands one ``adapter_names=[...]`` call's row names to a QST layer or a
    ``modules_to_save`` wrapper, for that call only (removed when it ends).

    A copy of the model taken while the call runs (a stopping criterion, logits processor or streamer that
    deep-copies the model it holds, another thread's ``copy.deepcopy``) copied the hook with the module: the copy
    routed every later forward by that call's names (a plain forward ran the rows through other adapters, silently;
    a beam search was refused for a wrong count of names), and a pickle (``torch.save(model)``) taken meanwhile
    failed on the hook, a local function. Copies and pickles get an inert hook instead.

    The hook routes the forwards of the thread that made the call only: the modules are shared, and another thread
    running the same model meanwhile (a plain forward or generate, which README allows at once) had its rows routed by
    this call's names, silently where the row counts matched."""

    def __init__(self, route, rows: dict):
        self.route, self.rows, self.thread = route, rows, threading.get_ident()

    def __call__(self, _module, args, module_kwargs):
        if threading.get_ident() != self.thread:
            return None
        module_kwargs["adapter_names"] = self.route(self.rows["names"])
        return args, module_kwargs

    def __deepcopy__(self, memo) -> "_NoRouting":
        return _NoRouting()

    def __reduce__(self):
        return (_NoRouting, ())


class _NoRouting:
    """What a copy or pickle of a :class:`_RowRouting` hook becomes: a hook that changes nothing."""

    def __call__(self, _module, args, module_kwargs):
        return None


#: the per-call state (:func:`peft_qst.per_call.call_state`) of a generating transformers model under which
#: ``adapter_names=[...]`` notes how generate expands its rows
_EXPANSION_KEY = "qst_expand_rows"


def _route_expansion(model_class: type) -> None:
    """Make ``_expand_inputs_for_generation`` of ``model_class`` (wherever it is defined, transformers'
    ``GenerationMixin`` for most models) tell the ``adapter_names=[...]`` call running in this thread how many times
    it repeats each row, before it does. Once per defining class; models not generating with ``adapter_names`` (this
    thread's state holds none) are unchanged. The routing is looked up in the per-thread call state of the model
    that generates, not set on it: an instance attribute shadowing the method for the call was carried by a copy or
    pickle taken during it, and routed the copy's later generate calls by the old call's names."""
    name = "_expand_inputs_for_generation"
    owner = next((klass for klass in model_class.__mro__ if name in vars(klass)), None)
    method = vars(owner).get(name) if owner is not None else None
    if not inspect.isfunction(method) or getattr(method, "_peft_qst_routes", False):
        return  # a static or class method: not expanded per row here (the layer refuses a row count that differs)

    @functools.wraps(method)
    def _expand_inputs_for_generation(self, expand_size: int = 1, *args, **kwargs):
        state = held_call_state(self)
        expanding = state.get(_EXPANSION_KEY) if state is not None else None
        if expanding is None:
            return method(self, expand_size, *args, **kwargs)
        expanding(expand_size, kwargs.get("input_ids"))
        # an override that calls the (also routed) method it overrides: the rows are repeated once
        state[_EXPANSION_KEY] = None
        try:
            return method(self, expand_size, *args, **kwargs)
        finally:
            state[_EXPANSION_KEY] = expanding

    _expand_inputs_for_generation._peft_qst_routes = True
    setattr(owner, name, _expand_inputs_for_generation)


def _check_bare_trunk_config(model: nn.Module, config: QSTConfig) -> None:
    """A bare decoder trunk (AutoModel) is side-tuned for its features only: its QST output is the adapted
    ``last_hidden_state``, which ``PeftModelForFeatureExtraction`` returns. Other task types' PEFT wrappers would
    run the trunk through a forward built for a model with a head (PEFT's plain ``PeftModel`` even through
    ``get_base_model()``, which is the unadapted trunk here), and an adapter saved from such a model has other weight
    names and its head."""
    name = model_class_name(model)
    if config.target_modules not in (None, ROOT_TRUNK):
        raise QSTUnsupportedModelError(
            f"QSTConfig.target_modules={config.target_modules!r} names a module inside the model, but {name} is a bare "
            "decoder trunk (as AutoModel loads it), which QST wraps whole. An adapter saved from a model with a head "
            "around the trunk (AutoModelForCausalLM, ...) loads onto that model class again, whose final hidden "
            "states (output_hidden_states=True) are its adapted features; for a new adapter leave target_modules "
            "None."
        )
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type != "FEATURE_EXTRACTION":
        raise QSTUnsupportedModelError(
            f"{name} is a bare decoder trunk (as AutoModel loads it): QST side-tunes it for its features, with "
            f"QSTConfig(task_type='FEATURE_EXTRACTION'), not task_type={task_type!r}. For a causal LM or a "
            "classifier, load the model with AutoModelForCausalLM or AutoModelForSequenceClassification."
        )


def _check_task_head(model: nn.Module, config: QSTConfig) -> None:
    """``task_type`` against the model's head. PEFT's task class for a classifier trains the head it finds by name
    (:data:`~peft_qst.modules_to_save.TASK_HEADS`); a causal LM has none, so ``task_type="SEQ_CLS"`` on an
    ``*ForCausalLM`` trained no head and its loss, the LM's on class labels, came out NaN without a word.
    ``task_type="CAUSAL_LM"`` on a model without generation (an ``*ForSequenceClassification``) failed in PEFT with
    "object has no attribute 'prepare_inputs_for_generation'". A head of another name that the config's
    ``modules_to_save`` lists (a model whose head is ``classification_head``, trained with
    ``modules_to_save=["classification_head"]``) counts: PEFT trains it beside the ones it adds."""
    task_type = getattr(config.task_type, "value", config.task_type)
    name = type(model).__name__
    heads = TASK_HEADS.get(task_type)
    # matched as PEFT matches modules_to_save: as suffixes of module names
    trained = tuple(heads or ()) + tuple(modules_to_save_entries(config))
    if heads and not any(names_an_entry(module, trained) for module, _ in model.named_modules()):
        raise ValueError(
            f"QSTConfig.task_type={task_type!r} trains the model's task head ({' or '.join(heads)}), but {name} has "
            "none. Load the model with the class of that task (AutoModelForSequenceClassification for 'SEQ_CLS', "
            "AutoModelForTokenClassification for 'TOKEN_CLS', AutoModelForQuestionAnswering for 'QUESTION_ANS'), "
            f"or give the task_type of this model{' (CAUSAL_LM)' if name.endswith('ForCausalLM') else ''}; a head "
            "of another name is trained when modules_to_save names it."
        )
    if task_type == "CAUSAL_LM" and not callable(getattr(model, "prepare_inputs_for_generation", None)):
        raise ValueError(
            f"QSTConfig.task_type='CAUSAL_LM' needs a model that generates (AutoModelForCausalLM), but {name} does "
            "not. Give the task_type of this model (e.g. 'SEQ_CLS' for an *ForSequenceClassification model), or "
            "load it with AutoModelForCausalLM."
        )


def resolve_side_dtype(model: nn.Module, config: QSTConfig) -> torch.dtype:
    """The side network's dtype: the config's, else the 4-bit compute dtype, else the model's dtype; float32 where
    that is float16. Trainable float16 weights do not train under fp16 mixed precision (``Trainer(fp16=True)``: its
    gradient scaler refuses to unscale float16 gradients), which the float16 compute dtype of the usual QLoRA recipe
    on GPUs without bfloat16 comes with; PEFT keeps LoRA weights in float32 there for the same reason. Under autocast
    the side network's matmuls still run in float16."""
    # set on the config after it was built (``config.side_dtype = torch.bfloat16``), which QSTConfig's check of its
    # arguments did not see (``getattr(torch, dtype)`` failed with a bare "attribute name must be string")
    config.side_dtype = checked_side_dtype(config.side_dtype)
    if config.side_dtype is not None:
        return getattr(torch, config.side_dtype)
    dtype = _compute_dtype(model)
    return torch.float32 if dtype == torch.float16 else dtype


def _compute_dtype(model: nn.Module) -> torch.dtype:
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        as_dict = quantization if isinstance(quantization, dict) else quantization.to_dict()
        compute = as_dict.get("bnb_4bit_compute_dtype")
        if as_dict.get("load_in_4bit") and compute is not None:
            return getattr(torch, compute) if isinstance(compute, str) else compute
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return torch.float32


def _as_offset_key(key: str) -> str:
    """The state-dict key of parameter ``key`` stored as a :class:`~peft_qst.side.ConstantOffset` offset."""
    parent, _, name = key.rpartition(".")
    return f"{parent}.parametrizations.{name}.original"


def _update_layer(layer: QSTLayer, adapter_name: str, config: QSTConfig, dtype: torch.dtype) -> None:
    """``layer.update_layer``, which builds the side network and runs it once; where ``side_heads="auto"`` chose the
    head count (the caller named none) and the model's own class refuses that side network or it does not run, the
    other head counts that fit r are tried in "auto"'s order (:func:`auto_side_head_candidates`, the model's own heads
    last) and the first that works is recorded in the config. DiffLlama needs an even number of key/value heads and
    Kolibri 1.1 keys and values of at least 16 channels: "auto"'s one 8-wide side head (r=16) gives neither, so both
    were refused although their own heads fit. Where every count fails, the error is the first one's, naming the
    others tried. A side network that works at once is built once, as before."""
    written = config.__dict__.get(_AS_WRITTEN) or {}
    if written.get("side_heads") != AUTO or config.init == "pruned":
        layer.update_layer(adapter_name, config, dtype)
        return
    chosen = config.side_heads
    base_config = layer.get_base_layer().config
    others = [heads for heads in auto_side_head_candidates(base_config, config.r) if heads != chosen]
    first_error = None
    for heads in [chosen, *others]:
        config.side_heads = heads
        try:
            layer.update_layer(adapter_name, config, dtype)
            return
        except QSTUnsupportedModelError as error:
            if getattr(error, "runs_in_float32", False):
                config.side_heads = chosen
                raise  # the side dtype is the problem, not the head count
            first_error = first_error or error
    config.side_heads = chosen
    if not others:
        raise first_error
    own = side_head_counts(base_config, None)[0]
    tried = ", ".join(
        "None (the model's own heads)" if heads is None
        else f"{heads} (the model's own)" if heads == own
        else str(heads)
        for heads in others
    )
    problem = getattr(first_error, "problem", None)
    if problem is None:
        raise QSTUnsupportedModelError(
            f"{first_error} side_heads={AUTO!r} also tried the other head counts that fit r={config.r} ({tried}), and "
            "none of their side networks can be used either: another r may fit."
        ) from first_error
    # the first error's own advice (side_heads=None, the model's heads) was tried already: not repeated
    raise QSTUnsupportedModelError(
        f"QST does not support this {base_config.model_type} model with r={config.r}, side_heads={chosen}: the side "
        f"network built from its config by QST's shrink rules cannot be used: {problem}. side_heads={AUTO!r} also "
        f"tried the other head counts that fit r={config.r} ({tried}), and none of their side networks can be used "
        "either: another r may fit, otherwise the model is not supported (see the README's supported architectures)."
    ) from first_error


class QSTModel(BaseTuner):
    """Creates a QST model from a pretrained transformers model. Use it through `get_peft_model` with a
    :class:`~peft_qst.QSTConfig`; see that class for the method and its options.

    Example:
        ```py
        >>> import peft_qst
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_qst.QSTConfig(task_type="CAUSAL_LM"))
        ```
    """

    prefix: str = "qst_"
    tuner_layer_cls = QSTLayer
    target_module_mapping: dict = {}

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            # checked before BaseTuner.__init__, which would put the QST config into that PeftModel's own peft_config
            # (replacing its adapter's under the same name). PEFT otherwise nests the two with a warning only: the
            # first one's trainable weights lie inside the trunk, which QST runs under no_grad (they never train), and
            # the adapter is saved under nested names that load onto no base model
            kinds = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in model.peft_config.values()})
            raise QSTUnsupportedModelError(
                f"get_peft_model was given a PeftModel (adapters {sorted(model.peft_config)}: {', '.join(kinds)}), "
                "not a transformers model: QST cannot be stacked on another PEFT wrapper. To add a QST adapter "
                "beside an existing QST one, call model.add_adapter(name, QSTConfig(...)); to side-tune a model with "
                "a LoRA adapter in it, merge it first (model = model.merge_and_unload()); to start over, pass "
                "model.unload() (or the base model as loaded)."
            )
        # PEFT's PeftModel (its task classes: get_peft_model, PeftModel.from_pretrained, AutoPeftModel*) builds the
        # tuner with a dict of configs by adapter name; inject_adapter_in_model (also transformers' load_adapter)
        # with the config itself, and no task class wraps the model there: task_type is ignored, so
        # _check_task_head, which guards what a task class does with it, does not run (it refused a mismatched
        # task_type that worked there)
        peft_config = args[0] if args else kwargs.get("peft_config")
        self.__dict__[_TASK_CLASS_WRAPS] = isinstance(peft_config, dict)
        super().__init__(model, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------------------------
    # injection
    # ---------------------------------------------------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        written = config.__dict__.get(_AS_WRITTEN)
        if written is not None:
            # This config object was bound to a model by an earlier get_peft_model (it is that model's adapter
            # config now): bind a copy, from the values as written, so that one QSTConfig can be applied to several
            # base models, as a LoraConfig can, with "auto" and fractions resolved for each, and the earlier model
            # keeps its own record. (The first binding fills in the caller's object itself, as PEFT's task classes
            # expect: some of them add their heads to modules_to_save on it after injection.)
            config = copy.copy(config)
            for name, value in written.items():
                setattr(config, name, value)
            self.peft_config[adapter_name] = config
        else:
            written = {name: getattr(config, name) for name in _BOUND_FIELDS}
        self._bind_config_to_model(config, model)
        config.__dict__[_AS_WRITTEN] = written
        # inject_adapter_in_model(..., state_dict=...) lets PEFT pick the modules to adapt from the keys of a
        # checkpoint instead of the config: the modules the keys lead up to, as written in a file saved from a
        # PeftModel, with its "base_model.model." prefix, which the model injected into lacks, so loading a saved QST
        # folder that way (state_dict=load_peft_weights(folder)) failed with "Target modules model not found". A side
        # network always goes on the trunk the config names, whatever the keys: they are checked when the weights are
        # loaded (set_peft_model_state_dict), not used to place it.
        kwargs.pop("state_dict", None)
        wrapping_root = config.target_modules == ROOT_TRUNK and not isinstance(model, QSTLayer)
        if wrapping_root:
            # a bare trunk: PEFT never targets the root model, so the tuner wraps it here and PEFT targets the trunk
            # inside the wrapper (_create_and_replace adds the side network to the wrapper itself)
            model = self.model = QSTLayer(model)
        super().inject_adapter(model, adapter_name, **kwargs)
        if wrapping_root:
            # PEFT took the new wrapper (a tuner layer) for an earlier adapter's and kept the trunk's parameters as
            # trainable as they were; a first injection freezes the base model
            self._mark_only_adapters_as_trainable(model)

    def _bind_config_to_model(self, config: QSTConfig, model: nn.Module) -> None:
        """Check, before anything changes, that this config can side-tune this model; fill in what it records."""
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # torch.compile(model) wraps the model (OptimizedModule), whose state dict names every weight under
            # "_orig_mod.": an adapter built inside the wrapper saved its keys so, and loading them onto the uncompiled
            # base model was refused as "target_modules='_orig_mod\\.model' matches no module ... leave it None", a
            # field the caller had left None; an adapter loaded onto a compiled base failed alike
            raise QSTUnsupportedModelError(
                f"This {type(model._orig_mod).__name__} is wrapped by torch.compile: its weights are named under "
                "'_orig_mod.', which the adapter's saved keys would carry and an uncompiled model does not have. "
                "Give get_peft_model (or PeftModel.from_pretrained) the model itself and compile the result: "
                "torch.compile(get_peft_model(model, config)), or TrainingArguments(torch_compile=True)."
            )
        added_tokens = bool(config.trainable_token_indices)  # TRL adds "lm_head" to modules_to_save beside it
        if config.trainable_token_indices:
            # TRL sets it when its chat-template cloning added tokens (SFTTrainer/RewardTrainer chat_template_path)
            warnings.warn(
                f"QSTConfig.trainable_token_indices={config.trainable_token_indices!r} is ignored: the token "
                "embeddings lie inside the decoder trunk, which QST runs frozen under no_grad, so they cannot train. "
                "Added tokens keep the embeddings they were given when the vocabulary was resized; the side network "
                "still reads them. To let the model generate them, add 'lm_head' to modules_to_save.",
                stacklevel=user_stacklevel(),
            )
            config.trainable_token_indices = None
        model_config = getattr(model, "config", None)
        model_type = getattr(model_config, "model_type", None) or type(model).__name__
        if model_config is None:
            raise QSTUnsupportedModelError(
                f"QST side-tunes transformers models; {type(model).__name__} has no transformers config. Pass a "
                "transformers model (e.g. AutoModelForCausalLM.from_pretrained(...)), or the transformers model "
                "inside your wrapper."
            )
        if getattr(model_config, "is_encoder_decoder", False):
            raise QSTUnsupportedModelError(
                f"QST does not support the {model_type} model: it is an encoder-decoder model, and QST side-tunes "
                "decoder-only models. Use a decoder-only model (see the README's supported architectures), or LoRA "
                "for this one."
            )
        text_config = text_config_of(model_config)
        composite = text_config is not model_config
        if composite:
            _check_composite_model(model_type, config)
            # the side network runs beside the language model: every size below is its config's
            model_config = text_config
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        if is_state_space_model(model_config):  # Mamba: the widths of its mixers replace heads (see shrink_config)
            required = ("hidden_size", "num_hidden_layers")
        for attribute in required:
            try:
                # a size a heterogeneous config sets per layer: the global one, and the sizes set per layer that no
                # shrink rule rescales are refused by name below (unsupported_reason: dots3_note_text's heads)
                value = global_size(model_config, attribute)
            except Exception as error:  # noqa: BLE001 - heterogeneous configs refuse global access to per-layer sizes
                raise QSTUnsupportedModelError(
                    f"QST does not support the {model_type} model: its config's {attribute} varies from layer to layer "
                    f"({type(error).__name__}), and QST's side network is built from one value per model."
                ) from error
            if value is None:
                raise QSTUnsupportedModelError(
                    f"QST does not support the {model_type} model: its config has no {attribute}, which the side "
                    "network's shape is derived from"
                    + (
                        " (without attention heads, QST's shrink rules cover the state-space models of the Mamba "
                        "layout, whose configs set state_size and expand: Mamba, Falcon-Mamba, Mamba-2)."
                        if attribute == "num_attention_heads"
                        else "."
                    )
                )

        reason = unsupported_reason(model_config)
        if reason is not None:
            raise QSTUnsupportedModelError(f"QST does not support this {model_type} model: {reason}.")

        signature = current_signature = model_signature(model)
        recorded = config.base_model_signature
        if recorded is not None and "sizes_of" in signature and "sizes_of" not in recorded:
            # recorded before QST read the decoder's sizes of this config: the encoder's, compared as such. Its side
            # blocks have the decoder's heads whatever its side_heads says (signature_predates_decoder_sizes), which
            # check_kwargs reads so from the file for the model types transformers registers; a config of remote code
            # (trust_remote_code, a subclass of BART's under its own model type) is known to map its sizes only here,
            # where None is set too (before, the file's count was applied to weights trained with the decoder's heads)
            signature = model_signature(model, decoder_sizes=False)
            config.side_heads = None
        differences = signature_differences(dict(recorded), signature) if recorded is not None else {}
        if differences:
            per_block = _sublayers_per_block(model_config)
            # the recorded count read so only where the adapter was built for the same type
            same_type = all(recorded.get(key) == signature.get(key) for key in ("model_type", "text_model_type"))
            recorded_per_block = per_block if same_type else None
            listed = ", ".join(
                _difference(name, recorded_value, model_value, recorded_per_block)
                for name, (recorded_value, model_value) in differences.items()
            )
            built_for, loaded_onto = _describe(recorded, recorded_per_block), _describe(signature, per_block)
            # where only what _describe leaves out differs (a resized vocabulary, a head_dim), the two descriptions are
            # the same text, and "built for X but loaded onto X" read as if the check itself were wrong
            loaded_onto = "one of the same type and those sizes" if loaded_onto == built_for else loaded_onto
            raise ValueError(
                f"This QST adapter was built for {built_for} but is being loaded onto {loaded_onto}"
                f" ({model_class_name(model)}); they differ in {listed} (the adapter's value first). Load it onto the "
                "base model it was trained on"
                + (f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else "")
                + (
                    f", with its token embeddings resized to {differences['vocab_size'][0]} "
                    "(model.resize_token_embeddings) as they were when the adapter was saved. "
                    # see resize_to_the_adapters_vocabulary: where it does not resize, the user must
                    "A load resizes the base model itself only where the model holds no adapter yet (a resize "
                    "would change the embeddings its adapters were trained with) and the adapter's file holds the "
                    "trained token embeddings, and an LM head not tied to them, for every token (PEFT's "
                    "save_embedding_layers): otherwise resize it before loading (after adding the same tokens to "
                    "the tokenizer; the adapter's model card shows how)."
                    if set(differences) == {"vocab_size"}
                    else "."
                )
            )

        if is_bare_trunk(model):
            _check_bare_trunk_config(model, config)
            target_modules, trunk = ROOT_TRUNK, model
        else:
            if config.target_modules == ROOT_TRUNK:
                raise QSTUnsupportedModelError(
                    f"This QST adapter was made for a bare decoder trunk (as AutoModel loads it, "
                    f"task_type='FEATURE_EXTRACTION'), but is being loaded onto {type(model).__name__}, a model with "
                    "a head around the trunk. Load the base model with AutoModel.from_pretrained(...). (An adapter "
                    "does not move between the two: the bare trunk's adapter holds no head, and the weight names "
                    "differ.)"
                )
            target_modules = config.target_modules or re.escape(find_trunk_name(model))
            trunk = self._matching_trunk(model, target_modules)
        if trunk is None:
            # an adapter saved from a model of another task class records that class's trunk name (LlamaForQuestion
            # Answering's "transformer", the others' "model"): loaded onto a causal LM or another classifier, the
            # missing task head is the problem to name, not the target_modules the user never set
            _check_task_head(model, config)
            raise QSTUnsupportedModelError(
                f"QSTConfig.target_modules={target_modules!r} matches no module of {type(model).__name__}."
                + _target_modules_hint(model, config)
            )
        base_trunk = trunk.get_base_layer() if isinstance(trunk, QSTLayer) else trunk
        forward_params = inspect.signature(type(base_trunk).forward).parameters
        if "inputs_embeds" not in forward_params:
            if config.target_modules:
                raise QSTUnsupportedModelError(
                    f"QSTConfig.target_modules={config.target_modules!r} matches {type(base_trunk).__name__}, which "
                    "is not a decoder trunk (it takes no inputs_embeds)." + _target_modules_hint(model, config)
                )
            raise QSTUnsupportedModelError(
                f"QST does not support the {model_type} model: its trunk {type(base_trunk).__name__} does not accept "
                "inputs_embeds, which the side network is fed through."
            )
        if composite:
            _check_composite_trunk(model_type, base_trunk, text_config)
        if recorded is None and not reading_saved_adapter.get():  # a new adapter; a loaded one: against its weights
            check_modules_to_save_match(model, trunk, config, added_tokens)
        if not is_bare_trunk(model) and self.__dict__.get(_TASK_CLASS_WRAPS, True):
            _check_task_head(model, config)
        check_modules_to_save_outside(model, trunk, config)
        if composite:
            check_modules_to_save_before_trunk(model, trunk, config, model_type)
        check_modules_to_save_unquantized(model, trunk, config)
        parent, blocks_name = find_layer_list(base_trunk, num_blocks(model_config))
        reason = unsupported_blocks_reason(getattr(parent, blocks_name))
        if reason is not None:
            raise QSTUnsupportedModelError(f"QST does not support this {model_type} model: {reason}.")
        # encoder-only models (BERT, RoBERTa, ...) attend both ways and their heads read other outputs (a pooler)
        # than the final hidden state QST adapts: their attention modules say so with is_causal=False
        # (a composite model's language model may be flagged bidirectional: PaliGemma's attends both ways over the
        # image and the prompt, a prefix-LM mask the composite model builds and hands the side trunk too, and
        # generates causally after it)
        if not composite and not _is_causal(model_config, base_trunk):
            raise QSTUnsupportedModelError(
                f"QST does not support the {model_type} model: its attention is bidirectional (an encoder-only model), "
                "and QST side-tunes decoder-only models, whose final hidden state is what the side network adapts. "
                "Use a decoder-only model (see the README's supported architectures), or LoRA for this one."
            )
        if config.copy_heads:
            _check_copy_head_support(model, model_type)
        if config.init == "pruned":
            from .pruning import PRUNABLE_MODEL_TYPES, _refuse

            pruned_type = model_config.model_type  # a composite model's: its language model's
            if pruned_type not in PRUNABLE_MODEL_TYPES:
                raise _refuse(pruned_type, "its block layout (module roles and rotary layout) is not mapped")
            if config.side_heads not in (None, AUTO) and config.side_heads != int(model_config.num_attention_heads):
                raise ValueError(
                    f"QSTConfig(init=\"pruned\", side_heads={config.side_heads}) cannot be built: pruning keeps "
                    f"each of the model's {int(model_config.num_attention_heads)} attention heads as a narrower side "
                    "head. Use side_heads=None (or \"auto\") with init=\"pruned\", or init=\"random\" with another "
                    "head count."
                )
        num_layers = num_blocks(model_config)
        backbone_lora_layers = resolve_backbone_lora_layers(config.backbone_lora_layers, num_layers)
        if backbone_lora_layers > num_layers:
            raise ValueError(
                f"QSTConfig.backbone_lora_layers={config.backbone_lora_layers} exceeds the {num_layers} blocks of this "
                f"{model_type} model; choose at most {num_layers}."
            )
        if recorded is None and not reading_saved_adapter.get():  # a saved adapter loads as it was trained
            check_gate_inits_fit(config, resolve_side_dtype(model, config))
        # raises a ValueError naming the fitting values when r does not fit the model's widths and heads
        shrink_config(model_config, config, torch.float32)

        # every check passed: record what the adapter is bound to, the head count "auto" chose and the number of
        # blocks a fraction of the depth came to, so that a saved adapter says what it holds whatever a later
        # version's "auto" or rounding would choose
        if recorded is None and config.base_model_fingerprint is None:
            # the rows of the vocabulary before any resize after this (save_pretrained records the values)
            config.base_model_fingerprint = base_model_fingerprint(model, original_vocabulary_rows(model, config))
        config.base_model_signature = current_signature
        config.target_modules = target_modules
        config.side_heads = resolve_side_heads(model_config, config)
        config.backbone_lora_layers = backbone_lora_layers

    @staticmethod
    def _matching_trunk(model: nn.Module, target_modules) -> Optional[nn.Module]:
        """The module named by ``target_modules``: a regex matched in full (as PEFT does), or a list of names."""
        for name, module in model.named_modules():
            if not name:
                continue
            if isinstance(target_modules, str):
                if re.fullmatch(target_modules, name):
                    return module
            elif name in target_modules:
                return module
        return None

    def _post_injection_hook(self, model: nn.Module, config: QSTConfig, adapter_name: str) -> None:
        # a bare trunk's wrapper: tags, loss and hooks belong to the trunk, which unload() hands back
        holder = model  # the module whose parameters include the side network (the wrapper of a bare trunk)
        model = model.get_base_layer() if isinstance(model, QSTLayer) else model
        # the tags end up in the model cards PEFT and the trainers write
        if hasattr(model, "add_model_tags"):
            if _TAGS_ADDED not in vars(model):  # what undo_post_injection takes off again: the tags the model lacked
                present = set(getattr(model, "model_tags", None) or ())
                vars(model)[_TAGS_ADDED] = ([t for t in _QST_TAGS if t not in present], "model_tags" in vars(model))
            model.add_model_tags(list(_QST_TAGS))
        # the same causal-LM loss without float32 copies of the full-vocabulary logits: with a frozen LM head they are
        # most of a QST step's memory and a large part of its time (peft_qst/loss.py)
        install_chunked_loss(model)
        # saving (save_pretrained, trainer checkpoints) calls model.state_dict(); after an eval forward on a CPU with
        # AVX512-BF16, bitsandbytes' Linear4bit would unpack its weights lossily in memory there
        # (peft_qst/bnb_compat.py)
        keep_4bit_weights_through_state_dict(model)
        # and training-mode forwards keep bitsandbytes' standard kernel after an eval forward has packed the 4-bit
        # layers for its CPU inference kernel, slower for many rows and without a backward (peft_qst/bnb_compat.py).
        # It keeps layouts only on a model with trainable parameters, so it must see the side network: a bare trunk
        # (FEATURE_EXTRACTION on AutoModel) has none of its own, and its training steps after an eval ran the packed
        # kernel (the losses of a Trainer run that evaluated between steps were off an unevaluated run's from step 2)
        route_4bit_layers_by_mode(holder)
        # generation's last-position logits: with a frozen LM head, PyTorch's CPU matmul would copy the whole head
        # weight for each prefill; in training, the head's backward in the side update's low rank (peft_qst/lm_head.py)
        install_lm_head_hooks(model)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if isinstance(model, QSTLayer):
            # a bare trunk's wrapper is the root, which PEFT's unloading never visits: it skips what lies inside a
            # tuner layer, and the root's parent counts as inside
            self._replace_module(None, "", model.get_base_layer(), model)
            model = self.model
        undo_post_injection(model)
        return model

    def _replace_module(self, parent, child_name, new_module, child):
        # unload(): put the original trunk back. PEFT's default also copies ``weight``/``bias`` from the wrapped module
        # onto the replacement, which fits single layers, not a whole trunk (it has neither, and unload() failed with
        # "'LlamaModel' object has no attribute 'weight'")
        if isinstance(child, QSTLayer) and new_module is child.get_base_layer():
            child.remove_hooks()
            if child is self.model:  # the wrapper of a bare trunk is the root (PEFT names it "")
                self.model = new_module
            else:
                setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _prepare_adapter_config(self, peft_config: QSTConfig, model_config: dict) -> QSTConfig:
        # target_modules was set from the model itself in _bind_config_to_model
        return peft_config

    def _create_and_replace(
        self,
        peft_config: QSTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(parent, QSTLayer) and target is parent.get_base_layer():
            target = parent  # a bare trunk (ROOT_TRUNK): the side network goes into the root wrapper around it
        dtype = resolve_side_dtype(self.model, peft_config)
        # a side network that cannot be used raises from update_layer before the layer holds it or hooks anything
        if isinstance(target, QSTLayer):
            target.bind_output_embeddings(self.model)
            _update_layer(target, adapter_name, peft_config, dtype)
            return
        new_module = QSTLayer(target)
        new_module.bind_output_embeddings(self.model)
        _update_layer(new_module, adapter_name, peft_config, dtype)
        setattr(parent, target_name, new_module)

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with the rows of an ``adapter_names=[...]`` that reaches it routed.

        ``PeftModelForCausalLM.forward`` routes ``adapter_names`` (:meth:`_enable_peft_forward_hooks`) and drops it,
        except on MPT models: a branch of its own for ``model_type == "mpt"`` hands every keyword to this forward
        without routing, and ``MptForCausalLM.forward`` swallowed ``adapter_names`` in its ``**kwargs``: every row ran
        the active adapter, silently (a hybrid's and a plain adapter's rows alike; ``generate`` routes through the
        hooks and was right). Routed here as the other models' forwards are."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self._enable_peft_forward_hooks(adapter_names=adapter_names):
            return self.model(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route ``adapter_names=[...]`` (one adapter per row, ``"__base__"`` for the base model) from
        ``PeftModel.forward``/``generate`` to the QST layer, as PEFT's LoRA does."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode: routing rows to adapters is for "
                "inference. Call model.eval() first (and model.train() again to go on training)."
            )
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}.")
        # the names of the rows the model runs now: one per input row until generate expands the batch
        rows = {"names": list(adapter_names)}

        def expanding(expand_size: int, prompts) -> None:
            # generate repeats each row expand_size times, consecutively (num_beams, num_return_sequences, from its
            # keywords, a generation_config argument or the model's own generation_config); so does the routing.
            # Read off the expansion itself, not off generate's keywords: the keywords missed a num_beams set in a
            # generation_config and sampling's num_return_sequences, and the batch then had more rows than names
            if expand_size > 1 and prompts is not None and len(rows["names"]) != prompts.shape[0]:
                raise ValueError(
                    f"adapter_names has {len(rows['names'])} entries for {prompts.shape[0]} prompts; give one "
                    "adapter name per prompt: generate repeats it for each of the prompt's beams and return sequences."
                )
            rows["names"] = [name for name in rows["names"] for _ in range(expand_size)]

        from peft.utils.other import AuxiliaryTrainingWrapper

        # the modules saved whole beside the side network (modules_to_save: a classification head, an LM head) route
        # rows too, as under LoRA: without the names each row went through the active adapter's copy of the head.
        # An adapter saved without this module runs its original, as it does alone (the wrapper's passthrough); PEFT's
        # wrapper would look the adapter up among its copies and fail with a KeyError
        handles = []
        for module in self.model.modules():
            if isinstance(module, QSTLayer):
                route = list
            elif isinstance(module, AuxiliaryTrainingWrapper):
                held = frozenset(getattr(module, "_adapters", ()))
                route = lambda names, held=held: [name if name in held else BASE_ADAPTER_NAME for name in names]
            else:
                continue
            handles.append(module.register_forward_pre_hook(_RowRouting(route, rows), with_kwargs=True))
        # the transformers model whose generate runs (PeftModel.generate calls it) expands its inputs through
        # _expand_inputs_for_generation, which tells this call's routing (see _route_expansion); a plain forward
        # never calls it. The routing is this thread's state of that model, which copies and pickles leave behind
        generating = self.model
        _route_expansion(type(generating))
        state = call_state(generating)
        outer = state.get(_EXPANSION_KEY)
        state[_EXPANSION_KEY] = expanding
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            state[_EXPANSION_KEY] = outer

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT upcasts bf16/fp16 adapter weights to fp32 by default; QST's dtype rule is its own (``side_dtype``:
        the compute dtype unless set), so that the side network computes in the dtype the backbone hands it.

        PEFT calls this after creating or loading an adapter. A load with ``low_cpu_mem_usage=True`` assigns the file's
        tensors as they are, in the dtype they were saved in (an adapter trained on a 4-bit model with bf16 compute
        loaded onto an fp32 model, or the reverse); they are brought back to the rule here. Except weights saved in
        float32 beside a half-precision side network (:func:`~peft_qst.loading.keeps_float32_weights`), which stay
        float32.
        """
        config = self.peft_config.get(adapter_name)
        if config is None:
            return
        dtype = resolve_side_dtype(self.model, config)
        for _, layer in layers_holding(self.model, adapter_name):
            side = layer.qst_side[adapter_name]
            keep = keeps_float32_weights(config, dtype, side.upsample.weight.dtype)
            for parameter in side.parameters():
                if keep and parameter.dtype == torch.float32:
                    continue
                if parameter.is_floating_point() and parameter.dtype != dtype and parameter.device.type != "meta":
                    parameter.data = parameter.data.to(dtype)

    def generate_batch(self, *args, **kwargs):
        raise QSTUnsupportedModelError(CONTINUOUS_BATCHING_REFUSAL)

    init_continuous_batching = continuous_batching_context_manager = generate_batch

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(
            "QST adapters cannot be combined with add_weighted_adapter: each adapter is a separate side network, not a "
            "weight delta that could be summed. Switch adapters with set_adapter(name), or route each row of a batch "
            "to its own adapter with adapter_names=[...]."
        )

    def _check_merge_allowed(self):
        raise ValueError(
            "QST adapters cannot be merged into the base model: the side network is a separate computation path, "
            "not a weight delta. Keep the model as a PeftModel, or call unload() to get the base model back. "
            "(Inference servers that load merged weights cannot run QST either: TRL's use_vllm=True merges the "
            "adapter to sync vLLM; generate with the trainer's default, transformers' generate, instead.)"
        )

    # ---------------------------------------------------------------------------------------------------------------
    # saving and loading
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...qst_side.<adapter>.trunk...`` -> ``...qst_side.trunk...``: saved keys never carry the adapter name,
        so an adapter loads under any name without touching the others.

        A QST adapter's own weights all lie under ``qst_side.<adapter>.``; the other keys saved with it (a module
        saved whole, whose wrapper has taken the name out already, and the token embeddings) carry the name only as
        the adapter's copy of a wrapped token embedding that PEFT's ``save_embedding_layers`` saves whole
        (``lm_head.modules_to_save.<adapter>.weight``), saved without it. PEFT's generic rule strips the name
        wherever it ends the key or its module path, so an adapter named ``"weight"``, ``"lm_head"`` or
        ``"embed_tokens"`` saved ``lm_head.weight`` as ``lm_head`` or ``model.embed_tokens.weight`` as
        ``model.weight``: a file that every load then refused."""
        marker = f"{SIDE_ATTR}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{SIDE_ATTR}.", 1)
        return re.sub(rf"(^|\.)modules_to_save\.{re.escape(adapter_name)}\.", r"\1modules_to_save.", key, count=1)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: QSTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = token_embeddings_named_as_in(model, adapter_name, with_peft_model_prefix(model, state_dict))
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for key in saved_adapter_copies_of_embeddings(model, adapter_name, list(remapped)):
            del remapped[key]

        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        marker = f".{SIDE_ATTR}.{adapter_name}."
        model_state = model.state_dict()
        own = _filter_state_dict_by_key_prefixes(model_state, prefixes)
        expected = {k for k in own if marker in k}
        loaded = {k for k in remapped if marker in k}
        strays = {k for k in remapped if f".{SIDE_ATTR}." in k and marker not in k}
        # (PEFT leaves the adapter's name out of keys the model lacks: they are strays here)
        left_out = (loaded - expected) | strays
        never_applied = sorted(key for key in left_out if is_time_step_delta(key))
        if never_applied:
            # an adapter saved before the hybrid left Mamba-style dt_proj layers out; refused as "saved from a
            # different QST configuration" although it is this one, and its deltas there provably did nothing
            warnings.warn(
                f"QST adapter {adapter_name!r} was saved with {len(never_applied)} backbone low-rank tensors on "
                f"Mamba-style dt_proj layers (e.g. {never_applied[:2]}), which their mixers never call (they read the "
                "weight): those deltas never changed the output nor trained, and are not loaded. The adapter computes "
                "what it did when saved; save it again to drop them from the file.",
                stacklevel=user_stacklevel(),
            )
        # tensors of parts an earlier peft-qst built into the side trunk although its forward never runs them (image
        # and audio towers, cross-attention: side.drop_unreached_parts): their random start, which never changed an
        # output nor trained, so they are left out without a word (the adapter computes exactly what it computed
        # when saved, and nothing is lost by loading it as it is)
        unreached = sorted({
            part
            for _, layer in layers_holding(model, adapter_name)
            for part in getattr(layer.qst_side[adapter_name], "unreached_parts", ())
        })
        never_run = {
            key for key in left_out
            if is_unreached_part(key, marker, unreached) or is_unreached_part(key, f".{SIDE_ATTR}.", unreached)
        }
        dropped = set(never_applied) | never_run
        for key in dropped:
            del remapped[key]
        loaded, strays = loaded - dropped, strays - dropped
        missing, unexpected = sorted(expected - loaded), sorted((loaded - expected) | strays)
        # an earlier peft-qst stored one-entry vectors (a one-head side block's attention sink) as offsets from their
        # random start, which it did not save (store_constant_parameters_as_offsets): the values are lost
        # (keys PEFT does not know are left without the adapter's name)
        lost = [key for key in missing if {_as_offset_key(key), _as_offset_key(key).replace(marker, f".{SIDE_ATTR}.")}
                & set(unexpected)]
        if lost:
            raise QSTAdapterFileError(
                f"The checkpoint of QST adapter {adapter_name!r} stores {len(lost)} one-entry weights (e.g. "
                f"{lost[:2]}) as offsets from a random start that the peft-qst version which saved it did not record, "
                "so their values cannot be recovered (it loaded only where the same random draws were repeated). "
                "Train the adapter again with this version; nothing was loaded."
            )
        if missing or unexpected:
            raise QSTAdapterFileError(
                f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: "
                f"{len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}). It was saved from a different QST configuration or base model; nothing "
                "was loaded."
            )
        # tensors of neither the side network nor a module saved whole with it: PEFT loads every key that names a
        # weight of the model (strict=False), so such a tensor was silently written over the frozen base model
        foreign = foreign_tensors(model, adapter_name, set(remapped) - loaded, model_state)
        if foreign:
            raise refuse_foreign_tensors(adapter_name, foreign)
        # the same names with other shapes: an adapter recorded before the signature named every width, or a
        # hand-edited config; torch's own size-mismatch error would come after part of the state was loaded
        misshapen = [
            f"{key} {tuple(remapped[key].shape)} against {tuple(own[key].shape)}"
            for key in sorted(loaded)
            if tuple(remapped[key].shape) != tuple(own[key].shape)
        ]
        if misshapen:
            raise QSTAdapterFileError(
                f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: {len(misshapen)} weights "
                f"have other shapes than this model's side network (e.g. {misshapen[:3]}). It was saved from a "
                "different base model or QST configuration; nothing was loaded."
            )
        # integers (or booleans) for a float weight: load_state_dict would cast them without an error, and the side
        # network (or a head saved whole) would compute with truncated values. (The other way round is left alone: a
        # head saved from an unquantized model may meet a 4-bit one here, whose packed weight is uint8.)
        miskinded = [
            f"{key} {remapped[key].dtype} for a {model_state[key].dtype} weight"
            for key in sorted(remapped)
            if key in model_state and model_state[key].is_floating_point() and not remapped[key].is_floating_point()
        ]
        if miskinded:
            raise QSTAdapterFileError(
                f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: {len(miskinded)} weights "
                f"are not stored as floating-point numbers like the weights they load into (e.g. {miskinded[:3]}). "
                "The file was written by something other than save_pretrained or was altered: save or download the "
                "adapter again; nothing was loaded."
            )
        # the modules saved whole beside the side network (modules_to_save: a classification head): torch's own
        # size-mismatch error would not say that the head was built for another number of labels
        loading = loading_adapter.get()
        ignore_mismatched = loading is not None and loading[2]  # PEFT then leaves such modules as they are, as for LoRA
        heads = [] if ignore_mismatched else [
            (key, tuple(remapped[key].shape), tuple(model_state[key].shape))
            for key in sorted(set(remapped) - loaded)
            if key in model_state and tuple(remapped[key].shape) != tuple(model_state[key].shape)
        ]
        if heads:
            key, saved, here = heads[0]
            hint = (
                f" A classification head saved with {saved[0]} outputs needs the base model loaded with "
                f"num_labels={saved[0]}."
                if config.task_type in ("SEQ_CLS", "TOKEN_CLS")
                else " It was saved from a different base model."
            )
            raise QSTAdapterFileError(
                f"The checkpoint does not fit this model: {key} is {saved} in the file and {here} here (a module "
                f"saved whole with the adapter, modules_to_save).{hint} Nothing was loaded."
            )
        keep_weights_saved_in_float32(model, config, marker, remapped, loaded)
        return remapped


def undo_post_injection(model: nn.Module) -> None:
    """Undo what `QSTModel._post_injection_hook` did to the model: the chunked loss, the LM-head hooks and the 4-bit
    layers' routing hooks come off, and of the model tags, those QST added (the model's own stay)."""
    uninstall_chunked_loss(model)
    uninstall_lm_head_hooks(model)
    stop_routing_4bit_layers(model)
    added = vars(model).pop(_TAGS_ADDED, None)
    if added is not None:
        tags = [t for t in (getattr(model, "model_tags", None) or ()) if t not in added[0]]
        if tags or added[1]:
            model.model_tags = tags
        else:  # the model had no tags of its own: back to the class default
            vars(model).pop("model_tags", None)


def remove_injected_adapters(model: nn.Module) -> None:
    """Undo ``peft.inject_adapter_in_model`` of QST on a model no PeftModel wraps (transformers' own adapter loading,
    which has no working ``delete_adapter`` with this PEFT): the trunk and any module saved whole go back in place of
    their wrappers, QST's hooks, loss and tags come off, and the model forgets the adapter configs."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, QSTLayer):
            original = module.get_base_layer()
            module.remove_hooks()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            original = module.original_module
        else:
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, original)
    undo_post_injection(model)
    if "peft_config" in model.__dict__:
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


