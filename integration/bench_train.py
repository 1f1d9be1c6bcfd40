"""Benchmark: one training step of QST against QLoRA, LoRA and a no-grad forward, same 4-bit model, same batches.

What is measured
----------------
The same 4-bit model (bitsandbytes NF4, double quantisation, bf16 compute) is trained on the same seeded random token
batches (labels = inputs, so the loss runs over every position and the full vocabulary, as in causal-LM training)
with the methods below. Any method takes ``dtype=float32`` (or ``float16``), e.g. ``qst:dtype=float32``: the model is
then loaded with that compute dtype (``bnb_4bit_compute_dtype``) and that ``dtype`` for its unquantized layers,
which is what ``peft_qst.recommended_compute_dtype()`` picks on CPUs without AVX512-BF16; the table then gives the
step-time ratio of each such spec against the same spec in bfloat16, where both ran.

- ``qst``: ``peft_qst.QSTConfig(task_type="CAUSAL_LM")`` (``qst:key=value,...`` sets ``QSTConfig`` fields, e.g.
  ``qst:side_dtype=float32``; ``qst:loss=transformers`` swaps QST's chunked causal-LM loss back to transformers'
  ``ForCausalLMLoss``, to measure what the chunked loss saves; ``qst:gc=true`` turns on gradient checkpointing as
  TRL's ``SFTConfig`` does, which checkpoints the side blocks; ``qst:compile=true`` compiles the wrapped model with
  ``model.compile()`` (Inductor), as ``TrainingArguments(torch_compile=True)`` does; its compilation falls in the
  warm-up steps, whose times are reported as ``warmup_times_s``); ``qst:eval_first=true`` runs one no-grad eval-mode
  forward of 16 tokens before the warm-up steps, as ``Trainer.evaluate``, ``eval_on_start`` or a generation before
  training do (on CPUs with AVX512-BF16 it packs the 4-bit layers for bitsandbytes' CPU inference kernel, see below);
- ``qlora``: ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)`` + ``LoraConfig(r=64,
  lora_alpha=16, target_modules="all-linear")``, as the QLoRA paper and PEFT's docs do it;
- ``lora``: the same LoRA config on the 4-bit model, without ``prepare_model_for_kbit_training`` and without
  gradient checkpointing;
- ``floor``: a forward of the 4-bit base model under ``torch.no_grad()`` on the same batch, with labels (so the LM
  head and the loss run as in training). No training method can take less than this one inference pass. It uses
  transformers' own loss; ``floor:loss=chunked`` uses QST's chunked loss (``peft_qst/loss.py``) instead. The model
  stays in training mode (``model.train()``, as QST's frozen backbone runs inside a training step), so the floor runs
  the same bitsandbytes kernels as QST's backbone: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks every
  ``Linear4bit`` for its own CPU kernel at the first forward in eval mode, and that kernel measured 4x slower than the
  standard dequantise-then-matmul path on an AMX Xeon (1.78 against 0.44 s per forward of this batch), which would
  make the floor no floor. ``floor:mode=eval`` measures that eval-mode forward.

Training steps are forward + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)``. Each method runs
``--warmup`` steps, then ``--steps`` measured steps; the step time is the median of the measured steps.

Memory. On CPU each method runs in its own child process (a fresh interpreter), so peaks do not mix. Reported per
method: ``peak_rss_mb``, the process's RSS high-water mark (``VmHWM``) over its whole life (imports, loading, steps);
``load_rss_mb``, its RSS right after the model was loaded and wrapped; ``step_peak_rss_mb``, the high-water mark
during the steps alone (reset through ``/proc/self/clear_refs`` after loading; where that is not allowed it equals the
whole-life peak); and ``step_increment_mb`` = ``step_peak_rss_mb - load_rss_mb``, what training adds on top of the
loaded model. On CUDA: ``torch.cuda.max_memory_allocated`` after loading and during the steps.

Time. ``step_s`` is the median wall-clock of a step; on CPU ``step_cpu_s`` is the median CPU time of the step (all
threads of the child, ``time.process_time``), which other processes on a shared machine distort far less.

Allocator. On CPU each method runs twice per round, in two fresh processes: a *memory* child with
``MALLOC_MMAP_THRESHOLD_=131072`` (``--malloc-mmap-threshold``), where glibc returns every freed tensor above 128 KB to
the OS, so RSS follows the tensors alive instead of what glibc's heap happened to keep (its default threshold grows up
to 32 MB as blocks are freed); and a *timing* child with glibc's default allocator, as a user's training runs. The
memory figures come from the first, the step times from the second: with the forced threshold every tensor above
128 KB is a fresh mapping whose pages fault in on first touch, which slowed the no-grad forward with transformers'
loss from 0.82 to 1.27 s per step and QST from 1.25 to 1.55 s, so step times measured that way compare wrongly.
``--malloc-mmap-threshold 0`` runs one child per method with glibc's defaults for both.

Rounds. The machine may be shared; ``--rounds N`` runs every method N times, interleaved (qst, qlora, lora, floor,
qst, ...), each time in a fresh process, and reports the median over rounds.

Paired. Separate processes run minutes apart, and a VM's speed drifts over minutes (measured: the floor 0.52 s in one
run, 0.61 s an hour later). ``--paired`` adds one more child that loads every method's model in the same process and
alternates their steps batch by batch (``--warmup`` + ``--steps`` batches), so drift hits all of them alike; it
reports each method's median step time and the same ratios ("paired ..."). It measures time only.

Models. On CPU the default is the embedded SmolLM2-135M-Instruct (``peft_qst.smollm2.smollm2_path()``), batch 4,
sequence 256. ``--layers L`` instead builds a randomly initialised model with SmolLM2's config and L layers (saved once
in bf16 to a temporary folder, then loaded in 4-bit like the real one), for the memory-scaling points. With
``--device cuda`` the default model is randomly initialised with LLaMA-2-7B's shape (hidden 4096, 32 layers, 32 heads,
FFN 11008, vocabulary 32000), batch 4, sequence 384: the setting of the QST paper's Table 2. Weights' values do not
matter for speed and memory.

How to run
----------
::

    .venv/bin/python integration/bench_train.py                       # CPU, all four methods, one round
    .venv/bin/python integration/bench_train.py --rounds 3 --steps 8 --output integration/results/bench_train_cpu.json
    .venv/bin/python integration/bench_train.py --methods qst floor --layers 60 --steps 3   # a memory-scaling point
    python integration/bench_train.py --device cuda --rounds 2      # on a GPU machine (bitsandbytes, peft_qst)

Prints a Markdown table with the machine and the versions, and the ratios QLoRA/QST and QST/floor (step time and
memory); ``--output`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from measure import (add_overwrite_output_argument, build_random_model, check_output_path, cpu_model, peak_rss_mb,
                     reset_peak_rss, status_kb)

REPO = Path(__file__).resolve().parent.parent
METHODS = ("qst", "qlora", "lora", "floor")
#: ``METHOD:dtype=...``: the 4-bit compute dtype and the unquantized layers' dtype (default bfloat16)
DTYPES = ("bfloat16", "float32", "float16")
#: qst options that are the benchmark's, not QSTConfig fields
BENCH_OPTIONS = ("loss", "gc", "compile", "eval_first", "dtype")
LABELS = {
    "qst": "QST (default config)",
    "qlora": "QLoRA (r=64, all linear, checkpointing)",
    "lora": "LoRA (r=64, all linear, no checkpointing)",
    "floor": "floor: no-grad forward",
}
#: LLaMA-2-7B's shape (the QST paper's Table 2 model), for --device cuda
LLAMA2_7B_SHAPE = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)


# ------------------------------------------------------------------------------------------------------------------
# environment and memory
# ------------------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    kb = status_kb("VmRSS")
    if kb is None:  # no /proc: the peak is the best available figure
        return peak_rss_mb()
    return kb / 1024


def release_free_heap() -> None:
    """Collect garbage and return free heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def environment(device: str) -> dict:
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers

    import peft_qst

    env = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "accelerate": accelerate.__version__,
        "peft_qst": peft_qst.__version__,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------------------------------------
