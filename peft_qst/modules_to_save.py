"""``modules_to_save`` entries against a model's modules: how PEFT matches them, what to suggest for one that matches
nothing, and whether a saved adapter's entries name modules of the model it is loaded onto.

PEFT wraps every module whose name ends with an entry and skips an entry that matches nothing without a word, so a
typo trains and saves nothing, and a saved head the model lacks shows up as unrelated missing weights. The checks of a
new adapter's entries (``check_modules_to_save_*``, called by :class:`~peft_qst.model.QSTModel` before injecting) and
of a loaded adapter's (:func:`check_saved_modules_to_save_present`) share the matching and the suggestions here.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional

from torch import nn

from .config import QSTConfig
from .layer import SIDE_ATTR, QSTLayer, is_side_network_key, model_class_name
from .loading import PEFT_MODEL_PREFIX
from .serialization import QSTAdapterFileError
from .side import QSTUnsupportedModelError


#: the heads PEFT's task classes (``PeftModelForSequenceClassification`` and its siblings) add to ``modules_to_save``
#: of every adapter they hold, so that a saved adapter lists them whether or not its user did. transformers'
#: ``load_adapter(..., peft_config=...)`` builds the adapter without a task class: the user's config does not list
#: them, and the saved head is loaded into the base model's own head, which computes what the saved adapter did.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def names_an_entry(name: str, entries) -> bool:
    """Whether module ``name`` is one that PEFT wraps for these ``modules_to_save`` entries. PEFT (``_set_trainable``)
    matches each entry as a plain suffix of the name, not as whole name segments: ``"layernorm"`` wraps every
    ``input_layernorm``, which a check of whole segments let through into the frozen trunk."""
    return any(name.endswith(entry) for entry in entries)


#: the modules inside PEFT's wrapper of a module saved whole (``ModulesToSaveWrapper``), and QST's side networks: not
#: modules of the model to suggest for a ``modules_to_save`` entry
_NOT_SUGGESTED = ("original_module", "modules_to_save", SIDE_ATTR)


def unmatched_entries(model: nn.Module, entries) -> list[str]:
    """The ``modules_to_save`` entries that name no module of ``model`` as PEFT matches them: ``_set_trainable``
    wraps every module whose name ends with an entry (:func:`names_an_entry`), over
    ``named_modules(remove_duplicate=False)``, so that a module registered under two names counts under both, and
    skips an entry that matches none without a word (for LoRA too)."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    return [entry for entry in dict.fromkeys(entries) if not any(names_an_entry(name, (entry,)) for name in names)]


