"""`QSTModel`: the PEFT tuner that injects Quantized Side Tuning into a transformers model.

It finds the model's decoder trunk, checks that the model and the config fit together (before touching anything), and
replaces the trunk by a :class:`~peft_qst.layer.QSTLayer` (a bare trunk, which is the root model itself, is wrapped
whole: see :data:`ROOT_TRUNK`). On loading it also checks that an adapter fits the model it
is loaded onto: the recorded base-model signature, the exact set of weight names, and the weights' digest.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import os
import re
import threading
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from .backbone_lora import is_time_step_delta, resolve_backbone_lora_layers
from .bnb_compat import keep_4bit_weights_through_state_dict, route_4bit_layers_by_mode, stop_routing_4bit_layers
from .config import AUTO, FINGERPRINT_METADATA, PEFT_TYPE, QSTConfig
from .layer import BASE_ADAPTER_NAME, CONTINUOUS_BATCHING_REFUSAL, QSTLayer, layers_holding
from .lm_head import install_lm_head_hooks, uninstall_lm_head_hooks
from .loss import install_chunked_loss, uninstall_chunked_loss
from .per_call import call_state, held_call_state
from .serialization import QSTAdapterFileError, user_stacklevel
from .side import (
    HALF_DTYPES,
    QSTUnsupportedModelError,
    auto_side_head_candidates,
    decoder_attribute,
    find_layer_list,
    is_state_space_model,
    is_unreached_part,
    num_blocks,
    resolve_side_heads,
    shrink_config,
    side_head_counts,
    signature_predates_decoder_sizes,
    sizes_mapped_to_encoder,
    unsupported_blocks_reason,
    unsupported_reason,
)

#: attribute holding the side networks inside a QSTLayer; every saved key goes through it
SIDE_ATTR = "qst_side"

#: (PeftModel, adapter name, ignore_mismatched_sizes) while ``PeftModel.load_adapter`` runs (set by its wrapper in
#: registration.py): the weights PEFT is about to read are for that adapter, loaded with those options
loading_adapter: ContextVar = ContextVar("peft_qst_loading_adapter", default=None)

#: True while a saved adapter is being loaded (``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers'
#: ``load_adapter``; set by their wrappers in registration.py): the config PEFT injects is the saved one, whose
#: ``modules_to_save`` is checked against the weights read with it (:func:`check_saved_modules_to_save_present`), not as
#: a new adapter's, also where it records no ``base_model_signature`` (a hand-written or older config)
reading_saved_adapter: ContextVar = ContextVar("peft_qst_reading_saved_adapter", default=False)

#: while a saved adapter is being loaded (set by the outermost load wrapper, :func:`warned_once_loaded`): the warnings
#: its checks found, as (message, category), given only once the load succeeded
_pending_load_warnings: ContextVar = ContextVar("peft_qst_pending_load_warnings", default=None)

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
#: the prefix of a PeftModel's parameter names (``base_model.model.`` + the transformers model's own): saved adapter
#: keys carry it, the names of a model that no PeftModel wraps (``inject_adapter_in_model``) do not
PEFT_MODEL_PREFIX = "base_model.model."


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
    """Module name of the decoder trunk to wrap (an already wrapped one counts); "" for a bare trunk, the model
    itself."""
    for name, module in model.named_modules():
        if isinstance(module, QSTLayer):
            return name
    if is_bare_trunk(model):
        return ""
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


def text_config_of(config):
    """The config the side network is sized from: a composite (multimodal) model's ``text_config`` where it has one
    with sizes (Llava, Gemma 3, Qwen2-VL, ...), else the config itself (text models; Phi-4-multimodal, whose text sizes
    are at its top level and which has no ``text_config``). Sizes at the top level beside a ``text_config`` do not make
    a config its own text config: a flat config.json (adept/fuyu-8b's: ``hidden_size``, ``num_hidden_layers``, ... at
    the top level and in ``text_config``) leaves them there as extra attributes, while the language model is built from
    ``text_config``; taken for a text model, a composite type was side-tuned unchecked (Fuyu was, though refused
    without them) and sized from copies its language model does not read."""
    text = getattr(config, "text_config", None)
    if text is None or not hasattr(text, "hidden_size"):
        return config
    return text


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


def _json_size(value):
    """A config size as JSON stores it: an int, or a list of ints for per-layer sizes."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return int(value)


def model_signature(model: nn.Module, decoder_sizes: bool = True) -> dict:
    """What an adapter must match: model type, widths, depth, head layout, FFN width and vocabulary.

    Every entry shapes the side network (its widths and heads are the model's divided by r) or what its output means
    (the vocabulary the frozen LM head maps it onto), so a model that differs in any of them is another base model.

    The counts are those of the decoder blocks QST side-tunes: where a config maps them to its encoder's (BART's
    family, Whisper: :func:`~peft_qst.side.decoder_attribute`), its decoder's, with ``"sizes_of": "decoder"`` to say
    so; an adapter saved before recorded the encoder's (an adapter of whisper-large-v3-turbo's 4-block decoder loaded
    onto distil-whisper's 2-block one was told "32 layers" on both sides), which ``decoder_sizes=False`` gives to
    compare it with.
    """
    config = text_config_of(model.config)
    of_decoder = decoder_sizes and sizes_mapped_to_encoder(config)

    def size(name):
        return getattr(config, decoder_attribute(config, name) if of_decoder else name, None)

    # a pure state-space model (Mamba) has no attention heads: recorded as 0, so that the entry every adapter records
    # is there and an SSM adapter loaded onto a model with heads is told so
    heads = 0 if is_state_space_model(config) else int(size("num_attention_heads"))
    signature = {
        # a composite model's own type (``llava``), with its language model's sizes
        "model_type": model.config.model_type,
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(size("num_hidden_layers")),
        "num_attention_heads": heads,
    }
    if of_decoder:
        signature["sizes_of"] = "decoder"
    if config is not model.config:
        # and its language model's type: the side network is built from that model's class (a Llava with a Llama or a
        # Mistral language model of the same sizes holds side networks of the same weight names and shapes, which
        # would load into each other silently, where the text models alone are refused by their model_type)
        signature["text_model_type"] = config.model_type
    kv_heads = size("num_key_value_heads")
    signature["num_key_value_heads"] = int(kv_heads) if kv_heads is not None else heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim or heads:  # Mamba-2's head_dim is its Mamba heads' width; Mamba has none
        signature["head_dim"] = int(head_dim) if head_dim else int(config.hidden_size) // heads
    if heads == 0:
        # the widths that shape a state-space side network beside hidden_size and intermediate_size
        for name in ("state_size", "num_heads", "n_groups"):
            if getattr(config, name, None) is not None:
                signature[name] = int(getattr(config, name))
    # the FFN width's name differs between families (and the decoder's has its own beside the encoder's)
    for name in ("decoder_ffn_dim",) * of_decoder + ("intermediate_size", "ffn_dim", "n_inner"):
        value = getattr(config, name, None)
        if value is not None:
            signature["intermediate_size"] = _json_size(value)
            break
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None:
        signature["vocab_size"] = int(vocab_size)
    return signature


def signature_differences(recorded: dict, signature: dict) -> dict:
    """The recorded entries this model does not match, as {name: (recorded, this model's)}.

    Only the entries the adapter recorded are compared: adapters saved by earlier versions recorded fewer of them."""
    return {
        name: (value, signature.get(name))
        for name, value in recorded.items()
        if signature.get(name) != value
    }


def _describe(signature: dict) -> str:
    text = signature.get("text_model_type")
    return (
        f"a {signature.get('model_type')} model"
        + (f" with a {text} language model" if text else "")
        + f" (hidden_size={signature.get('hidden_size')}, "
        f"{signature.get('num_hidden_layers')} {'decoder ' if signature.get('sizes_of') == 'decoder' else ''}layers, "
        f"{signature.get('num_attention_heads')} attention heads)"
    )


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
            f"QSTConfig.copy_heads needs a model with an LM head ({type(model).__name__}, a {model_type} model, has "
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


def _modules_to_save_entries(config: QSTConfig) -> list:
    """``modules_to_save`` as a list. ``QSTConfig`` refuses a bare string when it is built; one assigned to the field
    afterwards counts as one name here (PEFT would match each of its characters)."""
    return [config.modules_to_save] if isinstance(config.modules_to_save, str) else config.modules_to_save or []


def _names_an_entry(name: str, entries) -> bool:
    """Whether module ``name`` is one that PEFT wraps for these ``modules_to_save`` entries. PEFT (``_set_trainable``)
    matches each entry as a plain suffix of the name, not as whole name segments: ``"layernorm"`` wraps every
    ``input_layernorm``, which a check of whole segments let through into the frozen trunk."""
    return any(name.endswith(entry) for entry in entries)


#: the modules inside PEFT's wrapper of a module saved whole (``ModulesToSaveWrapper``), and QST's side networks: not
#: modules of the model to suggest for a ``modules_to_save`` entry
_NOT_SUGGESTED = ("original_module", "modules_to_save", SIDE_ATTR)