# one method, in this process
# ------------------------------------------------------------------------------------------------------------------


def parse_method(spec: str) -> tuple[str, dict]:
    """``METHOD`` or ``METHOD:key=value,...``; values are parsed as JSON where they can be (numbers, null)."""
    method, _, rest = spec.partition(":")
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r} in {spec!r}; choose from {', '.join(METHODS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad option {item!r} in {spec!r}: write key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if options.get("dtype", "bfloat16") not in DTYPES:
        raise SystemExit(f"bad dtype={options['dtype']!r} in {spec!r}: use one of {', '.join(DTYPES)}")
    if method in ("qlora", "lora") and set(options) - {"dtype"}:
        raise SystemExit(f"{method} takes only dtype= (got {spec!r}); qst:key=value sets QSTConfig fields")
    if method == "floor" and set(options) - {"loss", "mode", "dtype"}:
        raise SystemExit(f"floor takes only loss=chunked|transformers, mode=train|eval and dtype= (got {spec!r})")
    if options.get("mode", "train") not in ("train", "eval"):
        raise SystemExit(f"bad mode={options['mode']!r} in {spec!r}: use mode=train or mode=eval")
    if options.get("loss", "chunked") not in ("chunked", "transformers"):
        raise SystemExit(f"bad loss={options['loss']!r} in {spec!r}: use loss=chunked or loss=transformers")
    if method == "qst":
        # build the QSTConfig now: a misspelt field or a bad value fails before any run, not in the child of that
        # method after the methods before it have run (their results would be lost with the whole benchmark)
        from peft_qst import QSTConfig

        fields = {key: value for key, value in options.items() if key not in BENCH_OPTIONS}
        try:
            QSTConfig(task_type="CAUSAL_LM", **fields)
        except TypeError as err:
            raise SystemExit(
                f"bad option in {spec!r}: {err}; qst takes QSTConfig fields, loss=, gc=, compile=, eval_first= "
                "and dtype="
            ) from None
        except ValueError as err:
            raise SystemExit(f"bad option in {spec!r}: {err}") from None
    return method, options


def load_4bit(path: str, device: str, dtype: str = "bfloat16"):
    """The 4-bit model, computing in ``dtype``: bitsandbytes' compute dtype and the unquantized layers' dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )
    device_map = {"": 0} if device == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map=device_map, dtype=getattr(torch, dtype)
    )
    model.config.use_cache = False
    return model


def wrap(model, method: str, options: dict):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "floor":
        if options.get("loss") == "chunked":  # the floor with QST's chunked loss instead of transformers' own
            from peft_qst.loss import install_chunked_loss

            install_chunked_loss(model)
        return model
    if method == "qst":
        import peft_qst
        from peft_qst.loss import uninstall_chunked_loss

        options = dict(options)
        loss = options.pop("loss", "chunked")
        checkpointing = str(options.pop("gc", "false")).lower() in ("1", "true", "yes")
        compiled = str(options.pop("compile", "false")).lower() in ("1", "true", "yes")
        options.pop("eval_first", None)  # build_method's
        options.pop("dtype", None)  # load_4bit's
        model = get_peft_model(model, peft_qst.QSTConfig(task_type="CAUSAL_LM", **options))
        if loss == "transformers":  # measure QST with transformers' own ForCausalLMLoss (before peft_qst/loss.py)
            uninstall_chunked_loss(model.get_base_model())
        if checkpointing:  # what TRL's SFTConfig(gradient_checkpointing=True) does: the side blocks get checkpointed
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if compiled:
            model.compile()
        return model
    lora = LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, lora)


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int, device: str):
    """``n`` batches of random token ids, the same for every method (same seed)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        for _ in range(n)
    ]


def train_step(model, optimizer, ids) -> float:
    """One step of a method: a no-grad forward for the floor (no optimizer), else forward, backward, AdamW step."""
    import torch

    if optimizer is None:
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()  # .item() waits for the device, so the step is timed whole


def build_method(spec: str, args):
    """The wrapped model of one method spec, in the mode it trains in, and its optimizer (None for the floor)."""
    import torch

    method, options = parse_method(spec)
    model = wrap(load_4bit(args.model_path, args.device, options.get("dtype", "bfloat16")), method, options)
    if str(options.get("eval_first", "false")).lower() in ("1", "true", "yes"):
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.randint(0, model.config.vocab_size, (1, 16)).to(args.device))
    if method == "floor" and options.get("mode") == "eval":
        model.eval()
    else:
        model.train()  # the floor too: the kernels QST's backbone runs (module docstring)
    optimizer = (
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if method != "floor" else None
    )
    return model, optimizer


