"""TRL's other PEFT-capable trainers with peft_config=QSTConfig(...): DPO, KTO, ORPO, CPO, RewardTrainer, GRPO, RLOO.

Where they live in trl 1.16: `DPOTrainer`, `KTOTrainer`, `RewardTrainer`, `GRPOTrainer` and `RLOOTrainer` are in
`trl` itself (`trl.experimental.kto` still re-exports KTO, deprecated); `ORPOTrainer` and `CPOTrainer` only in
`trl.experimental.orpo` and `trl.experimental.cpo`.

Each test runs the real trainer for three optimizer steps on the tiny random Llama (vocabulary of the real SmolLM2
tokenizer), fp32 on CPU and in 4-bit with bf16=True (QLoRA's recipe), with data generated here and each trainer's
defaults otherwise (gradient checkpointing on, transformers' own generate for GRPO/RLOO), and checks what a side
network in place of the trunk could break:
- only the side network trains (plus the score head for `task_type="SEQ_CLS"`), and every backbone weight is
  bit-identical afterwards;
- the logged loss is finite, and where the batch is the same at every step (the whole data set in one batch) it goes
  down: gradients reach the side network through each trainer's own loss;
- where the trainer has a reference model (DPO, KTO, RLOO), TRL's reference is the base model with the adapter
  disabled: every reference log-probability TRL computes equals the plain base model's on the same inputs, bit for
  bit, while the policy's (adapter on) does not;
- the adapter saved by `trainer.save_model` reloads with `PeftModel.from_pretrained` to the trained model's logits
  (in 4-bit bit for bit under the trainer's bf16 autocast, once TRL's casts of frozen modules are given back).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from peft_qst import QSTConfig, QSTLayer
from peft_qst.cache import QSTCache, cache_field

from .conftest import bnb_config, tiny_causal_lm, tiny_llama_config

pytestmark = pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer (and the vocabulary size that goes with it)

STEPS = 3


# ----------------------------------------------------------------------------------------------------------------------
# Shared set-up
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)  # per test: GRPO/RLOO change its padding side


def _saved_on_disk(tmp_path_factory, smollm2_dir, build, name: str) -> str:
    """A tiny random model built with SmolLM2's vocabulary, saved for loading it in 4-bit."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp(name)
    build(AutoTokenizer.from_pretrained(smollm2_dir)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, smollm2_dir):
    """The tiny random Llama on disk, for loading it in 4-bit."""
    return _saved_on_disk(tmp_path_factory, smollm2_dir, tiny_lm, "tiny-llama-smollm2-vocab")


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory, smollm2_dir):
    """The tiny random classifier on disk, for loading it in 4-bit."""
    return _saved_on_disk(tmp_path_factory, smollm2_dir, tiny_classifier, "tiny-llama-classifier-smollm2-vocab")


