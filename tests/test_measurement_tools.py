"""The measuring instruments behind the published figures, checked piece by piece on tiny models (no long runs).

The quality harness (``integration/quality/``) and the training benchmark (``integration/bench_train.py``) produce
every accuracy, memory and speed figure of README.md and docs/; a slip in them would move the figures silently. These
tests call their functions directly -- the task generators, the data order, the training loop, the eval loss, the
exact-match scoring, the medians and ratios -- on a tiny random Llama with SmolLM2's tokenizer, loaded in 4-bit as the
harness loads SmolLM2, and compare each with an independent computation.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys

import pytest
import torch

from .conftest import REPO, load_script, tiny_causal_lm


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    """(harness, tasks) modules, with integration/quality on the path as when the harness runs as a script."""
    folder = f"{REPO}/integration/quality"
    sys.path.insert(0, folder)
    try:
        tasks = load_script("integration/quality/tasks.py", "tasks", register=True)
        harness = load_script("integration/quality/harness.py", "quality_harness_measured")
    finally:
        sys.path.remove(folder)
    return harness, tasks


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary, saved with SmolLM2's tokenizer (and its chat template)."""
    from transformers import AutoTokenizer

    from peft_qst.smollm2 import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tiny_causal_lm(vocab_size=len(tokenizer), num_hidden_layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def harness_args(harness, **overrides):
    args = harness.parse_args(["qst", "--steps", "4", "--batch-size", "4", "--warmup", "2", "--train-size", "24",
                               "--eval-size", "6", "--eval-batch-size", "4", "--log-every", "100"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------------------------


def test_every_task_family_answers_what_its_prompt_asks(quality):
    """Each family's answer, recomputed from the prompt text alone (arith and sort: test_quality_harness.py)."""
    _, tasks = quality
    rng = random.Random(1)
    formats = {"YYYY-MM-DD": "%Y-%m-%d", "DD/MM/YYYY": "%d/%m/%Y", "MM.DD.YYYY": "%m.%d.%Y",
               "Month D, YYYY": "%B %d, %Y"}
    for _ in range(200):
        prompt, answer = tasks.task_date(rng)
        source, target = prompt.removeprefix("Convert the date ").removesuffix(".").split(" to the format ")
        date = next(datetime.datetime.strptime(source, f) for f in formats.values() if _parses(source, f))
        expected = date.strftime(formats[target])
        if target == "Month D, YYYY":
            expected = f"{date.strftime('%B')} {date.day}, {date.year:04d}"
        assert answer == expected, (prompt, answer)

        prompt, answer = tasks.task_words(rng)
        words = prompt.split(": ", 1)[1].split()
        assert answer.split() == (words[::-1] if "reverse" in prompt else sorted(words)), (prompt, answer)

        prompt, answer = tasks.task_classify(rng)
        n = int(prompt.split()[3])
        threshold = int(prompt.split("below ")[1].split(",")[0])
        assert answer == f"{'odd' if n % 2 else 'even'}-{'large' if n >= threshold else 'small'}", (prompt, answer)

        prompt, answer = tasks.task_extract(rng)
        fact, question = prompt.split(". ", 1)
        name, rest = fact.split(" flew from ")
        origin, rest = rest.split(" to ")
        destination, rest = rest.split(" on ")
        weekday, other = rest.split(" with ")
        expected = {"fly to?": destination, "fly from?": origin, "day did": weekday, "Who flew": other}
        assert [value for key, value in expected.items() if key in question] == [answer], (prompt, answer)
    # the size boundary ("small if the number is below T"): enough draws to hit n == T
    at_threshold = 0
    for _ in range(20000):
        prompt, answer = tasks.task_classify(rng)
        n, threshold = int(prompt.split()[3]), int(prompt.split("below ")[1].split(",")[0])
        assert answer.endswith("-large" if n >= threshold else "-small"), (prompt, answer)
        at_threshold += n == threshold
    assert at_threshold > 0


def _parses(text: str, fmt: str) -> bool:
    try:
        datetime.datetime.strptime(text, fmt)
    except ValueError:
        return False
    return True


def test_eval_set_does_not_depend_on_the_train_pool_and_never_overlaps_it(quality):
    """The held-out set is the same whatever ``--train-size`` (runs of different sizes score the same prompts), and a
    large pool that must reject many draws still shares no prompt with it."""
    _, tasks = quality
    _, held_out = tasks.make_splits(10, 60, seed=5)
    train, held_out_again = tasks.make_splits(3000, 60, seed=5, families=None)
    assert held_out == held_out_again
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    # the families take turns in both splits
    assert [e.family for e in held_out[:6]] == list(tasks.FAMILIES) == [e.family for e in train[:6]]


@pytest.mark.smollm2
def test_encoded_example_masks_the_prompt_and_ends_with_the_end_of_turn(quality, chat_model_dir):
    from transformers import AutoTokenizer

    _, tasks = quality
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    example = tasks.Example("arith", "Compute 37 + 48.", "85")
    encoded = tasks.encode_example(tokenizer, example)
    prompt_ids = tokenizer(tasks.prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
    assert tasks.end_of_turn_token(tokenizer) == "<|im_end|>"
    assert encoded["input_ids"][: encoded["prompt_len"]] == prompt_ids
    assert encoded["labels"][: encoded["prompt_len"]] == [-100] * len(prompt_ids)
    answer = encoded["labels"][encoded["prompt_len"]:]
    assert len(answer) == encoded["answer_len"] and tokenizer.decode(answer) == "85<|im_end|>"
    # training continues the prompt exactly where generation starts: the chat template of the whole conversation
    # begins with the same ids
    full = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt},
                                          {"role": "assistant", "content": example.answer}], tokenize=False)
    assert tokenizer(full, add_special_tokens=False)["input_ids"][: len(encoded["input_ids"])] == encoded["input_ids"]


# ------------------------------------------------------------------------------------------------------------------
# training loop
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_every_method_trains_on_the_same_batches_with_the_same_schedule(quality, chat_model_dir):
    """QLoRA and QST (and LoRA on the top layer) see the same batches in the same order, at the same learning rate
    per step (warm-up, then the schedule), with clipped gradients, and the optimizer holds the trainable parameters
    only."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    harness, tasks = quality
    args = harness_args(harness, schedule="linear", max_grad_norm=1e-3)
    tokenizer, _ = harness.load_base(chat_model_dir)
    args.pad_id = tokenizer.pad_token_id
    train_set, _ = tasks.make_splits(args.train_size, args.eval_size, seed=args.seed)
    encoded = [tasks.encode_example(tokenizer, e) for e in train_set]
    expected_batches = []
    for _, indices in zip(range(args.steps), harness.batch_order(len(encoded), args.batch_size, args.seed)):
        expected_batches.append(harness.collate_right([encoded[i] for i in indices[1]], args.pad_id)["input_ids"])
    # lr 2e-3, 2 warm-up steps (1/2, 2/2 of it), then linear decay over the other 2: full rate, half
    expected_lrs = [1e-3, 2e-3, 2e-3, 1e-3]

    for method, options in (("qlora", {}), ("qst", {"r": 4}), ("topk-lora", {"k": 1})):
        _, model = harness.load_base(chat_model_dir)
        torch.manual_seed(0)
        model, _ = harness.wrap_model(model, method, options)
        seen, steps = [], []
        model.register_forward_pre_hook(lambda module, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)

        def before_step(optimizer, a, kw):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)  # AdamW without decay
            steps.append((optimizer.param_groups[0]["lr"], sum(p.numel() for g in optimizer.param_groups
                                                              for p in g["params"]),
                          float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))))

        handle = register_optimizer_step_pre_hook(before_step)
        try:
            result = harness.train(model, encoded, args, 2e-3, args.warmup, None, lambda message: None)
        finally:
            handle.remove()
        assert result["steps"] == args.steps == len(result["train_losses"]), method
        assert len(seen) == args.steps and all(torch.equal(a, b) for a, b in zip(seen, expected_batches)), method
        assert [lr for lr, _, _ in steps] == pytest.approx(expected_lrs), method
        assert all(n == harness.count_trainable(model) for _, n, _ in steps), method
        assert all(norm <= 1.02e-3 for _, _, norm in steps), (method, steps)  # bf16 side network: rounding
        assert result["median_step_s"] == statistics.median(result["step_times_s"])


@pytest.mark.smollm2
def test_a_time_budget_stops_training_once_it_is_spent(quality, chat_model_dir):
    harness, tasks = quality
    args = harness_args(harness, steps=1000, max_steps=None)
    tokenizer, model = harness.load_base(chat_model_dir)
    args.pad_id = tokenizer.pad_token_id
    train_set, _ = tasks.make_splits(args.train_size, args.eval_size, seed=args.seed)
    encoded = [tasks.encode_example(tokenizer, e) for e in train_set]
    model, _ = harness.wrap_model(model, "qst", {"r": 4})
    result = harness.train(model, encoded, args, 1e-3, 0, 1.0, lambda message: None)
    assert 1 <= result["steps"] < 1000
    # the budget is checked before each step: the last step began inside it
    assert result["train_time_s"] >= 1.0
    assert sum(result["step_times_s"][:-1]) < 1.0
    # a later time_s=match spec gets the first earlier successful QLoRA's training time, match:LABEL that label's
    results = [{"label": "x", "method": "qlora", "error": "child exited with 1"},
               {"label": "q1", "method": "qlora", "train_time_s": 12.5},
               {"label": "q2", "method": "qlora", "train_time_s": 30.0},
               {"label": "s", "method": "qst", "train_time_s": 7.0}]
    assert harness.resolve_time_budget("qst:time_s=match", results) == 12.5
    assert harness.resolve_time_budget("qst:time_s=match:s", results) == 7.0
    assert harness.resolve_time_budget("qst:time_s=40", results) == 40.0


# ------------------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------------------


def test_eval_loss_is_the_cross_entropy_per_answer_token(quality):
    """Against transformers' own causal-LM loss, example by example, weighted by each example's answer tokens:
    prompt tokens and padding do not count, and the batch size does not change the figure."""
    harness, tasks = quality
    model = tiny_causal_lm()
    generator = torch.Generator().manual_seed(0)
    encoded = []
    for prompt_len, answer_len in ((5, 2), (9, 4), (3, 1), (12, 3), (6, 6)):
        ids = torch.randint(3, 128, (prompt_len + answer_len,), generator=generator).tolist()
        encoded.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:], "prompt_len": prompt_len,
                        "answer_len": answer_len})
    total = count = 0
    with torch.no_grad():
        for e in encoded:
            loss = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
            total += float(loss) * e["answer_len"]
            count += e["answer_len"]
    for batch_size in (1, 2, 5):
        args = argparse.Namespace(batch_size=batch_size, pad_id=0)
        assert harness.eval_loss(model, encoded, args) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.smollm2
def test_exact_match_counts_whole_answers_only_and_keeps_each_prediction_with_its_prompt(quality, chat_model_dir):
    """Each prompt's greedy continuation, generated alone (no batching, no padding) and cut at the end-of-turn id,
    is what the batched scorer must compare with that prompt's answer: an answer equal to it scores, a prefix of it
    or one more character does not, whitespace around it does not matter, and the length-sorted batches put every
    prediction back with its own example."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    harness, tasks = quality
    # float32 (not 4-bit with bf16 compute): padding must not tip a greedy choice between the batched and lone runs
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir).eval()
    prompts = ["Compute 1 + 2.", "Sort these numbers in ascending order: 5, 3, 9, 1, 7, 2",
               "Write these words in reverse order: lamp river stone cup cloud table", "Hi",
               "Label the number 37 as <parity>-<size>, where parity is even or odd.", "Compute 99 - 10."]
    placeholder = [tasks.Example("arith", p, "12345") for p in prompts]
    encoded = [tasks.encode_example(tokenizer, e) for e in placeholder]
    max_new = max(e["answer_len"] for e in encoded) + 1
    with torch.no_grad():
        alone = [model.generate(torch.tensor([e["input_ids"][: e["prompt_len"]]]), max_new_tokens=max_new,
                                do_sample=False, pad_token_id=0)[0, e["prompt_len"]:].tolist() for e in encoded]
    # an end-of-turn id the tiny model does emit, so that the cut is exercised: the second token of the first output
    # whose second token differs from its first
    eos_id = next(ids[1] for ids in alone if ids[1] not in ids[:1])
    references = []
    for ids in alone:
        ids = ids[: ids.index(eos_id)] if eos_id in ids else ids
        references.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    assert len(set(references)) > 1  # different prompts, different outputs: a mix-up would show
    answers = [references[0], references[1][:-1], references[2] + "x", f"  {references[3]} ", references[4],
               "nothing like it"]
    expected = [True, False, False, True, True, False]
    eval_set = [tasks.Example(f"f{i}", p, a) for i, (p, a) in enumerate(zip(prompts, answers))]
    args = argparse.Namespace(eval_batch_size=4, pad_id=tokenizer.pad_token_id, samples=1)
    result = harness.exact_match(model, tokenizer, eval_set, encoded, args, eos_id)
    assert result["max_new_tokens"] == max_new
    assert [s["prediction"] for s in result["samples"]] == references
    assert result["per_family"] == {f"f{i}": float(hit) for i, hit in enumerate(expected)}
    assert result["exact_match"] == pytest.approx(sum(expected) / len(expected))


