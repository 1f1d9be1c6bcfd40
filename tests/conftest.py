"""Shared fixtures: tiny random models for plumbing, the real 4-bit SmolLM2 where realism matters."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

import peft_qst  # noqa: F401  (registers QST with PEFT)

warnings.filterwarnings("ignore", message=".*kernels.*")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documentation() -> dict[str, str]:
    """The README and the pages under ``docs/``, as ``{path relative to the repository: text}``, the README first.

    The README keeps the user documentation and short summaries; the measurement logs and details it links to live in
    ``docs/*.md``. Tests of what the documentation quotes (commands, file paths, links) read all of them."""
    pages = glob.glob(os.path.join(REPO, "docs", "*.md"))
    paths = ["README.md"] + sorted(os.path.relpath(path, REPO) for path in pages)
    texts = {}
    for path in paths:
        with open(os.path.join(REPO, path), encoding="utf-8") as handle:
            texts[path] = handle.read()
    return texts


def load_script(path: str, name: str, register: bool = False):
    """A script of the repository (``path`` relative to its root) imported as module ``name``; ``register`` puts it
    in ``sys.modules`` (needed where its dataclasses or pickling look the module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_llama_config(**overrides):
    from transformers import AutoConfig

    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    sizes.update(overrides)
    return AutoConfig.for_model("llama", **sizes)


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides) if model_type == "llama" else AutoConfig.for_model(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture
def tiny_model():
    return tiny_causal_lm()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved to disk, so adapters record a base_model_name_or_path that resolves."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_causal_lm()
    model.save_pretrained(path)
    return str(path)


def train_steps(model, input_ids, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps of causal-LM loss on fixed ids (so an adapter visibly changes the output); returns the
    losses and leaves the model in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def saved_under_another_trunk_name(model, folder) -> None:
    """``model`` saved as from a model whose trunk was called ``old_trunk`` (the digest recorded for those bytes): a
    folder that loads only with a ``key_mapping``."""
    from safetensors.torch import load_file, save_file

    from peft_qst.serialization import weights_digest

    model.save_pretrained(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    renamed = {key.replace(".model.model.", ".model.old_trunk.", 1): value for key, value in weights.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = weights_digest(renamed)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@contextlib.contextmanager
def parameters_frozen(model):
    """``model`` with every parameter's ``requires_grad`` off for the block, then as it was: logits to compare exactly
    with a model whose parameters are frozen (a base model under an adapter, an adapter loaded for inference). torch's
    matmul folds a transposed 3-D operand (Mamba mixers' ``x_proj`` and scan) into one matrix product when an operand
    requires grad, even under ``no_grad``, and runs a batched product when none does; on some CPUs the two round
    differently (1e-7 to 1e-6 on a tiny Mamba on an AMD EPYC, 0 on a Xeon), with bit-identical weights."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def bnb_config(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16, quant_storage=torch.uint8):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


@pytest.fixture(scope="session")
def smollm2_dir():
    from peft_qst.smollm2 import smollm2_path

    return smollm2_path()


def load_smollm2_4bit(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config())


def logits_in_fresh_process(tmp_path, load_model: str, input_ids, env: dict | None = None, field: str = "logits"):
    """Logits (or another output ``field``, e.g. ``last_hidden_state``) of ``input_ids`` from a model built in a fresh
    process by ``load_model``: Python statements, run after ``import torch, peft_qst``, that bind ``model``. Tensors
    cross the process boundary as safetensors files."""
    import textwrap

    from safetensors.torch import load_file, save_file

    ids_file, out_file = str(tmp_path / "fresh-ids.safetensors"), str(tmp_path / "fresh-logits.safetensors")
    save_file({"ids": input_ids}, ids_file)
    script = "import torch, peft_qst\n" + textwrap.dedent(load_model) + textwrap.dedent(
        f"""
        from safetensors.torch import load_file, save_file
        ids = load_file({ids_file!r})["ids"]
        with torch.no_grad():
            save_file({{"logits": model.eval()(input_ids=ids).{field}.contiguous()}}, {out_file!r})
        """
    )
    run_python(script, env=env)
    return load_file(out_file)["logits"]


def copy_of(model, how: str):
    """A copy of a whole model, by ``copy.deepcopy`` (``how="deepcopy"``) or by pickling it (``torch.save`` and
    ``torch.load``)."""
    import copy
    import io

    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous: fixed ports (accelerate's and torchrun's
    29500) collide when tests run side by side (scripts/test.sh runs two pytest workers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(code: str, timeout: int = 600, env: dict | None = None) -> str:
    """Run code in a fresh Python process (nothing imported, nothing registered) and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def run_command(command: list[str], timeout: int = 900) -> str:
    """Run a command (a script of the repository, or one of scripts/) from the repository's root; it must succeed.
    Returns its stdout and stderr, together."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def run_example(*args: str, timeout: int = 900) -> str:
    """``python SCRIPT ARGS`` in this Python, through :func:`run_command`."""
    return run_command([sys.executable, *args], timeout=timeout)


# runs each command line as ``python SCRIPT ARGS`` would (``runpy`` as ``__main__``, the script's folder and not the
# working directory on sys.path), one after the other in one process
SCRIPTS_DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
results = []
base_path = [entry for entry in sys.path if entry not in ("", os.getcwd())]
real_stdout = sys.stdout
for argv in COMMAND_LINES:
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = list(argv)
    sys.path[:] = [os.path.dirname(os.path.abspath(argv[0]))] + base_path
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            stderr.write(str(stop.code))
    except BaseException:
        code = 1
        stderr.write(traceback.format_exc())
    results.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
real_stdout.write(json.dumps(results) + "\\n")
"""


def run_scripts(command_lines: list[list[str]], timeout: int = 900) -> list[dict]:
    """Exit status, stdout and stderr of each command line (a script of the repository and its arguments), run one
    after the other in one fresh process: the imports (about 10 s of torch, transformers and PEFT) are paid once, not
    once per command line."""
    stdout = run_python(f"COMMAND_LINES = {command_lines!r}\n" + SCRIPTS_DRIVER, timeout=timeout)
    return json.loads(stdout.splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# Trainer runs under DeepSpeed and FSDP, compared with a plain Trainer
# --------------------------------------------------------------------------------------------------------------------

TRAINER_RUN_IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])  # the logits the saved adapters must reproduce


@pytest.fixture(scope="module")
def plain_trainer(tmp_path_factory):
    """The reference for tests/test_deepspeed.py and tests/test_fsdp_trainer.py: the same model trained by a plain
    Trainer (no DeepSpeed, no FSDP) in this process, one per model setting (trained on first use): its trained model,
    the weights before training, and the losses it logged."""
    from tests.deepspeed_train import build_model, save_base_model, train

    out = tmp_path_factory.mktemp("plain-trainer")
    save_base_model(str(out / "base"))
    trained = {}

    def reference(run: dict):
        setting = {key: run[key] for key in ("qst", "task", "four_bit", "quant_storage", "training") if key in run}
        key = json.dumps(setting, sort_keys=True)
        if key not in trained:
            initial = {n: p.detach().clone() for n, p in build_model(str(out / "base"), setting).named_parameters()}
            trainer, losses, _ = train(str(out), str(out / "base"), {"name": f"plain-{len(trained)}", **setting})
            trained[key] = trainer.model.eval(), initial, losses
        return trained[key]

    return reference


def assert_trained_as_by_a_plain_trainer(runs, name, plain_trainer):
    """The run's side weights and losses (tests/deepspeed_train.py's and tests/fsdp_trainer_train.py's runs) are the
    plain Trainer's, the backbone is untouched, only the side network (and a classification head) trained, and the
    adapter save_model wrote loads to the trained weights and logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.deepspeed_train import STEPS, load_base_model

    out, by_name = runs
    run, directory = by_name[name], out / name
    errors = sorted(glob.glob(str(directory / "error-rank*.txt")))
    assert not errors, open(errors[0]).read()
    model, initial, losses = plain_trainer(run)
    report = json.load(open(directory / "report.json"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert report["trainable"] == trainable
    assert report["optimizer"] == run.get("expected_optimizer", "AdamW")
    assert all(".qst_side." in n or (run.get("task") == "SEQ_CLS" and ".score." in n) for n in trainable), trainable
    # the resumed runs log the steps after the checkpoint only
    torch.testing.assert_close(report["losses"], losses[STEPS - len(report["losses"]):], atol=1e-5, rtol=1e-5)
    if "resume" in run:
        assert len(report["losses"]) == STEPS - 2

    weights, trained = load_file(directory / "weights.safetensors"), dict(model.named_parameters())
    assert weights.keys() == trained.keys()
    assert all(not torch.equal(trained[n].detach(), initial[n]) for n in trainable if "upsample" in n)  # it trained
    for n in trained:
        if n in trainable:
            torch.testing.assert_close(weights[n], trained[n].detach(), atol=1e-5, rtol=1e-4, msg=n)
        else:
            # the backbone stays as it was, bit for bit (4-bit weights stored as floats may hold NaN patterns)
            assert weights[n].dtype == initial[n].dtype, n
            assert torch.equal(weights[n].view(torch.uint8), initial[n].contiguous().view(torch.uint8)), n
    if "resume" in run:  # and continues to the straight run's weights
        straight = load_file(out / run["resume"] / "weights.safetensors")
        for n in trainable:
            torch.testing.assert_close(weights[n], straight[n], msg=n)

    if not run.get("save", True):
        return
    loaded = PeftModel.from_pretrained(load_base_model(str(out / "base"), run), str(directory / "adapter")).eval()
    for n, p in loaded.named_parameters():
        if n in trainable:
            assert torch.equal(p, weights[n]), n
    with torch.no_grad():
        logits = loaded(input_ids=TRAINER_RUN_IDS).logits
        torch.testing.assert_close(logits, model(input_ids=TRAINER_RUN_IDS).logits, atol=1e-5, rtol=1e-5)
