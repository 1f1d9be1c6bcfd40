"""Registering "QST" with PEFT.

PEFT's own `register_peft_method` only accepts names that are already members of its closed `PeftType` enum, so an
out-of-tree method cannot use it. PEFT looks methods up by ``config.peft_type`` in four dicts; `PeftType` is a
``str`` enum, so the plain string ``"QST"`` works as a key alongside the enum members. There is no entry-point
discovery in PEFT: ``import peft_qst`` must run before an adapter is loaded.

Two guards ride along. Loading: every load of QST weights, whatever the path (``from_pretrained`` with or without
``config=``, ``load_adapter`` into a new or existing name as trainers do to resume, local or Hub), reads them through
`serialization.read_adapter_weights` (safetensors only, readable, the digest of the folder's own config) and checks
that they fit the model before PEFT loads anything; PEFT's own reader would fall back to unpickling
``adapter_model.bin``. PEFT's public ``load_peft_weights``, which custom loops call themselves, reads a folder whose
config names QST the same way, and its ``set_peft_model_state_dict`` takes into a PeftModel the weights of a model
adapted with ``inject_adapter_in_model`` (keys without PeftModel's prefix). Saving: the recorded base-model
signature is refreshed (token embeddings resized since ``get_peft_model`` are saved resized), and
``safe_serialization=False`` is ignored with a warning for QST adapters, which are read only from safetensors (a
pickle written would be refused when loaded, and could sit beside an older safetensors file that would then load
instead).

FSDP: PEFT's ``fsdp_auto_wrap_policy(model)`` (which the Trainer installs for a PEFT model under FSDP1, and which
accelerate recipes call) gives each trainable leaf layer with a ``weight`` its own FSDP unit, so that no unit mixes
frozen and trainable parameters, which FSDP1 with ``use_orig_params=False`` refuses. A QST side network also holds
parameters elsewhere (the side blocks' gates, norms whose weights are parametrized as offsets, the output gate); for
a model holding a QST adapter the policy also wraps every module of a side network that holds parameters of its own.

One fix rides along too: ``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) saves the adapter, then overwrites
the model card PEFT just wrote with a generic transformers card (``library_name: transformers``, no base model) before
uploading. For models holding a QST adapter, the card is restored on the way to the upload: PEFT's fields
(``library_name: peft``, ``base_model``, tags) over whatever the push wrote, its tags kept, and QST's loading section.
The same section is kept in every ``create_or_update_model_card`` of a QST model, which transformers'
``Trainer.create_model_card`` (run by ``Trainer.push_to_hub``) calls after replacing the card with a training summary,
and TRL's trainers' own ``create_model_card`` is followed by PEFT's fields and the section.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import warnings
import weakref
from contextvars import ContextVar
from typing import Optional

from .adapter_checks import (
    check_saved_adapter_fits,
    check_saved_config_matches,
    check_width_options_of_earlier_files,
    foreign_tensors,
    refuse_foreign_tensors,
    refuse_qst_weights_in_other_adapter,
)
from .card import add_usage_section, saved_qst_adapters
from .config import AUTO, PEFT_TYPE, QSTConfig
from .fast_path import note_adapter_loaded
from .fingerprint import base_model_fingerprint, original_vocabulary_rows, warn_if_base_model_differs
from .layer import SIDE_ATTR, QSTLayer, identify_loaded_adapter, is_side_network_key
from .loading import loading_adapter, reading_saved_adapter, warned_once_loaded, with_peft_model_prefix
from .model import QSTModel, is_bare_trunk, remove_injected_adapters
from .modules_to_save import check_saved_modules_to_save_present
from .serialization import (
    QSTAdapterFileError,
    config_file_problem,
    damaged_config_error,
    read_adapter_weights,
    rename_as_peft_does,
    saved_tensor_shapes,
    user_stacklevel,
    weights_digest,
)
from .side import QSTSideNetwork, QSTUnsupportedModelError
from .side_config import auto_side_head_candidates, resolve_side_heads
from .signature import model_signature, text_config_of
from .vocabulary import (
    check_token_embeddings_fit,
    checkpoint_vocab_size,
    resize_to_the_adapters_vocabulary,
    saved_adapter_copies_of_embeddings,
    token_embeddings_named_as_in,
    vocabulary_resized_from_checkpoint,
    warn_added_token_embeddings_not_saved,
)

#: the download arguments of transformers' loaders that ``hf_hub_download`` (and so the QST reader) takes too
_HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def register() -> None:
    """Make "QST" resolvable by PEFT. Idempotent: a second call changes nothing."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = QSTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = QSTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = QSTModel.prefix
    _restore_model_card_on_push()
    _keep_the_loading_section_in_updated_cards()
    _restore_model_card_after_trainer_cards()
    _load_the_best_checkpoint_of_the_trained_adapter()
    _read_qst_weights_safely()
    _read_qst_weights_safely_in_transformers()
    _save_qst_weights_as_safetensors()
    _keep_the_weights_of_adapters_beside_module_named_ones()
    _wrap_side_modules_in_fsdp_units()
    _return_the_bare_trunk_from_get_base_model()
    _keep_the_side_attention_on_set_attn_implementation()
    _name_the_file_in_config_refusals()
    _read_qst_files_as_qst_config_does()
    _refuse_qst_adapters_in_lora_hotswap_helpers()


def _qst_adapter_names(model) -> list[str]:
    return [name for name, c in (getattr(model, "peft_config", None) or {}).items()
            if getattr(c, "peft_type", None) == PEFT_TYPE]


def _holds_qst_adapter(model) -> bool:
    return bool(_qst_adapter_names(model))