def name_in(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    """The name of ``module`` among ``model``'s modules ("" for the model itself), None where it is not one."""
    return next((name for name, candidate in model.named_modules() if candidate is module), None)


def meets_trunk(name: str, trunk_name: str) -> bool:
    """Whether the module ``name`` is the decoder trunk ``trunk_name``, lies inside it or holds it (every module does,
    for a bare trunk: ``trunk_name`` "")."""
    return (
        trunk_name == "" or name == trunk_name or name.startswith(trunk_name + ".") or trunk_name.startswith(name + ".")
    )


def suggested_module_names(model: nn.Module, entries, trunk: Optional[nn.Module]) -> str:
    """What to say instead of ``modules_to_save`` entries that match nothing: for each, a few names of the modules of
    ``model`` outside the decoder trunk ``trunk`` (whole names and their last parts) close to it; where none is close,
    those modules (the ones that can be trained: one inside the trunk is refused, and suggesting one misleads)."""
    trunk_name = name_in(model, trunk)
    modules = {}
    for name, _ in model.named_modules(remove_duplicate=False):
        if (
            not name
            or any(part in _NOT_SUGGESTED for part in name.split("."))
            or trunk_name is not None and meets_trunk(name, trunk_name)
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


def check_saved_modules_to_save_present(model: nn.Module, adapter_name: str, entries, keys) -> None:
    """Before an adapter's weights are loaded: each entry of its ``modules_to_save`` (``entries``: as saved where the
    file's config is known) whose weights the file holds (``keys``) names a module of ``model``. PEFT skips an entry
    that matches nothing without a word, so a head the adapter trained that this model lacks (an adapter saved from
    another model class, or with another head name) was reported as weights missing for the model's own head, or as
    tensors "written by something other than save_pretrained", neither naming the cause. An entry that matches nothing
    and has no weights in the file trained nothing (an adapter saved before
    :func:`check_modules_to_save_match`, TRL's ``"lm_head"`` on a classifier) and loads as it was
    saved."""
    entries = [entries] if isinstance(entries, str) else entries if isinstance(entries, (list, tuple, set)) else ()
    entries = [entry for entry in entries if isinstance(entry, str) and entry]  # a bad file's: refused elsewhere
    unmatched = unmatched_entries(model, entries)
    if not unmatched:
        return
    modules = set()
    for key in keys:
        key = key.removeprefix(PEFT_MODEL_PREFIX)
        if is_side_network_key(key):
            continue
        parts = key.split(".")[:-1]
        modules.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    saved = {entry: sorted(name for name in modules if names_an_entry(name, (entry,))) for entry in unmatched}
    saved = {entry: names for entry, names in saved.items() if names}
    if not saved:
        return
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    trunk = next((module for module in base.modules() if isinstance(module, QSTLayer)), None)
    raise QSTAdapterFileError(
        f"QST adapter {adapter_name!r} was saved with modules_to_save entries {sorted(saved)} and their trained "
        f"weights (modules {sorted(name for names in saved.values() for name in names)[:3]}), but they match no "
        f"module of {model_class_name(base)} ({suggested_module_names(base, sorted(saved), trunk)}). Load the "
        "adapter onto the model class (and head) it was trained with; nothing was loaded."
    )


def modules_to_save_entries(config: QSTConfig) -> list:
    """``modules_to_save`` as a list. ``QSTConfig`` refuses a bare string when it is built; one assigned to the field
    afterwards counts as one name here (PEFT would match each of its characters)."""
    return [config.modules_to_save] if isinstance(config.modules_to_save, str) else config.modules_to_save or []


def check_modules_to_save_match(model: nn.Module, trunk: nn.Module, config: QSTConfig, added_tokens: bool) -> None:
    """Every ``modules_to_save`` entry of a new adapter names a module of the model. PEFT skips one that matches nothing
    without a word (LoRA too): a typo (``"lm_haed"``, ``"scroe"``) trained and saved nothing for that module, which
    showed only after training. Not checked are the heads PEFT's task classes add to every adapter's list
    (:data:`~peft_qst.modules_to_save.TASK_HEADS`: ``"classifier"`` and ``"score"`` for ``SEQ_CLS``, of which a model
    has one), and the ``"lm_head"`` TRL adds beside ``trainable_token_indices`` when its chat-template cloning added
    tokens (a classifier has none). A loaded adapter's entries are checked against its weights instead
    (:func:`~peft_qst.modules_to_save.check_saved_modules_to_save_present`)."""
    task_type = getattr(config.task_type, "value", config.task_type)
    exempt = set(TASK_HEADS.get(task_type, ())) | ({"lm_head"} if added_tokens else set())
    unmatched = [entry for entry in unmatched_entries(model, modules_to_save_entries(config)) if entry not in exempt]
    if not unmatched:
        return
    raise ValueError(
        f"QSTConfig.modules_to_save={modules_to_save_entries(config)!r}: {unmatched} match no module of "
        f"{model_class_name(model)} (PEFT matches each entry as the end of a module name), so nothing would be trained "
        f"or saved for them ({suggested_module_names(model, unmatched, trunk)}). Correct these entries or "
        "remove them."
    )


def _entries_matching(model: nn.Module, trunk: nn.Module, config: QSTConfig, where: Callable[[str, str], bool]):
    """The ``modules_to_save`` entries, the trunk's name in the model, and the sorted entries that wrap a module whose
    name satisfies ``where(name, trunk_name)`` (none where there are no entries or the trunk is not in the model)."""
    entries = modules_to_save_entries(config)
    names = [name for name, _ in model.named_modules()]
    trunk_name = name_in(model, trunk)
    if not entries or trunk_name is None:
        return entries, trunk_name, []
    matched = {entry for name in names if where(name, trunk_name) for entry in entries if names_an_entry(name, [entry])}
    return entries, trunk_name, sorted(matched)


def check_modules_to_save_outside(model: nn.Module, trunk: nn.Module, config: QSTConfig) -> None:
    """modules_to_save inside the decoder trunk (embeddings, norms, a LoraConfig's list) cannot train: the trunk
    runs frozen under no_grad. Nor can the trunk itself or a module holding it (``modules_to_save=["model"]``, to
    fine-tune the whole decoder beside the side network): PEFT then left the trunk out of the modules QST wraps and
    failed with its ``NoMatchingPeftModuleError`` ("No modules were targeted for adaptation"), which named neither
    the entry nor QST's reason. PEFT matches entries as suffixes of module names."""

    def is_or_holds_trunk(name: str, trunk_name: str) -> bool:
        return bool(name and trunk_name) and meets_trunk(name, trunk_name) and not name.startswith(trunk_name + ".")

    def inside_trunk(name: str, trunk_name: str) -> bool:
        return name.startswith(trunk_name + ".") or (trunk_name == "" and bool(name))  # a bare trunk: every module

    entries, trunk_name, whole = _entries_matching(model, trunk, config, is_or_holds_trunk)
    if whole:
        raise ValueError(
            f"QSTConfig.modules_to_save={entries!r}: {whole} name the decoder trunk {trunk_name!r} or a module "
            "holding it, which QST runs frozen without gradients beside the side network, so it cannot be trained and "
            "saved whole with the adapter. Remove these entries; to train the trunk's own weights, use "
            "backbone_lora_layers (low-rank adapters on its top blocks) or LoRA."
        )
    entries, trunk_name, inside = _entries_matching(model, trunk, config, inside_trunk)
    if inside:
        raise ValueError(
            f"QSTConfig.modules_to_save={entries!r}: {inside} lie inside the decoder trunk "
            f"{repr(trunk_name) if trunk_name else '(the bare trunk is the whole model)'}, which QST "
            "runs frozen without gradients, so they could not train. Only modules outside it can be trained and "
            "saved with the adapter (an LM head, a classification head); remove these entries."
        )


def check_modules_to_save_before_trunk(model: nn.Module, trunk: nn.Module, config: QSTConfig, model_type: str) -> None:
    """modules_to_save before the language model of a composite (multimodal) model (its vision tower, its projector)
    cannot train either: their output reaches the loss only through the language model, which QST runs frozen under
    no_grad, and the side network reads the merged embeddings detached (:meth:`QSTLayer._forward_adapted`). PEFT would
    wrap them, count them as trainable and save them, while their gradients stayed None (LoRA trains them: its backward
    runs through the language model). They are the modules beside the trunk in the model that holds it (LlavaModel,
    Qwen2VLModel, ...); the heads after it (``lm_head``, ``score``) lie outside that model."""

    def beside_trunk(name: str, trunk_name: str) -> bool:
        holder = trunk_name.rpartition(".")[0]  # "" where the composite base model itself was passed (LlavaModel)
        return bool(
            name
            and (not holder or name == holder or name.startswith(holder + "."))
            and name != trunk_name
            and not name.startswith(trunk_name + ".")
            and not trunk_name.startswith(name + ".")  # a module holding the trunk: the trunk check's concern
        )

    entries, trunk_name, before = _entries_matching(model, trunk, config, beside_trunk)
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


def check_modules_to_save_unquantized(model: nn.Module, trunk: nn.Module, config: QSTConfig) -> None:
    """The modules trained and saved whole with the adapter (``modules_to_save``, and the head PEFT's task class adds to
    it after injection: :data:`~peft_qst.modules_to_save.TASK_HEADS`) must be plain, unquantized layers. transformers'
    bitsandbytes loading keeps only the model's last parameter and its LM head unquantized by default, so a head with a
    bias (the ``score`` of ``AutoModelForTokenClassification``, the ``qa_outputs`` of ``AutoModelForQuestionAnswering``)
    is loaded as a 4-bit ``Linear4bit`` (``SEQ_CLS``'s bias-free ``score`` is kept). PEFT's trainable copy of it then
    fails, after the side network was injected, with bitsandbytes' own errors: "only Tensors of floating point dtype can
    require gradients" for a head loaded from the checkpoint, a bare ``AssertionError`` at the first forward for a newly
    initialised one, whose weight was never quantized (LoRA fails the same way). A head made of sub-modules (an
    ``nn.Sequential``, a dense + out_proj classification head) is copied whole, so a quantized layer anywhere inside it
    fails the same way: every layer inside an entry is checked. The trunk, or a module holding it, is left to
    :func:`check_modules_to_save_outside` and PEFT (keeping it out of quantization is no fix)."""
    entries = modules_to_save_entries(config)
    task_type = getattr(config.task_type, "value", config.task_type)
    heads = set(entries) | set(TASK_HEADS.get(task_type, ()))
    trunk_name = name_in(model, trunk)
    if not heads or trunk_name is None:
        return
    quantized = {}
    for name, module in model.named_modules():
        if not name or not names_an_entry(name, heads) or meets_trunk(name, trunk_name):
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
            if set(skip) <= set(TASK_HEADS.get(task_type, ())) and not set(skip) & set(entries)
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