# ------------------------------------------------------------------------------------------------------------------
# the training benchmark
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, f"{REPO}/integration")
    try:
        return load_script("integration/bench_train.py", "bench_train_measured")
    finally:
        sys.path.remove(f"{REPO}/integration")


def _run(spec, step_s, step_cpu_s, peak, increment, round_index):
    return {"spec": spec, "method": spec.partition(":")[0], "trainable_params": 10, "step_s": step_s,
            "step_cpu_s": step_cpu_s, "peak_rss_mb": peak, "load_rss_mb": peak - increment,
            "step_peak_rss_mb": peak, "step_increment_mb": increment, "losses": [5.0 + round_index],
            "loadavg_1m_before": 0.5, "round": round_index}


def test_bench_train_rows_are_medians_over_rounds_and_ratios_divide_the_right_way(bench):
    args = argparse.Namespace(methods=["qst", "qlora", "floor"], batch=4, seq=256, device="cpu")
    figures = {  # per method and round: step s, step CPU s, peak RSS MB, step increment MB
        "qst": [(1.0, 2.0, 500, 50), (1.2, 2.2, 520, 60), (9.0, 9.0, 900, 400)],
        "qlora": [(5.0, 9.0, 800, 300), (6.0, 9.5, 810, 310), (5.5, 9.9, 2000, 900)],
        "floor": [(0.8, 1.5, 450, 20), (0.9, 1.6, 460, 25), (0.85, 1.7, 470, 40)],
    }
    runs = [_run(spec, *figures[spec][r], r) for r in range(3) for spec in args.methods]  # interleaved, as run
    rows = {row["spec"]: row for row in bench.summarise(runs, args)}
    assert rows["qst"]["step_s"] == 1.2 and rows["qst"]["step_cpu_s"] == 2.2
    assert rows["qst"]["peak_rss_mb"] == 520 and rows["qst"]["step_increment_mb"] == 60
    assert rows["qlora"]["peak_rss_mb"] == 810 and rows["floor"]["step_s"] == 0.85
    assert rows["qst"]["tokens_per_s"] == 4 * 256 / 1.2
    assert rows["qst"]["first_loss"] == 5.0 and rows["qst"]["step_s_per_round"] == [1.0, 1.2, 9.0]
    ratio = bench.ratios(list(rows.values()), args)
    assert ratio["qlora_over_qst_step_time"] == pytest.approx(5.5 / 1.2)
    assert ratio["qlora_over_qst_step_cpu_time"] == pytest.approx(9.5 / 2.2)
    assert ratio["qlora_over_qst_peak_memory"] == pytest.approx(810 / 520)
    assert ratio["qlora_over_qst_step_increment"] == pytest.approx(310 / 60)
    assert ratio["qst_over_floor_step_time"] == pytest.approx(1.2 / 0.85)
    assert ratio["qst_over_floor_peak_memory"] == pytest.approx(520 / 460)
    # with two floors, the plain ratio uses the first, the strictest bound the faster one
    paired = bench.step_time_ratios({"qst": 1.2, "floor": 1.0, "floor:loss=chunked": 0.8, "qlora": 6.0})
    assert paired == pytest.approx({"qlora_over_qst_step_time": 5.0, "qst_over_floor_step_time": 1.2,
                                    "qst_over_fastest_floor_step_time": 1.5})