def _write_loading_section(model, folder: str) -> None:
    """QST's loading section in the card at the root of ``folder``, for every QST adapter of ``model`` saved there:
    ``"default"`` in the folder itself, any other name in its subfolder (a model made with
    ``get_peft_model(..., adapter_name="side")`` saves only ``side/``, which a section written from the root's
    ``adapter_config.json`` alone never named); the base model as the first one's config says, quantized and in the
    dtype of the model saving them."""
    import torch

    names = _qst_adapter_names(model)
    base_model = next((model.peft_config[name].base_model_name_or_path for name in saved_qst_adapters(folder, names)),
                      model.active_peft_config.base_model_name_or_path)
    transformers_model = getattr(getattr(model, "base_model", None), "model", model)
    quantization = getattr(getattr(transformers_model, "config", None), "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    dtype = getattr(transformers_model, "dtype", None)
    add_usage_section(folder, base_model, names, quantization=quantization,
                      dtype=str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else None)


def _patch_once(owner, name: str, make_replacement) -> None:
    """Replace ``owner.name`` with ``make_replacement(original)``, once: a second ``register()`` (a reloaded
    package) finds it replaced and leaves it."""
    original = getattr(owner, name)
    if getattr(original, "_peft_qst_patch", False):
        return
    replacement = functools.wraps(original)(make_replacement(original))
    replacement._peft_qst_patch = True
    setattr(owner, name, replacement)


def _patch_classmethod_once(owner, name: str, make_replacement) -> None:
    """:func:`_patch_once` for a classmethod defined on ``owner`` itself: the replacement wraps the underlying
    function and is installed as a classmethod, so subclasses that inherit it (``PeftModelForCausalLM``,
    ``QSTConfig``) get it too."""
    original = vars(owner)[name].__func__
    if getattr(original, "_peft_qst_patch", False):
        return
    replacement = functools.wraps(original)(make_replacement(original))
    replacement._peft_qst_patch = True
    setattr(owner, name, classmethod(replacement))


def _restore_model_card_on_push() -> None:
    from peft import PeftModel

    def make(original):
        def _upload_modified_files(self, working_dir, *args, **kwargs):
            if _holds_qst_adapter(self):
                _restore_peft_card(self, working_dir)
            return original(self, working_dir, *args, **kwargs)

        return _upload_modified_files

    _patch_once(PeftModel, "_upload_modified_files", make)


def _restore_peft_card(model, folder: str) -> None:
    """Put PEFT's fields (``library_name: peft``, ``base_model``, its tags) and QST's loading section back into the
    card in ``folder`` that something else just wrote, keeping that card's tags (PEFT's update replaces them) and
    text; no card, nothing to do. PEFT's card update writes the section too
    (:func:`_keep_the_loading_section_in_updated_cards`), and the tags are set after it, leaving the text as it is."""
    from huggingface_hub import ModelCard

    card_path = os.path.join(folder, "README.md")
    if not os.path.isfile(card_path):
        return
    written_tags = list(ModelCard.load(card_path).data.tags or [])
    model.create_or_update_model_card(folder)
    card = ModelCard.load(card_path)
    card.data.tags = sorted(set(card.data.tags or []) | set(written_tags))
    card.save(card_path)


def _restore_model_card_after_trainer_cards() -> None:
    """TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ... through TRL's base trainer) override
    ``Trainer.create_model_card`` with a card of their own (``library_name: transformers``, no PEFT fields, no base
    model for a local one, a quick start that loads the folder with ``pipeline``), written over the output folder's
    ``README.md`` by ``Trainer.push_to_hub`` just before the upload, at each checkpoint, and by scripts that call it
    after ``save_model`` (Philipp Schmid's ``run_sft.py``, the alignment handbook's ``run_sft.py``). The card of a QST
    adapter trained with TRL then did not say that loading it needs ``import peft_qst``, and its quick start failed with
    a bare ``KeyError: 'QST'`` (a LoRA adapter's loads). For a model holding a QST adapter, every such card is followed
    by PEFT's fields and QST's loading section, the trainer's text and tags kept (transformers' own
    ``create_model_card`` has PEFT update the card, which keeps the section already). The override is wrapped on the
    class that defines it: the subclasses of ``Trainer`` defined now, and those defined later (TRL imports its trainers
    lazily); an instance's own ``create_model_card`` is left as it is."""
    from transformers import Trainer

    def make(original):
        def create_model_card(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            model = getattr(self, "model", None)
            if _holds_qst_adapter(model) and self.is_world_process_zero():
                _restore_peft_card(model, self.args.output_dir)
            return result

        return create_model_card

    def wrap_own_card(cls) -> None:
        if "create_model_card" in vars(cls):
            _patch_once(cls, "create_model_card", make)

    pending = list(Trainer.__subclasses__())
    while pending:
        cls = pending.pop()
        wrap_own_card(cls)
        pending.extend(cls.__subclasses__())

    previous = vars(Trainer).get("__init_subclass__")
    if getattr(getattr(previous, "__func__", None), "_peft_qst_patch", False):
        return

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(Trainer, cls).__init_subclass__(**kwargs)
        wrap_own_card(cls)

    __init_subclass__._peft_qst_patch = True
    Trainer.__init_subclass__ = classmethod(__init_subclass__)


def _load_the_best_checkpoint_of_the_trained_adapter() -> None:
    """transformers' ``Trainer(load_best_model_at_end=True)`` reloads the best checkpoint with
    ``model.load_adapter(best_checkpoint, active_adapter)``: the checkpoint folder's root. A model holding several
    adapters saves ``"default"`` there and every other adapter in its own subfolder, so training adapter ``"b"`` beside
    ``"default"`` ended with ``"default"``'s weights copied into ``"b"`` (silently, where the two have the same
    configuration; otherwise with a refusal that blamed the checkpoint). For a model holding a QST adapter whose active
    adapter is not ``"default"``, that reload reads the active adapter's own subfolder. Resuming
    (``resume_from_checkpoint``) already loads each subfolder into its own name. The instance gets a wrapped
    ``load_adapter`` for the reload only. A model that holds no
    ``"default"`` (``get_peft_model(..., adapter_name="b")``) saves nothing at the checkpoint's root, where
    transformers looks before it calls ``load_adapter``: it only warned that it "could not locate the best model" and
    kept the last step's weights, so that subfolder is loaded here directly."""
    from transformers import Trainer
    from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    def make(original):
        def _load_best_model(self):
            model = self.model
            best = self.state.best_model_checkpoint
            active = getattr(model, "active_adapter", None) if _holds_qst_adapter(model) else None
            folder = os.path.join(best, active) if best and isinstance(active, str) and active != "default" else None
            if (
                folder is None
                or not os.path.isfile(os.path.join(folder, ADAPTER_SAFE_WEIGHTS_NAME))
                or "load_adapter" in vars(model)
            ):
                return original(self)
            root_has_weights = any(
                os.path.isfile(os.path.join(best, name))
                for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
            )
            if not root_has_weights and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                model.load_adapter(folder, active)
                return None
            load_adapter = model.load_adapter

            def load_the_active_adapters_folder(model_id, adapter_name, *args, **kwargs):
                if adapter_name == active and os.path.normpath(str(model_id)) == os.path.normpath(best):
                    model_id = folder
                return load_adapter(model_id, adapter_name, *args, **kwargs)

            model.load_adapter = load_the_active_adapters_folder
            try:
                return original(self)
            finally:
                del model.load_adapter

        return _load_best_model

    _patch_once(Trainer, "_load_best_model", make)


#: the Hub pipeline of each PEFT task class beside the causal LM's ("text-generation", which PEFT's card sets itself)
_PIPELINE_OF_TASK_CLASS = {
    "PeftModelForSequenceClassification": "text-classification",
    "PeftModelForTokenClassification": "token-classification",
    "PeftModelForQuestionAnswering": "question-answering",
    "PeftModelForFeatureExtraction": "feature-extraction",
}


def _name_the_pipeline_of_the_task(model, folder: str) -> None:
    """The card's ``pipeline_tag`` for a task class: PEFT's card names it for a causal LM only, so the card of a
    classifier, a question-answering or a feature-extraction adapter named no task at all, and the Hub listed it
    under none. Set from the PEFT class that saves it, where the card names none yet (one set by hand is kept)."""
    from huggingface_hub import ModelCard

    pipeline = next((tag for cls in type(model).__mro__ if (tag := _PIPELINE_OF_TASK_CLASS.get(cls.__name__))), None)
    card_path = os.path.join(folder, "README.md")
    if pipeline is None or not os.path.isfile(card_path):
        return
    card = ModelCard.load(card_path)
    if not card.data.pipeline_tag:
        card.data.pipeline_tag = pipeline
        card.save(card_path)


def _keep_the_loading_section_in_updated_cards() -> None:
    """transformers' ``Trainer.create_model_card`` (which ``Trainer.push_to_hub`` calls before uploading the output
    folder) overwrites the card ``save_model`` just wrote with a training summary, then has PEFT's
    ``create_or_update_model_card`` put PEFT's fields back; QST's loading section (written by ``save_pretrained``
    only) was lost, so the Hub card no longer said that loading needs ``import peft_qst``. Every card update of a model
    holding a QST adapter now ends with the section, for each of its QST adapters the folder holds
    (:func:`_write_loading_section`). Where the folder holds none yet (within ``save_pretrained``, which updates the
    card before it writes the configs), the section is left to ``save_pretrained`` itself once all are saved
    (:func:`_save_qst_weights_as_safetensors`), which reads the task type and labels from the configs it has just
    written; where it holds older ones (a folder saved over), the section written here from them is rewritten there."""
    from peft import PeftModel

    def make(original):
        def create_or_update_model_card(self, output_dir, *args, **kwargs):
            result = original(self, output_dir, *args, **kwargs)
            if _holds_qst_adapter(self):
                _name_the_pipeline_of_the_task(self, output_dir)
                _write_loading_section(self, output_dir)
            return result

        return create_or_update_model_card

    _patch_once(PeftModel, "create_or_update_model_card", make)


#: while QST's ``PeftModel.load_adapter`` builds an adapter for the weights it loads: a list that receives the digest
#: of the weights its reader read
_read_digests: ContextVar = ContextVar("peft_qst_read_digests", default=None)


def _digest_of(tensors: dict, saved_config: dict) -> str:
    """The digest of adapter weights as read from their file: the one recorded beside them when they were saved
    (checked against them on reading), else computed."""
    return saved_config.get("adapter_weights_sha256") or weights_digest(tensors)


def _read_qst_weights_safely() -> None:
    import peft.peft_model as peft_model_module
    from peft import PeftModel

    def make_load_adapter(original):
        def load_adapter(self, model_id, adapter_name, *args, **kwargs):
            built = _built_by_from_pretrained.get()
            new_name = adapter_name not in self.peft_config
            # the adapter is built for this load (a new name, or the one PeftModel.from_pretrained just injected): it
            # takes the identity of the weights read (see QSTSideNetwork.cache_identity); an existing one keeps its own
            built_here = new_name or (built is not None and not built)
            if built is not None and not built:
                built.append(self)  # the PeftModel PeftModel.from_pretrained is loading into: undone if this fails
            token = loading_adapter.set((self, adapter_name, bool(kwargs.get("ignore_mismatched_sizes", False))))
            reading_token = reading_saved_adapter.set(True)
            digests = []
            digest_token = _read_digests.set(digests if built_here else None)
            wrapped = _modules_saved_whole(self) if new_name else None
            try:
                if _holds_qst_adapter(self):
                    with _accelerate_dispatch_kept(self.get_base_model()):
                        result = original(self, model_id, adapter_name, *args, **kwargs)
                else:
                    result = original(self, model_id, adapter_name, *args, **kwargs)
                if built_here and len(digests) == 1:
                    identify_loaded_adapter(self, adapter_name, digests[0])
                return result
            except BaseException as error:
                # PEFT adds an adapter of a new name before it reads the weights: a refused load left it there, with
                # its fresh weights, to be activated by set_adapter (and a second try into that name built with the
                # refused folder's config); so too another method's adapter refused for reading QST weights
                added = self.peft_config.get(adapter_name) if new_name else None
                if getattr(added, "peft_type", None) == PEFT_TYPE or (
                    added is not None and isinstance(error, QSTAdapterFileError)
                ):
                    self.delete_adapter(adapter_name)
                    if wrapped is not None:
                        _unwrap_modules_saved_whole(self, wrapped)
                raise
            finally:
                _read_digests.reset(digest_token)
                reading_saved_adapter.reset(reading_token)
                loading_adapter.reset(token)
                note_adapter_loaded()  # a continued generation cache checks the weights again

        return warned_once_loaded(load_adapter)

    def make_load_peft_weights(original):
        def load_peft_weights(model_id, device=None, key_mapping=None, **hf_hub_download_kwargs):
            loading = loading_adapter.get()
            if loading is None:  # called directly, not by load_adapter: the public helper, which reads QST folders
                import peft.utils.save_and_load as save_and_load

                return save_and_load.load_peft_weights(
                    model_id, device=device, key_mapping=key_mapping, **hf_hub_download_kwargs
                )
            config = loading[0].peft_config.get(loading[1])
            if getattr(config, "peft_type", None) != PEFT_TYPE:
                tensors = original(model_id, device=device, key_mapping=key_mapping, **hf_hub_download_kwargs)
                refuse_qst_weights_in_other_adapter(config, loading[1], tensors)
                return tensors
            tensors, saved_config = read_adapter_weights(model_id, device, dict(hf_hub_download_kwargs))
            digests = _read_digests.get()
            if digests is not None:
                digests.append(_digest_of(tensors, saved_config))
            # PEFT's renaming, on the tensors read and checked above (PEFT's own would read the file again, unchecked)
            tensors = rename_as_peft_does(tensors, key_mapping, repr(model_id))
            # the token embeddings saved with it, as this model holds them (its LM head wrapped or not)
            tensors = token_embeddings_named_as_in(loading[0], loading[1], tensors)
            check_saved_adapter_fits(loading[0], loading[1], tensors, saved_config)
            return tensors

        return load_peft_weights

    _patch_once(PeftModel, "load_adapter", make_load_adapter)
    _patch_once(peft_model_module, "load_peft_weights", make_load_peft_weights)
    _keep_accelerate_dispatch_in_from_pretrained()
    _read_qst_folders_safely_in_load_peft_weights()
    _prefix_the_weights_of_injected_models_in_set_peft_model_state_dict()


def _modules_saved_whole(model) -> set[int]:
    """The wrappers of the modules saved whole with ``model``'s adapters (``modules_to_save``) before a load adds an
    adapter: see :func:`_unwrap_modules_saved_whole`."""
    from peft.utils.other import ModulesToSaveWrapper

    return {id(module) for module in model.modules() if isinstance(module, ModulesToSaveWrapper)}


def _unwrap_modules_saved_whole(model, before: set[int]) -> None:
    """After a refused load's adapter is deleted: the modules that adding it wrapped for its ``modules_to_save`` (an
    LM head, a classification head) go back in place of their wrappers, which hold no adapter now. PEFT's
    ``delete_adapter`` keeps the wrapper, so the refused load left the model's head wrapped, its weight renamed
    (``lm_head.original_module.weight``) in the model's state and in the token embeddings PEFT saves with the other
    adapters."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper) and id(module) not in before and not module.modules_to_save:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.original_module)


def _is_qst_folder(model_id, hub_kwargs: dict) -> bool:
    """Whether the ``adapter_config.json`` at ``model_id`` (a local folder, or a Hub repository through the download
    cache, with the hub arguments given) names QST as its ``peft_type`` (misspelt as ``"qst"`` too: its weights are
    QST's); False where there is none or it cannot be read, so that the caller reads the folder as PEFT does."""
    import json

    from .serialization import CONFIG_NAME, _locate, download_kwargs

    try:
        path = _locate(os.fspath(model_id), CONFIG_NAME, download_kwargs(hub_kwargs), required=False)
        if path is None:
            return False
        with open(path) as handle:
            peft_type = json.load(handle).get("peft_type")
    except Exception:  # noqa: BLE001 - no readable config: PEFT's reader runs and reports what is wrong
        return False
    return isinstance(peft_type, str) and peft_type.strip().upper() == PEFT_TYPE


def _read_qst_folders_safely_in_load_peft_weights() -> None:
    """PEFT's public ``load_peft_weights(folder)`` (``peft.load_peft_weights``, ``peft.utils.load_peft_weights``),
    which custom training and inference scripts call themselves before ``set_peft_model_state_dict``, falls back to
    unpickling ``adapter_model.bin`` where a folder or Hub repository holds no safetensors file, and knows nothing of
    the digest recorded beside the weights: a QST folder holding only a pickle was read by it (every peft-qst path
    refuses that file), and a corrupt or replaced safetensors file was returned as it was. For a folder whose
    ``adapter_config.json`` names QST, the weights are read by `serialization.read_adapter_weights` instead (safetensors
    only, readable, as recorded, with the warning for NaN weights), onto the device PEFT would use; ``key_mapping``
    then renames those tensors as PEFT does (:func:`serialization.rename_as_peft_does`), without a second, unchecked
    read of the file. Folders of other methods (and folders without a config) are read by PEFT as before; for a Hub
    repository, that lookup downloads its ``adapter_config.json`` first. The helper is replaced where PEFT exports it;
    a name bound before ``import peft_qst`` (``from peft import load_peft_weights`` above the import) keeps PEFT's
    own."""
    import sys

    import peft.utils.save_and_load as save_and_load
    from peft.utils.other import infer_device

    original = save_and_load.load_peft_weights
    if getattr(original, "_peft_qst_patch", False):
        return

    def load_peft_weights(model_id, device=None, key_mapping=None, **hf_hub_download_kwargs):
        if not _is_qst_folder(model_id, hf_hub_download_kwargs):
            return original(model_id, device=device, key_mapping=key_mapping, **hf_hub_download_kwargs)
        tensors, _ = read_adapter_weights(
            os.fspath(model_id), infer_device() if device is None else device, dict(hf_hub_download_kwargs)
        )
        # PEFT's renaming, on the tensors read and checked above (PEFT's own would read the file again, unchecked)
        return rename_as_peft_does(tensors, key_mapping, repr(model_id))

    replacement = functools.wraps(original)(load_peft_weights)
    replacement._peft_qst_patch = True
    # the modules that bound PEFT's function at import (hotswap and cartridge helpers read folders with it too)
    for name in ("peft.utils.save_and_load", "peft.utils", "peft", "peft.utils.hotswap", "peft.tuners.cartridge.utils"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "load_peft_weights", None) is original:
            setattr(module, "load_peft_weights", replacement)


def _prefix_the_weights_of_injected_models_in_set_peft_model_state_dict() -> None:
    """``set_peft_model_state_dict(peft_model, weights)`` with the weights of a model adapted by
    ``inject_adapter_in_model`` (keys without PeftModel's ``"base_model.model."`` prefix): before the tuner sees the
    weights, PEFT gives the keys of the modules saved whole (``modules_to_save``: an LM head, a classification head)
    the adapter's name, looking each one up in the dict it was given with the prefix, and failed with a bare KeyError
    ('base_model.model.lm_head.weight'). For a QST adapter the prefix is put on first
    (:func:`loading.with_peft_model_prefix`). The function is replaced in every ``peft`` module that bound it
    (``peft.set_peft_model_state_dict``, ``peft.utils``, ``PeftModel.load_adapter``'s); a name bound before
    ``import peft_qst`` keeps PEFT's own, with which the side network's weights still load
    (:meth:`QSTModel._remap_adapter_state_dict_for_load` prefixes them too) and a module saved whole does not."""
    import sys

    import peft.utils.save_and_load as save_and_load

    original = save_and_load.set_peft_model_state_dict
    if getattr(original, "_peft_qst_patch", False):
        return

    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
        if getattr(config, "peft_type", None) == PEFT_TYPE:
            peft_model_state_dict = with_peft_model_prefix(model, peft_model_state_dict)
        return original(model, peft_model_state_dict, adapter_name, *args, **kwargs)

    replacement = functools.wraps(original)(set_peft_model_state_dict)
    replacement._peft_qst_patch = True
    for name, module in list(sys.modules.items()):
        bound = getattr(module, "set_peft_model_state_dict", None) is original
        if bound and (name == "peft" or name.startswith("peft.")):
            setattr(module, "set_peft_model_state_dict", replacement)


def _offloaded_device_map(model) -> Optional[dict]:
    """The ``hf_device_map`` of a model that accelerate offloads parts of (``"cpu"`` or ``"disk"`` entries), else
    None."""
    device_map = vars(model).get("hf_device_map")
    if isinstance(device_map, dict) and {"cpu", "disk"} & {str(device) for device in device_map.values()}:
        return device_map
    return None


@contextlib.contextmanager
def _accelerate_dispatch_kept(model):
    """Hide an offloading model's ``hf_device_map`` from PEFT while a QST adapter is built and loaded onto it.

    For such a model PEFT's ``from_pretrained`` removes accelerate's hooks before it builds the adapter, and
    ``load_adapter`` dispatches the whole ``PeftModel`` again, rewriting the offloaded weights under the names LoRA
    layers give the modules they replace. QST replaces no backbone module (it wraps the trunk and reads its hidden
    states), so those names do not exist (``KeyError: 'base_model.model.model.layers.1...'`` in ``_update_offload``),
    and without its hooks an offloaded block's weights are meta tensors with no values (the side block placed beside
    it would follow it to the meta device). The backbone's own dispatch is what QST needs: the side network is placed
    on the hooks' execution devices (:meth:`~peft_qst.side.QSTSideNetwork.place`) and its weights load there, so the
    map is restored afterwards and the model runs as ``get_peft_model`` on the same base model does. A ``device_map``
    given to ``from_pretrained`` is not applied: the base model keeps the one it was loaded with."""
    device_map = _offloaded_device_map(model)
    if device_map is None:
        yield
        return
    del model.hf_device_map
    try:
        yield
    finally:
        model.hf_device_map = device_map


#: while ``PeftModel.from_pretrained`` runs: a list that receives the PeftModel it builds (its ``load_adapter`` puts it
#: there), so that a load refused after the adapter was injected can be undone on the caller's base model
_built_by_from_pretrained: ContextVar = ContextVar("peft_qst_built_by_from_pretrained", default=None)


def trainability(model) -> tuple[dict, dict]:
    """Each parameter's ``requires_grad`` and each module's mode: what injecting an adapter (which freezes the base
    model) and loading one (which sets eval mode) change, for :func:`restore_trainability` to put back."""
    return (
        {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        {name: module.training for name, module in model.named_modules()},
    )


def restore_trainability(model, flags: tuple[dict, dict]) -> None:
    requires_grad, training = flags
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    for name, module in model.named_modules():
        module.training = training.get(name, module.training)


def _keep_accelerate_dispatch_in_from_pretrained() -> None:
    """Wrap ``PeftModel.from_pretrained`` so that loading a QST adapter onto a base model accelerate offloads keeps
    that model's dispatch (:func:`_accelerate_dispatch_kept`); LoRA and other adapters, and bases that offload
    nothing, take PEFT's own path unchanged."""
    from peft import PeftConfig, PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    def make(original):
        def from_pretrained(cls, model, model_id, *args, **kwargs):
            # PEFT injects the adapter into ``model`` in place and then loads its weights: where QST refuses them
            # (the digest, the weights' names and shapes, the config saved with them), ``model`` was left holding a
            # side network of fresh weights, its own parameters frozen. For a model that held no adapter before, that
            # is undone.
            fresh = not getattr(model, "peft_config", None) and not any(
                isinstance(module, BaseTunerLayer) for module in model.modules()
            )
            flags = trainability(model) if fresh else None
            built = []
            undo_resize = None
            token = _built_by_from_pretrained.set(built)
            reading_token = reading_saved_adapter.set(True)
            try:
                if fresh:  # (a model holding adapters keeps its vocabulary: they were trained with it)
                    undo_resize = _resize_to_the_vocabulary_of_the_folder(model, model_id, args, kwargs)
                loaded = _from_pretrained(cls, model, model_id, *args, **kwargs)
                if undo_resize is not None:
                    undo_resize.announce()  # only now: a refused load hands the model back at its size
                return loaded
            except BaseException as error:
                try:
                    if flags is not None and built and (
                        _holds_qst_adapter(built[0]) or isinstance(error, QSTAdapterFileError)
                    ):
                        built[0].base_model.unload()
                        restore_trainability(model, flags)
                    if undo_resize is not None:
                        undo_resize()
                except Exception as err:  # noqa: BLE001 - the refusal is what the caller must see
                    warnings.warn(
                        f"The base model could not be handed back unwrapped ({err!r}); load it again.",
                        stacklevel=user_stacklevel(),
                    )
                raise
            finally:
                reading_saved_adapter.reset(reading_token)
                _built_by_from_pretrained.reset(token)

        def _from_pretrained(cls, model, model_id, *args, **kwargs):
            if _offloaded_device_map(model) is None:
                return original(cls, model, model_id, *args, **kwargs)
            config = args[2] if len(args) > 2 else kwargs.get("config")
            if config is None:
                hub = {name: kwargs[name] for name in ("subfolder", "revision", "cache_dir", "token")
                       if name in kwargs}
                try:
                    peft_type = PeftConfig._get_peft_type(model_id, **hub)
                except Exception:  # noqa: BLE001 - PEFT's own call below reports it
                    peft_type = None
            else:
                peft_type = getattr(config, "peft_type", None)
            if peft_type != PEFT_TYPE:
                return original(cls, model, model_id, *args, **kwargs)
            with _accelerate_dispatch_kept(model):
                return original(cls, model, model_id, *args, **kwargs)

        return warned_once_loaded(from_pretrained)

    _patch_classmethod_once(PeftModel, "from_pretrained", make)


def _resize_to_the_vocabulary_of_the_folder(model, model_id, args: tuple, kwargs: dict):
    """:func:`~peft_qst.vocabulary.resize_to_the_adapters_vocabulary` for ``PeftModel.from_pretrained(model, model_id,
    *args, **kwargs)`` of a QST adapter (the config given, else the one saved at ``model_id``), with the shapes of
    the tensors in its file, before PEFT injects the adapter into ``model``; returns the resize's undo, or None.

    The tensors are named as the load will name them, after its ``key_mapping``
    (:func:`serialization.rename_as_peft_does`): a file saved under an older layout's module names holds the
    embeddings under those names, and read as saved the resize found none of them, so that the load (which renames
    them) was refused as "another vocabulary size". Where the renaming refuses the file, the names are taken as saved
    (the load's own renaming then refuses it, and the resize is undone)."""
    config = args[2] if len(args) > 2 else kwargs.get("config")
    key_mapping = args[6] if len(args) > 6 else kwargs.get("key_mapping")
    hub_kwargs = {name: kwargs[name] for name in (*_HUB_ARGUMENTS, "use_auth_token") if kwargs.get(name) is not None}
    if config is None:
        try:
            config = _saved_qst_config(model_id, hub_kwargs)
        except Exception:  # noqa: BLE001 - PEFT's own reading of the config reports it
            return None
    if getattr(config, "peft_type", None) != PEFT_TYPE:
        return None

    def shapes() -> dict:
        saved = saved_tensor_shapes(model_id, hub_kwargs)
        try:
            return rename_as_peft_does(saved, key_mapping, repr(model_id))
        except ValueError:  # (QSTAdapterFileError too) reported by the load's own renaming
            return saved

    return resize_to_the_adapters_vocabulary(model, config, shapes)


def _transformers_hub_kwargs(kwargs: dict) -> dict:
    """The download arguments transformers' ``load_adapter`` was given, wherever they came in: its ``load_config``
    (``from_pretrained`` passes its own), ``adapter_kwargs``, ``local_files_only`` and plain keyword arguments."""
    hub_kwargs = {}
    load_config = kwargs.get("load_config")
    if load_config is not None:
        hub_kwargs.update(getattr(load_config, "download_kwargs", None) or {})
    hub_kwargs.update(kwargs.get("adapter_kwargs") or {})
    hub_kwargs.update({name: value for name, value in kwargs.items() if name in _HUB_ARGUMENTS})
    if kwargs.get("local_files_only"):
        hub_kwargs["local_files_only"] = True
    return {name: value for name, value in hub_kwargs.items() if name in _HUB_ARGUMENTS and value is not None}


def _saved_qst_config(model_id, hub_kwargs: dict):
    """The QSTConfig saved at ``model_id``, or None when the adapter there is not QST or its config cannot be read
    (transformers' own loader then runs and reports whatever is wrong). A QST adapter whose weights QST refuses to
    read (pickled only, unreadable) is refused here."""
    from peft import PeftConfig

    try:
        peft_type = PeftConfig._get_peft_type(model_id, **hub_kwargs)
    except Exception:  # noqa: BLE001 - no readable adapter_config.json: transformers' loader decides
        return None
    if peft_type != PEFT_TYPE:
        return None
    return QSTConfig.from_pretrained(model_id, **hub_kwargs)


def _check_given_config(model, config: QSTConfig, adapter_name: str, saved_config: dict) -> bool:
    """:func:`check_saved_config_matches` for a config not bound to ``model`` yet, with ``side_heads="auto"`` resolved
    as binding it would (a model binding refuses is left to the binding's own error). Returns whether the head count
    is left for after the binding: where the saved count is one "auto" reaches only when the side networks of the
    counts before it cannot be used (DiffLlama, Kolibri 1.1: ``model._update_layer``), only building them tells, so
    the caller checks the bound config again (an adapter saved with ``side_heads="auto"`` on such a model was refused
    as saved with another head count)."""
    import copy

    deferred = False
    if config.side_heads == AUTO:
        try:
            base_config = text_config_of(model.config)
            resolved = resolve_side_heads(base_config, config)
            later = auto_side_head_candidates(base_config, config.r)[1:] if config.init != "pruned" else []
        except Exception:  # noqa: BLE001 - binding the config to the model reports it
            return False
        config = copy.copy(config)
        saved = saved_config.get("side_heads", resolved)
        deferred = saved != resolved and saved in later
        config.side_heads = saved if deferred else resolved
    check_saved_config_matches(config, adapter_name, saved_config, model)
    return deferred


def _read_qst_weights_safely_in_transformers() -> None:
    """transformers loads PEFT adapters itself: ``AutoModelForCausalLM.from_pretrained(adapter_folder)`` and
    ``model.load_adapter(adapter_folder)`` inject the adapter with PEFT and read its weights with transformers' own
    loader. That loader falls back to ``adapter_model.bin`` (unpickled), knows nothing of the digest recorded in
    ``adapter_config.json``, and starts a weight missing from the file at its fresh initialisation with a log line.
    For QST adapters the weights are read by
    `serialization.read_adapter_weights` instead and handed to transformers as ``adapter_state_dict``; a load that
    leaves any adapter weight missing, unexpected or of another shape is undone and refused. A second adapter on the
    same model is refused: transformers' ``set_adapter`` and ``delete_adapter`` need a newer PEFT than this one."""
    from transformers.integrations.peft import PeftAdapterMixin

    def make(original):
        def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None,
                         *args, **kwargs):
            # the adapter_config.json saved with the weights, where a config given here builds the adapter instead
            saved_config = file_config = {}  # file_config: read whether or not a config is given here
            digest = None  # of weights read from a folder here (not of an adapter_state_dict passed in)
            if adapter_state_dict is None and peft_model_id is not None:
                hub_kwargs = _transformers_hub_kwargs(kwargs)
                config = peft_config if peft_config is not None else _saved_qst_config(peft_model_id, hub_kwargs)
                if getattr(config, "peft_type", None) == PEFT_TYPE:
                    adapter_state_dict, read_config = read_adapter_weights(peft_model_id, None, hub_kwargs)
                    digest = _digest_of(adapter_state_dict, read_config)
                    file_config = read_config
                    saved_config = read_config if peft_config is not None else {}
                    peft_config = config
            if getattr(peft_config, "peft_type", None) != PEFT_TYPE:
                return original(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kwargs)
            if getattr(self, "peft_config", None):
                raise ValueError(
                    f"This model already holds the adapter(s) {sorted(self.peft_config)}; transformers' own adapter "
                    "loading takes one QST adapter per model (with this PEFT version, transformers cannot switch "
                    "between adapters). To hold several QST adapters, load them with PEFT: "
                    "model = PeftModel.from_pretrained(base_model, first_folder), then "
                    "model.load_adapter(second_folder, adapter_name=...) and model.set_adapter(...)."
                )
            if is_bare_trunk(self):
                raise QSTUnsupportedModelError(
                    f"transformers' own adapter loading injects an adapter into {type(self).__name__} in place, but "
                    "this model is a bare decoder trunk (AutoModel), which QST wraps from outside: PEFT cannot inject "
                    "into the root model. Load the adapter with PEFT: PeftModel.from_pretrained(AutoModel."
                    "from_pretrained(base), adapter_folder) or AutoPeftModelForFeatureExtraction.from_pretrained("
                    "adapter_folder)."
                )
            name = adapter_name or "default"  # transformers' default
            if saved_config:
                # a config given with peft_config= that computes otherwise than the one the weights were saved with:
                # refused before anything is injected or loaded (transformers loads a module saved whole, such as
                # lm_head, over the model's own where the config does not list it in modules_to_save)
                heads_deferred = _check_given_config(self, peft_config, name, saved_config)
            else:
                heads_deferred = False
            # a vocabulary resized with pad_to_multiple_of in training: resized again where the file holds every
            # tensor the resize gives new rows (undone with the load)
            undo_resize = resize_to_the_adapters_vocabulary(
                self, peft_config, lambda: {key: list(value.shape) for key, value in adapter_state_dict.items()}
            ) if adapter_state_dict is not None else None
            # injection freezes every base weight and loading sets eval mode: an undone load puts both back
            flags = trainability(self)

            def undo():
                remove_injected_adapters(self)
                restore_trainability(self, flags)
                if undo_resize is not None:
                    undo_resize()

            def load_checked(model, state_dict, *load_args, **load_kwargs):
                # the adapter is injected, nothing is loaded yet: transformers writes every tensor that names a weight
                # of the model into it, so one that is neither the adapter's nor a module saved with it would go
                # over the frozen base model (undo() takes the adapter off, not a base weight written over)
                if state_dict is not None:
                    state_dict = token_embeddings_named_as_in(model, name, state_dict)
                    # the widths the file's side blocks have, with a config given here that narrows them (only now,
                    # with the side network built, do its shapes tell): refused naming the option, as PEFT's loaders
                    # are, not as the shape mismatch transformers reports
                    check_saved_modules_to_save_present(
                        model, name, saved_config.get("modules_to_save", peft_config.modules_to_save), state_dict
                    )
                    check_width_options_of_earlier_files(model, name, saved_config, state_dict)
                    check_token_embeddings_fit(model, state_dict)
                    warn_added_token_embeddings_not_saved(model, name, file_config, state_dict)
                    warn_if_base_model_differs(model, name, file_config)
                    copies = set(saved_adapter_copies_of_embeddings(model, name, state_dict))
                    state_dict = {key: value for key, value in state_dict.items() if key not in copies}
                    foreign = foreign_tensors(model, name, state_dict, model.state_dict())
                    if foreign:
                        raise refuse_foreign_tensors(name, foreign)
                return type(model)._load_pretrained_model(model, state_dict, *load_args, **load_kwargs)

            own_loader = vars(self).get("_load_pretrained_model")
            vars(self)["_load_pretrained_model"] = load_checked
            reading_token = reading_saved_adapter.set(True)
            try:
                info = original(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kwargs)
            except BaseException:
                # transformers raises for a weight of another shape (ignore_mismatched_sizes=False) after injecting
                # the adapter and loading the weights that fit: without this, the half-loaded adapter stayed
                undo()
                raise
            finally:
                reading_saved_adapter.reset(reading_token)
                if own_loader is None:
                    vars(self).pop("_load_pretrained_model", None)
                else:
                    vars(self)["_load_pretrained_model"] = own_loader
            if heads_deferred:
                try:
                    check_saved_config_matches(self.peft_config[name], name, saved_config)
                except BaseException:
                    undo()
                    raise
            problems = {
                "missing from the file": sorted(info.missing_keys),
                "not in this model": sorted(info.unexpected_keys),
                "of another shape": sorted(
                    str(key[0]) if isinstance(key, tuple) else key for key in info.mismatched_keys
                ),
            }
            problems = {what: keys for what, keys in problems.items() if keys}
            if problems:
                undo()
                found = "; ".join(f"{len(keys)} {what}, e.g. {keys[:3]}" for what, keys in problems.items())
                raise QSTAdapterFileError(
                    f"The QST adapter at {peft_model_id!r} does not fit this model: of its weights, {found}. It was "
                    "saved with another configuration or is damaged; it was removed again, so the model is as it "
                    "was before load_adapter."
                )
            identify_loaded_adapter(self, name, digest)
            if undo_resize is not None:
                undo_resize.announce()  # only now: a refused load hands the model back at its size
            return info

        return warned_once_loaded(load_adapter)

    _patch_once(PeftAdapterMixin, "load_adapter", make)


def _save_qst_weights_as_safetensors() -> None:
    from peft import PeftModel

    def make(original):
        def save_pretrained(self, save_directory, *args, **kwargs):
            # the base model as it is now: its token embeddings may have been resized since get_peft_model, and PEFT
            # then saves the resized embeddings with the adapter, which fit only a base model resized the same way
            # and a fingerprint of its weights (the checkpoint's vocabulary rows, drawn before the signature's
            # vocabulary size is updated to a resize), which loading compares: another checkpoint of the same shapes
            for config in self.peft_config.values():
                if getattr(config, "peft_type", None) == PEFT_TYPE and config.base_model_signature is not None:
                    base = self.get_base_model()
                    # (where the weights cannot be read now, FSDP's shards, the one get_peft_model recorded)
                    config.base_model_fingerprint = (
                        base_model_fingerprint(base, original_vocabulary_rows(base, config))
                        or config.base_model_fingerprint
                    )
                    config.base_model_signature = model_signature(base)
            arguments = inspect.signature(original).bind(self, save_directory, *args, **kwargs).arguments
            # PEFT's weight conversion (PiSSA/CorDA/OLoRA) first rewrites the adapter_config.json of the folder it is
            # given with this model's config and a digest of that folder's own weights, and only then refuses QST:
            # the refused save left another saved adapter with a config that is not its own, yet passes the digest
            # check and loads computing something else. Refused here, before anything is written.
            holds_qst = _holds_qst_adapter(self)
            if arguments.get("path_initial_model_for_weight_conversion") is not None and holds_qst:
                raise ValueError(
                    "save_pretrained(path_initial_model_for_weight_conversion=...) is not supported for QST adapters: "
                    "it converts PiSSA/CorDA/OLoRA-initialised LoRA adapters, and QST has no such initialisation. "
                    "Call save_pretrained without it. Nothing was written."
                )
            args = list(args)
            if not arguments.get("safe_serialization", True) and holds_qst:
                warnings.warn(
                    "safe_serialization=False is ignored for QST adapters: they are saved as "
                    "adapter_model.safetensors, because QST loads weights only from safetensors and never unpickles "
                    "adapter_model.bin.",
                    stacklevel=user_stacklevel(),
                )
                if args:
                    args[0] = True
                else:
                    kwargs["safe_serialization"] = True
            if holds_qst and arguments.get("save_embedding_layers", "auto") == "auto":
                names = arguments.get("selected_adapters")
                if _vocabulary_resized_for_an_adapter(self, list(self.peft_config) if names is None else names):
                    position = list(inspect.signature(original).parameters).index("save_embedding_layers") - 2
                    if len(args) > position:
                        args[position] = True
                    else:
                        kwargs["save_embedding_layers"] = True
            result = original(self, save_directory, *args, **kwargs)
            # PEFT writes the card at the root before it saves the adapters ("default" there, each of another name
            # in its own subfolder): the root card's loading section is written once they are all saved, from
            # their configs
            if arguments.get("is_main_process", True) and holds_qst:
                _write_loading_section(self, save_directory)
            return result

        return save_pretrained

    _patch_once(PeftModel, "save_pretrained", make)


def _vocabulary_resized_for_an_adapter(model, adapter_names) -> bool:
    """Whether a QST adapter of ``model`` among ``adapter_names`` (those to be saved) was trained on a multimodal model
    whose language model's vocabulary was resized
    (:func:`~peft_qst.vocabulary.vocabulary_resized_from_checkpoint`), with PEFT's warning where it was: the
    embeddings are then saved with it. PEFT's ``save_embedding_layers="auto"`` saves
    the token embeddings beside an adapter where the vocabulary differs from the base checkpoint's, but reads only the
    top-level config: a resized Llava or Qwen2-VL was saved without them, and loaded onto a base model resized by hand
    (whose shapes the adapter's signature accepts) computed with the random rows that resize drew.

    An adapter added with ``add_adapter`` has no ``base_model_name_or_path`` until PEFT's ``save_pretrained`` records
    it, after saving its weights: PEFT's "auto" compared no vocabulary for it, and saved it without the embeddings of
    a resized one, on any model (the first adapter's file held them). Loaded alone it was refused as "another
    vocabulary size", or, onto a base resized by hand, computed with the rows that resize drew; loaded beside the
    first, it warned of those rows though the first one's load had written the trained ones. Its vocabulary is
    compared with the checkpoint PEFT will record (the base model's ``name_or_path``, a folder or a cached repository;
    :func:`~peft_qst.vocabulary.checkpoint_vocab_size`)."""
    for name in adapter_names:
        config = getattr(model, "peft_config", {}).get(name)
        if getattr(config, "peft_type", None) != PEFT_TYPE:
            continue
        model_id = getattr(config, "base_model_name_or_path", None)
        if model_id:
            resized = vocabulary_resized_from_checkpoint(model, model_id)
            what = "the language model's vocabulary (text_config.vocab_size)"
            why = "PEFT reads the top-level config's vocab_size, which a multimodal config does not resize"
        else:
            base = model.get_base_model()
            checkpoint = checkpoint_vocab_size(base.__dict__.get("name_or_path"), type(base.config))
            vocab_size = getattr(text_config_of(base.config), "vocab_size", None)
            resized = (checkpoint, vocab_size) if checkpoint not in (None, vocab_size) else None
            what = "the vocabulary"
            why = f"adapter {name!r}, added with add_adapter, records no base_model_name_or_path, which PEFT reads"
        if resized is not None:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                f"finetuning: {what} has {resized[1]} tokens, the base checkpoint's {resized[0]} ({why}).",
                stacklevel=user_stacklevel(),
            )
            return True
    return False


def _keep_the_weights_of_adapters_beside_module_named_ones() -> None:
    """PEFT's ``get_peft_model_state_dict`` (``save_pretrained``, trainer checkpoints) first drops every key that holds
    the name of another adapter of the model as a dotted segment (``.<name>.``). A side network's keys hold many
    segments that are plausible adapter names (``trunk``, ``layers``, ``mlp``, ``norm``, the block numbers ``0``,
    ``1``, ...): beside an adapter named ``"1"`` (or ``"mlp"``, ``"trunk"``), saving ``"default"`` silently wrote a
    file without those of its weights (41 of 57 on a tiny Llama, 8 of 57 beside ``"trunk"``), which its digest
    passed and loading refused as "saved from a different QST configuration": the trained adapter was lost. The keys
    of a module saved whole (``lm_head.modules_to_save.default.weight``) and the token embeddings PEFT saves beside
    the adapter (``model.embed_tokens.weight``) hold such segments too: beside an adapter named ``"model"``,
    ``"weight"`` or ``"modules_to_save"``, saving failed with a bare ``KeyError: 'modules_to_save.default.weight'``,
    and a resized vocabulary's embeddings were left out of the file without a word. In a model holding QST adapters
    a key names its adapter in one place, the segment after ``qst_side.`` (the side network) or ``modules_to_save.``
    (a module saved whole): such keys are kept or dropped by that segment alone, and a key naming no adapter (the
    base model's, the embeddings, a wrapped module's original) is kept, as PEFT keeps it where no name coincides. The
    keys of other methods' models are filtered as PEFT does."""
    import peft.utils.save_and_load as save_and_load

    side_key = re.compile(rf"(?:^|\.){SIDE_ATTR}\.([^.]+)\.")
    adapter_key = re.compile(rf"(?:^|\.)(?:{SIDE_ATTR}|modules_to_save)\.([^.]+)\.")

    def make(original):
        def _filter_state_dict_for_adapter_name(state_dict, unwanted_adapter_names):
            if not any(side_key.search(key) for key in state_dict):
                return original(state_dict, unwanted_adapter_names)  # no QST adapter: PEFT's filter
            unwanted = set(unwanted_adapter_names)
            return {
                key: value for key, value in state_dict.items()
                if (match := adapter_key.search(key)) is None or match.group(1) not in unwanted
            }

        return _filter_state_dict_for_adapter_name

    _patch_once(save_and_load, "_filter_state_dict_for_adapter_name", make)


def _side_modules_with_parameters(model) -> list:
    """The modules of the model's QST side networks that hold parameters of their own (directly, or through a
    parametrization such as the offsets of norm weights), each of which the FSDP policy below makes an FSDP unit: a
    side block (its gate), a norm, a linear layer, the output gate. Each is called as a module where its parameters
    are used, so FSDP gathers them for that call."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrize import ParametrizationList

    owners = []
    for layer in model.modules():
        if not isinstance(layer, QSTLayer):
            continue
        for side in layer.qst_side.values():
            for module in side.modules():
                if isinstance(module, ParametrizationList):  # part of the parametrized module that uses it
                    continue
                if parametrize.is_parametrized(module) or next(module.parameters(recurse=False), None) is not None:
                    owners.append(module)
    return owners


def _wrap_side_modules_in_fsdp_units() -> None:
    """PEFT's ``fsdp_auto_wrap_policy`` (see the module docstring), extended for models that hold QST adapters."""
    import peft.utils.other as peft_other

    def make(original):
        def fsdp_auto_wrap_policy(model):
            policy = original(model)
            owners = _side_modules_with_parameters(model)
            if not owners:
                return policy
            from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy

            wrapped = weakref.WeakSet(owners)
            side_policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: module in wrapped)
            return functools.partial(_or_policy, policies=[policy, side_policy])

        return fsdp_auto_wrap_policy

    _patch_once(peft_other, "fsdp_auto_wrap_policy", make)


def _holds_qst_side_network(model) -> bool:
    """Whether ``model`` (a PeftModel, a model ``inject_adapter_in_model`` adapted, or a ``torch.compile`` wrapper of
    either) holds a QST adapter."""
    import torch

    return _holds_qst_adapter(model) or (
        isinstance(model, torch.nn.Module) and any(isinstance(module, QSTLayer) for module in model.modules())
    )


def _refuse_qst_adapters_in_lora_hotswap_helpers() -> None:
    """PEFT's ``hotswap_adapter`` refuses a QST adapter by its type before it touches the model. The two helpers it is
    built on, which LoRA users call themselves to compile once and swap adapters in place, did not:
    ``prepare_model_for_compiled_hotswap`` told a model holding a QST adapter that it had "no adapter layers" and to
    call it "after loading the first adapter", and ``hotswap_adapter_from_state_dict``, given the side network's
    weights with the prefix PEFT maps QST to (``parameter_prefix="qst_"``, as ``hotswap_adapter`` passes it), first
    zeroed every weight of the adapter the state dict left out, then failed on LoRA's ``rank_pattern``
    (``AttributeError``): the adapter in use was damaged by a call that reported an unrelated error. Both refuse a
    model holding a QST adapter (or a QST config) before anything is changed, naming QST's own swap."""
    import peft.utils.hotswap as hotswap

    def refusal(function: str) -> ValueError:
        return ValueError(
            f"{function} works on LoRA adapters only, and this model holds a QST adapter (a side network, not "
            "LoRA's low-rank matrices, so there is nothing to pad or swap in place). To swap a QST adapter, load the "
            "new one into the name in use: model.load_adapter(folder, adapter_name=name), or, for weights in "
            "memory, set_peft_model_state_dict(model, state_dict, adapter_name=name); both check that the weights "
            "fit first. Nothing was changed."
        )

    def make_prepare(original):
        def prepare_model_for_compiled_hotswap(model, *args, **kwargs):
            if _holds_qst_side_network(model):
                raise refusal("prepare_model_for_compiled_hotswap")
            return original(model, *args, **kwargs)

        return prepare_model_for_compiled_hotswap

    def make_from_state_dict(original):
        def hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, *args, **kwargs):
            if _holds_qst_side_network(model) or getattr(config, "peft_type", None) == PEFT_TYPE:
                raise refusal("hotswap_adapter_from_state_dict")
            return original(model, state_dict, adapter_name, config, *args, **kwargs)

        return hotswap_adapter_from_state_dict

    _patch_once(hotswap, "prepare_model_for_compiled_hotswap", make_prepare)
    _patch_once(hotswap, "hotswap_adapter_from_state_dict", make_from_state_dict)


