"""The training benchmark (integration/bench_train.py) runs every method end to end on a tiny setting.

No timing is asserted (the machine is shared); the test checks that each method ran in its own processes on the real
4-bit model, trained what it should, and produced finite step times and memory figures in the table and the JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO, load_script, tiny_causal_lm


@pytest.mark.smollm2
def test_bench_train_all_methods_tiny(tmp_path):
    output = tmp_path / "bench.json"
    completed = subprocess.run(
        # a 2-layer model of SmolLM2's shape keeps the child processes quick; "lora" (QLoRA's adapter without
        # prepare_model_for_kbit_training and checkpointing) is left out, as each method costs two processes (with it
        # the test took 150 s on 2 cores, without it 97-108 s): its child runs in test_measurement_tools.py's
        # test_bench_train_times_the_measured_steps_only
        [sys.executable, "integration/bench_train.py", "--methods", "qst", "qlora", "floor", "--steps", "2",
         "--warmup", "1", "--seq", "16", "--batch", "2", "--layers", "2", "--threads", "1", "--paired", "--output",
         str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())

    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["qst", "qlora", "floor"]
    for row in rows.values():
        for key in ("step_s", "step_cpu_s", "tokens_per_s", "peak_rss_mb", "load_rss_mb", "step_peak_rss_mb",
                    "first_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key, row[key])
        assert row["peak_rss_mb"] >= row["load_rss_mb"]
        assert math.isfinite(row["step_increment_mb"])
    # each method ran in its own process, on the same batches of the same model: the untrained adapters (QST's
    # upsample and LoRA's B start at zero) give the base model's first loss
    pids = {run["pid"] for run in result["runs"]} | {run["memory_child"]["pid"] for run in result["runs"]}
    assert len(pids) == 2 * len(result["runs"]) == 6
    # step times from children with glibc's default allocator, memory from children with the forced mmap threshold
    for run in result["runs"]:
        assert run["malloc_mmap_threshold"] is None and run["memory_child"]["malloc_mmap_threshold"] == "131072"
    first_losses = [row["first_loss"] for row in rows.values()]
    assert max(first_losses) - min(first_losses) < 0.05 * first_losses[0], first_losses
    # what is trained: nothing for the floor, QST's side network, LoRA r=64 on all linear layers
    assert rows["floor"]["trainable_params"] == 0
    assert rows["qst"]["trainable_params"] > 0
    assert rows["qlora"]["trainable_params"] > 10 * rows["qst"]["trainable_params"]
    # the floor runs in training mode, the bitsandbytes kernels QST's backbone runs (not the repacked eval-mode ones)
    assert all(run["model_training_mode"] for run in result["runs"])
    for run in result["runs"]:  # warm-up + measured steps, each with a finite loss
        assert len(run["step_times_s"]) == 2 and len(run["losses"]) == 3 and len(run["warmup_times_s"]) == 1
        assert all(math.isfinite(loss) for loss in run["losses"])

    assert set(result["ratios"]) >= {"qlora_over_qst_step_time", "qlora_over_qst_peak_memory",
                                     "qst_over_floor_step_time", "qst_over_floor_peak_memory"}
    assert all(value is None or math.isfinite(value) for value in result["ratios"].values())
    for label in ("QST (default config)", "QLoRA", "floor: no-grad forward", "torch threads [1]"):
        assert label in completed.stdout
    assert "| method | step (s) | step CPU time (s) | tokens/s | peak RSS (MB) |" in completed.stdout
    assert result["model"]["num_hidden_layers"] == 2
    # the paired child: every method in one process, each timed on the same measured batches
    paired = result["paired"]
    assert paired["pid"] not in pids
    assert set(paired["step_s"]) == {"qst", "qlora", "floor"}
    assert all(len(times) == 2 for times in paired["step_times_s"].values())
    assert all(math.isfinite(value) and value > 0 for value in paired["ratios"].values())
    assert set(paired["ratios"]) == {"qlora_over_qst_step_time", "qst_over_floor_step_time",
                                     "qst_over_fastest_floor_step_time"}
    assert "paired qst over floor step time" in completed.stdout


def test_bench_train_qst_options_compile_and_checkpoint_the_wrapped_model():
    """``qst:compile=true`` compiles the wrapped model (``model.compile()``, what ``torch_compile=True`` does) and
    ``qst:gc=true`` turns on gradient checkpointing; neither is passed to QSTConfig, and without them neither is on."""
    sys.path.insert(0, os.path.join(REPO, "integration"))
    bench = load_script("integration/bench_train.py", "bench_train_for_options")
    compiled = bench.wrap(tiny_causal_lm(), *bench.parse_method("qst:compile=true,gc=true,r=4"))
    plain = bench.wrap(tiny_causal_lm(), *bench.parse_method("qst:r=4"))
    assert compiled._compiled_call_impl is not None and plain._compiled_call_impl is None
    assert compiled.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert compiled.peft_config["default"].r == plain.peft_config["default"].r == 4


def test_bench_train_dtype_option_loads_the_4bit_model_computing_in_it(tiny_model_dir):
    """``METHOD:dtype=float32`` (what peft_qst.recommended_compute_dtype() picks on CPUs without AVX512-BF16) loads the
    4-bit model with that compute dtype and unquantized layers, is not passed to QSTConfig, and each such spec is
    compared with its bfloat16 twin where both ran."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "integration"))
    bench = load_script("integration/bench_train.py", "bench_train_for_dtype")
    assert bench.parse_method("qlora:dtype=float32") == ("qlora", {"dtype": "float32"})
    with pytest.raises(SystemExit, match="bad dtype='fp8'.*bfloat16, float32, float16"):
        bench.parse_method("qst:dtype=fp8")
    with pytest.raises(SystemExit, match="qlora takes only dtype="):
        bench.parse_method("qlora:r=8")
    model = bench.load_4bit(tiny_model_dir, "cpu", "float32")
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    wrapped = bench.wrap(model, *bench.parse_method("qst:dtype=float32,r=4"))
    assert {p.dtype for p in wrapped.parameters() if p.requires_grad} == {torch.float32}
    assert bench.load_4bit(tiny_model_dir, "cpu").get_input_embeddings().weight.dtype == torch.bfloat16
    step_s = {"qst": 2.0, "qst:dtype=float32": 0.5, "qlora": 3.0, "floor:loss=chunked,dtype=float32": 1.0}
    assert bench.dtype_ratios(step_s) == {"qst bfloat16 over float32 step time": 4.0}  # the floor has no twin