def _unmatched_entries(model: nn.Module, entries) -> list[str]:
    """The ``modules_to_save`` entries that name no module of ``model`` as PEFT matches them: ``_set_trainable``
    wraps every module whose name ends with an entry (:func:`_names_an_entry`), over
    ``named_modules(remove_duplicate=False)``, so that a module registered under two names counts under both, and
    skips an entry that matches none without a word (for LoRA too)."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    return [entry for entry in dict.fromkeys(entries) if not any(_names_an_entry(name, (entry,)) for name in names)]


def _name_in(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    """The name of ``module`` among ``model``'s modules ("" for the model itself), None where it is not one."""
    return next((name for name, candidate in model.named_modules() if candidate is module), None)


def _meets_trunk(name: str, trunk_name: str) -> bool:
    """Whether the module ``name`` is the decoder trunk ``trunk_name``, lies inside it or holds it (every module does,
    for a bare trunk: ``trunk_name`` "")."""
    return (
        trunk_name == "" or name == trunk_name or name.startswith(trunk_name + ".") or trunk_name.startswith(name + ".")
    )


def _suggested_module_names(model: nn.Module, entries, trunk: Optional[nn.Module]) -> str:
    """What to say instead of ``modules_to_save`` entries that match nothing: for each, a few names of the modules of
    ``model`` outside the decoder trunk ``trunk`` (whole names and their last parts) close to it; where none is close,
    those modules (the ones that can be trained: one inside the trunk is refused, and suggesting one misleads)."""
    trunk_name = _name_in(model, trunk)
    modules = {}
    for name, _ in model.named_modules(remove_duplicate=False):
        if (
            not name
            or any(part in _NOT_SUGGESTED for part in name.split("."))
            or trunk_name is not None and _meets_trunk(name, trunk_name)
        ):
            continue
        modules[name] = None
    names = list(dict.fromkeys([*modules, *(name.rpartition(".")[2] for name in modules)]))
    close = {entry: difflib.get_close_matches(entry, names, n=3) for entry in entries}
    if any(close.values()):
        return "close module names of this model: " + "; ".join(
            f"{entry!r}: {found}" for entry, found in close.items() if found
        )
    heads = sorted(name for name in modules if name.rpartition(".")[0] not in modules)  # the outermost
    if not heads:
        return "no module of this model lies outside the decoder trunk"
    return f"the modules of this model outside the decoder trunk: {heads[:8]}"


def _check_modules_to_save_match(model: nn.Module, trunk: nn.Module, config: QSTConfig, added_tokens: bool) -> None:
    """Every ``modules_to_save`` entry of a new adapter names a module of the model. PEFT skips one that matches
    nothing without a word (LoRA too): a typo (``"lm_haed"``, ``"scroe"``) trained and saved nothing for that module,
    which showed only after training. Not checked are the heads PEFT's task classes add to every adapter's list
    (:data:`_TASK_HEADS`: ``"classifier"`` and ``"score"`` for ``SEQ_CLS``, of which a model has one), and the
    ``"lm_head"`` TRL adds beside ``trainable_token_indices`` when its chat-template cloning added tokens (a
    classifier has none). A loaded adapter's entries are checked against its weights instead
    (:func:`check_saved_modules_to_save_present`)."""
    task_type = getattr(config.task_type, "value", config.task_type)
    exempt = set(_TASK_HEADS.get(task_type, ())) | ({"lm_head"} if added_tokens else set())
    unmatched = [entry for entry in _unmatched_entries(model, _modules_to_save_entries(config)) if entry not in exempt]
    if not unmatched:
        return
    raise ValueError(
        f"QSTConfig.modules_to_save={_modules_to_save_entries(config)!r}: {unmatched} match no module of "
        f"{type(model).__name__} (PEFT matches each entry as the end of a module name), so nothing would be trained "
        f"or saved for them ({_suggested_module_names(model, unmatched, trunk)}). Correct these entries or "
        "remove them."
    )


