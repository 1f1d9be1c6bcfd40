"""examples/sft_trl.py: the QLoRA script switched to QST in one line, run end to end (shortened) as a real process;
the one-line diff shown in the README is the script's."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from .conftest import REPO, load_script, run_example


def readme_diff_lines() -> list[str]:
    """The +/- lines of the diff block in the README's "Training with TRL" section."""
    with open(os.path.join(REPO, "README.md")) as handle:
        readme = handle.read()
    section = readme.split("## Training with TRL", 1)[1]
    block = re.search(r"```diff\n(.*?)```", section, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line[:1] in "+-"]


def test_readme_diff_is_the_scripts():
    with open(os.path.join(REPO, "examples", "sft_trl.py")) as handle:
        script = [line.strip() for line in handle.read().splitlines()]
    diff = readme_diff_lines()
    removed = [line[1:].strip() for line in diff if line.startswith("-")]
    added = [line[1:].strip() for line in diff if line.startswith("+")]
    assert len(removed) == len(added) == 1
    assert removed[0].startswith("peft_config = LoraConfig(") and added[0].startswith("peft_config = QSTConfig(")
    for line in removed + added:
        assert line in script, line


@pytest.mark.smollm2
def test_sft_trl_example_runs_and_reports(tmp_path):
    # 8 held-out messages, not 32: each of its two evaluations emulates bfloat16 on CPUs without AVX512-BF16
    out = run_example("examples/sft_trl.py", "--max-steps", "2", "--eval-size", "8",
                      "--output-dir", str(tmp_path / "run"))
    assert "trainable params: 798,544 || all params: 135,313,552 || trainable%: 0.5901" in out
    assert "2/2" in out  # the trainer's progress bar
    for line in ("train loss:", "train mean_token_accuracy:", "held-out eval loss:", "held-out token accuracy:"):
        assert re.search(re.escape(line) + r"\s+\d+\.\d{3} .*-> \d+\.\d{3}", out), line
    # "before" is the untrained model's eval, and the one optimizer step with a learning rate above 0 (the first is
    # warm-up) moved the adapter: the held-out loss falls
    before, after = map(float, re.search(r"held-out eval loss: +(\d+\.\d+) before -> (\d+\.\d+) after", out).groups())
    assert after < before, (before, after)
    with open(tmp_path / "run" / "adapter_config.json") as handle:
        assert json.load(handle)["peft_type"] == "QST"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.smollm2
def test_sft_trl_hands_the_trainer_a_4bit_model_qst_and_held_out_eval(tmp_path, monkeypatch):
    """What the script gives ``SFTTrainer``, which the printed summary cannot show: the 4-bit model (a float one prints
    the same parameter count), ``QSTConfig`` without ``--lora`` and ``LoraConfig`` with it, and an eval set of held-out
    phrasings, none of them a training prompt (its "held-out" numbers are about unseen messages)."""
    import bitsandbytes as bnb
    from peft import LoraConfig

    from peft_qst import QSTConfig

    example = load_script("examples/sft_trl.py", "sft_trl_example")
    given = []

    class Stop(Exception):
        pass

    def trainer(**kwargs):
        given.append(kwargs)
        raise Stop

    monkeypatch.setattr(example, "SFTTrainer", trainer)
    for flags, config_class in [([], QSTConfig), (["--lora"], LoraConfig)]:
        monkeypatch.setattr(sys, "argv", ["sft_trl.py", *flags, "--output-dir", str(tmp_path / "run")])
        with pytest.raises(Stop):
            example.main()
        kwargs = given[-1]
        assert type(kwargs["peft_config"]) is config_class
        assert any(isinstance(module, bnb.nn.Linear4bit) for module in kwargs["model"].modules())
        train = {row["prompt"][0]["content"] for row in kwargs["train_dataset"]}
        held_out = [row["prompt"][0]["content"] for row in kwargs["eval_dataset"]]
        assert held_out and not train & set(held_out)
        openings = [template.split("{x}")[0] for template in example.EVAL_TEMPLATES]
        assert all(any(opening in prompt for opening in openings) for prompt in held_out)
