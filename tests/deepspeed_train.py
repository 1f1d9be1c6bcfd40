"""Training of a QST model by transformers' Trainer under DeepSpeed ZeRO, run by tests/test_deepspeed.py in a process of
its own (DeepSpeed's CPU accelerator, gloo; one rank, or two under ``torchrun --nproc_per_node 2``).

Each run of ``--runs`` (a JSON list of objects; the keys are described in :func:`deepspeed_config` and :func:`train`)
sets up ``TrainingArguments(deepspeed=<config dict>)`` first, as a script that parses its arguments with
``HfArgumentParser`` does, so that under ZeRO-3 ``from_pretrained`` loads the tiny Llama of ``<out>/base`` already
partitioned (under ``deepspeed.zero.Init``); then ``get_peft_model`` adds a QST adapter and the Trainer trains
:data:`STEPS` steps on :func:`training_rows`, saving a checkpoint every 2 steps. Into ``<out>/<run name>/`` it writes

- ``weights.safetensors``: every parameter of the PEFT model after training, gathered where ZeRO-3 partitioned it;
- ``report.json``: the logged losses, the names of the parameters that required grad, and the optimizer's class;
- ``rank{R}-rows.json``: the rows (token ids) rank R trained on, step by step;
- ``adapter/``: what ``trainer.save_model`` wrote;
- ``error-rank{R}.txt`` instead, with the traceback, where the run failed on rank R (the next run still runs).

The test trains the same models with a plain Trainer (no DeepSpeed) for its reference, with :func:`train` too.

Usage: python tests/deepspeed_train.py --out DIR --runs '[{"name": "zero3", "stage": 3}]'
(or ``torchrun --nproc_per_node 2 tests/deepspeed_train.py ...``); ``<out>/base`` holds the base model
(:func:`save_base_model`).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # only the worker process is a DeepSpeed rank; the test imports the helpers below
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for _name, _value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                          ("WORLD_SIZE", "1")):
        os.environ.setdefault(_name, _value)

import argparse
import json
import traceback

import torch

STEPS = 4  # with a checkpoint at step 2, from which the resumed runs continue
GLOBAL_BATCH = 4  # every step trains on all of training_rows(), split between the ranks
NUM_LABELS = 3


def training_rows(task: str = "CAUSAL_LM") -> list[dict]:
    """GLOBAL_BATCH rows of 12 token ids, all labels valid. Every step trains on all of them: the order the sampler
    deals them in does not change the step, and as each row predicts as many tokens, the mean loss over all rows is
    the mean of two ranks' mean losses over their halves (so one process with all rows is the reference for two
    ranks). For SEQ_CLS, a class label a row."""
    ids = torch.randint(3, 128, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(7))
    if task == "SEQ_CLS":
        return [{"input_ids": row.tolist(), "labels": index % NUM_LABELS} for index, row in enumerate(ids)]
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def save_base_model(directory: str) -> None:
    from tests.conftest import tiny_causal_lm

    tiny_causal_lm().save_pretrained(directory)


def load_base_model(base_dir: str, run: dict):
    """The base model as a training script loads it: under ZeRO-3's ``zero.Init`` once the TrainingArguments carry a
    ZeRO-3 config; in 4 bits with ``"four_bit"``; for sequence classification (a new head, from a fixed seed) with
    ``"task": "SEQ_CLS"``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tests.conftest import bnb_config

    kwargs = {"dtype": torch.float32}
    if run.get("four_bit"):  # "quant_storage": the dtype the packed 4-bit weights are stored in (FSDP shards them)
        storage = getattr(torch, run.get("quant_storage", "uint8"))
        kwargs["quantization_config"] = bnb_config(compute_dtype=torch.float32, quant_storage=storage)
    if run.get("task", "CAUSAL_LM") == "SEQ_CLS":
        torch.manual_seed(1)
        return AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=NUM_LABELS, pad_token_id=0, **kwargs
        )
    return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)


def build_model(base_dir: str, run: dict):
    """The base model and a QST adapter (further QSTConfig arguments in ``"qst"``) from a fixed seed."""
    from peft import get_peft_model

    from peft_qst import QSTConfig

    base = load_base_model(base_dir, run)
    torch.manual_seed(0)
    return get_peft_model(base, QSTConfig(task_type=run.get("task", "CAUSAL_LM"), r=4, **run.get("qst", {})))