def check_saved_modules_to_save_present(model: nn.Module, adapter_name: str, entries, keys) -> None:
    """Before an adapter's weights are loaded: each entry of its ``modules_to_save`` (``entries``: as saved where the
    file's config is known) whose weights the file holds (``keys``) names a module of ``model``. PEFT skips an entry
    that matches nothing without a word, so a head the adapter trained that this model lacks (an adapter saved from
    another model class, or with another head name) was reported as weights missing for the model's own head, or as
    tensors "written by something other than save_pretrained", neither naming the cause. An entry that matches
    nothing and has no weights in the file trained nothing (an adapter saved before
    :func:`_check_modules_to_save_match`, TRL's ``"lm_head"`` on a classifier) and loads as it was saved."""
    entries = [entries] if isinstance(entries, str) else entries if isinstance(entries, (list, tuple, set)) else ()
    entries = [entry for entry in entries if isinstance(entry, str) and entry]  # a bad file's: refused elsewhere
    unmatched = _unmatched_entries(model, entries)
    if not unmatched:
        return
    modules = set()
    for key in keys:
        key = key.removeprefix(PEFT_MODEL_PREFIX)
        if f".{SIDE_ATTR}." in f".{key}":
            continue
        parts = key.split(".")[:-1]
        modules.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    saved = {entry: sorted(name for name in modules if _names_an_entry(name, (entry,))) for entry in unmatched}
    saved = {entry: names for entry, names in saved.items() if names}
    if not saved:
        return
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    trunk = next((module for module in base.modules() if isinstance(module, QSTLayer)), None)
    raise QSTAdapterFileError(
        f"QST adapter {adapter_name!r} was saved with modules_to_save entries {sorted(saved)} and their trained "
        f"weights (modules {sorted(name for names in saved.values() for name in names)[:3]}), but they match no "
        f"module of {type(base).__name__} ({_suggested_module_names(base, sorted(saved), trunk)}). Load the "
        "adapter onto the model class (and head) it was trained with; nothing was loaded."
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


def _check_modules_to_save_outside(model: nn.Module, trunk: nn.Module, config: QSTConfig) -> None:
    """modules_to_save inside the decoder trunk (embeddings, norms, a LoraConfig's list) cannot train: the trunk
    runs frozen under no_grad. PEFT matches entries as suffixes of module names."""
    entries = _modules_to_save_entries(config)
    names = {module: name for name, module in model.named_modules()}
    trunk_name = names.get(trunk)
    if not entries or trunk_name is None:
        return
    inside = sorted(
        {
            entry
            for name in names.values()
            if name.startswith(trunk_name + ".") or (trunk_name == "" and name)  # a bare trunk: every module
            for entry in entries
            if _names_an_entry(name, (entry,))
        }
    )
    if inside:
        raise ValueError(
            f"QSTConfig.modules_to_save={entries!r}: {inside} lie inside the decoder trunk "
            f"{repr(trunk_name) if trunk_name else '(the bare trunk is the whole model)'}, which QST "
            "runs frozen without gradients, so they could not train. Only modules outside it can be trained and "
            "saved with the adapter (an LM head, a classification head); remove these entries."
        )


def _check_modules_to_save_before_trunk(model: nn.Module, trunk: nn.Module, config: QSTConfig, model_type: str) -> None:
    """modules_to_save before the language model of a composite (multimodal) model (its vision tower, its projector)
    cannot train either: their output reaches the loss only through the language model, which QST runs frozen under
    no_grad, and the side network reads the merged embeddings detached (:meth:`QSTLayer._forward_adapted`). PEFT would
    wrap them, count them as trainable and save them, while their gradients stayed None (LoRA trains them: its backward
    runs through the language model). They are the modules beside the trunk in the model that holds it (LlavaModel,
    Qwen2VLModel, ...); the heads after it (``lm_head``, ``score``) lie outside that model."""
    entries = _modules_to_save_entries(config)
    names = {module: name for name, module in model.named_modules()}
    trunk_name = names.get(trunk)
    if not entries or trunk_name is None:
        return
    holder = trunk_name.rpartition(".")[0]  # "" where the composite base model itself was passed (LlavaModel)
    before = sorted(
        {
            entry
            for name in names.values()
            if name
            and (not holder or name == holder or name.startswith(holder + "."))
            and name != trunk_name
            and not name.startswith(trunk_name + ".")
            and not trunk_name.startswith(name + ".")  # a module holding the trunk: the trunk check's concern
            for entry in entries
            if _names_an_entry(name, (entry,))
        }
    )
    if before:
        raise ValueError(
            f"QSTConfig.modules_to_save={entries!r}: {before} lie before the language model {trunk_name!r} of this "
            f"{model_type} model (its vision tower or projector). Their output reaches the loss only through the "
            "language model, which QST runs frozen without gradients (the side network reads its hidden states "
            "detached), so they could not train. Remove these entries: QST trains the side network beside the "
            "language model, and modules after it (the LM head)."
        )


def _quantized_layers(module: nn.Module) -> list:
    """The bitsandbytes-quantized layers in ``module`` and anywhere inside it, as [(relative name, class name)]: a
    ``Linear4bit``/``Linear8bitLt``, or a layer holding a packed ``Params4bit``/``Int8Params`` or integer weight."""
    return [
        (name, type(layer).__name__)
        for name, layer in module.named_modules()
        if type(layer).__name__ in ("Linear4bit", "Linear8bitLt")
        or any(
            type(w).__name__ in ("Params4bit", "Int8Params") or not w.dtype.is_floating_point
            for w in layer.parameters(recurse=False)
        )
    ]


def _check_modules_to_save_unquantized(model: nn.Module, trunk: nn.Module, config: QSTConfig) -> None:
    """The modules trained and saved whole with the adapter (``modules_to_save``, and the head PEFT's task class adds
    to it after injection: :data:`_TASK_HEADS`) must be plain, unquantized layers. transformers' bitsandbytes loading
    keeps only the model's last parameter and its LM head unquantized by default, so a head with a bias (the
    ``score`` of ``AutoModelForTokenClassification``, the ``qa_outputs`` of ``AutoModelForQuestionAnswering``) is
    loaded as a 4-bit ``Linear4bit`` (``SEQ_CLS``'s bias-free ``score`` is kept). PEFT's trainable copy of it then
    fails, after the side network was injected, with bitsandbytes' own errors: "only Tensors of floating point dtype
    can require gradients" for a head loaded from the checkpoint, a bare ``AssertionError`` at the first forward for
    a newly initialised one, whose weight was never quantized (LoRA fails the same way). A head made of sub-modules
    (an ``nn.Sequential``, a dense + out_proj classification head) is copied whole, so a quantized layer anywhere
    inside it fails the same way: every layer inside an entry is checked. The trunk, or a module holding it, is
    left to :func:`_check_modules_to_save_outside` and PEFT (keeping it out of quantization is no fix)."""
    entries = _modules_to_save_entries(config)
    task_type = getattr(config.task_type, "value", config.task_type)
    heads = set(entries) | set(_TASK_HEADS.get(task_type, ()))
    trunk_name = _name_in(model, trunk)
    if not heads or trunk_name is None:
        return
    quantized = {}
    for name, module in model.named_modules():
        if not name or not _names_an_entry(name, heads) or _meets_trunk(name, trunk_name):
            continue
        layers = _quantized_layers(module)
        if layers and layers[0][0] == "":  # the module itself is the quantized layer
            quantized[name] = layers[0][1]
        elif layers:
            inside = ", ".join(f"{kind} {name + '.' + sub!r}" for sub, kind in layers)
            quantized[name] = f"{type(module).__name__} holding {inside}"
    if quantized:
        listed = ", ".join(f"{name!r} ({kind})" for name, kind in sorted(quantized.items()))
        skip = sorted({name.rpartition(".")[2] for name in quantized})
        why = (
            f"the task head PEFT trains for task_type={task_type!r}"
            if set(skip) <= set(_TASK_HEADS.get(task_type, ())) and not set(skip) & set(entries)
            else "modules_to_save"
        )
        raise QSTUnsupportedModelError(
            f"{listed} was loaded quantized by bitsandbytes, but QST trains and saves it whole with the adapter "
            f"({why}), and a quantized layer cannot be trained: bitsandbytes fails later with a bare AssertionError "
            "or \"only Tensors of floating point dtype can require gradients\" (LoRA too). transformers keeps only "
            "the LM head and the model's last parameter unquantized by default, so a head with a bias is quantized. "
            f"Keep it out of quantization when loading the base model: BitsAndBytesConfig(..., "
            f"llm_int8_skip_modules={skip!r}); load a saved adapter onto a base model loaded the same way."
        )


def _check_bare_trunk_config(model: nn.Module, config: QSTConfig) -> None:
    """A bare decoder trunk (AutoModel) is side-tuned for its features only: its QST output is the adapted
    ``last_hidden_state``, which ``PeftModelForFeatureExtraction`` returns. Other task types' PEFT wrappers would
    run the trunk through a forward built for a model with a head (PEFT's plain ``PeftModel`` even through
    ``get_base_model()``, which is the unadapted trunk here), and an adapter saved from such a model has other weight
    names and its head."""
    name = type(model.get_base_layer() if isinstance(model, QSTLayer) else model).__name__
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
    (:data:`_TASK_HEADS`); a causal LM has none, so ``task_type="SEQ_CLS"`` on an ``*ForCausalLM`` trained no head and
    its loss, the LM's on class labels, came out NaN without a word. ``task_type="CAUSAL_LM"`` on a model without
    generation (an ``*ForSequenceClassification``) failed in PEFT with "object has no attribute
    'prepare_inputs_for_generation'". A head of another name that the config's ``modules_to_save`` lists (a model
    whose head is ``classification_head``, trained with ``modules_to_save=["classification_head"]``) counts: PEFT
    trains it beside the ones it adds."""
    task_type = getattr(config.task_type, "value", config.task_type)
    name = type(model).__name__
    heads = _TASK_HEADS.get(task_type)
    # matched as PEFT matches modules_to_save: as suffixes of module names
    trained = tuple(heads or ()) + tuple(_modules_to_save_entries(config))
    if heads and not any(_names_an_entry(module, trained) for module, _ in model.named_modules()):
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
                value = getattr(model_config, attribute, None)
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
            listed = ", ".join(
                f"{name} {recorded_value} against {model_value}"
                for name, (recorded_value, model_value) in differences.items()
            )
            built_for, loaded_onto = _describe(recorded), _describe(signature)
            # where only what _describe leaves out differs (a resized vocabulary, a head_dim), the two descriptions are
            # the same text, and "built for X but loaded onto X" read as if the check itself were wrong
            loaded_onto = "one of the same type and those sizes" if loaded_onto == built_for else loaded_onto
            raise ValueError(
                f"This QST adapter was built for {built_for} but is being loaded onto {loaded_onto}"
                f" ({type(model).__name__}); they differ in {listed} (the adapter's value first). Load it onto the "
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
            _check_modules_to_save_match(model, trunk, config, added_tokens)
        if not is_bare_trunk(model) and self.__dict__.get(_TASK_CLASS_WRAPS, True):
            _check_task_head(model, config)
        _check_modules_to_save_outside(model, trunk, config)
        if composite:
            _check_modules_to_save_before_trunk(model, trunk, config, model_type)
        _check_modules_to_save_unquantized(model, trunk, config)
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

        PEFT calls this after creating or loading an adapter. A load with ``low_cpu_mem_usage=True`` assigns the
        file's tensors as they are, in the dtype they were saved in (an adapter trained on a 4-bit model with bf16
        compute loaded onto an fp32 model, or the reverse); they are brought back to the rule here. Except weights
        saved in float32 beside a half-precision side network (:func:`_keeps_float32_weights`), which stay float32.
        """
        config = self.peft_config.get(adapter_name)
        if config is None:
            return
        dtype = resolve_side_dtype(self.model, config)
        for _, layer in layers_holding(self.model, adapter_name):
            side = layer.qst_side[adapter_name]
            keep = _keeps_float32_weights(config, dtype, side.upsample.weight.dtype)
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
        so an adapter loads under any name without touching the others."""
        marker = f"{SIDE_ATTR}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{SIDE_ATTR}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: QSTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = with_peft_model_prefix(model, state_dict)
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
        _keep_weights_saved_in_float32(model, config, marker, remapped, loaded)
        return remapped


def _wrapped_by_peft_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameter names carry :data:`PEFT_MODEL_PREFIX` (a PeftModel, not an injected model)."""
    return any(name.startswith(PEFT_MODEL_PREFIX) for name, _ in model.named_parameters())


