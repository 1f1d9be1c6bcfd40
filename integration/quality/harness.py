"""Quality harness: QST against QLoRA, top-k-layer LoRA and the untrained base model, on the same data and budget.

What is measured
----------------
SmolLM2-135M-Instruct is loaded in 4-bit (bitsandbytes NF4, double quantisation, bf16 compute; ``--dtype float32``
computes in float32, every method alike, which trains several times faster on CPUs without AVX512-BF16) and fine-tuned
on the seeded instruction tasks of :mod:`tasks` (date reformatting, sorting, arithmetic, word rearranging, rule-based
labelling, fact extraction), rendered with the tokenizer's chat template, loss on the answer tokens only. Every method
sees the same training examples in the same order (one permutation drawn from ``--seed``), the same batch size and the
same number of optimizer steps -- or, with ``--time-budget-s`` (or ``time_s=`` in a spec), trains until that much
training wall-clock is spent. The loop is plain PyTorch: AdamW (no weight decay), linear warm-up then a constant
learning rate (or a linear / cosine decay with ``--schedule``, step-count runs only), gradient clipping.

For each method the table reports:

- **exact match**: greedy generation on the held-out eval set (batched, left padding, ``max_new_tokens`` = the longest
  eval answer in tokens + 1, so that a correct answer followed by anything but whitespace still fails), decoded up to
  the end-of-turn token and stripped, compared with the reference answer; also per task family in the JSON;
- **eval loss**: teacher-forced cross-entropy per answer token on the eval set;
- **train time**: wall-clock of the training loop (model loading and evaluation excluded), and the **median step
  time** (forward + backward + optimizer step);
- **peak RSS**: the peak resident memory of the process that trained the method, over loading and training (the
  memory fine-tuning needs; evaluation comes after and is measured apart). Each method runs in its own child process
  (``harness.py --run-one SPEC``), so peaks do not mix. The JSON also gives the RSS after loading, the peak during the
  training loop alone and the peak during evaluation (the kernel's high-water mark is reset through
  ``/proc/self/clear_refs`` between phases; where that is not allowed, the whole-process peak is all there is);
- **trainable parameters**.

The JSON also records the CPU time of the training loop (``train_cpu_s``, all threads of the child), which another
process on the machine distorts far less than wall-clock, and the 1-minute load average before and after each child.

Methods (a *spec* is ``METHOD`` or ``METHOD:key=value,key=value``)
------------------------------------------------------------------
- ``base``: no training (reference row).
- ``qlora``: ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)`` + ``LoraConfig(r=64, lora_alpha=16,
  target_modules="all-linear", lora_dropout=0.05)``. Keys: ``r``, ``alpha``, ``dropout``, plus the common keys.
- ``topk-lora``: LoRA (r=64, alpha 16, dropout 0.05) on all linear layers of the top ``k`` (default 4) decoder layers
  only (``layers_to_transform``), no gradient checkpointing. Keys: ``k``, ``r``, ``alpha``, ``dropout``.
- ``qst``: ``peft_qst.QSTConfig(task_type="CAUSAL_LM", ...)``. Keys: any ``QSTConfig`` field (``r``,
  ``side_heads``, ``downsample``, ``downsample_rank``, ``activation``, ``dropout``, ``side_gate_init``,
  ``output_gate_init``, ``side_dtype``, ``copy_heads``, ``copy_head_dim``, ``init``, ``backbone_lora_layers``,
  ``backbone_lora_r``, ``backbone_lora_alpha``, ``modules_to_save``: module names joined by ``+``, e.g.
  ``modules_to_save=lm_head`` to train the LM head too).
- Common keys: ``lr``, ``warmup``, ``label`` (name shown in the table; default: the spec itself), ``time_s`` (train
  for that many seconds instead of ``--steps``; ``time_s=match`` uses the training time measured for the first earlier
  ``qlora`` spec of the same invocation, ``time_s=match:LABEL`` that of the spec labelled LABEL).

How to run
----------
::

    # the default comparison (150 steps of batch 8), measured side by side in one invocation
    .venv/bin/python integration/quality/harness.py --output outputs/quality.json \\
        base qlora topk-lora qst:lr=1e-3 qst:lr=3e-3

    # QST at QLoRA's wall-clock
    .venv/bin/python integration/quality/harness.py qlora "qst:lr=3e-3,time_s=match"

    # a quick smoke run
    .venv/bin/python integration/quality/harness.py --steps 20 --eval-size 60 base qlora qst

    # one method in this process, result as JSON (what the parent runs for each spec)
    .venv/bin/python integration/quality/harness.py --run-one "qst:r=8,downsample=lora" --steps 20

Each child's progress goes to stderr. The parent prints a Markdown table with the machine, the library versions and the
load average around each run (another process on the machine distorts the timings; the load average shows it), and
writes everything -- settings, per-step losses, per-family accuracy, sample predictions -- to ``--output``. A method
whose child fails is a "failed" row, and the harness then exits with status 1, naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # integration/: measure.py

from measure import (  # noqa: E402
    add_overwrite_output_argument, check_output_path, cpu_model, peak_rss_mb, reset_peak_rss, status_kb,
)

METHODS = ("base", "qlora", "topk-lora", "qst")
COMMON_KEYS = ("lr", "warmup", "label", "time_s")
LORA_KEYS = ("r", "alpha", "dropout")
QST_KEYS = (
    "r",
    "side_heads",
    "downsample",
    "downsample_rank",
    "activation",
    "dropout",
    "side_gate_init",
    "output_gate_init",
    "side_dtype",
    "copy_heads",
    "copy_head_dim",
    "init",
    "backbone_lora_layers",
    "backbone_lora_r",
    "backbone_lora_alpha",
    "modules_to_save",
)
METHOD_KEYS = {
    "base": ("label",),
    "qlora": COMMON_KEYS + LORA_KEYS,
    "topk-lora": COMMON_KEYS + LORA_KEYS + ("k",),
    "qst": COMMON_KEYS + QST_KEYS,
}

# options of the parent that every child gets too (dest, flag)
FORWARDED = (
    "steps",
    "batch_size",
    "time_budget_s",
    "max_steps",
    "lr",
    "warmup",
    "schedule",
    "max_grad_norm",
    "train_size",
    "eval_size",
    "eval_batch_size",
    "families",
    "seed",
    "threads",
    "log_every",
    "samples",
    "model",
    "dtype",
)


# ------------------------------------------------------------------------------------------------------------------
# specs
# ------------------------------------------------------------------------------------------------------------------


def _coerce(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("none", "null"):
        return None
    return value


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"qst:r=8,lr=3e-3"`` -> ``("qst", {"r": 8, "lr": 0.003})``; unknown methods or keys fail here."""
    method, _, rest = spec.partition(":")
    method = method.strip()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in spec {spec!r}; choose from {', '.join(METHODS)}")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"option {item!r} of spec {spec!r} is not key=value")
        if key not in METHOD_KEYS[method]:
            allowed = ", ".join(METHOD_KEYS[method])
            raise ValueError(f"{method} takes no option {key!r} (spec {spec!r}); allowed: {allowed}")
        if key in ("label", "time_s"):
            options[key] = value.strip()
        elif key == "modules_to_save":  # a list: names joined by "+" (the comma separates options)
            options[key] = [name.strip() for name in value.split("+") if name.strip()]
        else:
            options[key] = _coerce(value.strip())
    return method, options