def _return_the_bare_trunk_from_get_base_model() -> None:
    """``PeftModel.get_base_model()`` returns ``base_model.model``, which for a bare decoder trunk (AutoModel) is the
    QSTLayer the tuner wrapped it in (PEFT cannot inject below the root): return the trunk itself, the model the user
    passed in, as the Trainer expects (it reads the forward's signature to keep the dataset's columns). Its forward
    is the trunk's own, without the side network around it; the PeftModel runs the adapted one."""
    from peft import PeftModel

    def make(original):
        def get_base_model(self):
            model = original(self)
            return model.get_base_layer() if isinstance(model, QSTLayer) else model

        return get_base_model

    _patch_once(PeftModel, "get_base_model", make)


def _keep_the_side_attention_on_set_attn_implementation() -> None:
    """``model.set_attn_implementation(...)`` (transformers) sets the implementation on every ``PreTrainedModel`` the
    model holds, and a side network's trunk is one: switching an adapted model's backbone to ``"eager"`` (or back to
    ``"sdpa"``) also took the side trunk off its own implementation, :data:`~peft_qst.side_attention.SIDE_SDPA` (SDPA
    in float32 on CPU, chosen for the side's tiny heads; see peft_qst/side_attention.py), to the one asked for the
    backbone. The side trunk never returns attention weights (``output_attentions`` goes to the backbone alone) and its
    heads are not the backbone's, so its implementation, chosen when it was built, is kept; a call on a side trunk
    itself (``side.trunk.set_attn_implementation(...)``) still changes it."""
    from transformers import PreTrainedModel

    def make(original):
        def set_attn_implementation(self, *args, **kwargs):
            kept = [
                (module.config, module.config._attn_implementation_internal)
                for side in self.modules() if isinstance(side, QSTSideNetwork)
                for module in side.modules() if isinstance(module, PreTrainedModel)
            ]
            try:
                return original(self, *args, **kwargs)
            finally:
                for config, implementation in kept:
                    config._attn_implementation_internal = implementation

        return set_attn_implementation

    _patch_once(PreTrainedModel, "set_attn_implementation", make)