def test_bench_train_eval_first_runs_one_eval_forward_then_trains(monkeypatch):
    """``qst:eval_first=true`` (not a QSTConfig field) runs one no-grad eval-mode forward before training, as
    ``Trainer.evaluate`` or a generation before training do, and hands the model back in training mode."""
    import argparse

    import torch

    sys.path.insert(0, os.path.join(REPO, "integration"))
    bench = load_script("integration/bench_train.py", "bench_train_for_eval_first")
    monkeypatch.setattr(bench, "load_4bit", lambda path, device, dtype: tiny_causal_lm())
    args = argparse.Namespace(model_path=None, device="cpu")
    for spec, expected in (("qst:eval_first=true,r=4", [(False, False)]), ("qst:r=4", [])):
        calls = []
        wrap = bench.wrap

        def recording_wrap(model, method, options):
            wrapped = wrap(model, method, options)
            wrapped.register_forward_pre_hook(lambda module, inputs: calls.append((module.training,
                                                                                   torch.is_grad_enabled())))
            return wrapped

        monkeypatch.setattr(bench, "wrap", recording_wrap)
        model, optimizer = bench.build_method(spec, args)
        monkeypatch.setattr(bench, "wrap", wrap)
        assert calls == expected and model.training and optimizer is not None
        assert model.peft_config["default"].r == 4


@pytest.mark.smollm2
def test_bench_trl_dtype_runs_each_setting_as_configured(tmp_path):
    """integration/bench_trl_dtype.py: each setting in its own process loads the 4-bit model in its dtype and trains
    with SFTConfig's bf16 as the setting says (no timing is asserted). Run here: the float32 setting (the other two
    differ in the dtype and the bf16 flag only, and their bfloat16 steps take several times longer on CPUs without
    AVX512-BF16); the settings table is checked whole."""
    sys.path.insert(0, os.path.join(REPO, "integration"))
    bench = load_script("integration/bench_trl_dtype.py", "bench_trl_dtype_settings")
    assert bench.SETTINGS == {"bfloat16": ("bfloat16", True), "float32-autocast": ("float32", True),
                              "float32": ("float32", False)}
    output = tmp_path / "trl.json"
    completed = subprocess.run(
        [sys.executable, "integration/bench_trl_dtype.py", "--settings", "float32", "--steps", "2",
         "--output", str(output)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (run,) = json.loads(output.read_text())["runs"]
    assert (run["setting"], run["model_dtype"], run["compute_dtype"], run["bf16_mixed_precision"]) == (
        "float32", "float32", "float32", False)
    assert len(run["step_times_s"]) == 2 and all(math.isfinite(loss) for loss in run["losses"])
    assert run["trainable_dtypes"] == ["bfloat16"]  # SFTTrainer's cast of a 4-bit model's trainable parameters
    assert "| float32 | float32 / float32 | False | bfloat16 |" in completed.stdout
    assert "1.00x" in completed.stdout  # float32 over itself: the reference row


def test_bench_train_ratios_compare_specs_of_one_dtype():
    """The targets' ratios (QLoRA/QST, QST/floor) set specs of one dtype against each other: with a bfloat16 ``qst``
    first and the other methods only in float32, "qlora over qst" was float32 QLoRA over bfloat16 QST (0.50x for a
    QLoRA 2.5x slower than QST). And a bfloat16 twin spelt ``dtype=bfloat16`` is the bfloat16 twin."""
    import argparse

    sys.path.insert(0, os.path.join(REPO, "integration"))
    bench = load_script("integration/bench_train.py", "bench_train_for_dtype_ratios")
    step_s = {"qst": 20.0, "qst:dtype=float32": 4.0, "qlora:dtype=float32": 10.0, "floor:dtype=float32": 2.0}
    assert bench.step_time_ratios(step_s) == {}  # no bfloat16 QLoRA or floor beside the bfloat16 QST
    assert bench.step_time_ratios({"qst:dtype=float32": 4.0, "qst": 20.0, "qlora:dtype=float32": 10.0,
                                   "floor": 15.0, "floor:dtype=float32": 2.0}) == {
        "qlora_over_qst_step_time": 2.5, "qst_over_floor_step_time": 2.0, "qst_over_fastest_floor_step_time": 2.0}
    rows = [dict(spec=spec, method=bench.parse_method(spec)[0], step_s=seconds, step_cpu_s=seconds, peak_rss_mb=100.0,
                 step_increment_mb=10.0) for spec, seconds in step_s.items()]
    assert bench.ratios(rows, argparse.Namespace(device="cpu")) == {"qst bfloat16 over float32 step time": 5.0}
    assert bench.dtype_ratios({"qst:dtype=bfloat16": 2.0, "qst:dtype=float32": 0.5}) == {
        "qst:dtype=bfloat16 bfloat16 over float32 step time": 4.0}