def check_specs(specs: list[str]) -> None:
    """Fail now on what would fail a child only after the methods before it have trained: a QST value that
    ``QSTConfig`` refuses, a ``time_s`` that is no number of seconds, a ``time_s=match`` with nothing to match."""
    earlier: list[tuple[str, dict]] = []
    for spec in specs:
        method, options = parse_spec(spec)
        if method == "qst":
            from peft_qst import QSTConfig

            try:
                QSTConfig(task_type="CAUSAL_LM", **{key: options[key] for key in QST_KEYS if key in options})
            except (TypeError, ValueError) as err:
                raise ValueError(f"spec {spec!r}: {err}") from None
        value = options.get("time_s")
        if value is not None and not value.startswith("match"):
            try:
                seconds = float(value)
            except ValueError:
                seconds = float("nan")
            if not seconds > 0:
                raise ValueError(f"spec {spec!r}: time_s={value} must be a number of seconds > 0, match or match:LABEL")
        elif value is not None:
            target = value.partition(":")[2]
            if not any((target and opts.get("label", s) == target) or (not target and m == "qlora")
                       for s, m, opts in ((s, *parse_spec(s)) for s, _ in earlier)):
                raise ValueError(f"spec {spec!r}: time_s={value} matches the training time of an earlier "
                                 f"{'spec labelled ' + target if target else 'qlora spec'}; put one before it")
        earlier.append((spec, options))


