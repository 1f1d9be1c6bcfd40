"""Training of a QST model by transformers' Trainer under FSDP (``TrainingArguments(fsdp=..., fsdp_config=...)``), run
by tests/test_fsdp_trainer.py under ``torchrun --nproc_per_node 2`` on the CPU (gloo).

accelerate 1.16 turns FSDP on only for GPU (and other accelerator) process groups: on a CPU-only machine its
``AcceleratorState`` leaves a ``MULTI_CPU`` state as it is and drops the FSDP plugin, so the Trainer (and ``accelerate
launch --use_fsdp``, ``ACCELERATE_USE_FSDP=true``) silently trains with DDP. :func:`let_accelerate_use_fsdp_on_the_cpu`
takes the branch accelerate takes on GPUs (the state becomes ``DistributedType.FSDP`` with the plugin the Trainer
built); everything after that is accelerate's and the Trainer's own FSDP code.

Each run of ``--runs`` (a JSON list; the keys of tests/deepspeed_train.py's :func:`train`, with ``"fsdp"``: the
TrainingArguments that turn FSDP on; ``"save_full"``: switch to FULL_STATE_DICT before the final ``save_model``;
``"save": false``: no final ``save_model``) trains :data:`tests.deepspeed_train.STEPS` steps, each rank on its half
of every step's rows, and writes into ``<out>/<run name>/`` what tests/deepspeed_train.py's runs write
(``weights.safetensors``, ``report.json``, ``rank{R}-rows.json``, ``adapter/`` from ``trainer.save_model``, or
``error-rank{R}.txt``).

Usage: torchrun --nproc_per_node 2 tests/fsdp_trainer_train.py --out DIR --runs '[{"name": "fsdp2", "fsdp": {...}}]'
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json

import torch


def let_accelerate_use_fsdp_on_the_cpu() -> None:
    """Make accelerate's ``AcceleratorState`` take FSDP on a ``MULTI_CPU`` (gloo) process group, as it does on GPUs
    (where its ``MULTI_GPU`` branch sets ``distributed_type = FSDP`` and keeps the plugin)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    initialise = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # "cpu", not the "cpu:0" PartialState sets: FSDP1 refuses a device_id other than its compute device's
            self.device = torch.device("cpu")
            PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=self.device)

    AcceleratorState.__init__ = __init__


def gathered_parameters(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every parameter of the PEFT model, whole, by its name without FSDP's and activation checkpointing's wrapper
    prefixes, and the names of those that require grad (collective: every rank calls it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    def gather() -> tuple[dict[str, torch.Tensor], list[str]]:
        weights, trainable = {}, []
        for name, p in model.named_parameters():
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            weights[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
            if p.requires_grad:
                trainable.append(name)
        return weights, trainable

    if isinstance(model, FSDP):  # FSDP1: the original parameters, unflattened, within summon_full_params
        with FSDP.summon_full_params(model, writeback=False):
            return gather()
    return gather()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="a JSON list of runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torch.distributed as dist

    from tests.deepspeed_train import train, write_failure, write_run

    let_accelerate_use_fsdp_on_the_cpu()
    # a run that fails on one rank leaves the other waiting in a collective: it fails too, after this time
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for run in json.loads(args.runs):
        directory = os.path.join(args.out, run["name"])
        try:
            trainer, losses, batches = train(args.out, os.path.join(args.out, "base"), run, world_size)
            assert trainer.is_fsdp_enabled
            weights, trainable = gathered_parameters(trainer.model_wrapped)
            if run.get("save_full"):  # PEFT's FSDP recipe: checkpoints sharded, the final adapter gathered whole
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            if run.get("save", True):
                trainer.save_model(os.path.join(directory, "adapter"))
            write_run(directory, rank, batches, weights,
                      {"losses": losses, "trainable": trainable,
                       "optimizer": type(trainer.optimizer.optimizer).__name__})
        except Exception:
            write_failure(directory, rank)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