def tiny_lm(tokenizer):
    """The tiny random Llama with the tokenizer's vocabulary: the same weights at every call."""
    return tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def tiny_classifier(tokenizer):
    """The same tiny Llama trunk with a one-output ``score`` head (a reward model): the same weights at every call."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    return AutoModelForSequenceClassification.from_config(config).eval()


def causal_lm(tokenizer, tiny_lm_dir, quantized: bool):
    """The tiny random Llama: in fp32, or from disk in 4-bit (NF4, bf16 compute), the same weights at every call."""
    from transformers import AutoModelForCausalLM

    if quantized:
        return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, quantization_config=bnb_config())
    return tiny_lm(tokenizer)


def check_trl_cast_to_bf16(model) -> None:
    """In 4-bit with bf16=True, KTO, RewardTrainer, GRPO and RLOO (as DPO) cast every trainable parameter to bf16 in
    their constructor and nothing else: the side network is bf16 already (QST's rule: the 4-bit compute dtype), and
    every frozen parameter keeps the dtype it was loaded in (no ``peft_module_casting_to_bf16`` as in ORPO and CPO),
    so the saved adapter reloads onto a fresh 4-bit base as it trained, with nothing of the model to give back."""
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float32, torch.uint8}


def qst_config(task_type: str = "CAUSAL_LM") -> QSTConfig:
    return QSTConfig(task_type=task_type, r=4)


def trainer_args(config_class, tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "run"), report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                    disable_tqdm=True, learning_rate=1e-2, logging_steps=1, max_steps=STEPS, seed=0,
                    per_device_train_batch_size=8)
    return config_class(**{**defaults, **overrides})


def preference_rows() -> dict:
    """Prompts with a chosen (counting on) and a rejected (off-pattern) completion; plain text, no chat template. The
    numbers have one to three digits, so that prompts and completions differ in length and batches are padded."""
    starts = [7 * i * i for i in range(8)]
    return {
        "prompt": [f"Count on from {n}:" for n in starts],
        "chosen": [f" {n + 1} {n + 2} {n + 3}" for n in starts],
        "rejected": [f" {n} zebra {n}" for n in starts],
    }


def sample_inputs(tokenizer) -> dict:
    """A padded batch for comparing logits: texts of different lengths."""
    rows = preference_rows()
    texts = [rows["prompt"][0] + rows["chosen"][0], rows["prompt"][7] + rows["rejected"][7], rows["prompt"][3]]
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    assert not inputs["attention_mask"].all()
    return inputs


def qst_layer(model) -> QSTLayer:
    return next(m for m in model.modules() if isinstance(m, QSTLayer))


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logged(trainer, key: str = "loss") -> list[float]:
    """``key`` at every training step of the trainer's log; each one finite (a NaN or inf loss still "runs")."""
    values = [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]
    assert len(values) == STEPS, trainer.state.log_history
    assert all(math.isfinite(v) for v in values), values
    return values


def check_only_the_adapter_trained(model, before: dict, head: bool = False) -> None:
    """The trainable parameters are the side network's (and the SEQ_CLS score head's copy in ``modules_to_save``,
    when ``head``); training changed some of them, the side network's upsample (its only way into the output) and the
    head among them, and nothing else: every backbone weight, 4-bit or not, is bit-identical to before training. A
    trainer that unfroze the trunk, or an optimizer given the backbone, fails here. (``before`` is taken after the
    trainer was built: a trunk changed in its constructor shows in the reference comparison of DPO, KTO and RLOO,
    which runs a fresh copy of the base model.)"""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    side = {n for n in trainable if ".qst_side." in n}
    head_copy = {n for n in trainable if ".modules_to_save." in n}
    assert side and trainable == side | head_copy
    assert bool(head_copy) == head
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(after[n].detach(), before[n])}
    assert changed <= trainable, sorted(changed - trainable)
    assert any(".upsample." in n for n in changed), sorted(changed)
    assert head_copy <= changed


def check_adapter_reloads(trainer, tmp_path, fresh_base, inputs: dict) -> None:
    """``trainer.save_model`` writes the adapter; ``PeftModel.from_pretrained`` on a fresh copy of the base model gives
    the trained model's logits exactly, and not the base model's (the trained adapter is in what is compared). Under
    mixed precision both run under bf16 autocast, as the trainer's model does (accelerate wraps its forward)."""
    path = tmp_path / "adapter"
    trainer.save_model(str(path))
    reloaded = PeftModel.from_pretrained(fresh_base, path).eval()
    trained = trainer.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.args.bf16):
        expected = trained(**inputs).logits
        got = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            base = reloaded(**inputs).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert not torch.allclose(got, base, atol=1e-4)


