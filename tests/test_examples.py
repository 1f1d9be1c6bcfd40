"""The examples users copy run end to end (shortened), as real processes on the real 4-bit SmolLM2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_qst import recommended_compute_dtype

from .conftest import REPO, load_script, run_command, run_example, run_scripts


def runs_in_the_setups_venv() -> bool:
    """Whether the tests run in .venv's Python, the one scripts/setup.sh makes and scripts/main.sh runs."""
    return Path(sys.executable).resolve() == (Path(REPO) / ".venv" / "bin" / "python").resolve()


@pytest.mark.smollm2
def test_quickstart_then_generate(tmp_path):
    """The README's main command, ``bash scripts/main.sh``: the set-up (nothing to do where it already ran for this
    pyproject.toml and setup.sh, as under scripts/test.sh), then the quickstart in .venv's Python with the arguments
    given passed on to it (where the tests run in another Python, the quickstart itself, in this one). Then
    ``examples/generate.py`` on the adapter it saved."""
    command = ["bash", "scripts/main.sh"] if runs_in_the_setups_venv() else [sys.executable, "examples/quickstart.py"]
    out = run_command([*command, "--steps", "12", "--output-dir", str(tmp_path / "adapter")])
    assert "trainable params: 798,544 || all params: 135,313,552 || trainable%: 0.5901" in out
    assert "before training (held-out prompt)" in out and "after training (same held-out prompt)" in out
    assert "training: 100%" in out  # tqdm's progress bar reached the end
    # --dtype auto: float32 on CPUs that would emulate bfloat16 (several times slower there), bfloat16 elsewhere
    assert f"compute dtype: {str(recommended_compute_dtype()).removeprefix('torch.')} (--dtype auto" in out
    assert "reloaded adapter answers the same: yes" in out
    assert f"QST adapter saved to {tmp_path / 'adapter'}" in out
    # the loading snippet it prints for the user names the folder it saved to
    assert f"model = PeftModel.from_pretrained(base_model, {str(tmp_path / 'adapter')!r})" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # what the run shows is what happened: the loss its log prints falls (the optimizer stepped), the "before" answer
    # is the untrained model's free text and the "after" answer, on the same held-out prompt, is in the trained format
    losses = [float(value) for value in re.findall(r"^step +\d+/12  loss (\d+\.\d+)$", out, flags=re.M)]
    assert len(losses) >= 2 and losses[-1] < losses[0] / 2, losses
    blocks = re.findall(r"^--- (before|after) training.*---\nuser: +(.*)\nassistant: (.*)$", out, flags=re.M)
    shown = {when: (prompt, reply) for when, prompt, reply in blocks}
    (prompt, before), (same_prompt, after) = shown["before"], shown["after"]
    assert prompt == same_prompt
    assert not before.startswith("Sentiment:") and re.fullmatch(r"Sentiment: (positive|negative|mixed)", after), (
        before, after)

    # generate.py with the saved adapter answers that prompt as the trained model did (greedy, same tokens), and with
    # --no-adapter as the model did before training (an untrained QST adapter starts at the base model); both command
    # lines in one fresh process
    runs = [([], after), (["--no-adapter"], before)]
    results = run_scripts([["examples/generate.py", "--adapter", str(tmp_path / "adapter"), "--prompt", prompt,
                            "--max-new-tokens", "32", *flags] for flags, _ in runs])
    for (flags, expected), result in zip(runs, results):
        assert result["code"] == 0, result["stderr"][-4000:]
        assert result["stdout"].strip() == expected, flags


