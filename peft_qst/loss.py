"""A causal-LM loss that never materialises the full-vocabulary logits in float32.

transformers' ``ForCausalLMLoss`` upcasts the whole ``(tokens, vocabulary)`` logits tensor to float32 and runs
``cross_entropy`` on it; autograd then keeps the float32 log-softmax for backward and builds float32 gradients of the
same size. With SmolLM2's 49k vocabulary, a batch of 4 x 256 tokens makes each of those tensors 200 MB, and the copies,
fills and casts cost as much time as the LM head's matmul. A QST step differentiates only through the LM head into a
small side network, so this is most of its memory and a large part of its time.

:func:`chunked_causal_lm_loss` computes the same loss (same shifting, ``ignore_index``, ``num_items_in_batch`` and
``shift_labels`` handling) in row chunks: each chunk is upcast, reduced to its log-sum-exp and target logit, and
dropped; backward recomputes the softmax chunk by chunk and writes the gradient straight into the logits' dtype. The
logits themselves (in the model's dtype) are what the model returns anyway. QST installs it as the model's
``loss_function`` where the model uses transformers' default causal-LM loss (see :func:`install_chunked_loss`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

#: elements of one float32 chunk on CPU (4 MB: it stays in cache across the chunk's few passes; measured on a 2-core
#: EPYC, 1024 x 49152 bf16 logits, forward + backward: 0.46 s CPU time with ForCausalLMLoss, 0.22 s with 32 MB chunks,
#: 0.15 s with 4 MB chunks)
CHUNK_ELEMENTS = 1 << 20
#: on accelerators, larger chunks (64 MB) keep the number of kernel launches small
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(logits: torch.Tensor) -> int:
    elements = CHUNK_ELEMENTS if logits.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // logits.shape[1])


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy ``logsumexp(logits) - logits[target]`` (0 where the target is ignored)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        rows = logits.shape[0]
        chunk = _chunk_rows(logits)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        log_normalizers = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk):
            end = start + chunk
            block = logits[start:end].to(torch.float32, copy=True)  # a copy even of float32 logits: changed in place
            picked = block.gather(1, safe_targets[start:end, None]).squeeze(1)
            # log-sum-exp in place on the one float32 chunk
            peak = block.amax(dim=1, keepdim=True)
            lse = block.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))
            log_normalizers[start:end] = lse
            losses[start:end] = lse - picked
        losses = losses.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, safe_targets, valid, log_normalizers)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        try:
            logits, safe_targets, valid, log_normalizers = ctx.saved_tensors
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            # transformers' loss keeps a float32 copy (its log-softmax) and lets the caller edit the logits it returned
            # afterwards; this loss keeps those very logits instead of a copy, to recompute the softmax from them. The
            # values are gone, so backward cannot run: say so, rather than autograd's message about a tensor of the
            # loss's own (the cause is code after the forward, e.g. a distillation loss's ``logits /= temperature``)
            raise RuntimeError(
                "QST's causal-LM loss (peft_qst.loss.chunked_causal_lm_loss) cannot back-propagate: the logits the "
                "model returned with this loss were modified in place after the forward (e.g. `logits /= T`, "
                "`logits.div_(T)`, `logits[..., ids] = -inf`), and it reads them again in backward. Modify a copy "
                "(`logits = logits / T`), or call the model without labels and compute the loss from the logits, or "
                "put transformers' loss back with peft_qst.loss.uninstall_chunked_loss(model.get_base_model())."
            ) from error
        rows = logits.shape[0]
        chunk = _chunk_rows(logits)
        # ignored rows get no gradient whatever flows in: with no target at all the mean divides by zero, the incoming
        # gradient is inf and inf * 0 would fill the logits' gradient with NaN (cross_entropy leaves it at 0)
        scale = torch.where(valid, grad_losses.float(), 0.0).unsqueeze(1)
        grad = torch.empty_like(logits)
        for start in range(0, rows, chunk):
            end = start + chunk
            probs = logits[start:end].to(torch.float32, copy=True)
            probs.sub_(log_normalizers[start:end, None]).exp_()  # softmax, in place
            probs.scatter_add_(1, safe_targets[start:end, None], -torch.ones_like(scale[start:end]))
            grad[start:end] = probs.mul_(scale[start:end])
        return grad, None, None


def chunked_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss``: the same value, without float32 copies of the full logits."""
    _refuse_labels_of_a_dtype_for_no_token_ids(labels if shift_labels is None else shift_labels, ignore_index)
    if shift_labels is None:
        # shift so that tokens < n predict n
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    if targets.numel() != logits.shape[0]:
        # cross_entropy refuses this (transformers' loss raises its ValueError); the chunks would not: a single target
        # broadcasts against every row of a chunk, and labels of shape (1, 1) for a longer sequence gave a NaN loss
        raise ValueError(
            f"Expected input batch_size ({logits.shape[0]}) to match target batch_size ({targets.numel()}): QST's "
            f"causal-LM loss (peft_qst.loss.chunked_causal_lm_loss) got logits for {logits.shape[0]} positions and "
            f"labels for {targets.numel()}. Pass labels of the same shape as input_ids (and no logits_to_keep with "
            "labels), as for transformers' loss."
        )
    try:
        losses = _ChunkedCrossEntropy.apply(logits, targets, ignore_index)
    except RuntimeError as error:
        _refuse_labels_outside_vocabulary(targets, vocab_size, ignore_index, error)
        raise
    if num_items_in_batch is not None:  # "sum" reduction over the items of the whole (accumulated) batch
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch
    return losses.sum() / (targets != ignore_index).sum()  # "mean" over the non-ignored targets, as cross_entropy


