"""Fully sharded data-parallel training of a QST model, run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``.

A tiny random Llama gets ``QSTConfig(task_type="CAUSAL_LM", r=4, **<--qst JSON>)`` and is wrapped as the FSDP
recipes wrap a PEFT model:

- ``--fsdp 2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer (the backbone's and the side network's:
  TRANSFORMER_BASED_WRAP with ``LlamaDecoderLayer``), the input embeddings and the LM head, then on the whole model,
  as accelerate's FSDP2 plugin does;
- ``--fsdp 1``: ``FullyShardedDataParallel`` with PEFT's ``fsdp_auto_wrap_policy(model)`` (the policy the Trainer
  installs for a PEFT model under FSDP1) and ``use_orig_params=False`` (the QLoRA-FSDP recipe's setting).

Each rank trains a few AdamW steps on its own batch and writes, after every step, the full (gathered) trainable weights
to ``<out>/rank{R}-step{S}.safetensors``; then the logits of an evaluation forward (``no_grad``, eval mode, the path
``Trainer.evaluate`` takes) and, under FSDP2, the tokens of a greedy ``generate``. Last, the full model state dict is
gathered as accelerate gathers it for ``Trainer.save_model``, and rank 0 saves the adapter from it with
``save_pretrained(state_dict=...)``. Nothing here needs a GPU: FSDP runs on the CPU over gloo (the script builds the
FSDP wrapping itself: accelerate and the Trainer turn FSDP on only with GPUs and fall back to DDP on CPUs).

Usage: torchrun --nproc_per_node 2 tests/fsdp_train.py --out DIR [--fsdp 1|2] [--steps N] [--qst '{"copy_heads": 1}']
[--side-unit]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import faulthandler
import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from peft_qst import QSTConfig

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])


def batch_of(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s batch at ``step``: 2 rows of 12 tokens (the test rebuilds them for its reference run)."""
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1000 * step + rank))


def full_trainable_weights(model, fsdp: int) -> dict[str, torch.Tensor]:
    """Every trainable parameter, unsharded, by its name in the PEFT model (collective: every rank calls it)."""
    if fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            return {
                name.replace("_fsdp_wrapped_module.", ""): p.detach().clone().contiguous()
                for name, p in model.named_parameters()
                if p.requires_grad
            }
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def full_state_dict(model, fsdp: int) -> dict[str, torch.Tensor]:
    """The whole model's state dict, unsharded, as accelerate's ``get_state_dict`` gathers it for saving."""
    if fsdp == 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", type=int, choices=[1, 2], default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--qst", default="{}", help="further QSTConfig arguments, as JSON")
    parser.add_argument("--side-unit", action="store_true",
                        help="FSDP2: also make each side network one unit (as a size-based wrap policy can)")
    args = parser.parse_args()
    # a rank that aborts in C++ (SIGABRT) prints every thread's Python stack, and each stage is logged, so that the
    # test's failure message says where a rank stopped
    faulthandler.enable()

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def stage(what: str) -> None:
        print(f"[rank {rank}] {what}", file=sys.stderr, flush=True)

    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    )
    torch.manual_seed(0)  # the same backbone and side network on every rank (tests/conftest.py's tiny_causal_lm)
    qst_config = QSTConfig(task_type="CAUSAL_LM", r=4, **json.loads(args.qst))
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), qst_config)

    if args.fsdp == 1:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(
            peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model), use_orig_params=False,
            device_id=torch.device("cpu"),
        )
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # accelerate's layout (fsdp2_prepare_model): the decoder layers, the input embeddings, the LM head (kept
        # unsharded after its forward), then the rest as the root
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for module in list(peft_model.modules()):
            if isinstance(module, LlamaDecoderLayer):
                fully_shard(module, mesh=mesh)
        if args.side_unit:
            from peft_qst.side import QSTSideNetwork

            for module in list(peft_model.modules()):
                if isinstance(module, QSTSideNetwork):
                    fully_shard(module, mesh=mesh)
        fully_shard(peft_model.get_input_embeddings(), mesh=mesh)
        fully_shard(peft_model.get_output_embeddings(), mesh=mesh, reshard_after_forward=False)
        model = fully_shard(peft_model, mesh=mesh)

    stage("wrapped")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for step in range(1, args.steps + 1):
        ids = batch_of(rank, step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        weights = full_trainable_weights(model, args.fsdp)
        save_file(weights, os.path.join(args.out, f"rank{rank}-step{step}.safetensors"))
        stage(f"step {step}")

    model.eval()
    with torch.no_grad():
        outputs = {"logits": model(input_ids=IDS).logits.contiguous()}
        if args.fsdp == 2:  # greedy decoding with a cache, as the Trainer runs generate under FSDP2
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, "generate")
            outputs["generated"] = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False).contiguous()
    save_file(outputs, os.path.join(args.out, f"rank{rank}-eval.safetensors"))
    stage("evaluated")

    state_dict = full_state_dict(model, args.fsdp)
    if rank == 0:
        peft_model.save_pretrained(os.path.join(args.out, "adapter"), state_dict=state_dict)
        frozen = {n: t.contiguous() for n, t in state_dict.items() if ".qst_side." not in n}
        save_file(frozen, os.path.join(args.out, "backbone.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}-report.json"), "w") as handle:
        json.dump({"losses": losses, "world_size": dist.get_world_size(), "backend": dist.get_backend()}, handle)
    stage("saved")
    dist.barrier()
    dist.destroy_process_group()
    stage("process group destroyed")


if __name__ == "__main__":
    main()
