"""Where a QST training step goes on a CUDA GPU, and variants timed side by side in one process.

The GPU counterpart of ``profile_train.py`` (CPU). On the random LLaMA-2-7B-shaped 4-bit model of
``bench_train.py --device cuda`` (NF4, double quant, bf16 compute; batch 4, sequence 384 by default):

1. **Paired timing.** Every ``--methods`` spec (``bench_train.py``'s syntax) is loaded in this one process and their
   steps alternate batch by batch, so that drift hits all of them alike (``bench_train.run_paired``).
2. **Sections.** On a QST model, forward hooks that synchronise the GPU split the step into the backbone, the side
   network (its downsamplers and blocks), the LM head, the loss, the backward and the optimizer. Synchronising costs
   a little and stops the CPU from running ahead, so these are the sections' own times, not their share of an
   unsynchronised step.
3. **Profiler.** ``torch.profiler`` (CPU and CUDA) over unsynchronised steps: the GPU's busy time against the step's
   wall time (a step whose kernels keep the GPU busy a fraction of its wall time is bound by the CPU: Python and
   kernel launches), the number of kernel launches, and the top operators by GPU and by CPU time.

    python integration/profile_cuda.py --output OUT.json [--methods qst qst:loss=transformers floor qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import add_overwrite_output_argument, build_random_model, check_output_path  # noqa: E402
from bench_train import LLAMA2_7B_SHAPE, build_method, make_batches, parse_method, run_paired, train_step  # noqa: E402

SECTIONS = ("backbone", "side", "side.downsample", "side.block", "lm_head", "loss", "backward", "optimizer")


class SyncedSections:
    """Wall time per labelled section, the GPU synchronised at each boundary."""

    def __init__(self):
        self.times = {}
        self._open = {}

    def enter(self, name):
        torch.cuda.synchronize()
        self._open.setdefault(name, []).append(time.perf_counter())

    def leave(self, name):
        torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._open[name].pop()

    def hook(self, module, name):
        return [module.register_forward_pre_hook(lambda *_: self.enter(name)),
                module.register_forward_hook(lambda *_: self.leave(name))]


def instrument(model, sections: SyncedSections) -> list:
    qst_layer = model.get_base_model().model
    handles = sections.hook(qst_layer.base_layer, "backbone")
    for side in qst_layer.qst_side.values():
        handles += sections.hook(side, "side")
        handles += sections.hook(side.embed_downsample, "side.downsample")
        for block in side._blocks:
            handles += sections.hook(block.downsample, "side.downsample")
            handles += sections.hook(block.block, "side.block")
    handles += sections.hook(model.get_base_model().lm_head, "lm_head")
    return handles


def synced_steps(model, optimizer, batches) -> list[dict]:
    sections = SyncedSections()
    handles = instrument(model, sections)
    base = model.get_base_model()
    loss_function = base.loss_function

    def timed_loss(*args, **kwargs):
        sections.enter("loss")
        try:
            return loss_function(*args, **kwargs)
        finally:
            sections.leave("loss")

    base.loss_function = timed_loss
    per_step = []
    try:
        for ids in batches:
            sections.times = {}
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            sections.enter("backward")
            loss.backward()
            sections.leave("backward")
            sections.enter("optimizer")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sections.leave("optimizer")
            sections.times["step"] = time.perf_counter() - start
            per_step.append(dict(sections.times))
    finally:
        for handle in handles:
            handle.remove()
        base.loss_function = loss_function
    return per_step


def profiled_steps(model, optimizer, batches, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for ids in batches:
            train_step(model, optimizer, ids)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / len(batches)
    events = prof.key_averages()
    # the kernels' own time, as the profiler's table totals it: CPU-side operators report their kernels' time too, and
    # a user annotation (the optimizer's step) reports the span from its first to its last kernel, gaps included
    kernel_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    gpu_us = sum(e.self_device_time_total for e in kernel_events) / len(batches)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cuLaunchKernelEx")) / len(batches)
    return {
        "profiled_step_wall_s": wall,
        "gpu_busy_s_per_step": gpu_us / 1e6,
        "kernel_launches_per_step": launches,
        "top_by_gpu_time": events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60),
        "top_by_cpu_time": events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["qst", "qst:loss=transformers", "floor", "qlora"],
                        help="specs timed side by side (bench_train.py's syntax)")
    parser.add_argument("--qst", default="", help="QSTConfig fields (key=value,...) of the profiled QST model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="backbone blocks (default: LLaMA-2-7B's 32)")
    parser.add_argument("--top", type=int, default=25, help="operators listed per table")
    parser.add_argument("--output", default=None, help="write everything as JSON")
    add_overwrite_output_argument(parser)
    args = parser.parse_args(argv)
    for spec in args.methods + ["qst:" + args.qst if args.qst else "qst"]:
        try:
            parse_method(spec)
        except SystemExit as err:
            parser.error(str(err.code))
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch, --seq and --steps must be at least 1, --warmup at least 0")
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_cuda.py needs a CUDA GPU; profile_train.py profiles a step on the CPU")
    shape = dict(LLAMA2_7B_SHAPE)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory(prefix="qst-profile-cuda-") as workdir:
        args.model_path = os.path.join(workdir, "model")
        print(f"building a random LLaMA-2-7B-shaped model ({shape['num_hidden_layers']} layers)", flush=True)
        build_random_model(shape, args.model_path, "cuda")
        args.device, args.seed, args.threads = "cuda", 0, None

        paired = run_paired(args)
        print("\nPaired (one process, steps alternating), median step (s):", flush=True)
        for spec, seconds in paired["step_s"].items():
            print(f"- {spec}: {seconds:.3f}")
        torch.cuda.empty_cache()

        spec = "qst:" + args.qst if args.qst else "qst"
        model, optimizer = build_method(spec, args)
        batches = make_batches(args.warmup + args.steps, args.batch, args.seq, model.config.vocab_size, 0, "cuda")
        for ids in batches[: args.warmup]:
            train_step(model, optimizer, ids)
        per_step = synced_steps(model, optimizer, batches[args.warmup:])
        median = {key: statistics.median(p.get(key, 0.0) for p in per_step) for key in per_step[0]}
        print(f"\nQST step sections ({spec}), GPU synchronised at each boundary, median of {args.steps} steps:")
        print("| section | time (s) | share of step |\n|---|---|---|")
        for key in SECTIONS + ("step",):
            if key in median:
                print(f"| {key} | {median[key]:.4f} | {100 * median[key] / median['step']:.0f}% |")
        profile = profiled_steps(model, optimizer, batches[args.warmup:args.warmup + 3], args.top)
        print(f"\nProfiled steps: wall {profile['profiled_step_wall_s']:.3f} s per step, GPU busy "
              f"{profile['gpu_busy_s_per_step']:.3f} s per step, {profile['kernel_launches_per_step']:.0f} kernel "
              "launches per step")
        print("\nTop operators by GPU time:\n" + profile["top_by_gpu_time"])
        print("\nTop operators by CPU time:\n" + profile["top_by_cpu_time"])
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "model_path"}, "shape": shape,
                       "paired": paired, "sections_median_s": median, "sections_per_step": per_step,
                       "profile": profile, "gpu": torch.cuda.get_device_name(0)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
