"""The quality harness itself: its tasks are deterministic, checkable and split cleanly; a tiny run works end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peft_qst import recommended_compute_dtype

from .conftest import REPO, load_script


def load_tasks():
    return load_script("integration/quality/tasks.py", "quality_tasks", register=True)


def test_splits_are_deterministic_balanced_and_disjoint():
    tasks = load_tasks()
    train, held_out = tasks.make_splits(600, 120, seed=3)
    again_train, again_held_out = tasks.make_splits(600, 120, seed=3)
    assert train == again_train and held_out == again_held_out
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    families = {e.family for e in held_out}
    assert families == set(tasks.FAMILIES)
    assert len({e.prompt for e in train}) == len(train)


def test_answers_are_right():
    import random

    tasks = load_tasks()
    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = tasks.task_arith(rng)
        expression = prompt.split("Compute ", 1)[1].rstrip(".")
        assert str(eval(expression, {"__builtins__": {}})) == answer  # noqa: S307 (digits and operators only)
        prompt, answer = tasks.task_sort(rng)
        numbers = [int(x) for x in prompt.rsplit(":", 1)[1].split(",")]
        assert answer == ", ".join(str(n) for n in sorted(numbers, reverse="descending" in prompt))


@pytest.mark.smollm2
def test_harness_runs_one_method_end_to_end(tmp_path):
    # in the dtype this machine computes fastest (--dtype float32 on CPUs without AVX512-BF16, where a bfloat16 run of
    # this test took 206 s against 62 s; the default bfloat16 elsewhere)
    dtype = str(recommended_compute_dtype("cpu")).removeprefix("torch.")
    result_file = tmp_path / "qst.json"
    completed = subprocess.run(
        [sys.executable, "integration/quality/harness.py", "--run-one", "qst:lr=3e-3", "--steps", "3",
         "--train-size", "48", "--eval-size", "12", "--result-file", str(result_file), "--dtype", dtype],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["method"] == "qst" and result["steps"] == 3
    assert result["compute_dtype"] == dtype  # read back from the loaded model's quantization config
    assert result["trainable_params"] == 798544
    assert 0.0 <= result["exact_match"] <= 1.0 and result["eval_loss"] > 0


def load_harness():
    sys.path.insert(0, f"{REPO}/integration/quality")
    try:
        module = load_script("integration/quality/harness.py", "quality_harness")
    finally:
        sys.path.remove(f"{REPO}/integration/quality")
    return module


def test_harness_settings_are_checked_and_reported():
    harness = load_harness()
    # a train pool smaller than one batch would leave the batch stream empty forever
    with pytest.raises(SystemExit):
        harness.parse_args(["qst", "--train-size", "4", "--batch-size", "8"])
    # decaying schedules: full rate right after warm-up, a last step that still learns
    for schedule in ("linear", "cosine"):
        assert harness.lr_factor(10, 10, schedule, 150) == 1.0
        assert 0.0 < harness.lr_factor(149, 10, schedule, 150) < 0.01
    # the table reports the thread count the children were given, not the parent's
    assert harness.environment(1)["torch_threads"] == 1


def test_a_qst_spec_can_train_the_lm_head_too(tiny_model_dir):
    """``modules_to_save=lm_head`` (names joined by "+", as a comma separates options) reaches QSTConfig as a list:
    the LM head's copy trains beside the side network, and the table's config records it."""
    from transformers import AutoModelForCausalLM

    harness = load_harness()
    method, options = harness.parse_spec("qst:modules_to_save=lm_head,r=4")
    assert options["modules_to_save"] == ["lm_head"]
    assert harness.parse_spec("qst:modules_to_save=lm_head+score")[1]["modules_to_save"] == ["lm_head", "score"]
    harness.check_specs(["qst:modules_to_save=lm_head"])
    model, described = harness.wrap_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), method, options)
    assert described["modules_to_save"] == ["lm_head"]
    table_config = harness.describe_config({"method": "qst", "adapter_config": described, "lr": 1e-3})
    assert table_config == "r=4 adapter/16, modules_to_save=lm_head, lr=0.001", table_config
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any("lm_head.modules_to_save" in name for name in trainable), trainable
    assert any("side" in name for name in trainable)
    # without it the head stays frozen
    model, described = harness.wrap_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "qst", {"r": 4})
    assert described["modules_to_save"] is None
    assert not any("lm_head" in name for name, p in model.named_parameters() if p.requires_grad)