def run_paired(args) -> dict:
    """Every method in this one process, their steps alternating (floor, QST, ... for each batch): the machine's
    drift between the separate children then hits every method alike, so the step-time ratios are the steadier
    figure. Memory is not measured here (the models share the process)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [(spec, *build_method(spec, args)) for spec in args.methods]
    vocab = methods[0][1].config.vocab_size
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq, vocab, args.seed, args.device)
    times = {spec: [] for spec, _, _ in methods}
    for i, ids in enumerate(batches):
        for spec, model, optimizer in methods:
            t0 = time.perf_counter()
            train_step(model, optimizer, ids)
            if i >= args.warmup:
                times[spec].append(time.perf_counter() - t0)
    return {"step_times_s": times, "step_s": {spec: statistics.median(t) for spec, t in times.items()},
            "torch_threads": torch.get_num_threads(), "pid": os.getpid()}


def comparable_specs(specs) -> list[str]:
    """The specs the targets' ratios compare: those in the dtype of the first QST spec (else of the first spec), so
    that a spec in another dtype (``qlora:dtype=float32`` beside a bfloat16 ``qst``) is not set against it;
    ``dtype_ratios`` compares the dtypes."""
    parsed = {spec: parse_method(spec) for spec in specs}
    dtypes = {spec: options.get("dtype", "bfloat16") for spec, (_, options) in parsed.items()}
    reference = next((spec for spec, (method, _) in parsed.items() if method == "qst"), next(iter(parsed), None))
    return [spec for spec in parsed if dtypes[spec] == dtypes.get(reference)]


def step_time_ratios(step_s: dict) -> dict:
    """QLoRA/QST, QST/floor and QST over the fastest floor, from each spec's step time (the first spec of each method
    stands for it, among the specs in the dtype of the first QST spec: :func:`comparable_specs`)."""
    first, floors = {}, []
    for spec in comparable_specs(step_s):  # a bfloat16 QST over a float32 floor is no target's ratio
        method, seconds = parse_method(spec)[0], step_s[spec]
        first.setdefault(method, seconds)
        if method == "floor":
            floors.append(seconds)
    out = {}
    if "qst" in first and "qlora" in first:
        out["qlora_over_qst_step_time"] = first["qlora"] / first["qst"]
    if "qst" in first and floors:
        out["qst_over_floor_step_time"] = first["qst"] / first["floor"]
        out["qst_over_fastest_floor_step_time"] = first["qst"] / min(floors)
    return out


def run_one(args) -> dict:
    import torch

    method, options = parse_method(args.run_one)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    started = time.perf_counter()
    model, optimizer = build_method(args.run_one, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if method != "floor" else 0
    vocab = model.config.vocab_size
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq, vocab, args.seed, args.device)
    load_s = time.perf_counter() - started

    # loading frees a lot of heap memory (transient bf16 copies, the loader's thread pool) that glibc keeps mapped
    # in its arenas, by a different amount in every run (measured: 370 to 710 MB anonymous RSS after the same load);
    # hand it back, so that "after load" means the loaded model and not the loader's leftovers
    release_free_heap()
    if cuda:
        torch.cuda.synchronize()
        load_memory_mb = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    load_rss = rss_mb()
    load_rss_file = (status_kb("RssFile") or 0) / 1024
    peak_before_steps = peak_rss_mb()
    hwm_reset = reset_peak_rss()

    times, cpu_times, losses, warmup_times = [], [], [], []
    for i, ids in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(train_step(model, optimizer, ids))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        else:
            warmup_times.append(time.perf_counter() - t0)

    step_peak = peak_rss_mb()
    result = {
        "spec": args.run_one,
        "method": method,
        "options": options,
        "trainable_params": trainable,
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "step_s": statistics.median(times),
        "step_cpu_times_s": cpu_times,
        "step_cpu_s": statistics.median(cpu_times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "losses": losses,
        "load_s": load_s,
        "load_rss_mb": load_rss,
        "load_rss_file_mb": load_rss_file,
        "step_peak_rss_mb": step_peak,
        "step_increment_mb": step_peak - load_rss,
        "peak_rss_mb": max(peak_before_steps, step_peak),
        "peak_reset_after_load": hwm_reset,
        "model_training_mode": bool(model.training),
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if cuda:
        result["load_memory_mb"] = load_memory_mb
        result["step_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["step_increment_memory_mb"] = result["step_peak_memory_mb"] - load_memory_mb
    return result


# ------------------------------------------------------------------------------------------------------------------
# the parent: models, child processes, table
# ------------------------------------------------------------------------------------------------------------------


def prepare_model_path(args, workdir: str) -> tuple[str, dict]:
    """The checkpoint every child loads, and a description of it."""
    if args.model == "llama2-7b-shape":
        shape = dict(LLAMA2_7B_SHAPE)
        if args.layers is not None:
            shape["num_hidden_layers"] = args.layers
        path = os.path.join(workdir, "llama2-7b-shape")
        print(f"building a random LLaMA-2-7B-shaped model ({shape['num_hidden_layers']} layers) in {path}",
              file=sys.stderr, flush=True)
        build_random_model(shape, path, args.device)
        return path, {"model": "random LLaMA-2-7B-shaped", **shape}
    from peft_qst.smollm2 import smollm2_path

    path = smollm2_path()
    if args.layers is None:
        return path, {"model": "SmolLM2-135M-Instruct", "num_hidden_layers": 30}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).to_dict()
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "tie_word_embeddings")
    shape = {k: config[k] for k in keys if k in config}
    shape["num_hidden_layers"] = args.layers
    random_path = os.path.join(workdir, f"smollm2-shape-{args.layers}-layers")
    build_random_model(shape, random_path, "cpu")
    return random_path, {"model": f"random SmolLM2-135M-shaped, {args.layers} layers", "num_hidden_layers": args.layers}


def child_command(spec: Optional[str], args, model_path: str, result_file: str) -> list[str]:
    """The command of a child measuring ``spec``, or (spec None) of the paired child running every method."""
    what = ["--run-one", spec] if spec is not None else ["--run-paired", "--methods", *args.methods]
    command = [
        sys.executable, str(Path(__file__).resolve()), *what, "--model-path", model_path,
        "--result-file", result_file, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def timing_environment() -> dict:
    """The environment of the children that time steps: this package first on the path, glibc's default allocator."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # OMP_WAIT_POLICY is left as the user has it: PASSIVE (threads sleep between parallel regions) slowed a QST step
    # from 0.81 to 1.33 s on a 2-core Xeon, far more than the floor, and only one child runs at a time
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    return env