def _config_file(model_id, subfolder=None) -> str:
    from peft.utils import CONFIG_NAME

    return os.path.join(model_id, *([subfolder] if subfolder else []), CONFIG_NAME)


def _misspelt_qst_peft_type(peft_type, file: str) -> Optional[ValueError]:
    """The refusal of a ``peft_type`` that reads "qst", "Qst" or " QST" (a file edited by hand, or written by another
    tool), which PEFT, looking types up by exact name, reported as a bare ``KeyError: 'qst'``; None for any other
    value, other methods' included."""
    if not isinstance(peft_type, str) or peft_type == PEFT_TYPE or peft_type.strip().upper() != PEFT_TYPE:
        return None
    return ValueError(
        f"{file}: peft_type {peft_type!r} is not a PEFT method name; QST adapters have peft_type 'QST' (PEFT matches "
        "the name exactly). Write \"peft_type\": \"QST\" in the file, or save the adapter again with save_pretrained."
    )


def _damaged_qst_config(file: str) -> Optional[QSTAdapterFileError]:
    """The refusal of an ``adapter_config.json`` that cannot be read as a PEFT config (not JSON, not a JSON object, or
    without ``peft_type``: a file truncated, emptied or edited by hand) beside the weights of a QST adapter (a local
    folder whose safetensors file holds side-network weights), which PEFT reported as a bare ``JSONDecodeError``,
    ``TypeError`` or ``KeyError: 'peft_type'`` naming neither the file nor the fix; None for a readable file and for
    other folders (other methods' get PEFT's own error). Called only once PEFT failed to read the file."""
    if not os.path.isfile(file):
        return None
    problem = config_file_problem(file)
    if problem is None:
        return None
    # the weights file's header ({} where there is none, or it is unreadable: reported when the weights are read)
    if not any(is_side_network_key(key) for key in saved_tensor_shapes(os.path.dirname(file), {})):
        return None
    return damaged_config_error(file, problem)


