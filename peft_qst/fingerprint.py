"""The base-model fingerprint: whether an adapter is loaded onto the checkpoint it was trained on.

The base-model signature (:mod:`peft_qst.signature`) tells architectures and sizes apart, not checkpoints: an Instruct
model and its base, or a fine-tune, have the same. The side network reads every layer's hidden states of the backbone
and was trained on those of one checkpoint, so ``save_pretrained`` records a few entries of its token embeddings
(:func:`base_model_fingerprint`), which are not quantized and read the same in every dtype a checkpoint is loaded in,
and loading warns where the model's differ (:func:`warn_if_base_model_differs`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .config import FINGERPRINT_METADATA
from .loading import warn_once_loaded
from .vocabulary import checkpoint_vocab_size, token_embeddings


#: how many entries of each token-embedding matrix :func:`base_model_fingerprint` records
FINGERPRINT_ENTRIES = 64
#: the largest relative difference the same stored value shows loaded in another dtype: bf16 keeps 8 significant
#: bits (rounding to nearest moves a value by at most 2^-8 of it), float16 11 (2^-11 more where a float16 load is
#: compared with a bf16 one); float16's subnormals (below 6.1e-5) are spaced 2^-24 apart
FINGERPRINT_RTOL = 2.0 ** -8 + 2.0 ** -11
FINGERPRINT_ATOL = 2.0 ** -24


def _fingerprinted_weights(model: nn.Module, tied_head: bool = False) -> Optional[dict]:
    """{"input_embeddings": weight, "output_embeddings": weight} of the base ``model`` for
    :func:`base_model_fingerprint`: the token embeddings, and the LM head where it is not tied to them. bitsandbytes
    quantizes neither (nor do ``load_in_8bit`` and ``load_in_4bit`` touch their values), so they read the same in a
    float32, bf16, float16, 8-bit or 4-bit load of one checkpoint, up to the rounding of the load's dtype; a fine-tune
    moves them (a tied embedding matrix and an LM head get gradients in every row, from the softmax over the whole
    vocabulary). None where they cannot be read here: on the meta device (weights offloaded by accelerate or not
    loaded yet), partitioned by DeepSpeed ZeRO-3 or sharded by FSDP (:func:`~peft_qst.fast_path.sharded`), not a
    plain 2-D floating-point tensor (quantized by another method, a DTensor). ``tied_head``: an LM head tied to the
    embeddings is given as ``"output_embeddings"`` too (the rows it computes the logits with), for a comparison with
    a fingerprint recorded on a model whose head was not tied."""
    from .fast_path import sharded

    weights = {}
    layers = token_embeddings(model)
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
            if tied_head:
                weights[kind] = weight
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
    here). The recorded LM head of an untied model is compared with this model's head tied to its embeddings (the rows
    it computes the logits with), and left out where this model has no LM head (a bare trunk). Whether the head is
    tied is not in the base model's signature: such a model was left out of the comparison altogether, and an adapter
    loaded onto another checkpoint whose head is tied (of other embeddings too) gave no warning."""
    weights = _fingerprinted_weights(model, tied_head=True)
    recorded = {kind: entries for kind, entries in recorded.items() if kind not in FINGERPRINT_METADATA}
    if weights is None:
        return None
    changed = compared = 0
    for kind, entries in recorded.items():
        weight = weights.get(kind)
        if weight is None:
            continue
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