def with_peft_model_prefix(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with PeftModel's ``"base_model.model."`` prefix on its keys where ``model`` is a PeftModel and
    none of them has it. Weights taken with ``get_peft_model_state_dict`` from a model that ``inject_adapter_in_model``
    adapted (a custom loop's model, no PeftModel around it) lack the prefix: ``set_peft_model_state_dict`` takes it off
    for such a model but does not put it back for a PeftModel, and every weight was refused as missing and unexpected
    ("saved from a different QST configuration"), or, for a module saved whole (``modules_to_save``), PEFT failed with
    a bare KeyError. The keys name the same weights. Run in PEFT's ``set_peft_model_state_dict`` before it gives
    those modules' keys the adapter's name (``registration``), and in
    :meth:`QSTModel._remap_adapter_state_dict_for_load` for a ``set_peft_model_state_dict`` bound before
    ``import peft_qst``."""
    prefixed = any(key.startswith(PEFT_MODEL_PREFIX) for key in state_dict)
    if state_dict and not prefixed and _wrapped_by_peft_model(model):
        return {PEFT_MODEL_PREFIX + key: value for key, value in state_dict.items()}
    return state_dict


def _keeps_float32_weights(config: QSTConfig, dtype: torch.dtype, upsample_dtype: torch.dtype) -> bool:
    """Whether float32 weights of a side network whose upsample is ``upsample_dtype`` stay float32 under the rule's
    ``dtype``: where ``side_dtype`` is unset, the rule is a half dtype and the upsample (the weight the side network
    computes in the dtype of) is one too. Such a side network was saved with some weights kept in float32 on purpose:
    TRL's ORPO and CPO trainers (``peft_module_casting_to_bf16`` under ``bf16=True`` on a 4-bit model) cast every
    module named ``norm`` to float32, so its norm weights and the downsamplers' LayerNorms trained in float32 beside a
    bf16 side network. Rounded to bf16 on reload, they lost their training below bf16's resolution and the reloaded
    adapter's logits differed from the trained model's (by 0.004 after three steps on a tiny 4-bit Llama), where a
    LoRA adapter (float32, as PEFT keeps it) reloads exactly. A side network saved in one dtype still takes the
    rule's (float32 loaded onto a bf16 model: bf16 throughout), and a ``side_dtype`` that is set is the dtype of
    every weight."""
    return config.side_dtype is None and dtype in HALF_DTYPES and upsample_dtype in HALF_DTYPES


def _keep_weights_saved_in_float32(
    model: nn.Module, config: QSTConfig, marker: str, remapped: dict[str, torch.Tensor], loaded: set[str]
) -> None:
    """Before PEFT copies the file's tensors into the side network: the weights of a half-precision side network
    that the file holds in float32 (see :func:`_keeps_float32_weights`) are made float32 first, so that the copy
    keeps every bit of them (``load_state_dict`` copies into the parameter's own dtype). A load with
    ``low_cpu_mem_usage=True`` assigns the file's tensors whole, and ``_cast_adapter_dtype`` leaves them float32.

    Every other weight of the file is brought to its parameter's dtype here, as the copy would do:
    ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)`` called directly (after ``inject_adapter_in_model``,
    as PEFT's docs pair them) assigns the tensors as they are and has no ``_cast_adapter_dtype`` after it, so a side
    network saved in float32 and loaded onto a bf16 model stayed float32 (and one saved in bf16 from a 4-bit model
    stayed bf16 on a float32 model), computing otherwise than ``PeftModel.from_pretrained`` of the same folder."""
    parameters = dict(model.named_parameters())
    for key in loaded:
        parameter = parameters.get(key)
        if parameter is None or parameter.device.type == "meta" or remapped[key].dtype != torch.float32:
            continue
        upsample = remapped.get(key[: key.index(marker) + len(marker)] + "upsample.weight")
        if upsample is not None and _keeps_float32_weights(config, parameter.dtype, upsample.dtype):
            parameter.data = parameter.data.float()
    for key in loaded:  # (after the loop above, which reads the upsample's dtype as saved)
        parameter = parameters.get(key)
        if (
            parameter is not None and parameter.device.type != "meta" and parameter.is_floating_point()
            and remapped[key].is_floating_point() and remapped[key].dtype != parameter.dtype
        ):
            remapped[key] = remapped[key].to(parameter.dtype)


def _token_embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's input and output token embeddings (the LM head), as ``get_input_embeddings`` and
    ``get_output_embeddings`` give them: the layers PEFT's ``save_embedding_layers`` saves."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if layer is not None:
            layers.append(layer)
    return layers


def _named_token_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's token embeddings (:func:`_token_embeddings`) with every name they have in its state dict (FSDP's
    wrapper names left out): the loading checks below look them up in a file read for an adapter."""
    embeddings = _token_embeddings(model)
    return [
        (name.replace("_fsdp_wrapped_module.", ""), module)
        for name, module in model.named_modules(remove_duplicate=False)
        if name and any(module is layer for layer in embeddings)
    ]


def _saved_beside_the_adapter(model: nn.Module, adapter_name: str, state_keys) -> set[str]:
    """The state keys besides the side network that an adapter saved by ``save_pretrained`` may hold: those of the
    modules saved whole with adapter ``adapter_name`` (``modules_to_save``; as saved and as PEFT's wrappers map them
    for loading), those of the head its task class saves (:data:`_TASK_HEADS`, which transformers' ``load_adapter``
    with ``peft_config=`` loads into the model's own head), and those of the model's input and output token
    embeddings, which PEFT saves with ``save_embedding_layers`` (and sets that itself when they were resized) and
    loads into the model's own."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    def plain(name: str) -> str:
        return name.replace("_fsdp_wrapped_module.", "")

    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
                keys.update((f"{plain(name)}.{saved}", f"{plain(name)}.{loaded}"))
    config = getattr(model, "peft_config", {}).get(adapter_name)
    task_type = getattr(config, "task_type", None)
    heads = _TASK_HEADS.get(getattr(task_type, "value", task_type), ())
    names = [name for name, _ in _named_token_embeddings(model)] + [
        plain(name) for name, _ in model.named_modules(remove_duplicate=False)
        if name and name.rpartition(".")[2] in heads
    ]
    keys.update(key for key in state_keys for name in names if key.startswith(f"{name}."))
    return keys


def saved_adapter_copies_of_embeddings(model: nn.Module, adapter_name: str, keys) -> list[str]:
    """The keys among ``keys`` (of a file read for QST adapter ``adapter_name``) that hold the saved adapter's trained
    copy of a token embedding wrapped by ``modules_to_save`` (the LM head of ``modules_to_save=["lm_head"]``) a second
    time, as ``<head>.modules_to_save.weight``. PEFT's ``save_embedding_layers`` (which it sets when the vocabulary was
    resized) saves the wrapped head's whole state: the resized frozen head (``<head>.original_module.weight``, which
    loads into the head every adapter and ``disable_adapter`` share) and the adapter's copy with its name removed,
    which PEFT also saves as the ``<head>.weight`` that loads into the adapter's copy. That second copy names no weight
    of the model, so every load refused the file as foreign: an adapter trained with its LM head on a resized
    vocabulary could be saved but never loaded. It is dropped instead (LoRA's load ignores it)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = PEFT_MODEL_PREFIX
    prefixed = _wrapped_by_peft_model(model)
    copies = set()
    for name, module in _named_token_embeddings(model):
        if isinstance(module, AuxiliaryTrainingWrapper):
            copies.update(f"{name}.modules_to_save.{key}" for key in module.adapter_state_dict_load_map(adapter_name))
    return [key for key in keys if (key if prefixed else key.removeprefix(prefix)) in copies]


def check_token_embeddings_fit(model: nn.Module, tensors: dict) -> None:
    """The token embeddings in a file read for a QST adapter of ``model`` (PEFT saves them with
    ``save_embedding_layers``, which it sets when the vocabulary was resized) have as many rows as the model's. An
    adapter whose config records the vocabulary size is refused before its weights are read; one saved before it was
    recorded, loaded onto a base model that was not resized as it had been, was refused by PEFT for "a module saved
    whole with the adapter, modules_to_save" (which it is not) and by transformers' ``load_adapter`` with a bare
    "You set `ignore_mismatched_sizes` to `False`", neither naming the vocabulary or the resize that fixes it."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = PEFT_MODEL_PREFIX
    for name, module in _named_token_embeddings(model):
        layer = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            continue  # (a 4-bit head's packed weight does not show the vocabulary)
        name, rows = name.removeprefix(prefix), weight.shape[0]
        for key, tensor in tensors.items():
            if (
                key.removeprefix(prefix).startswith(f"{name}.") and key.endswith("weight") and tensor.dim() == 2
                and tensor.shape[0] != rows
            ):
                raise QSTAdapterFileError(
                    f"The checkpoint does not fit this model: it holds token embeddings for a vocabulary of "
                    f"{tensor.shape[0]} tokens ({key} {tuple(tensor.shape)}), and this model's has {rows}. PEFT saves "
                    "them beside an adapter trained on a resized vocabulary (save_embedding_layers). Load the adapter "
                    f"onto its base model resized as it was then: model.resize_token_embeddings({tensor.shape[0]}) "
                    "(after adding the same tokens to the tokenizer). Nothing was loaded."
                )


def checkpoint_vocab_size(model_id, config_class, local_files_only: bool = True) -> Optional[int]:
    """The vocabulary size in the config of checkpoint ``model_id`` (a folder or a Hub id), read as ``config_class``:
    its text config's where it has one (:func:`text_config_of`; a Llava or Qwen2-VL config keeps it in
    ``text_config``, which PEFT's ``save_embedding_layers="auto"`` does not read). None where the config cannot be
    read (with ``local_files_only``, without the network: a folder, or the Hub cache)."""
    if not model_id or not isinstance(model_id, (str, os.PathLike)):
        return None
    try:
        config = config_class.from_pretrained(model_id, local_files_only=local_files_only)
        vocab_size = getattr(text_config_of(config), "vocab_size", None)
    except Exception:  # noqa: BLE001 - no such folder or cached repo, another config class, a garbled file
        return None
    return int(vocab_size) if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None


def vocabulary_resized_from_checkpoint(model: nn.Module, model_id) -> Optional[tuple[int, int]]:
    """(the checkpoint's, the model's) vocabulary sizes where the language model of composite ``model`` (its vocabulary
    size in ``text_config``) was resized from checkpoint ``model_id``'s, else None. PEFT's ``save_embedding_layers=
    "auto"`` compares the top-level configs' ``vocab_size``, which a composite config lacks (or keeps unresized beside
    its ``text_config``): it saved no embeddings for a resized VLM. The checkpoint's config is found as PEFT finds it
    (a folder, else the Hub: ``check_file_exists_on_hf_hub``, which warns itself where it cannot tell and PEFT then
    assumes the vocabulary unchanged). Its warning is PEFT's to give, once: the same lookup, which PEFT's
    ``save_pretrained`` makes next for every adapter with a ``base_model_name_or_path``, reports the same failure
    itself; this one's is held back (each save of a VLM named by Hub id, without the network, printed PEFT's
    "Unable to fetch remote file ... config.json" twice, once for a lookup the user never asked for)."""
    from peft.utils.other import check_file_exists_on_hf_hub

    config = model.config
    vocab_size = getattr(text_config_of(config), "vocab_size", None)
    if text_config_of(config) is config or not isinstance(vocab_size, int) or not model_id:
        return None  # a plain config: PEFT decides itself; a from-config model (no name): PEFT does not check either
    exists = os.path.exists(os.path.join(model_id, "config.json"))
    if not exists:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unable to fetch remote file", category=UserWarning)
            exists = check_file_exists_on_hf_hub(model_id, "config.json")
    if not exists:
        return None
    base_vocab_size = checkpoint_vocab_size(model_id, type(config), local_files_only=False)
    if base_vocab_size is None or base_vocab_size == vocab_size:
        return None
    return base_vocab_size, vocab_size


def warn_once_loaded(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn about the adapter being loaded once its load succeeded (:func:`warned_once_loaded`), at the user's line;
    at once where no load wrapper runs. Given where the check finds it, a warning preceded every refusal later in the
    same load (the weights' digest, names, shapes, foreign tensors), telling of an adapter that was then not loaded."""
    pending = _pending_load_warnings.get()
    if pending is None:
        warnings.warn(message, category, stacklevel=user_stacklevel())
    elif (message, category) not in pending:
        pending.append((message, category))