def run_child(spec: Optional[str], args, model_path: str, result_file: str, env: dict) -> dict:
    """Run one child (``spec``, or the paired child when ``spec`` is None) and return the JSON result it wrote."""
    proc = subprocess.run(child_command(spec, args, model_path, result_file), env=env,
                          timeout=args.child_timeout_s, check=False)
    if proc.returncode != 0 or not os.path.isfile(result_file):
        what = spec if spec is not None else "the paired run"
        raise SystemExit(f"{what} failed (exit code {proc.returncode}); its error is printed above")
    with open(result_file) as handle:
        return json.load(handle)


def run_paired_child(args, model_path: str) -> dict:
    """Run :func:`run_paired` in a fresh child process and return its result."""
    with tempfile.TemporaryDirectory(prefix="qst-bench-paired-") as tmp:
        return run_child(None, args, model_path, os.path.join(tmp, "paired.json"), timing_environment())


def run_children(args, model_path: str) -> list[dict]:
    timing_env = timing_environment()
    memory_env = None  # CPU with a forced threshold: a second child per method measures memory (module docstring)
    if args.device == "cpu" and args.malloc_mmap_threshold:
        # glibc serves allocations above this size with their own mappings and unmaps them when freed, so RSS follows
        # the tensors alive; by default the threshold grows with freed blocks (up to 32 MB) and freed tensors stay
        # resident in the heap, which makes peaks depend on the allocation history more than on what a step needs
        memory_env = dict(timing_env, MALLOC_MMAP_THRESHOLD_=str(args.malloc_mmap_threshold))
    memory_keys = ("peak_rss_mb", "load_rss_mb", "step_peak_rss_mb", "step_increment_mb")
    runs = []
    with tempfile.TemporaryDirectory(prefix="qst-bench-train-") as tmp:

        def child(spec: str, child_env: dict) -> dict:
            result_file = os.path.join(tmp, f"{len(runs)}-{int(child_env is memory_env)}.json")
            return run_child(spec, args, model_path, result_file, child_env)

        for round_index in range(args.rounds):
            for spec in args.methods:
                print(f"[round {round_index + 1}/{args.rounds}] {spec}", file=sys.stderr, flush=True)
                load_before = os.getloadavg()[0]
                run = child(spec, timing_env)
                if memory_env is not None:
                    measured = child(spec, memory_env)
                    run["timing_child_memory"] = {key: run[key] for key in memory_keys}
                    run.update({key: measured[key] for key in memory_keys})
                    run["memory_child"] = {key: measured[key] for key in ("pid", "malloc_mmap_threshold", "step_s")}
                run.update(round=round_index, loadavg_1m_before=load_before, loadavg_1m_after=os.getloadavg()[0])
                runs.append(run)
                print(f"    step {run['step_s']:.3f} s (warm-up steps {sum(run['warmup_times_s']):.1f} s), "
                      f"peak RSS {run['peak_rss_mb']:.0f} MB, "
                      f"step increment {run['step_increment_mb']:.0f} MB", file=sys.stderr, flush=True)
    return runs