def is_4bit(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def scramble_side_network(model) -> None:
    """Overwrite the loaded QST parameters (side network, gates, ...) with noise: a reload gone wrong."""
    with torch.no_grad():
        scrambled = [param.normal_(std=1.0) for name, param in model.named_parameters() if "qst_" in name]
    assert scrambled, "no QST parameters found"


@pytest.mark.smollm2
def test_quickstart_trains_in_4bit_and_notices_a_reload_that_answers_differently(tmp_path, monkeypatch):
    """The quickstart's last check ("reloaded adapter answers the same") compares the adapter loaded back from disk
    with the trained model: a reload that does not reproduce it (its side network scrambled here, after a real
    ``PeftModel.from_pretrained``) fails the run, instead of printing "yes" about a comparison of nothing. And the
    model it trains and the one it reloads onto are the 4-bit ones the script is about (the printed parameter count is
    the same for a float model), and its accuracies are measured on the held-out reviews."""
    example = load_script("examples/quickstart.py", "quickstart_example")
    get_peft_model, from_pretrained = example.get_peft_model, example.PeftModel.from_pretrained
    bases = []

    def wrap(model, *args, **kwargs):
        bases.append(model)
        return get_peft_model(model, *args, **kwargs)

    def reload_gone_wrong(base, folder, *args, **kwargs):
        bases.append(base)
        model = from_pretrained(base, folder, *args, **kwargs)
        scramble_side_network(model)
        return model

    make_dataset, accuracy = example.make_dataset, example.accuracy
    scored = []

    def recorded_accuracy(model, tokenizer, pairs):
        scored.append(pairs)
        return accuracy(model, tokenizer, pairs)

    monkeypatch.setattr(example, "make_dataset", lambda seed: make_dataset(seed, n_train=64, n_eval=4))  # shorter
    monkeypatch.setattr(example, "accuracy", recorded_accuracy)
    monkeypatch.setattr(example, "get_peft_model", wrap)
    monkeypatch.setattr(example.PeftModel, "from_pretrained", reload_gone_wrong)
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--steps", "1", "--output-dir", str(tmp_path / "adapter")])
    with pytest.raises(SystemExit, match="the reloaded adapter does not reproduce"):
        example.main()
    assert len(bases) == 2 and all(is_4bit(base) for base in bases)
    # in the dtype recommended for this machine: the unquantized layers and bitsandbytes' compute dtype
    dtype = recommended_compute_dtype()
    assert all(base.get_input_embeddings().weight.dtype == dtype for base in bases)
    assert all(base.config.quantization_config.bnb_4bit_compute_dtype == dtype for base in bases)
    # the accuracy it prints, before and after training, is the held-out set's
    assert scored == [make_dataset(42, n_train=64, n_eval=4)[1]] * 2


@pytest.mark.smollm2
def test_classify(tmp_path):
    out = run_example("examples/classify.py", "--max-steps", "4", "--eval-size", "32",
                      "--output-dir", str(tmp_path / "classifier"))
    assert "trainable params: 799,696 || all params: 135,315,856 || trainable%: 0.5910" in out
    assert "modules_to_save: ['classifier', 'score']" in out
    assert "held-out accuracy before training:" in out and "held-out accuracy after training:" in out
    assert "reloaded adapter gives the same logits: yes" in out
    assert (tmp_path / "classifier" / "adapter_model.safetensors").is_file()


@pytest.mark.smollm2
def test_classify_trains_in_4bit_and_notices_a_reload_that_gives_other_logits(tmp_path, monkeypatch):
    """As for the quickstart: classify.py's "reloaded adapter gives the same logits" compares the classifier loaded
    back from disk with the trained one, so a reload that does not reproduce it fails the run; both are 4-bit, and
    the evaluation set is the held-out one."""
    example = load_script("examples/classify.py", "classify_example")
    get_peft_model = example.get_peft_model
    from_pretrained = example.AutoPeftModelForSequenceClassification.from_pretrained
    models = []

    def wrap(model, *args, **kwargs):
        models.append(model)
        return get_peft_model(model, *args, **kwargs)

    def reload_gone_wrong(folder, *args, **kwargs):
        model = from_pretrained(folder, *args, **kwargs)
        models.append(model)
        scramble_side_network(model)
        return model

    datasets = {}

    class Trainer(example.Trainer):
        def __init__(self, *args, **kwargs):
            datasets.update(train=kwargs["train_dataset"], eval=kwargs["eval_dataset"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(example, "Trainer", Trainer)
    monkeypatch.setattr(example, "get_peft_model", wrap)
    monkeypatch.setattr(example.AutoPeftModelForSequenceClassification, "from_pretrained", reload_gone_wrong)
    monkeypatch.setattr(sys, "argv", ["classify.py", "--max-steps", "1", "--batch-size", "2", "--eval-size", "4",
                                      "--output-dir", str(tmp_path / "classifier")])
    with pytest.raises(SystemExit, match="the reloaded adapter does not reproduce"):
        example.main()
    assert len(models) == 2 and all(is_4bit(model) for model in models)
    # the accuracies it prints are the held-out sentences' (other topics and adjectives), none of them trained on
    train = {tuple(ids) for ids in datasets["train"]["input_ids"]}
    held_out = [tuple(ids) for ids in datasets["eval"]["input_ids"]]
    assert len(held_out) == 4 and not train & set(held_out)


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


BAD_ARGUMENTS = [
    (["examples/quickstart.py", "--steps", "-3"], "--steps and --batch-size must be at least 1"),
    (["examples/quickstart.py", "--output-dir", "/proc/no-such-dir/adapter"], "cannot write to --output-dir"),
    (["examples/sft_trl.py", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["examples/sft_trl.py", "--eval-size", "0"], "--eval-size must be at least 1, got 0"),
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
    (["examples/generate.py", "--no-adapter", "--prompt", " "], "--prompt is empty"),
    (["integration/quality/harness.py", "--steps", "0", "qst"], "--steps and --max-steps must be at least 1"),
    (["integration/quality/harness.py", "--eval-size", "0", "base"], "--eval-size and --eval-batch-size must"),
    (["integration/quality/harness.py", "--model", "/proc/self", "base"], "--model /proc/self is not a model"),
    (["examples/quickstart.py", "--lr=-1e-3"], "--lr must be above 0, got -0.001"),
    (["examples/classify.py", "--lr", "0"], "--lr must be above 0, got 0.0"),
    (["integration/quality/harness.py", "--output", "pyproject.toml", "qst"],
     "--output pyproject.toml already exists: pass --overwrite-output to replace it"),
    (["integration/bench_trl_dtype.py", "--output", "integration"], "--output integration is a folder"),
    (["integration/bench_train.py", "--methods", "qst", "dora"],
     "unknown method 'dora' in 'dora'; choose from qst, qlora, lora, floor"),
    (["integration/bench_train.py", "--methods", "floor:mode=inference"],
     "bad mode='inference' in 'floor:mode=inference': use mode=train or mode=eval"),
    (["integration/bench_trl_dtype.py", "--steps", "1"], "--steps must be at least 2"),
]
BAD_ARGUMENT_IDS = ["quickstart-steps", "quickstart-output", "sft-steps", "sft-eval-size", "classify-batch",
                    "generate-adapter", "generate-tokens", "harness-spec", "bench-generate-repeats",
                    "bench-train-output", "sweep-type", "generate-base", "bench-train-qst-field", "harness-match",
                    "harness-qst-value", "real-shapes-name", "generate-empty-prompt", "harness-steps",
                    "harness-eval-size", "harness-model", "quickstart-lr", "classify-lr", "harness-existing-output",
                    "bench-trl-output-folder", "bench-train-method", "bench-train-floor-mode", "bench-trl-steps"]


@pytest.fixture(scope="module")
def refusals():
    """Exit status and stderr of every command line in ``BAD_ARGUMENTS``, run in one fresh process."""
    command_lines = [args for args, _ in BAD_ARGUMENTS]
    return dict(zip(map(tuple, command_lines), run_scripts(command_lines)))


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS, ids=BAD_ARGUMENT_IDS)
def test_bad_arguments_are_refused_before_any_work(args, message, refusals):
    """A usage error (exit status 2, one line naming the argument) before the model loads, not a traceback after
    minutes of training."""
    result = refusals[tuple(args)]
    assert result["code"] == 2, result["stderr"][-2000:]
    assert message in result["stderr"] and "Traceback" not in result["stderr"]


@pytest.mark.parametrize("script", ["examples/quickstart.py", "examples/classify.py", "examples/sft_trl.py"])
def test_an_output_dir_that_holds_files_is_refused_unless_overwriting(script, tmp_path, monkeypatch, capsys):
    """save_pretrained replaces an adapter already in --output-dir and rewrites a README.md there into a model card:
    a folder that holds files (another adapter here, and the user's notes) is refused before the model loads, with
    the flag that allows it, and nothing in it changes. With --overwrite-output-dir it is accepted."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "README.md").write_text("# my notes\n")
    example = load_script(script, "output_dir_" + Path(script).stem)
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, before the model loads
        example.parse_args(["--output-dir", str(folder)])
    stderr = capsys.readouterr().err
    assert refused.value.code == 2, stderr
    assert f"--output-dir {folder} already holds files (README.md, adapter_config.json)" in stderr
    assert "--overwrite-output-dir" in stderr
    assert (folder / "adapter_config.json").read_text() == '{"peft_type": "LORA"}'
    assert (folder / "README.md").read_text() == "# my notes\n"

    args = example.parse_args(["--output-dir", str(folder), "--overwrite-output-dir"])
    assert args.output_dir == str(folder)
    (tmp_path / "empty").mkdir()  # an empty folder, or a new one, needs no flag
    assert example.parse_args(["--output-dir", str(tmp_path / "empty")]).output_dir == str(tmp_path / "empty")
    # the script's default folder is its own output: a rerun (the README's `bash scripts/main.sh` again) replaces it
    default = {"examples/quickstart.py": "outputs/qst-smollm2-quickstart",
               "examples/classify.py": "outputs/qst-smollm2-classify", "examples/sft_trl.py": "outputs/sft-trl-qst"}
    monkeypatch.chdir(tmp_path)
    os.makedirs(default[script])
    (tmp_path / default[script] / "adapter_config.json").write_text("{}")
    assert example.parse_args([]).output_dir == default[script]


def test_quality_harness_exits_nonzero_when_a_method_fails(tmp_path):
    """A method whose child process fails (a --model folder whose config.json is no model's) is a failed row in the
    table and a non-zero exit status naming it, not exit status 0 as if the comparison had run."""
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "integration/quality/harness.py", "--model", str(tmp_path), "base",
                             "--train-size", "8", "--eval-size", "2"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "| base | base | failed: child exited with 1 |" in result.stdout
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: 1 of 1 methods failed: base" in result.stderr


@pytest.mark.parametrize("script", ["examples/quickstart.py", "examples/classify.py", "examples/generate.py"])
def test_dtype_help_names_every_dtype_auto_picks(script, capsys):
    """--dtype auto is peft_qst.recommended_compute_dtype(), which is float16 on GPUs before Ampere (a T4, a V100);
    the help said "bfloat16 on GPUs"."""
    example = load_script(script, "dtype_help_" + Path(script).stem)
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bfloat16 on GPUs since Ampere" in text and "float16 on older GPUs" in text
    assert "float32 on other CPUs" in text