@pytest.mark.smollm2
def test_bench_train_times_the_measured_steps_only(chat_model_dir, tmp_path):
    """Warm-up steps are timed apart; the step time is the median of the measured steps and tokens/s follows it; the
    peak covers loading and the steps (a fresh process, as the benchmark runs each method: the full-vocabulary logits
    of 4 x 128 tokens take the steps above the loading peak)."""
    import json
    import os
    import subprocess

    result_file = tmp_path / "lora.json"
    completed = subprocess.run(
        [sys.executable, "integration/bench_train.py", "--run-one", "lora", "--model-path", chat_model_dir,
         "--result-file", str(result_file), "--steps", "3", "--warmup", "2", "--batch", "4", "--seq", "128"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert len(result["warmup_times_s"]) == 2 and len(result["step_times_s"]) == 3 == len(result["step_cpu_times_s"])
    assert len(result["losses"]) == 5
    assert result["step_s"] == statistics.median(result["step_times_s"])
    assert result["step_cpu_s"] == statistics.median(result["step_cpu_times_s"])
    assert result["tokens_per_s"] == pytest.approx(4 * 128 / result["step_s"])
    assert result["peak_rss_mb"] >= result["step_peak_rss_mb"] >= result["load_rss_mb"] > 0
    assert result["step_increment_mb"] == pytest.approx(result["step_peak_rss_mb"] - result["load_rss_mb"])


@pytest.mark.smollm2
def test_harness_runs_each_method_with_the_shared_settings_and_reports_its_own_peak(quality, chat_model_dir):
    """What the parent runs in each child (``--run-one``), in this process: QLoRA and QST get the same learning rate,
    warm-up and number of steps unless their spec says otherwise, and the fine-tuning peak covers loading and
    training."""
    harness, tasks = quality
    args = harness_args(harness, model=chat_model_dir, steps=2)
    results = {spec: harness.run_one(spec, args, None) for spec in ("base", "qlora", "qst:r=4", "qst:r=4,lr=0.01")}
    # the scores are of the held-out set: the untrained model's eval loss recomputed on it
    tokenizer, model = harness.load_base(chat_model_dir)
    _, held_out = tasks.make_splits(args.train_size, args.eval_size, seed=args.seed)
    args.pad_id = tokenizer.pad_token_id
    reference = harness.eval_loss(model.eval(), [tasks.encode_example(tokenizer, e) for e in held_out], args)
    assert results["base"]["eval_loss"] == pytest.approx(reference, rel=1e-4)
    for spec in ("qlora", "qst:r=4"):
        result = results[spec]
        assert (result["lr"], result["warmup"], result["steps"]) == (args.lr, args.warmup, 2), spec
        assert result["n_eval"] == 6 and result["n_train_pool"] == 24
        assert result["peak_rss_mb"] >= max(result["peak_rss_load_mb"], result["peak_rss_train_mb"])
        assert result["trainable_params"] > 0 and 0.0 <= result["exact_match"] <= 1.0
    assert results["qst:r=4,lr=0.01"]["lr"] == 0.01
    # same data, same initial adapter output (zero-initialised LoRA B and QST upsample): the same first loss
    first = [results[spec]["train_losses"][0] for spec in ("qlora", "qst:r=4")]
    assert first[0] == pytest.approx(first[1], rel=0.02)


def test_an_existing_output_file_is_replaced_only_when_asked(tmp_path):
    """Every benchmark's ``--output`` goes through ``check_output_path``: a file that exists (the JSON of an earlier
    run, a recorded table's) is refused with the flag that allows it, and left as it was; with ``--overwrite-output``
    it is accepted; a folder is refused either way."""
    sys.path.insert(0, f"{REPO}/integration")
    try:
        from measure import add_overwrite_output_argument, check_output_path
    finally:
        sys.path.remove(f"{REPO}/integration")

    class Refused(Exception):
        pass

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise Refused(message)

    parser = Parser()
    parser.add_argument("--output")
    add_overwrite_output_argument(parser)
    earlier = tmp_path / "results.json"
    earlier.write_text('{"rows": []}')
    args = parser.parse_args(["--output", str(earlier)])
    with pytest.raises(Refused, match="already exists: pass --overwrite-output to replace it, or another path"):
        check_output_path(parser, args.output, args.overwrite_output)
    assert earlier.read_text() == '{"rows": []}'
    args = parser.parse_args(["--output", str(earlier), "--overwrite-output"])
    check_output_path(parser, args.output, args.overwrite_output)
    check_output_path(parser, str(tmp_path / "new" / "results.json"))  # a new file, in a folder made for it
    assert (tmp_path / "new").is_dir()
    for overwrite in (False, True):
        with pytest.raises(Refused, match="is a folder: pass a file path"):
            check_output_path(parser, str(tmp_path), overwrite)