def record_scoring_forwards(peft_model) -> list[dict]:
    """Records every forward TRL runs through its fused LM head (``fused_lm_head=True``: the policy's and the
    reference's per-token log-probabilities; generation is not recorded): whether the QST adapter was disabled, the
    mode and autocast state, the inputs and the log-probabilities."""
    layer = qst_layer(peft_model)
    calls = []
    trunk = {}

    def trunk_hook(module, args):  # autocast as the trunk sees it: mixed precision wraps the model's forward inside
        trunk["autocast"] = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def hook(module, args, kwargs, output):
        if not kwargs.get("fused_lm_head"):
            return
        assert not args
        calls.append({
            "reference": layer.disable_adapters,
            "training": module.training,
            "autocast": trunk["autocast"],
            "inputs": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
            "log_probs": output.log_probs.detach().clone(),
        })

    layer.register_forward_pre_hook(trunk_hook)
    peft_model.register_forward_hook(hook, with_kwargs=True)
    return calls


def check_reference_is_the_base_model(calls: list[dict], base) -> list[dict]:
    """TRL's reference for a PEFT model is the model with the adapter disabled; with QST that must be the base model
    exactly, at every step, also after the side network has trained (a side network leaking into the disabled path, a
    trunk changed by wrapping, or a reference cast to another dtype shows here). ``base`` is an unwrapped copy of the
    base model, given TRL's fused LM head and run in the same mode and autocast state as each recorded forward. The
    policy's last forward (adapter on, after training) must differ from it, or the comparison would prove nothing.
    Returns the reference forwards, for the caller to count."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base)

    def base_log_probs(call):
        base.train(call["training"])
        with torch.no_grad(), torch.autocast("cpu", dtype=call["autocast"] or torch.bfloat16,
                                             enabled=call["autocast"] is not None):
            return base(**call["inputs"]).log_probs

    references = [call for call in calls if call["reference"]]
    for call in references:
        expected = base_log_probs(call)
        assert torch.equal(call["log_probs"], expected), (call["log_probs"] - expected).abs().max()
    policy = [call for call in calls if not call["reference"]][-1]
    assert not torch.allclose(policy["log_probs"], base_log_probs(policy), atol=1e-4)
    return references


# ----------------------------------------------------------------------------------------------------------------------
# Offline preference trainers: DPO and KTO (with a reference), ORPO and CPO (without)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_dpo(tmp_path, tokenizer, tiny_lm_dir, quantized):
    """DPOTrainer: the reference is the base model exactly (adapter disabled), the first loss is log 2 (the untrained
    adapter is the base model: zero upsample), the DPO loss on the fixed batch goes down, only the side network
    trains, and the saved adapter reloads. The 4-bit case is the QLoRA recipe: NF4 trunk, TRL's bf16 default (mixed
    precision, trainable parameters cast to bf16), the reference run under the same autocast."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    def base_model():
        if quantized:
            return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, quantization_config=bnb_config())
        return tiny_lm(tokenizer)

    trainer = DPOTrainer(model=base_model(), args=trainer_args(DPOConfig, tmp_path, max_length=32, bf16=quantized),
                         train_dataset=Dataset.from_dict(preference_rows()), processing_class=tokenizer,
                         peft_config=qst_config())
    if quantized:
        assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    before = parameters(trainer.model)
    calls = record_scoring_forwards(trainer.model)
    trainer.train()

    losses = logged(trainer)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 1e-3
    assert logged(trainer, "rewards/margins")[-1] > 0
    check_only_the_adapter_trained(trainer.model, before)
    assert len(check_reference_is_the_base_model(calls, base_model())) == STEPS  # chosen and rejected in one forward
    check_adapter_reloads(trainer, tmp_path, base_model(), sample_inputs(tokenizer))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_dpo_continues_a_saved_adapter_against_a_frozen_copy_of_it(tmp_path, tokenizer, tiny_lm_dir, quantized):
    """QLoRA recipes that run DPO after SFT (Hands-On Large Language Models, ch. 12) merge the SFT adapter first and
    DPO-train a new LoRA on the merged model; a QST adapter cannot be merged, so its form of that recipe loads the SFT
    adapter trainable and passes that model to DPOTrainer without a peft_config. TRL then adds a ``"ref"`` adapter
    with the loaded one's config and copies its weights in place (``param.data.copy_``): the reference is the SFT
    adapter, frozen, not the base model. Checked: both adapters start equal, every reference log-probability equals a
    separately loaded copy of the SFT adapter's, the first loss is log 2, only ``"default"`` trains and ``"ref"``
    ends bit for bit as it started."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from .conftest import train_steps

    def base_model():
        if quantized:
            return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, quantization_config=bnb_config())
        return tiny_lm(tokenizer)

    sft = get_peft_model(base_model(), qst_config())
    train_steps(sft, sample_inputs(tokenizer)["input_ids"], steps=3)
    sft.save_pretrained(tmp_path / "sft")

    model = PeftModel.from_pretrained(base_model(), tmp_path / "sft", is_trainable=True)
    trainer = DPOTrainer(model=model, args=trainer_args(DPOConfig, tmp_path, max_length=32, bf16=quantized),
                         train_dataset=Dataset.from_dict(preference_rows()), processing_class=tokenizer)
    model = trainer.model
    assert sorted(model.peft_config) == ["default", "ref"] and model.active_adapter == "default"
    side = {name: p.detach().clone() for name, p in model.named_parameters() if ".qst_side." in name}
    ref = {name: p for name, p in side.items() if ".qst_side.ref." in name}
    assert ref and all(torch.equal(p, side[name.replace(".ref.", ".default.")]) for name, p in ref.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in side if ".default." in n}

    calls, trunk = [], {}
    # autocast as the trunk sees it: mixed precision wraps the model's forward inside the hooks
    qst_layer(model).register_forward_pre_hook(lambda *_: trunk.update(autocast=torch.is_autocast_enabled("cpu")))
    model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((module.active_adapter, module.training, trunk["autocast"],
                                                           dict(kwargs), output.log_probs.detach().clone()))
        if kwargs.get("fused_lm_head") else None,
        with_kwargs=True,
    )
    trainer.train()

    # policy and reference hold the same weights at the first step, but the policy runs with gradients and the
    # reference without them (QST's inference fast path): equal to float rounding, bf16's under 4-bit's autocast
    assert logged(trainer)[0] == pytest.approx(math.log(2), abs=1e-4 if quantized else 1e-6)
    references = [call for call in calls if call[0] == "ref"]
    assert len(references) == STEPS
    base = base_model()
    add_fused_lm_head(base)  # as TRL does, before PEFT wraps the model
    frozen_sft = PeftModel.from_pretrained(base, tmp_path / "sft")
    for _, training, autocast, inputs, log_probs in references:
        frozen_sft.train(training)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(log_probs, frozen_sft(**inputs).log_probs)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], p) for name, p in ref.items())
    assert any(not torch.equal(after[name], p) for name, p in side.items() if ".default." in name)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_kto(tmp_path, tokenizer, tiny_lm_dir, quantized):
    """KTOTrainer (unpaired completions with a desirable/undesirable label): its reference forwards, the completions'
    and the KL estimate's mismatched pairs alike, are the base model exactly (adapter disabled); the first step is at
    the reference (KL 0, loss 1/2), the loss on the fixed batch goes down, only the side network trains, and the saved
    adapter reloads. In 4-bit as DPO's: bf16=True, trainable parameters cast to bf16 (see check_trl_cast_to_bf16)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = preference_rows()
    data = {"prompt": rows["prompt"] * 2, "completion": rows["chosen"] + rows["rejected"],
            "label": [True] * 8 + [False] * 8}
    trainer = KTOTrainer(model=causal_lm(tokenizer, tiny_lm_dir, quantized),
                         args=trainer_args(KTOConfig, tmp_path, max_length=32, per_device_train_batch_size=16,
                                           bf16=quantized),
                         train_dataset=Dataset.from_dict(data), processing_class=tokenizer, peft_config=qst_config())
    if quantized:
        check_trl_cast_to_bf16(trainer.model)
    before = parameters(trainer.model)
    calls = record_scoring_forwards(trainer.model)
    trainer.train()

    losses = logged(trainer)
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and logged(trainer, "kl")[0] == 0
    assert losses[-1] < losses[0]
    check_only_the_adapter_trained(trainer.model, before)
    references = check_reference_is_the_base_model(calls, causal_lm(tokenizer, tiny_lm_dir, quantized))
    assert len(references) == 2 * STEPS  # per step: the KL estimate's mismatched pairs, then the completions
    for kl_pairs, completions in zip(references[::2], references[1::2]):
        assert not torch.equal(kl_pairs["inputs"]["labels"], completions["inputs"]["labels"])
    check_adapter_reloads(trainer, tmp_path, causal_lm(tokenizer, tiny_lm_dir, quantized), sample_inputs(tokenizer))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