def warned_once_loaded(load):
    """``load`` (a load wrapper: ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers'
    ``load_adapter``) collecting the warnings of :func:`warn_once_loaded` and giving them, once each, only where it
    returns; a refused load drops them. Within another load (``from_pretrained`` calls ``load_adapter``) the outer
    one gives them."""

    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        if _pending_load_warnings.get() is not None:
            return load(*args, **kwargs)
        pending = []
        token = _pending_load_warnings.set(pending)
        try:
            result = load(*args, **kwargs)
        finally:
            _pending_load_warnings.reset(token)
        for message, category in pending:
            warnings.warn(message, category, stacklevel=user_stacklevel())
        return result

    return wrapper


def warn_added_token_embeddings_not_saved(model: nn.Module, adapter_name: str, saved_config: dict, tensors) -> None:
    """Warn where QST adapter ``adapter_name`` was trained on a vocabulary larger than the checkpoint the model was
    loaded from (the ``base_model_signature`` of ``saved_config``, the ``adapter_config.json`` read with the weights,
    records the size at saving, {} where none was read; the checkpoint's config tells its own; not the config of the
    adapter loaded into, which binding to this model, with ``config=`` or into an existing adapter, gives this model's
    size) while the file read for it (``tensors``) holds no input embeddings: the model was resized by hand, its
    added tokens' rows are those the resize drew (random), not those the adapter was trained with, and it computes
    otherwise on them, though every shape fits. PEFT saves no embeddings where ``save_embedding_layers=False`` or
    where it could not tell the vocabulary was resized (a VLM before peft-qst checked its ``text_config``; a base
    model built from a config, with no checkpoint to compare). The model's own checkpoint is read first (a base saved
    after its resize holds the trained rows), then the adapter's ``base_model_name_or_path``; neither read: no
    warning (the network is not used here)."""
    saved_config = saved_config or {}
    signature = saved_config.get("base_model_signature")
    recorded = signature.get("vocab_size") if isinstance(signature, dict) else None
    if not isinstance(recorded, int) or isinstance(recorded, bool):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    names = {
        name.replace("_fsdp_wrapped_module.", "").removeprefix(PEFT_MODEL_PREFIX)
        for name, module in model.named_modules(remove_duplicate=False) if name and module is embeddings
    }
    if any(key.removeprefix(PEFT_MODEL_PREFIX).startswith(f"{name}.") for key in tensors for name in names):
        return  # loaded over the model's rows
    for model_id in (getattr(base.config, "name_or_path", None), saved_config.get("base_model_name_or_path")):
        checkpoint = checkpoint_vocab_size(model_id, type(base.config))
        if checkpoint is not None:
            break
    if checkpoint is None or checkpoint >= recorded:
        return
    warn_once_loaded(
        f"QST adapter {adapter_name!r} was trained on a vocabulary of {recorded} tokens (recorded in its "
        f"adapter_config.json), resized from the {checkpoint} of base checkpoint {model_id!r}, but its file holds no "
        f"token embeddings: the {recorded - checkpoint} added tokens' rows are the ones this model's "
        "resize_token_embeddings drew (random), not the ones the adapter was trained with, so its outputs on those "
        "tokens differ from the trained model's. It was saved with save_embedding_layers=False, or by an earlier "
        "peft-qst (for a multimodal model, whose vocabulary size is in text_config, PEFT's save_embedding_layers="
        "\"auto\" did not save them). Save the adapter again from the trained model (save_pretrained saves them), or "
        "load it onto the base model it was trained on, saved after its resize."
    )


#: how many entries of each token-embedding matrix :func:`base_model_fingerprint` records
FINGERPRINT_ENTRIES = 64
#: the largest relative difference the same stored value shows loaded in another dtype: bf16 keeps 8 significant
#: bits (rounding to nearest moves a value by at most 2^-8 of it), float16 11 (2^-11 more where a float16 load is
#: compared with a bf16 one); float16's subnormals (below 6.1e-5) are spaced 2^-24 apart
FINGERPRINT_RTOL = 2.0 ** -8 + 2.0 ** -11
FINGERPRINT_ATOL = 2.0 ** -24


def _fingerprinted_weights(model: nn.Module) -> Optional[dict]:
    """{"input_embeddings": weight, "output_embeddings": weight} of the base ``model`` for
    :func:`base_model_fingerprint`: the token embeddings, and the LM head where it is not tied to them. bitsandbytes
    quantizes neither (nor do ``load_in_8bit`` and ``load_in_4bit`` touch their values), so they read the same in a
    float32, bf16, float16, 8-bit or 4-bit load of one checkpoint, up to the rounding of the load's dtype; a fine-tune
    moves them (a tied embedding matrix and an LM head get gradients in every row, from the softmax over the whole
    vocabulary). None where they cannot be read here: on the meta device (weights offloaded by accelerate or not
    loaded yet), partitioned by DeepSpeed ZeRO-3 or sharded by FSDP (:func:`~peft_qst.fast_path.sharded`), not a
    plain 2-D floating-point tensor (quantized by another method, a DTensor)."""
    from .fast_path import sharded

    weights = {}
    layers = _token_embeddings(model)
    if not layers or sharded(model):
        return None
    for kind, layer in zip(("input_embeddings", "output_embeddings"), layers):
        for attribute in ("original_module", "base_layer"):
            # the base model's own under PEFT's wrappers: an LM head trained with the adapter (modules_to_save) is a
            # copy, saved in the adapter's file; the original stays the checkpoint's
            inner = getattr(layer, attribute, None)
            layer = inner if isinstance(inner, nn.Module) else layer
        weight = getattr(layer, "weight", None)
        if kind == "output_embeddings" and any(weight is w for w in weights.values()):
            continue  # tied: the embeddings' rows
        if (
            type(weight) not in (torch.Tensor, nn.Parameter) or not weight.is_floating_point() or weight.dim() != 2
            or weight.device.type == "meta" or weight.numel() == 0 or hasattr(weight, "ds_id")
        ):
            return None
        weights[kind] = weight
    return weights


def base_model_fingerprint(model: nn.Module, original_rows: Optional[int] = None) -> Optional[dict]:
    """A cheap fingerprint of the base ``model``'s weights, which ``save_pretrained`` records in
    ``adapter_config.json`` (``base_model_fingerprint``) and loading compares (:func:`warn_if_base_model_differs`):
    :data:`FINGERPRINT_ENTRIES` entries of each token-embedding matrix (:func:`_fingerprinted_weights`), at fixed
    pseudo-random positions, as [row, column, value]. Rows are drawn from the first ``original_rows`` only (the
    checkpoint's vocabulary: a resize adds rows after them, drawn afresh by each resize), recorded as ``"rows"``. The
    positions are recorded with the values, so that a later version may draw others and still read this one; the
    model's ``name_or_path`` as ``"name_or_path"`` (where it has one), which the warning names: an adapter loaded onto
    another checkpoint and saved again keeps its first ``base_model_name_or_path`` (PEFT sets it once) but records
    this checkpoint's entries. None where the weights cannot be read (:func:`_fingerprinted_weights`)."""
    weights = _fingerprinted_weights(model)
    if weights is None:
        return None
    rows = min(weight.shape[0] for weight in weights.values())
    rows = min(rows, original_rows) if original_rows else rows
    fingerprint = {"rows": rows}
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None)
    if isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path):
        fingerprint["name_or_path"] = str(name_or_path)
    for kind, weight in weights.items():
        generator = torch.Generator().manual_seed(0)
        row_index = torch.randint(rows, (FINGERPRINT_ENTRIES,), generator=generator)
        column_index = torch.randint(weight.shape[1], (FINGERPRINT_ENTRIES,), generator=generator)
        with torch.no_grad():
            values = weight.detach()[row_index.to(weight.device), column_index.to(weight.device)].float().cpu()
        fingerprint[kind] = [[int(r), int(c), float(v)] for r, c, v in zip(row_index, column_index, values)]
    return fingerprint