def _refuse_labels_of_a_dtype_for_no_token_ids(labels: torch.Tensor, ignore_index: int) -> None:
    """Refuse labels whose dtype holds no token ids: floats, complex numbers and booleans (logits, probabilities or a
    mask passed as labels), integers narrower than 32 bits, which cannot hold the ids of a real vocabulary (so a cast
    to them has already wrapped ids around), and unsigned ones, which cannot hold ``ignore_index``. The loss's gather
    failed on them with "gather(): Expected dtype int32/int64 for index" and ``uint8`` labels with "value cannot be
    converted to type uint8_t without overflow" (from padding the shifted labels with ``ignore_index``), naming neither
    the labels nor the fix (transformers' loss: "expected target dtype to be Long or Byte, but got Float")."""
    dtype = labels.dtype
    if dtype in (torch.int64, torch.int32):
        return
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        problem = "not logits, probabilities or a mask"
    elif torch.iinfo(dtype).bits < 32:
        problem = (f"not a {dtype} copy: {torch.iinfo(dtype).bits} bits cannot hold the ids of a real vocabulary "
                   "(a cast to them wraps ids around)")
    else:
        problem = f"not a {dtype} copy, which cannot hold ignore_index ({ignore_index})"
    raise TypeError(
        f"QST's causal-LM loss (peft_qst.loss.chunked_causal_lm_loss) got labels of dtype {dtype}: labels are token "
        f"ids, an integer tensor (torch.long) of the shape of input_ids, with ignore_index ({ignore_index}) where no "
        f"loss is wanted. Pass labels=input_ids (or its masked copy) as the tokenizer gives them, {problem}."
    )


def _refuse_labels_outside_vocabulary(targets: torch.Tensor, vocab_size: int, ignore_index: int, error) -> None:
    """Raise the error of labels that are not token ids of the model (nor ``ignore_index``), if that is what ``error``
    (from the loss's gather) is about. The gather's own "index -1 is out of bounds for dimension 1 with size 128"
    named no labels (transformers' loss: ``IndexError: Target -1 is out of bounds.``); the usual causes are padding
    marked with another value than ``ignore_index`` and a tokenizer with tokens the model's embeddings lack. Checked
    only once the loss failed, so that a step with valid labels waits on no device-to-host copy."""
    outside = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if not bool(outside.any()):
        return
    values = sorted(set(targets[outside].tolist()))
    fixes = []
    if values[0] < 0:
        fixes.append(f"mark the positions that get no loss (padding, the prompt) with {ignore_index}")
    if values[-1] >= vocab_size:
        fixes.append(
            f"labels at or above {vocab_size} come from a tokenizer with tokens the model lacks: resize the model's "
            "token embeddings to it (model.resize_token_embeddings(len(tokenizer)))"
        )
    fix = "; ".join(fixes)
    raise IndexError(
        f"Target {values[0]} is out of bounds: QST's causal-LM loss (peft_qst.loss.chunked_causal_lm_loss) got labels "
        f"{values[:8]}{' ...' if len(values) > 8 else ''} that are neither token ids of this model (0 to "
        f"{vocab_size - 1}) nor ignore_index ({ignore_index}). {fix[0].upper() + fix[1:]}."
    ) from error


def install_chunked_loss(model: nn.Module) -> bool:
    """Make ``model`` compute its causal-LM loss with :func:`chunked_causal_lm_loss`.

    Only where the model would use transformers' default ``ForCausalLMLoss`` and nobody set a loss function on it;
    anything else (a sequence-classification loss, a user's own ``loss_function``) is left alone. Returns whether it
    was installed.
    """
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - older transformers
        return False
    if "_loss_function" in vars(model) or not hasattr(type(model), "loss_function"):
        return vars(model).get("_loss_function") is chunked_causal_lm_loss
    try:
        current = model.loss_function
    except Exception:  # noqa: BLE001 - a model whose loss cannot be resolved keeps whatever it does
        return False
    if current is not ForCausalLMLoss:
        return False
    model.loss_function = chunked_causal_lm_loss
    return True


def uninstall_chunked_loss(model: nn.Module) -> None:
    """Undo :func:`install_chunked_loss` (the model resolves its default loss again)."""
    if vars(model).get("_loss_function") is chunked_causal_lm_loss:
        del model._loss_function
