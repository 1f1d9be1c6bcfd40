"""Profile one QST training step on CPU: where the time and the memory of a step go.

Same setting as ``bench_train.py`` (4-bit SmolLM2-135M-Instruct, NF4, double quant, bf16 compute; seeded random token
batches, labels = inputs; AdamW). After ``--warmup`` steps, ``--steps`` steps run under ``torch.profiler`` with the
forward split into labelled sections by module hooks:

- ``backbone``: the frozen 4-bit trunk under ``no_grad`` (inside it, ``backbone.linear4bit``: its 4-bit matmuls);
- ``side``: the side network; inside it ``side.downsample`` (the 31 downsamplers) and ``side.block`` (the shrunk
  decoder blocks); ``side.upsample`` for the upsample;
- ``lm_head`` and ``loss`` (the model's own LM head over the full vocabulary and its cross-entropy);
- ``backward`` and ``optimizer``.

Printed: the wall time of each section (median over the profiled steps, from ``time.perf_counter`` in the same hooks,
so the profiler's own overhead shows up as well), the top operators by self CPU time for the forward and the
backward, and the RSS after each section of one step (``VmRSS``; the high-water mark is reset at the start of the
step, so ``VmHWM`` is the peak up to that point of the step).

    .venv/bin/python integration/profile_train.py [--batch 4] [--seq 256] [--qst side_dtype=float32]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import add_overwrite_output_argument, check_output_path  # noqa: E402
from bench_train import load_4bit, make_batches, parse_method, peak_rss_mb, reset_peak_rss, rss_mb, wrap  # noqa: E402

SECTION_ORDER = ("backbone", "backbone.linear4bit", "side", "side.downsample", "side.block", "side.upsample",
                 "lm_head", "loss", "backward", "optimizer")


class Sections:
    """Wall time and RSS per labelled section; each section is also a ``record_function`` range for the profiler."""

    def __init__(self):
        self.times = collections.defaultdict(float)
        self.memory = []  # (section, VmRSS MB, VmHWM MB) at the end of each top-level section of the current step
        self._open = {}

    def enter(self, name):
        record = torch.autograd.profiler.record_function(name)
        record.__enter__()
        self._open.setdefault(name, []).append((record, time.perf_counter()))

    def leave(self, name, track_memory=False):
        record, start = self._open[name].pop()
        self.times[name] += time.perf_counter() - start
        record.__exit__(None, None, None)
        if track_memory:
            self.memory.append((name, rss_mb(), peak_rss_mb()))

    def hook(self, module, name, track_memory=False):
        module.register_forward_pre_hook(lambda *_: self.enter(name))
        module.register_forward_hook(lambda *_: self.leave(name, track_memory))


def instrument(model, sections: Sections):
    import bitsandbytes as bnb

    qst_layer = model.get_base_model().model
    sections.hook(qst_layer.base_layer, "backbone", track_memory=True)
    for module in qst_layer.base_layer.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            sections.hook(module, "backbone.linear4bit")
    for side in qst_layer.qst_side.values():
        sections.hook(side, "side", track_memory=True)
        sections.hook(side.embed_downsample, "side.downsample")
        sections.hook(side.upsample, "side.upsample")
        for block in side._blocks:
            sections.hook(block.downsample, "side.downsample")
            sections.hook(block.block, "side.block")
    sections.hook(model.get_base_model().lm_head, "lm_head", track_memory=True)
    loss_function = model.get_base_model().loss_function

    def timed_loss(*args, **kwargs):
        sections.enter("loss")
        try:
            return loss_function(*args, **kwargs)
        finally:
            sections.leave("loss", track_memory=True)

    model.get_base_model().loss_function = timed_loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--qst", default="", help="QSTConfig fields as key=value,... (e.g. side_dtype=float32)")
    parser.add_argument("--top", type=int, default=18, help="operators listed per table")
    parser.add_argument("--output", default=None, help="write the section times and memory points as JSON")
    add_overwrite_output_argument(parser)
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch, --seq and --steps must be at least 1, --warmup at least 0")
    try:
        parse_method("qst:" + args.qst if args.qst else "qst")  # a bad QSTConfig field fails here, before the load
    except SystemExit as err:
        parser.error(str(err.code))
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft_qst.smollm2 import smollm2_path

    _, options = parse_method("qst:" + args.qst if args.qst else "qst")
    model = wrap(load_4bit(smollm2_path(), "cpu"), "qst", options).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq, model.config.vocab_size, 0, "cpu")
    sections = Sections()

    def step(ids, instrumented: bool):
        reset_peak_rss()
        sections.memory = [("start", rss_mb(), peak_rss_mb())]
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        forward = time.perf_counter()
        with torch.autograd.profiler.record_function("backward"):
            loss.backward()
        backward = time.perf_counter()
        sections.memory.append(("backward", rss_mb(), peak_rss_mb()))
        with torch.autograd.profiler.record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        sections.memory.append(("optimizer", rss_mb(), peak_rss_mb()))
        return {"forward": forward - start, "backward": backward - forward, "optimizer": end - backward,
                "step": end - start}

    for ids in batches[: args.warmup]:
        step(ids, False)
    instrument(model, sections)
    per_step = []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for ids in batches[args.warmup:]:
            sections.times.clear()
            phases = step(ids, True)
            phases.update(sections.times)
            per_step.append(phases)
    memory = sections.memory  # of the last step

    median = {key: statistics.median(p.get(key, 0.0) for p in per_step) for key in per_step[0]}
    print(f"\nQST step, SmolLM2-135M 4-bit, batch {args.batch}, sequence {args.seq}, QSTConfig({args.qst}), "
          f"{torch.get_num_threads()} torch threads; median over {args.steps} profiled steps (profiler on)")
    print("\n| section | time (s) | share of step |")
    print("|---|---|---|")
    for key in ("forward",) + SECTION_ORDER[:-2] + ("backward", "optimizer", "step"):
        if key in median:
            print(f"| {key} | {median[key]:.3f} | {100 * median[key] / median['step']:.0f}% |")
    print("\nRSS during the last step (MB): " + ", ".join(f"{n} {r:.0f} (peak {h:.0f})" for n, r, h in memory))

    averages = prof.key_averages()
    print(f"\nTop {args.top} operators by self CPU time (all profiled steps):")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    print("\nBy input shape (top by self CPU time):")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                             max_name_column_width=40, max_shapes_column_width=70))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"settings": vars(args), "median_s": median, "per_step": per_step, "rss_mb": memory}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