def deepspeed_config(run: dict) -> dict:
    """ZeRO stage ``"stage"``; ``"offload_optimizer"`` / ``"offload_param"``: to the CPU; ``"ds_optimizer"``: an
    ``optimizer`` section (AdamW with the Trainer's settings), so that DeepSpeed builds its own optimizer
    (DeepSpeedCPUAdam where the optimizer is offloaded) instead of taking the Trainer's torch AdamW (which accelerate
    swaps for DeepSpeedCPUAdam under ZeRO-Offload too, unless ``zero_force_ds_cpu_optimizer`` is false:
    ``"force_ds_cpu_optimizer": false``); ``"gather_16bit"``: ``stage3_gather_16bit_weights_on_model_save`` (default
    true)."""
    zero = {"stage": run["stage"]}
    if run["stage"] == 3:
        # every parameter partitioned and gathered in its own module's hooks only, as a large model's are
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0,
                    stage3_gather_16bit_weights_on_model_save=run.get("gather_16bit", True))
    for key in ("offload_optimizer", "offload_param"):
        if run.get(key):
            zero[key] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": run.get("force_ds_cpu_optimizer", True),
    }
    if run.get("ds_optimizer"):
        config["optimizer"] = {
            "type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config


class RecordingCollator:
    """The default collator, keeping the rows of every batch this rank trains on."""

    def __init__(self):
        from transformers import default_data_collator

        self.collate = default_data_collator
        self.batches: list[list[list[int]]] = []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.batches.append(batch["input_ids"].tolist())
        return batch


def train(out: str, base_dir: str, run: dict, world_size: int = 1):
    """Train as ``run`` says into ``<out>/<name>`` (``"stage"`` absent: a plain Trainer, no DeepSpeed; ``"fsdp"``: the
    TrainingArguments that turn FSDP on, tests/fsdp_trainer_train.py; ``"resume"``:
    the name of a run to resume from at its step-2 checkpoint; ``"training"``: further TrainingArguments); returns the
    trainer, the losses it logged and the rows it trained on."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    # the arguments first, as HfArgumentParser makes them: from then on from_pretrained loads under ZeRO-3's zero.Init
    settings = dict(
        output_dir=os.path.join(out, run["name"]), per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps", save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        deepspeed=deepspeed_config(run) if run.get("stage") else None,
    )
    args = TrainingArguments(**{**settings, **run.get("fsdp", {}), **run.get("training", {})})
    model = build_model(base_dir, run)
    rows = Dataset.from_list(training_rows(run.get("task", "CAUSAL_LM")))
    losses, collator = [], RecordingCollator()

    class RecordLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=collator,
        callbacks=[RecordLosses()],
    )
    resume = run.get("resume")
    trainer.train(resume_from_checkpoint=os.path.join(out, resume, "checkpoint-2") if resume else None)
    return trainer, losses, collator.batches


def gathered_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (ZeRO-3 gathers the partitioned ones for the copy; collective: every rank calls it)."""
    import deepspeed

    parameters = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(parameters.values())):
        return {name: p.detach().clone().contiguous() for name, p in parameters.items()}


def write_run(directory: str, rank: int, batches, weights: dict, report: dict) -> None:
    """What a run leaves for the test: the rows this rank trained on; on rank 0 the gathered weights and the report."""
    from safetensors.torch import save_file

    with open(os.path.join(directory, f"rank{rank}-rows.json"), "w") as handle:
        json.dump(batches, handle)
    if rank == 0:
        save_file(weights, os.path.join(directory, "weights.safetensors"))
        with open(os.path.join(directory, "report.json"), "w") as handle:
            json.dump(report, handle)


def write_failure(directory: str, rank: int) -> None:
    """The traceback of the exception being handled, where the test reads it (the next run still runs)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"error-rank{rank}.txt"), "w") as handle:
        handle.write(traceback.format_exc())
    traceback.print_exc()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="a JSON list of runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import deepspeed.ops
    import torch.distributed as dist

    # the CPU accelerator's JIT-compiled shared-memory all-reduce (a C++ build at the first run) is not needed here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # With use_cpu, accelerate starts torch.distributed (gloo) but not DeepSpeed's communication layer, from which
    # deepspeed.zero.Init (entered by from_pretrained before the Trainer initializes the engine) reads the world size:
    # 1 where it is not up, and ZeRO-3 on two ranks then fails its batch size check. On GPUs accelerate starts it.
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for run in json.loads(args.runs):
        directory = os.path.join(args.out, run["name"])
        try:
            trainer, losses, batches = train(args.out, os.path.join(args.out, "base"), run, world_size)
            weights = gathered_parameters(trainer.model)
            trainer.save_model(os.path.join(directory, "adapter"))
            trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
            # the optimizer DeepSpeed steps (inside its ZeRO optimizer)
            optimizer = type(trainer.model_wrapped.basic_optimizer).__name__
            write_run(directory, rank, batches, weights,
                      {"losses": losses, "trainable": trainable, "optimizer": optimizer})
        except Exception:
            write_failure(directory, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
