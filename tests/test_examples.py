"""The examples users copy run end to end (shortened), as real processes on the real 4-bit SmolLM2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO, load_script


def run_example(*args: str, timeout: int = 900) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.smollm2
def test_quickstart_then_generate(tmp_path):
    out = run_example("examples/quickstart.py", "--steps", "12", "--output-dir", str(tmp_path / "adapter"))
    assert "trainable params: 798,544 || all params: 135,313,552 || trainable%: 0.5901" in out
    assert "before training (held-out prompt)" in out and "after training (same held-out prompt)" in out
    assert "training: 100%" in out  # tqdm's progress bar reached the end
    assert "reloaded adapter answers the same: yes" in out
    assert f"QST adapter saved to {tmp_path / 'adapter'}" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    answer = run_example("examples/generate.py", "--adapter", str(tmp_path / "adapter"), "--prompt",
                         "Classify the sentiment of this review: \"The soup was superb.\"", "--max-new-tokens", "8")
    assert answer.strip()


@pytest.mark.smollm2
def test_classify(tmp_path):
    out = run_example("examples/classify.py", "--max-steps", "4", "--eval-size", "32",
                      "--output-dir", str(tmp_path / "classifier"))
    assert "trainable params: 799,696 || all params: 135,315,856 || trainable%: 0.5910" in out
    assert "modules_to_save: ['classifier', 'score']" in out
    assert "held-out accuracy before training:" in out and "held-out accuracy after training:" in out
    assert "reloaded adapter gives the same logits: yes" in out
    assert (tmp_path / "classifier" / "adapter_model.safetensors").is_file()


def test_generate_uses_the_base_model_it_is_given(tmp_path, monkeypatch, tiny_model_dir):
    """examples/generate.py --base: used as given (a typo fails instead of silently loading another model); without
    it, the adapter's recorded base model where that folder exists."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_qst import QSTConfig

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4)) \
        .save_pretrained(tmp_path / "adapter")
    example = load_script("examples/generate.py", "generate_example")
    asked = []

    class Stop(Exception):
        pass

    def from_pretrained(path, *args, **kwargs):
        asked.append(path)
        raise Stop

    monkeypatch.setattr(example.AutoTokenizer, "from_pretrained", from_pretrained)
    for base, expected in [("some-org/another-model", "some-org/another-model"), (None, tiny_model_dir)]:
        with pytest.raises(Stop):
            example.load(str(tmp_path / "adapter"), base)
        assert asked[-1] == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["examples/quickstart.py", "--steps", "-3"], "--steps and --batch-size must be at least 1"),
        (["examples/quickstart.py", "--output-dir", "/proc/no-such-dir/adapter"], "cannot write to --output-dir"),
        (["examples/sft_trl.py", "--max-steps", "0"], "--max-steps must be at least 1"),
        (["examples/classify.py", "--batch-size", "0"], "must be at least 1"),
        (["examples/generate.py", "--adapter", "/no/such/adapter"], "no adapter at --adapter /no/such/adapter"),
        (["examples/generate.py", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["integration/quality/harness.py", "qst:foo=1"], "qst takes no option 'foo'"),
        (["integration/bench_generate.py", "--repeats", "0"], "must be at least 1"),
        (["integration/bench_train.py", "--output", "/proc/no-such-dir/out.json"], "cannot write --output"),
        (["integration/arch_sweep.py", "nosuchtype"], "unknown model types"),
        (["examples/generate.py", "--no-adapter", "--base", "/proc/self"], "--base /proc/self holds no config.json"),
        (["integration/bench_train.py", "--methods", "qst", "qst:side_head=1"], "unexpected keyword argument"),
        (["integration/quality/harness.py", "qst", "qst:time_s=match"], "an earlier qlora spec"),
        (["integration/quality/harness.py", "qlora", "qst:downsample=conv"], "QSTConfig.downsample='conv'"),
        (["integration/real_shapes.py", "Llama-9"], "unknown models ['Llama-9']"),
    ],
    ids=["quickstart-steps", "quickstart-output", "sft-steps", "classify-batch", "generate-adapter",
         "generate-tokens", "harness-spec", "bench-generate-repeats", "bench-train-output", "sweep-type",
         "generate-base", "bench-train-qst-field", "harness-match", "harness-qst-value", "real-shapes-name"],
)
def test_bad_arguments_are_refused_before_any_work(args, message):
    """A usage error (exit status 2, one line naming the argument) before the model loads, not a traceback after
    minutes of training."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