# ------------------------------------------------------------------------------------------------------------------
# environment and memory
# ------------------------------------------------------------------------------------------------------------------


def rss_mb() -> float | None:
    kb = status_kb("VmRSS")
    return kb / 1024 if kb is not None else None


def environment(threads: int | None = None) -> dict:
    """The machine and versions; ``threads``: the torch thread count the children were given (--threads), which the
    parent itself does not set."""
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers

    import peft_qst

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "accelerate": accelerate.__version__,
        "peft_qst": peft_qst.__version__,
    }


# ------------------------------------------------------------------------------------------------------------------
# model building
# ------------------------------------------------------------------------------------------------------------------


def load_base(path: str, dtype: str = "bfloat16"):
    """The tokenizer and the 4-bit model computing in ``dtype`` (bitsandbytes' compute dtype and the unquantized
    layers' dtype): ``--dtype``, bfloat16 for every table recorded so far."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=getattr(torch, dtype))
    model.config.use_cache = False
    return tokenizer, model


def wrap_model(model, method: str, options: dict):
    """Apply the method's adapter; returns the model to train and a dict describing the adapter config."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "base":
        return model, {}  # nothing is trained (its parameters are not counted as trainable either)
    if method in ("qlora", "topk-lora"):
        lora = {
            "r": int(options.get("r", 64)),
            "lora_alpha": float(options.get("alpha", 16)),
            "lora_dropout": float(options.get("dropout", 0.05)),
            "target_modules": "all-linear",
            "task_type": "CAUSAL_LM",
        }
        described = {"r": lora["r"], "alpha": lora["lora_alpha"], "dropout": lora["lora_dropout"]}
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
            described["gradient_checkpointing"] = True
        else:
            n_layers = model.config.num_hidden_layers
            k = int(options.get("k", 4))
            if not 1 <= k <= n_layers:
                raise ValueError(f"topk-lora: k={k} must be in [1, {n_layers}]")
            # PEFT refuses layers_to_transform with the string "all-linear": spell out the same module names
            lora["target_modules"] = linear_module_names(model)
            lora["layers_to_transform"] = list(range(n_layers - k, n_layers))
            lora["layers_pattern"] = "layers"
            described.update(k=k, layers=f"{n_layers - k}-{n_layers - 1}", gradient_checkpointing=False)
        return get_peft_model(model, LoraConfig(**lora)), described
    if method == "qst":
        import peft_qst

        fields = {key: options[key] for key in QST_KEYS if key in options}
        config = peft_qst.QSTConfig(task_type="CAUSAL_LM", **fields)
        described = {key: getattr(config, key) for key in QST_KEYS}
        return get_peft_model(model, config), described
    raise ValueError(method)


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder blocks: what ``target_modules="all-linear"`` selects
    (every linear layer but the output head), as an explicit list."""
    import bitsandbytes as bnb
    from torch import nn

    output_head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, bnb.nn.Linear4bit)) and module is not output_head
    }
    return sorted(names)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------


def batch_order(n_examples: int, batch_size: int, seed: int):
    """Endless stream of index batches: a seeded permutation per epoch, the same for every method."""
    epoch = 0
    while True:
        order = list(range(n_examples))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield epoch, order[start : start + batch_size]
        epoch += 1


def collate_right(encoded: list[dict], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) for teacher forcing."""
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_left(prompts: list[list[int]], pad_id: int):
    """Left-padded prompts for batched generation."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, schedule: str, total: int | None) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total:
        return 1.0
    # the first step after warm-up runs at the full rate and the last at 1/(total - warmup) of it (as transformers'
    # schedules do), not at zero
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model, encoded_train, args, lr: float, warmup: int, time_budget_s: float | None, log) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = None if time_budget_s else args.steps
    max_steps = args.max_steps if time_budget_s else args.steps
    losses, step_times = [], []
    epochs_seen = 0
    model.train()
    batches = batch_order(len(encoded_train), args.batch_size, args.seed)
    cpu_start = time.process_time()
    start = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        if max_steps is not None and step >= max_steps:
            break
        epoch, indices = next(batches)
        epochs_seen = max(epochs_seen, epoch + 1)
        batch = collate_right([encoded_train[i] for i in indices], args.pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, args.schedule, total)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        step += 1
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}")
        if step % args.log_every == 0 or step == 1:
            recent = losses[-args.log_every :]
            log(
                f"step {step}: loss {statistics.fmean(recent):.4f} (mean of last {len(recent)}), "
                f"{step_times[-1]:.2f} s/step, {time.perf_counter() - start:.0f} s"
            )
    train_time = time.perf_counter() - start
    train_cpu = time.process_time() - cpu_start
    model.eval()
    tail = losses[-max(1, min(10, len(losses))) :] if losses else []
    return {
        "steps": step,
        "epochs_seen": epochs_seen,
        "train_time_s": train_time,
        # CPU seconds of this process (all threads): less sensitive than wall-clock to other processes on the machine
        "train_cpu_s": train_cpu,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "mean_step_s": statistics.fmean(step_times) if step_times else None,
        "final_train_loss": statistics.fmean(tail) if tail else None,
        "train_losses": losses,
        "step_times_s": step_times,
    }


def eval_loss(model, encoded_eval, args) -> float:
    """Cross-entropy per answer token, teacher-forced, summed over the eval set and divided by its answer tokens."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        # the training batch size: full-vocabulary logits of a large batch would dominate the process's memory
        for start in range(0, len(encoded_eval), args.batch_size):
            batch = collate_right(encoded_eval[start : start + args.batch_size], args.pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:]
            keep = shift_labels != -100
            total += float(F.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def exact_match(model, tokenizer, eval_set, encoded_eval, args, eos_id: int) -> dict:
    """Greedy, batched (left padding) generation; prediction = decoded text up to end-of-turn, stripped."""
    import torch

    # a correct answer needs answer_len tokens (end-of-turn included); one more makes any trailing junk visible
    max_new = max(e["answer_len"] for e in encoded_eval) + 1
    prompts = [e["input_ids"][: e["prompt_len"]] for e in encoded_eval]
    # batch prompts of similar length together to limit padding; results go back to their own index
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    predictions: list[str | None] = [None] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), args.eval_batch_size):
            indices = order[start : start + args.eval_batch_size]
            batch = collate_left([prompts[i] for i in indices], args.pad_id)
            out = model.generate(
                **batch,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=args.pad_id,
                use_cache=True,
            )
            for row, i in enumerate(indices):
                new = out[row, batch["input_ids"].shape[1] :].tolist()
                if eos_id in new:
                    new = new[: new.index(eos_id)]
                predictions[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    per_family: dict[str, list[int]] = {}
    correct = 0
    for example, prediction in zip(eval_set, predictions):
        hit = int(prediction == example.answer.strip())
        correct += hit
        per_family.setdefault(example.family, []).append(hit)
    samples = []
    shown: dict[str, int] = {}
    for example, prediction in zip(eval_set, predictions):
        if shown.get(example.family, 0) < args.samples:
            shown[example.family] = shown.get(example.family, 0) + 1
            samples.append(
                {"family": example.family, "prompt": example.prompt, "answer": example.answer, "prediction": prediction}
            )
    return {
        "exact_match": correct / len(eval_set),
        "per_family": {family: sum(hits) / len(hits) for family, hits in per_family.items()},
        "max_new_tokens": max_new,
        "samples": samples,
    }


def run_one(spec: str, args, time_budget_s: float | None) -> dict:
    """Load, wrap, train and evaluate one method spec in this process; returns the result dict."""
    import tasks
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    method, options = parse_spec(spec)
    label = options.get("label", spec)

    def log(message: str) -> None:
        print(f"[{label}] {message}", file=sys.stderr, flush=True)

    lr = float(options.get("lr", args.lr))
    warmup = int(options.get("warmup", args.warmup))
    if time_budget_s is None and args.time_budget_s:
        time_budget_s = args.time_budget_s
    cpu_start = time.process_time()
    load_start = time.perf_counter()

    model_path = args.model
    if model_path is None:
        from peft_qst.smollm2 import smollm2_path

        model_path = smollm2_path()
    tokenizer, model = load_base(model_path, args.dtype)
    eos_token = tasks.end_of_turn_token(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    args.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    families = args.families.split(",") if args.families else None
    train_set, eval_set = tasks.make_splits(args.train_size, args.eval_size, seed=args.seed, families=families)
    encoded_train = [tasks.encode_example(tokenizer, e) for e in train_set]
    encoded_eval = [tasks.encode_example(tokenizer, e) for e in eval_set]

    torch.manual_seed(args.seed)
    model, adapter_config = wrap_model(model, method, options)
    trainable = count_trainable(model) if method != "base" else 0
    load_time = time.perf_counter() - load_start
    rss_after_load = rss_mb()
    peak_at_load = peak_rss_mb()
    log(f"loaded in {load_time:.0f} s, {trainable:,} trainable parameters, RSS {rss_after_load:.0f} MB")

    result = {
        "spec": spec,
        "method": method,
        "label": label,
        "adapter_config": adapter_config,
        "lr": lr if method != "base" else None,
        "warmup": warmup if method != "base" else None,
        "time_budget_s": time_budget_s if method != "base" else None,
        "trainable_params": trainable,
        "compute_dtype": str(model.config.quantization_config.bnb_4bit_compute_dtype).removeprefix("torch."),
        "load_time_s": load_time,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_load_mb": peak_at_load,
    }
    reset_ok = reset_peak_rss()
    result["peak_rss_train_mb"] = None
    if method != "base":
        torch.manual_seed(args.seed)
        result.update(train(model, encoded_train, args, lr, warmup, time_budget_s, log))
        result["peak_rss_train_mb"] = peak_rss_mb() if reset_ok else None
        log(
            f"trained {result['steps']} steps in {result['train_time_s']:.0f} s, median step "
            f"{result['median_step_s']:.2f} s, final train loss {result['final_train_loss']:.4f}"
        )
    # the memory of fine-tuning: loading + training (evaluation, measured apart below, is not part of it)
    result["peak_rss_mb"] = max(peak_at_load, peak_rss_mb())
    reset_ok = reset_peak_rss()
    model.eval()
    model.config.use_cache = True
    eval_start = time.perf_counter()
    result["eval_loss"] = eval_loss(model, encoded_eval, args)
    result.update(exact_match(model, tokenizer, eval_set, encoded_eval, args, eos_id))
    result["eval_time_s"] = time.perf_counter() - eval_start
    result["peak_rss_eval_mb"] = peak_rss_mb() if reset_ok else None
    result["cpu_time_s"] = time.process_time() - cpu_start
    result["n_train_pool"] = len(train_set)
    result["n_eval"] = len(eval_set)
    log(
        f"exact match {100 * result['exact_match']:.1f}%, eval loss {result['eval_loss']:.4f}, "
        f"eval {result['eval_time_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


# ------------------------------------------------------------------------------------------------------------------
# parent: one child process per spec, then the table
# ------------------------------------------------------------------------------------------------------------------


def resolve_time_budget(spec: str, results: list[dict]) -> float | None:
    """The ``time_s`` of a spec in seconds: a number, ``match`` (first earlier qlora) or ``match:LABEL``."""
    _, options = parse_spec(spec)
    value = options.get("time_s")
    if value is None:
        return None
    if not str(value).startswith("match"):
        return float(value)
    target = str(value).partition(":")[2]
    for earlier in results:
        if earlier.get("error"):
            continue
        if (target and earlier["label"] == target) or (not target and earlier["method"] == "qlora"):
            return float(earlier["train_time_s"])
    raise ValueError(f"spec {spec!r}: no earlier successful run to match ({target or 'qlora'}); put it first")


def child_command(spec: str, args, result_file: str, time_budget_s: float | None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--run-one", spec, "--result-file", result_file]
    for dest in FORWARDED:
        value = getattr(args, dest)
        if value is None:
            continue
        command += [f"--{dest.replace('_', '-')}", str(value)]
    if time_budget_s is not None:
        command += ["--spec-time-budget-s", repr(time_budget_s)]
    return command


def run_children(args) -> list[dict]:
    results = []
    for spec in args.specs:
        method, options = parse_spec(spec)
        label = options.get("label", spec)
        try:
            budget = resolve_time_budget(spec, results)
        except ValueError as error:
            print(f"[{label}] skipped: {error}", file=sys.stderr, flush=True)
            results.append({"spec": spec, "method": method, "label": label, "error": str(error)})
            continue
        with tempfile.TemporaryDirectory(prefix="qst-quality-") as tmp:
            result_file = os.path.join(tmp, "result.json")
            command = child_command(spec, args, result_file, budget)
            load_before = os.getloadavg()
            started = time.perf_counter()
            print(f"[{label}] running: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            try:
                proc = subprocess.run(command, check=False, env=env, timeout=args.child_timeout_s)
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                returncode = "timeout"
            wall = time.perf_counter() - started
            load_after = os.getloadavg()
            if returncode == 0 and os.path.isfile(result_file):
                with open(result_file) as handle:
                    result = json.load(handle)
            else:
                result = {"spec": spec, "method": method, "label": label, "error": f"child exited with {returncode}"}
            result["wall_s"] = wall
            result["loadavg_1m_before"] = load_before[0]
            result["loadavg_1m_after"] = load_after[0]
            results.append(result)
        if args.output:  # keep partial results if a later method fails or is interrupted
            write_output(args, results)
    return results


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def describe_config(result: dict) -> str:
    parts = []
    config = result.get("adapter_config") or {}
    method = result.get("method")
    if method in ("qlora", "topk-lora"):
        parts.append(f"r={config.get('r')} a={config.get('alpha'):g}")
        if method == "topk-lora":
            parts.append(f"layers {config.get('layers')}")
        if config.get("gradient_checkpointing"):
            parts.append("GC")
    elif method == "qst":
        parts.append(f"r={config.get('r')} {config.get('downsample')}")
        if config.get("downsample") in ("adapter", "lora"):
            parts[-1] += f"/{config.get('downsample_rank')}"
        from peft_qst.config import QSTConfig

        defaults = QSTConfig()
        shown = [key for key in QST_KEYS if key not in ("r", "downsample", "downsample_rank")]  # those three: above
        for key in shown:
            if config.get(key) != getattr(defaults, key):
                value = config.get(key)
                parts.append(f"{key}={'+'.join(value) if isinstance(value, list) else value}")
    if result.get("lr") is not None:
        parts.append(f"lr={result['lr']:g}")
    if result.get("time_budget_s"):
        parts.append(f"budget {result['time_budget_s']:.0f}s")
    return ", ".join(parts) if parts else "-"


def markdown(results: list[dict], env: dict, args) -> str:
    lines = [
        (
            f"Machine: {env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
            f"{env['memory_gb']} GB RAM. Python {env['python']}, torch {env['torch']}, transformers "
            f"{env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, accelerate "
            f"{env['accelerate']}, peft_qst {env['peft_qst']}."
        ),
        "",
        f"SmolLM2-135M-Instruct, 4-bit NF4 (double quant, {args.dtype} compute). Batch {args.batch_size}, "
        + (f"{args.steps} steps" if not args.time_budget_s else f"time budget {args.time_budget_s:g} s")
        + f" (unless the config says otherwise), {args.schedule} lr after {args.warmup} warm-up steps, AdamW. "
        f"Held-out eval: {args.eval_size} examples, seed {args.seed}.",
        "",
        (
            "| method | config | exact match % | eval loss | steps | train time s | train CPU s | median step s "
            "| peak RSS MB | trainable params | load avg 1m (before/after) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['label']} | {r['spec']} | failed: {r['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {describe_config(r)} | {100 * r['exact_match']:.1f} | {r['eval_loss']:.4f} | "
            f"{r.get('steps', 0)} | {_fmt(r.get('train_time_s'), '.0f')} | {_fmt(r.get('train_cpu_s'), '.0f')} | "
            f"{_fmt(r.get('median_step_s'), '.2f')} | "
            f"{r['peak_rss_mb']:.0f} | {r['trainable_params']:,} | "
            f"{_fmt(r.get('loadavg_1m_before'), '.1f')}/{_fmt(r.get('loadavg_1m_after'), '.1f')} |"
        )
    ok = [r for r in results if not r.get("error")]
    if ok:
        families = list(ok[0]["per_family"])
        lines += [
            "",
            "Exact match % per task family:",
            "",
            "| method | " + " | ".join(families) + " | final train loss |",
            "|---|" + "---:|" * (len(families) + 1),
        ]
        for r in ok:
            cells = [f"{100 * r['per_family'].get(f, 0):.0f}" for f in families]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_fmt(r.get('final_train_loss'), '.4f')} |")
    return "\n".join(lines)


def write_output(args, results: list[dict]) -> None:
    env = environment(args.threads)
    payload = {
        "environment": env,
        "settings": {dest: getattr(args, dest) for dest in FORWARDED} | {"specs": args.specs},
        "results": results,
        "table": markdown(results, env, args),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(payload, handle, indent=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", default=["base", "qlora", "topk-lora", "qst"], help="method specs")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (ignored with a time budget)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--time-budget-s", type=float, default=None, help="train each method this long instead")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap when training to a time budget")
    parser.add_argument("--lr", type=float, default=1e-3, help="default learning rate (spec key lr overrides)")
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    parser.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--train-size", type=int, default=8000, help="train pool size (cycled if exhausted)")
    parser.add_argument("--eval-size", type=int, default=240, help="held-out eval examples")
    parser.add_argument("--eval-batch-size", type=int, default=48)
    parser.add_argument("--families", default=None, help="comma-separated task families (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--samples", type=int, default=3, help="sample predictions kept per family")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype of the 4-bit model, every method alike (default: bfloat16; float32 "
                             "is several times faster on CPUs without AVX512-BF16, see "
                             "peft_qst.recommended_compute_dtype)")
    parser.add_argument("--output", default=None, help="write results JSON here")
    add_overwrite_output_argument(parser)
    parser.add_argument("--child-timeout-s", type=float, default=3600)
    parser.add_argument("--run-one", default=None, metavar="SPEC", help="run one spec in this process")
    parser.add_argument("--result-file", default=None, help="with --run-one: write the result JSON here")
    parser.add_argument("--spec-time-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.max_steps is not None and args.max_steps < 1):
        parser.error(f"--steps and --max-steps must be at least 1, got {args.steps} and {args.max_steps}")
    if args.eval_size < 1 or args.eval_batch_size < 1:
        parser.error(f"--eval-size and --eval-batch-size must be at least 1, got {args.eval_size} and "
                     f"{args.eval_batch_size}")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        # checked here: each method's child process would otherwise fail alike, after the parent started them all
        parser.error(f"--model {args.model} is not a model folder (no config.json in it): pass a folder saved with "
                     "save_pretrained, or leave --model out for the embedded SmolLM2-135M-Instruct")
    if args.batch_size < 1 or args.train_size < args.batch_size:
        parser.error(f"--train-size ({args.train_size}) must hold at least one batch (--batch-size {args.batch_size})")
    try:
        if args.run_one:
            parse_spec(args.run_one)  # time_s=match is refused in main: it needs the parent
        else:
            check_specs(args.specs)  # fail on a bad spec before anything runs
    except ValueError as err:
        parser.error(str(err))
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main(argv=None):
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    args = parse_args(argv)
    if args.run_one:
        budget = args.spec_time_budget_s
        if budget is None:
            value = parse_spec(args.run_one)[1].get("time_s")
            if value is not None:
                if str(value).startswith("match"):
                    raise SystemExit("time_s=match needs the parent harness (several specs in one invocation)")
                budget = float(value)
        result = run_one(args.run_one, args, budget)
        if args.result_file:
            with open(args.result_file, "w") as handle:
                json.dump(result, handle)
        else:
            print(json.dumps({k: v for k, v in result.items() if k != "train_losses"}, indent=2))
        return
    results = run_children(args)
    env = environment(args.threads)
    print(markdown(results, env, args))
    if args.output:
        write_output(args, results)
        print(f"\nresults written to {args.output}", file=sys.stderr)
    failed = [result["label"] for result in results if "error" in result]
    if failed:  # the table says so too, but a script or CI job running the harness reads the exit status
        raise SystemExit(f"error: {len(failed)} of {len(results)} methods failed: {', '.join(failed)} (their "
                         "output above says why)")


if __name__ == "__main__":
    main()
