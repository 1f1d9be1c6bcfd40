"""Token embeddings and vocabulary sizes of a QST adapter against the model it is loaded onto.

The side network's output is read through the base model's LM head, so an adapter trained on a resized vocabulary
(added chat tokens) computes as trained only on a model resized as it was, with the trained rows of the added tokens:
PEFT saves the token embeddings beside the adapter (``save_embedding_layers``) and loads them into the base model,
which every adapter shares. The functions here find the model's token embeddings, read a checkpoint's vocabulary size,
check the embeddings in an adapter's file against the model's, and resize a model to the adapter's vocabulary where
the file holds every row the resize adds.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
from torch import nn

from .loading import PEFT_MODEL_PREFIX, warn_once_loaded, wrapped_by_peft_model
from .modules_to_save import name_in
from .serialization import QSTAdapterFileError, user_stacklevel
from .signature import model_signature, signature_differences, text_config_of


def token_embeddings(model: nn.Module) -> list[nn.Module]:
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


def named_token_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's token embeddings (:func:`token_embeddings`) with every name they have in its state dict (FSDP's
    wrapper names left out): the loading checks below look them up in a file read for an adapter."""
    embeddings = token_embeddings(model)
    return [
        (name.replace("_fsdp_wrapped_module.", ""), module)
        for name, module in model.named_modules(remove_duplicate=False)
        if name and any(module is layer for layer in embeddings)
    ]


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
    prefixed = wrapped_by_peft_model(model)
    copies = set()
    for name, module in named_token_embeddings(model):
        if isinstance(module, AuxiliaryTrainingWrapper):
            copies.update(f"{name}.modules_to_save.{key}" for key in module.adapter_state_dict_load_map(adapter_name))
    return [key for key in keys if (key if prefixed else key.removeprefix(prefix)) in copies]


def token_embeddings_named_as_in(model: nn.Module, adapter_name: str, tensors: dict) -> dict:
    """``tensors`` (of a file read for QST adapter ``adapter_name`` of ``model``) with the token embeddings PEFT saves
    beside an adapter (``save_embedding_layers``) named as ``model`` holds them. PEFT names them as the model that
    saved them held them: an adapter that does not train the LM head, saved beside one that does
    (``modules_to_save=["lm_head"]``, which wraps the head for every adapter), holds the frozen head as
    ``lm_head.original_module.weight``, and one saved alone holds it as ``lm_head.weight``. Loaded onto a model whose
    head is wrapped otherwise, the first was refused as a tensor "written by something other than save_pretrained"
    (so such an adapter, trained on a resized vocabulary, could be saved but never loaded alone), and the second
    named no weight of the model and was dropped without a word: the head's rows for the added tokens were not
    written, nor compared with those the other adapters share. An adapter that trains the head itself
    (``modules_to_save``) has its file as PEFT maps it, and a name the file already holds is left alone."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    renamed = dict(tensors)
    for name, module in named_token_embeddings(model):
        wrapped = isinstance(module, AuxiliaryTrainingWrapper)
        if wrapped and module.adapter_state_dict_load_map(adapter_name):
            continue  # the adapter's own modules_to_save
        name = name.removeprefix(PEFT_MODEL_PREFIX)
        for key in list(renamed):
            plain = key.removeprefix(PEFT_MODEL_PREFIX)
            if not plain.startswith(f"{name}."):
                continue
            rest = plain[len(name) + 1:]
            if not wrapped and rest.startswith("original_module."):
                new = rest.removeprefix("original_module.")
            elif wrapped and not rest.startswith(("original_module.", "modules_to_save.")):
                new = "original_module." + rest
            else:
                continue
            new_key = key[: len(key) - len(plain)] + f"{name}.{new}"
            if new_key not in renamed:
                renamed[new_key] = renamed.pop(key)
    return renamed


def check_token_embeddings_fit(model: nn.Module, tensors: dict) -> None:
    """The token embeddings in a file read for a QST adapter of ``model`` (PEFT saves them with
    ``save_embedding_layers``, which it sets when the vocabulary was resized) have as many rows as the model's. An
    adapter whose config records the vocabulary size is refused before its weights are read; one saved before it was
    recorded, loaded onto a base model that was not resized as it had been, was refused by PEFT for "a module saved
    whole with the adapter, modules_to_save" (which it is not) and by transformers' ``load_adapter`` with a bare
    "You set `ignore_mismatched_sizes` to `False`", neither naming the vocabulary or the resize that fixes it."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = PEFT_MODEL_PREFIX
    for name, module in named_token_embeddings(model):
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
    its text config's where it has one (:func:`~peft_qst.signature.text_config_of`; a Llava or Qwen2-VL config keeps it
    in ``text_config``, which PEFT's ``save_embedding_layers="auto"`` does not read). None where the config cannot be
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
        name = name_in(model, module)
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
    for name, module in named_token_embeddings(peft_model):
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