def _name_the_file_in_config_refusals() -> None:
    """A value of ``adapter_config.json`` that ``QSTConfig`` refuses (its messages begin ``"QSTConfig.<field>"``) is
    reported naming the file. The patch sits on PEFT's ``from_pretrained``, which builds the config of the type the
    file names: ``PeftConfig.from_pretrained(folder)``, with which ``AutoPeftModelForCausalLM.from_pretrained`` and
    transformers' ``load_adapter`` read the folder, never reaches ``QSTConfig.from_pretrained`` (whose own call of it
    is covered too), and its refusal named the field and the fix but not the file. A misspelt QST ``peft_type``
    (:func:`_misspelt_qst_peft_type`) is refused naming the file there and in ``PeftConfig._get_peft_type``, through
    which ``PeftModel.from_pretrained`` and ``load_adapter`` read the type. Other refusals and other methods' configs
    pass unchanged."""
    from peft.config import PeftConfigMixin

    def make_from_pretrained(original):
        def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
            file = _config_file(pretrained_model_name_or_path, subfolder)
            try:
                return original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
            except ValueError as error:
                if not str(error).startswith("QSTConfig."):
                    damaged = _damaged_qst_config(file)
                    if damaged is None:
                        raise
                    raise damaged from error
                raise ValueError(f"{file}: {error}") from error
            except (KeyError, TypeError) as error:
                refusal = _damaged_qst_config(file) or (
                    _misspelt_qst_peft_type(error.args[0] if error.args else None, file)
                    if isinstance(error, KeyError) else None
                )
                if refusal is None:
                    raise
                raise refusal from None

        return from_pretrained

    def make_get_peft_type(original):
        def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
            file = _config_file(model_id, hf_hub_download_kwargs.get("subfolder"))
            try:
                peft_type = original(cls, model_id, **hf_hub_download_kwargs)
            except (KeyError, TypeError, ValueError) as error:
                damaged = _damaged_qst_config(file)
                if damaged is None:
                    raise
                raise damaged from error
            refusal = _misspelt_qst_peft_type(peft_type, file)
            if refusal is not None:
                raise refusal
            return peft_type

        return _get_peft_type

    _patch_classmethod_once(PeftConfigMixin, "from_pretrained", make_from_pretrained)
    _patch_classmethod_once(PeftConfigMixin, "_get_peft_type", make_get_peft_type)