@pytest.mark.parametrize("method", ["orpo", "cpo"])
def test_orpo_and_cpo(tmp_path, tokenizer, tiny_lm_dir, method, quantized):
    """ORPOTrainer and CPOTrainer (trl.experimental; no reference model: an odds-ratio or contrastive term plus the
    chosen completions' NLL): the loss on the fixed batch goes down, only the side network trains, and the saved
    adapter reloads. In 4-bit with bf16=True they cast (``peft_module_casting_to_bf16``) every module named ``norm`` to
    float32, the side network's norms among them, and the frozen embeddings and LM head to bf16: the norms trained
    in float32 reload in float32 (rounded to bf16 the reload's logits were 0.004 off), and resuming training from a
    checkpoint keeps every dtype (ORPO); the frozen modules' cast, which a LoRA adapter does not reload either, is
    given back to the trained model before the comparison."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

    def base_model():
        if quantized:
            return AutoModelForCausalLM.from_pretrained(tiny_lm_dir, quantization_config=bnb_config())
        return tiny_lm(tokenizer)

    def build(**overrides):
        return Trainer(model=base_model(), args=trainer_args(Config, tmp_path, max_length=32, bf16=quantized,
                                                             **overrides),
                       train_dataset=Dataset.from_dict(preference_rows()), processing_class=tokenizer,
                       peft_config=qst_config())

    resume = quantized and method == "orpo"  # CPO's casts are the same TRL function's
    trainer = build(**(dict(save_strategy="steps", save_steps=STEPS - 1) if resume else {}))
    # in 4-bit: the side trunk's RMSNorms and the downsamplers' LayerNorms (module 3 of each), beside the bf16 rest
    float32_side = {n for n, p in trainer.model.named_parameters() if ".qst_side." in n and p.dtype == torch.float32}
    if quantized:
        assert float32_side and all("norm" in n or "downsample.3." in n for n in float32_side), sorted(float32_side)
    before = parameters(trainer.model)
    trainer.train()

    losses = logged(trainer)
    assert losses[-1] < losses[0] - 1e-3
    assert logged(trainer, "nll_loss")[-1] < logged(trainer, "nll_loss")[0]
    check_only_the_adapter_trained(trainer.model, before)
    if resume:
        # resuming from the checkpoint of step 2 (the adapter loaded into a new trainer's model, which TRL cast the
        # same way, and the optimizer's state) keeps each parameter's dtype and ends where the run did, bit for bit
        resumed = build()
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{STEPS - 1}"))
        trained = dict(trainer.model.named_parameters())
        for name, parameter in resumed.model.named_parameters():
            assert parameter.dtype == trained[name].dtype, name
            assert torch.equal(parameter, trained[name]), name
    if quantized:
        fresh = base_model()
        for module, original in ((trainer.model.get_input_embeddings(), fresh.get_input_embeddings()),
                                 (trainer.model.get_output_embeddings(), fresh.get_output_embeddings())):
            assert module.weight.dtype == torch.bfloat16 != original.weight.dtype  # TRL's cast
            module.weight.data = original.weight.data.clone()
    check_adapter_reloads(trainer, tmp_path, base_model(), sample_inputs(tokenizer))
    if quantized:
        reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
        assert {n for n, p in reloaded.named_parameters() if p.dtype == torch.float32 and ".qst_side." in n} == (
            float32_side)


# ----------------------------------------------------------------------------------------------------------------------
# RewardTrainer: a SEQ_CLS QST model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
def test_reward_trainer(tmp_path, tokenizer, tiny_classifier_dir, quantized):
    """RewardTrainer on a one-output classifier with QSTConfig(task_type="SEQ_CLS"): the score head (PEFT's
    modules_to_save for SEQ_CLS) and the side network train, nothing else; the rewards the model gives chosen and
    rejected texts, read from its own logits, move apart (the Bradley-Terry loss works through QST's output), and the
    saved adapter with its head reloads. In 4-bit the head stays unquantized (``llm_int8_skip_modules=["score"]``, as
    the README says) and bf16=True: TRL casts the head's trainable copy to bf16 with the side network; it reloads in
    the base model's float32 with the same values, so the reload under the trainer's bf16 autocast is exact."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = preference_rows()
    data = {"chosen": [p + c for p, c in zip(rows["prompt"], rows["chosen"])],
            "rejected": [p + r for p, r in zip(rows["prompt"], rows["rejected"])]}
    def base_model():
        if quantized:
            from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

            skip_score = BitsAndBytesConfig(**{**bnb_config().to_dict(), "llm_int8_skip_modules": ["score"]})
            return AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir,
                                                                      quantization_config=skip_score)
        return tiny_classifier(tokenizer)

    trainer = RewardTrainer(model=base_model(),
                            args=trainer_args(RewardConfig, tmp_path, max_length=32, bf16=quantized),
                            train_dataset=Dataset.from_dict(data), processing_class=tokenizer,
                            peft_config=qst_config("SEQ_CLS"))
    assert "score" in trainer.model.peft_config["default"].modules_to_save
    if quantized:
        check_trl_cast_to_bf16(trainer.model)

    def margin() -> float:
        """Mean reward of the chosen texts minus that of the rejected ones, from the model's own logits."""
        trainer.model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=quantized):
            chosen = trainer.model(**tokenizer(data["chosen"], return_tensors="pt", padding=True)).logits
            rejected = trainer.model(**tokenizer(data["rejected"], return_tensors="pt", padding=True)).logits
        return (chosen - rejected).mean().item()

    margin_before = margin()
    before = parameters(trainer.model)
    trainer.train()

    losses = logged(trainer)
    assert losses[-1] < losses[0] - 1e-3
    assert margin() > margin_before + 0.1
    check_only_the_adapter_trained(trainer.model, before, head=True)
    check_adapter_reloads(trainer, tmp_path, base_model(), sample_inputs(tokenizer))