def summarise(runs: list[dict], args) -> list[dict]:
    """One row per method spec: medians over rounds."""
    rows = []
    for spec in args.methods:
        mine = [run for run in runs if run["spec"] == spec]
        row = {
            "spec": spec,
            "method": mine[0]["method"],
            "rounds": len(mine),
            "trainable_params": mine[0]["trainable_params"],
            "step_s": statistics.median(run["step_s"] for run in mine),
            "step_s_per_round": [run["step_s"] for run in mine],
            "step_cpu_s": statistics.median(run["step_cpu_s"] for run in mine),
            "loadavg_1m": [run["loadavg_1m_before"] for run in mine],
        }
        row["tokens_per_s"] = args.batch * args.seq / row["step_s"]
        keys = ("peak_rss_mb", "load_rss_mb", "step_peak_rss_mb", "step_increment_mb")
        if args.device == "cuda":
            keys += ("load_memory_mb", "step_peak_memory_mb", "step_increment_memory_mb")
        for key in keys:
            row[key] = statistics.median(run[key] for run in mine)
        row["first_loss"] = mine[0]["losses"][0]
        rows.append(row)
    return rows


def memory_key(args) -> str:
    return "step_peak_memory_mb" if args.device == "cuda" else "peak_rss_mb"


def ratios(rows: list[dict], args) -> dict:
    """QLoRA/QST and QST/floor, for step time and peak memory (the first spec of each method, in the dtype of the
    first QST spec: :func:`comparable_specs`)."""
    first = {}
    comparable = comparable_specs([row["spec"] for row in rows])
    for row in rows:
        if row["spec"] in comparable:
            first.setdefault(row["method"], row)
    memory = memory_key(args)
    out = {}

    def add(name, numerator, denominator):
        if numerator in first and denominator in first:
            out[f"{name}_step_time"] = first[numerator]["step_s"] / first[denominator]["step_s"]
            if args.device != "cuda":
                out[f"{name}_step_cpu_time"] = first[numerator]["step_cpu_s"] / first[denominator]["step_cpu_s"]
            out[f"{name}_peak_memory"] = first[numerator][memory] / first[denominator][memory]
            if args.device != "cuda":
                out[f"{name}_step_increment"] = (
                    first[numerator]["step_increment_mb"] / first[denominator]["step_increment_mb"]
                    if first[denominator]["step_increment_mb"] > 0 else None
                )

    add("qlora_over_qst", "qlora", "qst")
    add("qst_over_floor", "qst", "floor")
    # the strictest bound: the fastest of the floors measured
    fastest = step_time_ratios({row["spec"]: row["step_s"] for row in rows}).get("qst_over_fastest_floor_step_time")
    if fastest is not None:
        out["qst_over_fastest_floor_step_time"] = fastest
    out.update(dtype_ratios({row["spec"]: row["step_s"] for row in rows}))
    return out