def _read_qst_files_as_qst_config_does() -> None:
    """PEFT's ``from_pretrained`` passes the attributes read from an ``adapter_config.json`` through the
    ``check_kwargs`` of the class it was called on, then builds the config of the class the file's ``peft_type``
    names. ``QSTConfig.check_kwargs`` reads a file written before ``side_heads``, ``side_linear_heads`` or
    ``side_inner_widths`` existed as the side blocks its weights have (the model's heads and widths), but
    ``PeftConfig.from_pretrained(folder)`` (the user's, ``AutoPeftModel``'s, transformers' own) never called it: the
    config it returned said today's defaults, ``"auto"`` and ``"divided"``, for an adapter that every loader builds
    with the model's, and a config copied from it built side blocks the weights do not fit. A file of peft_type QST
    is read through ``QSTConfig.check_kwargs`` whatever class ``from_pretrained`` was called on; configs built in code
    keep today's defaults, and other methods' files pass unchanged."""
    from peft.config import PeftConfigMixin

    def make(original):
        def check_kwargs(cls, **kwargs):
            if kwargs.get("peft_type") == PEFT_TYPE and not issubclass(cls, QSTConfig):
                return QSTConfig.check_kwargs(**kwargs)
            return original(cls, **kwargs)

        return check_kwargs

    _patch_classmethod_once(PeftConfigMixin, "check_kwargs", make)
