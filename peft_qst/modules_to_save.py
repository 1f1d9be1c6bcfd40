"""``modules_to_save`` entries against a model's modules: how PEFT matches them, what to suggest for one that matches
nothing, and whether a saved adapter's entries name modules of the model it is loaded onto.

PEFT wraps every module whose name ends with an entry and skips an entry that matches nothing without a word, so a
typo trains and saves nothing, and a saved head the model lacks shows up as unrelated missing weights. The checks of a
new adapter's entries (``peft_qst.model._check_modules_to_save_*``) and of a loaded adapter's
(:func:`check_saved_modules_to_save_present`) share the matching and the suggestions here.
"""

from __future__ import annotations

import difflib
from typing import Optional

from torch import nn

from .layer import SIDE_ATTR, QSTLayer
from .loading import PEFT_MODEL_PREFIX
from .serialization import QSTAdapterFileError


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
    :func:`~peft_qst.model._check_modules_to_save_match`, TRL's ``"lm_head"`` on a classifier) and loads as it was
    saved."""
    entries = [entries] if isinstance(entries, str) else entries if isinstance(entries, (list, tuple, set)) else ()
    entries = [entry for entry in entries if isinstance(entry, str) and entry]  # a bad file's: refused elsewhere
    unmatched = unmatched_entries(model, entries)
    if not unmatched:
        return
    modules = set()
    for key in keys:
        key = key.removeprefix(PEFT_MODEL_PREFIX)
        if f".{SIDE_ATTR}." in f".{key}":
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
        f"module of {type(base).__name__} ({suggested_module_names(base, sorted(saved), trunk)}). Load the "
        "adapter onto the model class (and head) it was trained with; nothing was loaded."
    )