# ----------------------------------------------------------------------------------------------------------------------
# Online trainers: GRPO and RLOO, generating with transformers' generate
# ----------------------------------------------------------------------------------------------------------------------


def record_generation_forwards(peft_model) -> list[tuple[float, float] | None]:
    """Records each trunk forward that ran the side network with a paired KV cache (a `QSTCache` holding the side
    network's own cache, adapter on): the steps of cached generation. The first forward of each generation (the
    prompt) is computed again right there, without a cache, from the side network's live parameters, twice: on the
    general path (QST's inference fast path off), and on the path the generation took with the fast path's packed
    weights dropped, so that it packs the live parameters anew. The list gets the largest differences over the
    prompt's real tokens (general, repacked), or None for a decoding step. Generation from stale weights (packed for
    the fast path before an optimizer step, say) would make the trainer silently off-policy; it shows in both. The
    repacked difference is exactly zero; the general one is float32 rounding for a float32 side network, and for a
    bf16 one (4-bit) bf16's: the fast path computes in float32 whatever the side dtype (peft_qst/fast_path.py)."""
    from peft_qst.fast_path import fast_path_disabled

    layer = qst_layer(peft_model)
    records = []
    busy = []

    def hook(module, args, kwargs, output):
        cache = None if isinstance(output, tuple) else getattr(output, cache_field(output), None)
        if busy or module.disable_adapters or not isinstance(cache, QSTCache) or cache.side_cache("default") is None:
            return
        prompt_ids = kwargs.get("input_ids")
        if prompt_ids is None or cache.get_seq_length() != prompt_ids.shape[1]:
            records.append(None)  # a decoding step
            return
        again_kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
        side = module.qst_side[module.active_adapters[0]]
        busy.append(True)
        try:
            with torch.no_grad(), fast_path_disabled():
                again = module(*args, **again_kwargs, use_cache=False).last_hidden_state
            side.__dict__.pop("_packed_weights", None)
            with torch.no_grad():
                again_fast = module(*args, **again_kwargs, use_cache=False).last_hidden_state
        finally:
            busy.pop()
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(prompt_ids, dtype=torch.bool) if mask is None else mask.bool()
        records.append(tuple((output.last_hidden_state[real] - rerun[real]).abs().max().item()
                             for rerun in (again, again_fast)))

    layer.register_forward_hook(hook, with_kwargs=True)
    return records


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "4bit"])
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_grpo_and_rloo(tmp_path, tokenizer, tiny_lm_dir, method, quantized):
    """GRPOTrainer and RLOOTrainer with their default generation (transformers' generate, sampling): every step
    generates completions through the QST model, side network and its own KV cache included, with the side weights
    of that step; scores them with a reward function, and trains the side network only; the saved adapter reloads.
    RLOO keeps its default KL penalty (beta=0.05), whose reference is the base model exactly (adapter disabled);
    GRPO's default beta=0 has none. In 4-bit as DPO's: bf16=True, trainable parameters cast to bf16."""
    from datasets import Dataset

    if method == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    completions_seen = []

    def longer_is_better(completions, **kwargs):
        completions_seen.extend(completions)
        return [float(len(text)) for text in completions]

    max_completion_length = 6
    args = trainer_args(Config, tmp_path, per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=max_completion_length, bf16=quantized)
    trainer = Trainer(model=causal_lm(tokenizer, tiny_lm_dir, quantized), reward_funcs=longer_is_better, args=args,
                      train_dataset=Dataset.from_dict({"prompt": preference_rows()["prompt"]}),
                      processing_class=tokenizer, peft_config=qst_config())
    assert trainer.beta == (0.05 if method == "rloo" else 0.0)
    if quantized:
        check_trl_cast_to_bf16(trainer.model)
    before = parameters(trainer.model)
    calls = record_scoring_forwards(trainer.model)
    generation = record_generation_forwards(trainer.model)
    trainer.train()

    logged(trainer)
    assert len(completions_seen) == STEPS * 4 and all(completions_seen)
    assert all(0 < length <= max_completion_length for length in logged(trainer, "completions/mean_length"))
    # every step generates through the side network with its own cache: the prompt's forward, then one per new token
    prompts = [difference for difference in generation if difference is not None]
    assert len(prompts) == STEPS and len(generation) >= STEPS * (max_completion_length - 1)
    general, repacked = zip(*prompts)
    assert max(repacked) == 0  # from the side network's weights of that step
    assert max(general) < (1e-5 if not quantized else 1e-2)
    check_only_the_adapter_trained(trainer.model, before)
    if method == "rloo":
        assert len(check_reference_is_the_base_model(calls, causal_lm(tokenizer, tiny_lm_dir, quantized))) == STEPS
    else:
        assert calls and not any(call["reference"] for call in calls)
    check_adapter_reloads(trainer, tmp_path, causal_lm(tokenizer, tiny_lm_dir, quantized), sample_inputs(tokenizer))