def original_vocabulary_rows(model: nn.Module, config) -> Optional[int]:
    """The rows of base ``model``'s token embeddings that hold its checkpoint's vocabulary, for
    :func:`base_model_fingerprint`: the smallest of the checkpoint's vocabulary size (its config read where
    ``name_or_path`` names a folder or a cached Hub repository), the bound an earlier fingerprint of adapter ``config``
    drew from (recorded by ``get_peft_model``, before a resize) and the vocabulary size its signature records; None
    where none is known (the model's rows are then taken as they are)."""
    known = [checkpoint_vocab_size(getattr(model.config, "name_or_path", None), type(model.config))]
    known.append((getattr(config, "base_model_fingerprint", None) or {}).get("rows"))
    known.append((getattr(config, "base_model_signature", None) or {}).get("vocab_size"))
    known = [int(size) for size in known if isinstance(size, int) and not isinstance(size, bool) and size > 0]
    return min(known) if known else None


def fingerprint_differences(recorded: dict, model: nn.Module) -> Optional[tuple[int, int]]:
    """(entries that differ beyond the rounding of a load's dtype, entries compared) between a recorded
    :func:`base_model_fingerprint` and base ``model``; None where nothing can be compared (the weights cannot be read
    here, or a recorded matrix, the LM head of an untied model, is tied or missing in this one: a model of another
    layout, which the base model's signature tells)."""
    weights = _fingerprinted_weights(model)
    recorded = {kind: entries for kind, entries in recorded.items() if kind not in FINGERPRINT_METADATA}
    if weights is None or set(recorded) - set(weights):
        return None
    changed = compared = 0
    for kind, entries in recorded.items():
        weight = weights[kind]
        entries = [(r, c, v) for r, c, v in entries if r < weight.shape[0] and c < weight.shape[1]]
        if not entries:
            continue
        rows, columns, values = (torch.tensor(column) for column in zip(*entries))
        with torch.no_grad():
            found = weight.detach()[rows.to(weight.device), columns.to(weight.device)].float().cpu()
        values = values.float()
        tolerance = FINGERPRINT_RTOL * torch.maximum(values.abs(), found.abs()) + FINGERPRINT_ATOL
        changed += int(((found - values).abs() > tolerance).sum())
        compared += len(entries)
    return (changed, compared) if compared else None


def warn_if_base_model_differs(model: nn.Module, adapter_name: str, saved_config: Optional[dict]) -> None:
    """Warn where the base ``model`` is another checkpoint than the one QST adapter ``adapter_name`` was saved on
    (``saved_config``, its ``adapter_config.json``, records a :func:`base_model_fingerprint`) with the same
    architecture and sizes, which the base model's signature cannot tell apart: the Instruct model and its base, a
    fine-tune. The side network reads every layer's hidden states of the backbone and was trained on those of that
    checkpoint. A warning, not a refusal: loading onto a further fine-tune of the base can be intended. No warning
    where nothing was recorded (saved before peft-qst recorded it, or where the weights could not be read) or the
    weights cannot be read now (:func:`_fingerprinted_weights`)."""
    recorded = (saved_config or {}).get("base_model_fingerprint")
    if not isinstance(recorded, dict) or not recorded:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    differences = fingerprint_differences(recorded, base)
    if differences is None or differences[0] == 0:
        return
    changed, compared = differences
    # the checkpoint the entries were read from; the adapter's first base where they were recorded without its name
    saved_on = recorded.get("name_or_path") or saved_config.get("base_model_name_or_path")
    loaded_on = getattr(base.config, "name_or_path", None)
    saved_on = repr(saved_on) if saved_on else "a checkpoint whose name was not recorded"
    loaded_on = repr(loaded_on) if loaded_on else "a model built from a config"
    warn_once_loaded(
        f"QST adapter {adapter_name!r} was trained on other base model weights than this model's: {changed} of "
        f"{compared} entries of the token embeddings recorded in its adapter_config.json (base_model_fingerprint) "
        "differ here by more than a float32/bf16/float16 load of the same checkpoint rounds them. It was saved on "
        f"{saved_on} and is being loaded onto {loaded_on}: same architecture and sizes, another checkpoint (the "
        "Instruct model and its base, a fine-tune). The side network reads every layer's hidden states of the base "
        "model and was trained on that checkpoint's, so its outputs here may differ from the trained model's. Load it "
        "onto the checkpoint it was trained on, or train it on this one; if this base model is meant "
        "(a further fine-tune of it), evaluate the adapter on it."
    )


def _saved_state_names(key: str) -> set[str]:
    """The names a tensor saved with an adapter (``key``, as in its file) has in the state of its base model before the
    adapter is injected: the PeftModel prefix off, and the wrappers' levels that injection adds (the trunk's
    ``base_layer``, a ``modules_to_save`` head's ``original_module``, whose trained copy saves as the head itself)."""
    names = set()
    for prefix in (PEFT_MODEL_PREFIX, "base_model."):
        if key.startswith(prefix):
            names.add(re.sub(r"(^|\.)(?:base_layer|original_module)\.", r"\1", key[len(prefix):]))
    return names