def dtype_ratios(step_s: dict) -> dict:
    """For each spec with ``dtype=X``: the same spec in bfloat16 (``dtype`` removed) over it, where both ran."""
    plain = {}
    for spec in step_s:
        method, options = parse_method(spec)
        if options.pop("dtype", "bfloat16") == "bfloat16":  # "qst" and "qst:dtype=bfloat16" alike
            plain[(method, tuple(sorted(options.items())))] = spec
    out = {}
    for spec, seconds in step_s.items():
        method, options = parse_method(spec)
        dtype = options.pop("dtype", "bfloat16")
        twin = plain.get((method, tuple(sorted(options.items()))))
        if dtype != "bfloat16" and twin is not None:
            out[f"{twin} bfloat16 over {dtype} step time"] = step_s[twin] / seconds
    return out


def readable(key: str) -> str:
    """A ratio's key as a table line: snake_case names spelt out; keys holding specs (with spaces) left as they are."""
    return key if " " in key else key.replace("_", " ")


def markdown(rows: list[dict], ratio: dict, env: dict, model: dict, args) -> str:
    threads = sorted({run_threads for run_threads in args._threads_seen})
    lines = [
        f"Training step, {model['model']} 4-bit NF4 (double quant, bf16 compute unless a spec says dtype=), "
        f"{args.device}, batch {args.batch}, "
        f"sequence {args.seq}, AdamW; median of {args.steps} steps after {args.warmup} warm-up, "
        f"median over {args.rounds} interleaved round(s), each method in its own process",
        "Machine: " + (env.get("gpu", "") + ", " if args.device == "cuda" else "")
        + f"{env['cpu']}, {env['cpu_count']} cores, {env['memory_gb']} GB, torch threads {threads}",
        "Versions: " + ", ".join(f"{k} {env[k]}" for k in
                                ("python", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "peft_qst")),
    ]
    if args.device != "cuda":
        loads = [load for row in rows for load in row["loadavg_1m"]]
        lines.append(
            f"1-minute load average before each child: {min(loads):.1f} to {max(loads):.1f} on {env['cpu_count']} "
            "cores (above the thread count, other processes took CPU time; the step CPU time is the steadier figure)"
            + (f"; step times with glibc's default allocator, memory from a second child per method with "
               f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else "")
        )
    lines.append("")
    if args.device == "cuda":
        lines += [
            "| method | step (s) | tokens/s | peak memory (MB) | after load (MB) | step increment (MB) "
            "| trainable params |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {LABELS.get(row['spec'], row['spec'])} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                f"{row['step_peak_memory_mb']:.0f} | {row['load_memory_mb']:.0f} | "
                f"{row['step_increment_memory_mb']:.0f} | {row['trainable_params']:,} |"
            )
    else:
        lines += [
            "| method | step (s) | step CPU time (s) | tokens/s | peak RSS (MB) | RSS after load (MB) | "
            "step increment (MB) | trainable params |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {LABELS.get(row['spec'], row['spec'])} | {row['step_s']:.3f} | {row['step_cpu_s']:.2f} | "
                f"{row['tokens_per_s']:.0f} | "
                f"{row['peak_rss_mb']:.0f} | {row['load_rss_mb']:.0f} | {row['step_increment_mb']:.0f} | "
                f"{row['trainable_params']:,} |"
            )
    if ratio:
        lines.append("")
        for key, value in ratio.items():
            lines.append(f"- {readable(key)}: " + ("n/a" if value is None else f"{value:.2f}x"))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="method specs: qst, qlora, lora, floor; qst:key=value,... sets QSTConfig fields")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per method and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 256 on CPU, 384 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["smollm2", "llama2-7b-shape"], default=None,
                        help="default: smollm2 on CPU, llama2-7b-shape on CUDA")
    parser.add_argument("--layers", type=int, default=None,
                        help="build a randomly initialised model of the chosen shape with this many layers")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="CPU: glibc MALLOC_MMAP_THRESHOLD_ for the children (0: leave glibc's dynamic default)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the table gives medians")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write settings, environment, every run and the table as JSON")
    add_overwrite_output_argument(parser)
    parser.add_argument("--child-timeout-s", type=float, default=3600)
    parser.add_argument("--paired", action="store_true",
                        help="also time every method in one process, steps alternating (drift-free step-time ratios)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-paired", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seq is None:
        args.seq = 384 if args.device == "cuda" else 256
    if args.model is None:
        args.model = "llama2-7b-shape" if args.device == "cuda" else "smollm2"
    for spec in args.methods:
        try:
            parse_method(spec)
        except SystemExit as err:
            parser.error(str(err.code))
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if min(args.steps, args.batch, args.seq, args.rounds) < 1 or args.warmup < 0:
        parser.error("--steps, --batch, --seq and --rounds must be at least 1, --warmup at least 0")
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_one or args.run_paired:
        result = run_one(args) if args.run_one else run_paired(args)
        with open(args.result_file, "w") as handle:
            json.dump(result, handle)
        return 0

    paired = None
    with tempfile.TemporaryDirectory(prefix="qst-bench-model-") as workdir:
        model_path, model = prepare_model_path(args, workdir)
        runs = run_children(args, model_path)
        if args.paired:
            print("[paired] every method in one process, steps alternating", file=sys.stderr, flush=True)
            paired = run_paired_child(args, model_path)
            paired["ratios"] = step_time_ratios(paired["step_s"]) | dtype_ratios(paired["step_s"])
    args._threads_seen = {run["torch_threads"] for run in runs}
    rows = summarise(runs, args)
    ratio = ratios(rows, args)
    env = environment(args.device)
    table = markdown(rows, ratio, env, model, args)
    if paired is not None:
        table += "\n\nPaired (one process, every method's steps alternating; medians of the measured steps):\n"
        table += "\n".join(f"- {LABELS.get(spec, spec)}: {step_s:.3f} s" for spec, step_s in paired["step_s"].items())
        table += "\n" + "\n".join(f"- paired {readable(key)}: {value:.2f}x"
                                   for key, value in paired["ratios"].items())
    print(table)
    for row in rows:
        for key in ("step_s", "tokens_per_s", memory_key(args)):
            if not math.isfinite(row[key]):
                raise SystemExit(f"{row['spec']}: {key} is not finite ({row[key]})")
    if args.output:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in
                    ("run_one", "run_paired", "model_path", "result_file")}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump({"settings": settings, "model": model, "environment": env, "rows": rows, "ratios": ratio,
                       "runs": runs, "paired": paired, "table": table}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