def _vocabulary_tensors_missing(model: nn.Module, vocab_size: int, shapes: dict) -> Optional[list[str]]:
    """The state keys of ``model`` that resizing its token embeddings to ``vocab_size`` rows would give new rows and
    that the file of tensor ``shapes`` ({key: shape}) does not hold at that size; [] where it holds them all, None
    where QST does not resize them: input embeddings or an LM head that is not a floating-point ``nn.Embedding`` or
    ``nn.Linear`` on a device (a head quantized to 4 bits, weights offloaded by accelerate or partitioned by ZeRO-3).

    Those keys are the input embeddings' weight and, where the LM head is not tied to them, the head's weight (and
    bias): a tied head reads the embeddings' rows. PEFT saves them all with ``save_embedding_layers``, under the names
    of the adapter's wrappers (:func:`_saved_state_names`), tied or not."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    needed = {}
    for module in (embeddings, head):
        if module is None:
            continue
        weight = getattr(module, "weight", None)
        if (
            not isinstance(module, (nn.Embedding, nn.Linear)) or not isinstance(weight, nn.Parameter)
            or not weight.is_floating_point() or weight.device.type == "meta" or weight.dim() != 2
        ):
            return None
        if module is head and embeddings is not None and weight is embeddings.weight:
            continue  # tied: the embeddings' rows
        name = _name_in(model, module)
        if name is None:  # (not a module of the model: nothing QST resizes)
            return None
        needed[f"{name}.weight"] = (vocab_size, weight.shape[1])
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            needed[f"{name}.bias"] = (vocab_size,)
    if embeddings is None:
        return None
    held = {
        name for key, shape in shapes.items() for name in _saved_state_names(key) if tuple(shape) == needed.get(name)
    }
    return sorted(set(needed) - held)


def resize_to_the_adapters_vocabulary(model: nn.Module, config, saved_shapes):
    """Resize ``model``'s token embeddings to the vocabulary size the QST adapter of ``config`` recorded, where the
    adapter's file (whose tensor shapes, {key: shape}, ``saved_shapes()`` gives) holds every tensor the resize gives
    new rows to (:func:`_vocabulary_tensors_missing`): loading then writes each of their rows, so the model computes
    as trained. Returns a function that undoes the resize (for a load refused later), or None where nothing was resized.
    The warning that says the model was resized is that function's ``announce()``, for the caller to give once the load
    succeeded: given at the resize, it preceded every refusal of the load after it (the digest, the weights' names,
    the config), saying that the model was resized and "computes as it did in training" of a model handed back at its
    size with nothing loaded.

    A QLoRA recipe that adds chat tokens resizes with ``pad_to_multiple_of`` (PEFT's examples/sft, TRL's
    ``clone_chat_template``), and ``AutoPeftModelForCausalLM.from_pretrained(folder)`` resizes the base model it loads
    to ``len(tokenizer)`` of the tokenizer saved there: another size, which the binding refused as "another vocabulary
    size" (LoRA fails there too, with a bare size mismatch), so the documented one-line load never worked. Only a model
    that holds no adapter is given here (a resize would change the embeddings its adapters were trained with); a file
    that lacks some of those tensors keeps the refusal (the rows a resize draws for added tokens are random)."""
    recorded = (getattr(config, "base_model_signature", None) or {}).get("vocab_size")
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded <= 0:
        return None
    try:
        signature = model_signature(model)
        differences = signature_differences(dict(config.base_model_signature), signature)
        resize = getattr(model, "resize_token_embeddings", None)
        if set(differences) != {"vocab_size"} or resize is None:
            return None
        missing = _vocabulary_tensors_missing(model, recorded, saved_shapes())
    except Exception:  # noqa: BLE001 - a model QST cannot read this way: the binding's own checks report it
        return None
    if missing is None or missing:
        return None
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    # transformers resizes the input embeddings in place (their weight takes new data) and builds a new head
    tied = head is None or head.weight is embeddings.weight
    weight, data = embeddings.weight, embeddings.weight.data
    rows, padding_idx = embeddings.num_embeddings, embeddings.padding_idx
    text_config = model.config.get_text_config()
    config_vocab_size = text_config.vocab_size
    had_vocab_size, vocab_size = "vocab_size" in vars(model), vars(model).get("vocab_size")

    def undo() -> None:
        embeddings.weight = weight  # (tied, the old head's weight too)
        weight.data = data
        embeddings.num_embeddings, embeddings.padding_idx = rows, padding_idx
        model.set_input_embeddings(embeddings)
        if head is not None:
            model.set_output_embeddings(head)
        text_config.vocab_size = config_vocab_size
        if had_vocab_size:
            model.vocab_size = vocab_size
        else:
            vars(model).pop("vocab_size", None)

    before = signature["vocab_size"]
    # mean_resizing=False: the rows drawn are overwritten by the saved ones (the mean and covariance of a large
    # vocabulary's embeddings are costly to compute for nothing)
    try:
        resize(recorded, mean_resizing=False)
        resized = model_signature(model).get("vocab_size") == recorded  # not: a config keeping it elsewhere
    except Exception:  # noqa: BLE001 - a layout transformers cannot resize: refused as another vocabulary size
        resized = False
    if not resized:
        undo()
        return None
    message = (
        f"The base model's token embeddings were resized from {before} to {recorded} tokens "
        f"(model.resize_token_embeddings({recorded})): the QST adapter was trained on a vocabulary of {recorded} "
        f"tokens (recorded in its adapter_config.json), and the file saved with it holds the trained token "
        f"embeddings{'' if tied else ' and LM head'} for all of them, which were loaded over every row, so the model "
        "computes as it did in training. (AutoPeftModel*.from_pretrained resizes the base model to the length of the "
        "tokenizer saved with the adapter, another size where the training script resized with pad_to_multiple_of.)"
    )
    undo.announce = lambda: warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
    return undo


def check_shared_embeddings_kept(peft_model: nn.Module, adapter_name: str, tensors: dict) -> None:
    """The token embeddings in a file read for adapter ``adapter_name`` of a model that holds other adapters equal
    the model's. PEFT saves them beside an adapter trained on a resized vocabulary (``save_embedding_layers``) and
    loads them into the base model, which every adapter shares: the rows ``resize_token_embeddings`` draws for the
    added tokens are random, so an adapter trained on a base model resized on its own, loaded beside another, silently
    changed what the other computed (its logits no longer those it was trained to). The first adapter's load, and a
    load into the only adapter (a trainer resuming), set the rows as they were saved."""
    others = sorted(name for name in getattr(peft_model, "peft_config", {}) if name != adapter_name)
    if not others:
        return
    # the embedding layers' own state only: the whole model's state_dict() would serialize every 4-bit layer's
    # quantization state for a check of two layers
    state = {}
    for name, module in _named_token_embeddings(peft_model):
        state.update(module.state_dict(prefix=name + "."))
    changed = [
        key for key, tensor in tensors.items()
        if key in state and state[key].is_floating_point() and state[key].shape == tensor.shape
        and not torch.equal(state[key], tensor.to(device=state[key].device, dtype=state[key].dtype))
    ]
    if changed:
        raise QSTAdapterFileError(
            f"Loading QST adapter {adapter_name!r} would write the token embeddings saved with it (PEFT saves them "
            f"when the vocabulary was resized) over the base model's, which differ ({changed[:3]}) and which "
            f"adapter(s) {others} share: they would no longer compute what they were trained to. The rows "
            "resize_token_embeddings draws for added tokens are random, so adapters trained on base models resized "
            "each on its own cannot share one model. Resize the base model once, save it, and train every adapter "
            "on that; or load this adapter into a model of its own. Nothing was loaded."
        )


def foreign_tensors(model: nn.Module, adapter_name: str, keys, state_keys) -> list[str]:
    """The keys among ``keys`` (of a file read for QST adapter ``adapter_name``, injected into ``model`` whose state
    has ``state_keys``) that belong neither to a side network nor to what :func:`_saved_beside_the_adapter` allows.
    Loading writes every key that names a weight of the model into it (PEFT with ``strict=False``, transformers by
    name), so a tensor named for a backbone layer or its norm went silently over the frozen base model that every
    adapter and ``disable_adapter`` share; a key naming nothing was silently dropped. Side keys are left to the
    checks of the side network's own names and shapes."""
    prefix = PEFT_MODEL_PREFIX
    state_keys = set(state_keys)
    prefixed = any(key.startswith(prefix) for key in state_keys)
    allowed = _saved_beside_the_adapter(model, adapter_name, state_keys)
    return sorted(
        key for key in keys
        if f".{SIDE_ATTR}." not in f".{key}" and key not in allowed
        and (prefixed or key.removeprefix(prefix) not in allowed)
    )


def refuse_foreign_tensors(adapter_name: str, foreign: list[str]) -> QSTAdapterFileError:
    return QSTAdapterFileError(
        f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: it holds {len(foreign)} tensors "
        f"that belong neither to the adapter's side network nor to a module saved whole with it (modules_to_save) "
        f"nor to the token embeddings PEFT saves beside an adapter (e.g. {foreign[:3]}). Loading would write them "
        "over the frozen base model's weights of the same names, which every adapter and disable_adapter share (or "
        "drop them, where the model has none). The file was written by something other than save_pretrained or was "
        "altered: save or download the adapter again; nothing was loaded."
    )


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


#: QSTConfig fields that decide what an adapter's weights compute without changing their names or shapes: the
#: activation of the "adapter" downsampler, the pooling kind of a parameter-free one, the side blocks' head layout
#: (with as many key/value heads as query heads, every head count gives the same shapes), the backbone low-rank
#: adapters' scaling, the modules saved whole beside the side network (without them in the adapter's
#: modules_to_save, a saved ``lm_head.weight`` is loaded over the frozen base model's own LM head), and the starting
#: values of the output gate and the side gates, which are saved as offsets from them (``ConstantOffset``: a saved
#: output gate read beside ``output_gate_init=2.0`` instead of 1.0 is 1.0 larger). Weights loaded into a side network
#: built with other values would load without an error and compute something else.
_COMPUTATION_FIELDS = (
    "downsample", "activation", "side_heads", "backbone_lora_alpha", "modules_to_save", "side_gate_init",
    "output_gate_init",
)
#: the fields of _COMPUTATION_FIELDS holding numbers, compared as such (JSON's 16.0 against a config's 16)
_NUMBER_FIELDS = ("backbone_lora_alpha", "side_gate_init", "output_gate_init")

#: the heads PEFT's task classes (``PeftModelForSequenceClassification`` and its siblings) add to ``modules_to_save``
#: of every adapter they hold, so that a saved adapter lists them whether or not its user did. transformers'
#: ``load_adapter(..., peft_config=...)`` builds the adapter without a task class: the user's config does not list
#: them, and the saved head is loaded into the base model's own head, which computes what the saved adapter did.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _predates_decoder_sizes(saved_signature, config: QSTConfig, model: Optional[nn.Module] = None) -> bool:
    """:func:`~peft_qst.side.signature_predates_decoder_sizes`, or, for a model type transformers does not register
    (remote code), one without ``"sizes_of"`` where the model's signature records it: that of ``model``, else of the
    model ``config`` is bound to (a file's ``side_heads`` is set to None when it is bound there:
    ``QSTModel._bind_config_to_model``)."""
    if signature_predates_decoder_sizes(saved_signature):
        return True
    bound = config.base_model_signature
    if model is not None:
        try:
            bound = model_signature(model)
        except Exception:  # noqa: BLE001 - a model binding refuses: binding it reports why
            return False
    return (
        isinstance(saved_signature, dict) and "sizes_of" not in saved_signature
        and isinstance(bound, dict) and "sizes_of" in bound
    )


def _computation_differences(saved_config: dict, config: QSTConfig, model: Optional[nn.Module] = None) -> dict:
    """The fields of :data:`_COMPUTATION_FIELDS` in which the ``adapter_config.json`` saved with the weights and the
    config of the adapter they are loaded into differ, as {field: (saved, adapter's)}; a field the file does not hold
    (written by an earlier version) is not compared, nor one that cannot matter (the activation of another downsampler,
    the scaling of backbone adapters there are none of)."""
    differences = {}
    for name in _COMPUTATION_FIELDS:
        if name not in saved_config:
            continue
        saved, here = saved_config[name], getattr(config, name, None)
        if name == "activation" and config.downsample != "adapter":
            continue
        if name == "backbone_lora_alpha" and not config.backbone_lora_layers:
            continue
        if name == "side_heads" and saved == AUTO:
            continue  # a config written by hand, never bound to a model: "auto" means what binding this one chose
        if name == "side_heads" and _predates_decoder_sizes(saved_config.get("base_model_signature"), config, model):
            continue  # means None, the model's heads (check_saved_config_matches refused any other count)
        if name == "modules_to_save":
            # PEFT's task classes add their head names to the list (order and repeats vary, and a config given to
            # transformers' load_adapter lacks them): compare the sets, with the task's heads on both sides
            task_type = getattr(config, "task_type", None)
            heads = _TASK_HEADS.get(getattr(task_type, "value", task_type), ())
            saved, here = sorted(set(saved or ()) | set(heads)), sorted(set(here or ()) | set(heads))
        elif name in _NUMBER_FIELDS and isinstance(saved, (int, float)) and isinstance(here, (int, float)):
            saved, here = float(saved), float(here)
        if saved != here:
            differences[name] = (saved, here)
    return differences


def check_saved_adapter_fits(peft_model: nn.Module, adapter_name: str, tensors: dict, saved_config: dict) -> None:
    """Before PEFT touches the model: the file read for ``adapter_name`` holds every module saved whole with the
    adapter (``modules_to_save``; PEFT would fail on the first one missing with a bare KeyError), and the weights were
    saved by an adapter that computes what ``adapter_name`` computes. The adapter's config comes from the folder when
    ``PeftModel.from_pretrained`` reads it there, but not when it is given (``config=``) or when the adapter already
    exists (``load_adapter`` into its name, as trainers do to resume a checkpoint): a config of another activation,
    pooling kind, head layout, backbone-adapter scaling, ``modules_to_save`` or gate start builds a side network the
    weights load into without an error (:data:`_COMPUTATION_FIELDS`). An ``adapter_config.json`` written before
    ``side_heads`` existed means the model's head count."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    config = peft_model.peft_config[adapter_name]
    entries = saved_config.get("modules_to_save", config.modules_to_save) if saved_config else config.modules_to_save
    check_saved_modules_to_save_present(peft_model, adapter_name, entries, tensors)
    check_saved_config_matches(peft_model.peft_config[adapter_name], adapter_name, saved_config)
    check_width_options_of_earlier_files(peft_model, adapter_name, saved_config, tensors)
    check_token_embeddings_fit(peft_model, tensors)
    check_shared_embeddings_kept(peft_model, adapter_name, tensors)
    warn_added_token_embeddings_not_saved(peft_model, adapter_name, saved_config, tensors)
    missing = []
    for name, module in peft_model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = name.removeprefix("_fsdp_wrapped_module.")
            keys = (f"{name}.{key}" for key in module.adapter_state_dict_load_map(adapter_name))
            missing += [key for key in keys if key not in tensors]
    if missing:
        raise QSTAdapterFileError(
            f"The checkpoint does not fit QST adapter {adapter_name!r} of this model: it lacks {len(missing)} weights "
            f"of the modules saved whole with the adapter (modules_to_save), e.g. {missing[:3]}. It was saved with "
            "another modules_to_save or task_type; nothing was loaded."
        )
    warn_if_base_model_differs(peft_model, adapter_name, saved_config)


#: options that narrowed parts of the side blocks, with "divided" as their default: an ``adapter_config.json`` written
#: before one existed holds side blocks of the model's widths there (``QSTConfig.check_kwargs`` reads it "backbone")
_WIDTH_OPTIONS = ("side_linear_heads", "side_inner_widths")


def check_width_options_of_earlier_files(
    peft_model: nn.Module, adapter_name: str, saved_config: dict, tensors: dict
) -> None:
    """Weights whose ``adapter_config.json`` predates ``side_linear_heads`` or ``side_inner_widths``, loaded into an
    adapter built with ``"divided"`` (today's default: a training script's ``QSTConfig(...)`` resuming a checkpoint
    saved before, or ``config=``), on a model whose side blocks the option narrows: the shapes cannot fit, and the
    refusal said only "saved from a different base model or QST configuration", naming neither the option nor the
    fix. Refused naming them; models the option does not change load as before. Only where a saved side tensor does
    not fit its parameter (``tensors``): a config can hold a width attribute its blocks do not build (MiniMax-M3's
    ``index_n_heads`` without sparse layers), which the option changes in the side config but in no side block, and
    such files loaded, and load, as they are.

    ``peft_model`` is a PeftModel, or a transformers model that transformers' ``load_adapter(..., peft_config=...)``
    injected the adapter into: the file's keys carry ``base_model.model.`` and module names of the latter do not, so
    both are compared without it."""
    config = peft_model.peft_config[adapter_name]
    options = [name for name in _WIDTH_OPTIONS
               if saved_config and name not in saved_config and getattr(config, name, "backbone") != "backbone"]
    if not options:
        return
    layers = layers_holding(peft_model, adapter_name)
    if not layers:
        return
    prefix = PEFT_MODEL_PREFIX
    shapes = {
        f"{name}.{SIDE_ATTR}.{key}".removeprefix(prefix): tuple(value.shape)
        for name, layer in layers
        for key, value in layer.qst_side[adapter_name].state_dict().items()
    }
    if not any(tuple(tensor.shape) != shapes.get(key.removeprefix(prefix), tuple(tensor.shape))
               for key, tensor in tensors.items()):
        return
    layer = layers[0][1]
    base_config = layer.get_base_layer().config
    try:
        built = shrink_config(base_config, config, torch.float32).to_dict()
        changed = []
        for name in options:
            as_saved = copy.copy(config)
            setattr(as_saved, name, "backbone")
            if shrink_config(base_config, as_saved, torch.float32).to_dict() != built:
                changed.append(name)
    except Exception:  # noqa: BLE001 - the adapter was built from this config: the shape check reports the rest
        return
    if changed:
        settings = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
        fix = ", ".join(f'{name}="backbone"' for name in changed)
        raise QSTAdapterFileError(
            f"The adapter_config.json saved with these weights predates {' and '.join(changed)}: its side blocks "
            f"have the model's widths there (\"backbone\"), but adapter {adapter_name!r} was built with {settings}, "
            f"which narrows them on this {getattr(base_config, 'model_type', 'model')} model. Build the adapter with "
            f"QSTConfig(..., {fix}) to load or resume it, or load the folder without a config of your own "
            "(PeftModel.from_pretrained without config=, transformers' load_adapter without peft_config=: the file is "
            "then read with QSTConfig.from_pretrained). Nothing was loaded."
        )


def check_saved_config_matches(
    config: QSTConfig, adapter_name: str, saved_config: dict, model: Optional[nn.Module] = None
) -> None:
    """The ``adapter_config.json`` saved with the weights (``saved_config``, {} where there is none) describes an
    adapter that computes what ``config``, the config of adapter ``adapter_name`` they are loaded into, computes.
    ``model``: the model a ``config`` not bound yet is for (whether the file predates the decoder sizes of a config of
    remote code: :func:`_predates_decoder_sizes`).

    Weights saved by another PEFT method (a LoRA folder given a ``QSTConfig`` with ``config=``, or loaded into an
    existing QST adapter, as a trainer resuming from the wrong checkpoint does) were refused as a QST file that
    "predates side_heads", with the advice to set ``side_heads=None``, which only led to another wrong diagnosis
    ("saved from a different QST configuration"): they are refused naming the method the file says."""
    saved_type = saved_config.get("peft_type") if saved_config else None
    if isinstance(saved_type, str) and saved_type.strip().upper() != PEFT_TYPE:
        raise QSTAdapterFileError(
            f"The weights loaded into QST adapter {adapter_name!r} were saved by a {saved_type} adapter (the "
            "peft_type of the adapter_config.json beside them), not a QST one: they cannot be loaded into a side "
            "network. Load a folder saved from a QST adapter, or load this one as what it is, without a QSTConfig "
            "(PeftModel.from_pretrained(base_model, folder) without config=, into a model holding no QST adapter). "
            "Nothing was loaded."
        )
    if saved_config and config.side_heads is not None and (
        "side_heads" not in saved_config
        or _predates_decoder_sizes(saved_config.get("base_model_signature"), config, model)
    ):
        what = (
            "side_heads" if "side_heads" not in saved_config
            else "the decoder head count of this model type (QST set side_heads on its encoder, which the side "
            f"network does not build; the file's side_heads={saved_config['side_heads']!r} was not applied)"
        )
        raise QSTAdapterFileError(
            f"The adapter_config.json saved with these weights predates {what}: its side blocks have the model's "
            f"head count, but adapter {adapter_name!r} was built with side_heads={config.side_heads!r}. Load the "
            "folder without config= (PeftModel.from_pretrained reads it with QSTConfig.from_pretrained), or set "
            "config.side_heads = None. Nothing was loaded."
        )
    differences = _computation_differences(saved_config, config, model) if saved_config else {}
    if differences:
        listed = ", ".join(f"{name}={saved!r} (adapter {adapter_name!r}: {here!r})" for name, (saved, here) in
                           differences.items())
        raise QSTAdapterFileError(
            f"The checkpoint does not fit QST adapter {adapter_name!r}: it was saved by a QST adapter with {listed} "
            "(weights that fit by name and shape would compute something else). Load the folder without a config of "
            "your own (PeftModel.from_pretrained without config=, transformers' load_adapter without peft_config=: "
            "the adapter is then built from the adapter_config.json beside the weights), load it under a new adapter "
            "name, or build the adapter with the saved values; nothing was loaded."
        )
