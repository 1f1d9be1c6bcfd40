"""Pure state-space models (Mamba, Falcon-Mamba, Mamba-2) beyond the default float32 checks of
tests/test_more_architectures.py: half precision (their blocks keep the residual stream in float32), the hybrid's
backbone adapters on Mamba mixers, TRL's SFTTrainer, and the side network's size at published shapes."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from peft_qst import QSTConfig

from .conftest import bnb_config, train_steps
from .test_more_architectures import V, side_of, tiny

IDS = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
STATE_SPACE = ["mamba", "falcon_mamba", "mamba2"]


def check_trains_reloads_and_generates(model, reload, ids=IDS, atol=0.0):
    """Starts at ``reload()``'s base model, trains, reloads to the same logits (side frozen: see the arch sweep's note
    on torch's matmul), and generates with its cache the logits of full forwards: exactly, or within ``atol`` (bf16,
    where the base models' own cached steps are up to 0.03 off theirs and greedy tokens can flip)."""
    with torch.no_grad():
        base = reload(None).requires_grad_(False)  # frozen, as under the adapter (conftest.parameters_frozen)
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    losses = train_steps(model, ids, steps=3, lr=3e-2)
    assert losses[-1] < losses[0]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    reloaded = reload(model)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    if not atol:
        assert torch.equal(model.generate(input_ids=ids, **kwargs),
                           model.generate(input_ids=ids, use_cache=False, **kwargs))
        return
    out = model.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits[:, ids.shape[1] - 1:-1].float()
    torch.testing.assert_close(torch.stack(out.logits, 1).float(), full, rtol=0, atol=atol)


@pytest.mark.parametrize("model_type", STATE_SPACE)
def test_half_precision_state_space_models(model_type, tmp_path):
    """Their blocks keep the residual stream in float32 (``residual_in_fp32``, set in every published Mamba, Falcon-Mamba
    and Mamba-2 config), so each side block after the first got a float32 input, to which the backbone hidden state
    was cast before the bf16 downsampler: "mat1 and mat2 must have the same dtype". Every bf16 model, and any
    ``side_dtype="bfloat16"``, was refused at get_peft_model."""
    assert tiny(model_type).config.residual_in_fp32

    def reload(trained, dtype=torch.bfloat16):
        base = tiny(model_type).to(dtype)
        if trained is None:
            return base
        trained.save_pretrained(tmp_path / str(dtype))
        return PeftModel.from_pretrained(base, str(tmp_path / str(dtype))).eval()

    model = get_peft_model(tiny(model_type).to(torch.bfloat16), QSTConfig(task_type="CAUSAL_LM", r=4))
    assert side_of(model).upsample.weight.dtype == torch.bfloat16
    # cached against uncached bf16 logits: the base model alone differs by up to 0.06 (Mamba, an AVX2-only AMD EPYC;
    # its scan and its stepwise update round differently), and a side network adds a bf16 recurrence of its own (0.105
    # seen there on one of 1280 logits)
    check_trains_reloads_and_generates(model, reload, atol=0.15)
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype="bfloat16"))
    check_trains_reloads_and_generates(model, lambda trained: reload(trained, torch.float32), atol=0.15)


def lora_layers(model) -> set[str]:
    return {n.split(".deltas.")[1].rsplit(".", 1)[0] for n, _ in model.named_parameters() if ".backbone_lora." in n}


@pytest.mark.parametrize("model_type", STATE_SPACE)
def test_hybrid_adapts_the_linear_layers_the_mixer_calls(model_type, tmp_path):
    """Mamba's and Falcon-Mamba's mixers never call their ``dt_proj``: they read its weight (``dt_proj.weight @
    time_step``) and add its bias inside the scan. The hybrid's delta there (a forward hook) never ran: two trainable
    matrices per block that got no gradient and changed nothing. Every delta left now gets a gradient, and nothing
    frozen does."""
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1))
    calls = {"in_proj", "out_proj"} | ({"x_proj"} if model_type != "mamba2" else set())
    assert lora_layers(model) == {f"1.mixer__{name}" for name in calls}
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if n.endswith("lora_B"))
    assert all(p.grad is not None for p in trainable.values())
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    model.zero_grad()

    def reload(trained):
        if trained is None:
            return tiny(model_type)
        trained.save_pretrained(tmp_path)
        return PeftModel.from_pretrained(tiny(model_type), str(tmp_path)).eval()

    check_trains_reloads_and_generates(model.eval(), reload)


def test_hybrid_on_a_4bit_mamba_with_bf16_compute(tmp_path):
    """4-bit as users load it (NF4, bf16 compute, so a bf16 side network): refused before, for the float32 residual
    stream (above)."""
    # x_proj's output, time_step_rank + 2 x state_size, a multiple of 32 (bitsandbytes' CPU kernel needs one)
    tiny("mamba", time_step_rank=16, state_size=8).save_pretrained(tmp_path / "base")

    # dt_proj stays unquantized: the mixer multiplies by its weight (dt_proj.weight @ time_step), which a packed
    # 4-bit weight cannot do: the base model itself fails ("Expected size for first two dimensions of batch2 tensor")
    quantization = bnb_config()
    quantization.llm_int8_skip_modules = ["dt_proj", "lm_head"]

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization).eval()

    def reload(trained):
        if trained is None:
            return load()
        trained.save_pretrained(tmp_path / "adapter")
        return PeftModel.from_pretrained(load(), str(tmp_path / "adapter")).eval()

    model = get_peft_model(load(), QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1))
    assert type(model.base_model.model.backbone.layers[1].mixer.in_proj).__name__ == "Linear4bit"
    assert lora_layers(model) == {"1.mixer__in_proj", "1.mixer__x_proj", "1.mixer__out_proj"}
    check_trains_reloads_and_generates(model, reload, atol=0.1)


def test_sft_trainer_on_mamba_saves_and_reloads_exactly(tmp_path):
    """TRL's SFTTrainer with QSTConfig on a Mamba model (gradient checkpointing on, SFTConfig's default), a few steps;
    the saved adapter reloads to the trained model's logits. A word-level tokenizer built here (no download)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(40)] + ["repeat", "twice", ":"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    data = Dataset.from_list([{"prompt": f"repeat {i % 40} twice :", "completion": f" {i % 40} {i % 40}"}
                              for i in range(32)])
    base = tiny("mamba", vocab_size=len(words), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True)
    assert args.gradient_checkpointing
    trainer = SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = trainer.model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    ids = torch.tensor([[3, 43, 7, 44, 45]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = tiny("mamba", vocab_size=len(words), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)


#: published config.json values (written out by hand: no model hub here); base parameters as published
PUBLISHED_STATE_SPACE = {
    "mamba-130m": ("mamba", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16, expand=2,
                                 intermediate_size=1536, time_step_rank=48, tie_word_embeddings=True)),
    "falcon-mamba-7b": ("falcon_mamba", dict(hidden_size=4096, num_hidden_layers=64, vocab_size=65024, state_size=16,
                                             expand=16, intermediate_size=8192, time_step_rank=256,
                                             tie_word_embeddings=False)),
    "mamba2-130m": ("mamba2", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50288, state_size=128, expand=2,
                                   num_heads=24, head_dim=64, n_groups=1, tie_word_embeddings=True)),
    "Codestral-Mamba-7B": ("mamba2", dict(hidden_size=4096, num_hidden_layers=64, vocab_size=32768, state_size=128,
                                          expand=2, num_heads=128, head_dim=64, n_groups=8, time_step_rank=256,
                                          tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", ["falcon-mamba-7b", "Codestral-Mamba-7B"])
def test_published_shapes_on_the_meta_device(name):
    """falcon-mamba-7b's config says ``expand`` 16 beside ``intermediate_size`` 8192 (2 x 4096, what its mixers use):
    the side's inner width was taken as expand x 256 = 4096, not 8192 / 16 = 512, and its side network was 230 M
    parameters, 3.2% of the model. Now 0.46%, about 1/r^2, as the attention models' (docs/architectures.md,
    Published model shapes)."""
    model_type, sizes = PUBLISHED_STATE_SPACE[name]
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes), dtype=torch.bfloat16)
    base_parameters = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    side = side_of(model).trunk.config
    assert side.hidden_size == 256
    if model_type == "falcon_mamba":
        assert side.intermediate_size == 512
    assert 0.003 < trainable / base_parameters < 0.006, trainable / base_parameters


@pytest.mark.parametrize("model_type", ["mamba", "jamba"])
def test_hybrid_saved_with_time_step_deltas_loads_without_them(model_type, tmp_path, monkeypatch):
    """peft-qst before 3f0c521 put a delta on ``dt_proj`` too, which these mixers never call (they read its weight):
    it never ran and never got a gradient, so a saved hybrid adapter holds it at its start, a delta of zero. Such an
    adapter was refused as "saved from a different QST configuration or base model"; its deltas there are dropped (with
    a warning saying why, at the caller's line) and it loads to the outputs it trained to."""
    from peft_qst import backbone_lora

    ids = IDS[:, :6]
    config = QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1)
    overrides = dict(attn_layer_offset=0, attn_layer_period=2) if model_type == "jamba" else {}  # mixer on top
    with monkeypatch.context() as patched:  # the previous version's choice of linear layers
        patched.setattr(backbone_lora, "_is_read_by_weight", lambda block, name: False)
        old = get_peft_model(tiny(model_type, **overrides), config)
    assert any("dt_proj" in name for name in lora_layers(old))
    train_steps(old, ids, steps=2, lr=3e-2)
    old.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        expected = old(input_ids=ids).logits
    with pytest.warns(UserWarning, match="dt_proj") as caught:
        loaded = PeftModel.from_pretrained(tiny(model_type, **overrides), str(tmp_path)).eval()
    # reported at this line, the user's call, as peft_qst's other loading warnings are (not inside peft_qst)
    assert {w.filename for w in caught if "dt_proj" in str(w.message)} == {__file__}
    assert not any("dt_proj" in name for name in lora_layers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, base_b, trainable_m", [
    ("mamba-130m", 0.129, 0.84), ("falcon-mamba-7b", 7.27, 33.7), ("mamba2-130m", 0.129, 1.07),
    ("Codestral-Mamba-7B", 7.29, 37.4),
])
def test_published_shapes_count_what_the_readme_table_says(name, base_b, trainable_m):
    """The table of state-space models at their published shapes in docs/architectures.md: base parameters
    (billions, as published) and QST's trainable parameters (millions) of the default config, as measured here."""
    model_type, sizes = PUBLISHED_STATE_SPACE[name]
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes), dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in base.parameters()) / 1e9, 3 if base_b < 1 else 2) == base_b
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6, 2 if trainable_m < 10 else 1) == trainable_m


def test_side_mixers_round_their_time_step_rank_up_and_keep_groups_that_divide_their_heads():
    """Two rounding rules of the state-space side mixers that the released shapes (whose ranks and groups r divides)
    do not reach. A time-step rank of 24 at r=16 is 1.5: rounded up to 2, the rank of the side mixer's time-step
    projection, as for the hybrids' ``mamba_dt_rank``. Mamba-2's 18 heads in 18 groups of B/C at r=4 divide to 4
    groups, which 18 heads do not share evenly: the side takes 2 (the greatest common divisor of 18 and 4; 3 would
    divide 18 too), and its mixers run."""
    mamba = side_of(get_peft_model(tiny("mamba", time_step_rank=24), QSTConfig(task_type="CAUSAL_LM")))
    assert mamba.trunk.config.time_step_rank == 2
    assert mamba.trunk.layers[0].block.mixer.dt_proj.in_features == 2
    model = get_peft_model(tiny("mamba2", hidden_size=144, num_heads=18, head_dim=16, n_groups=18),
                           QSTConfig(task_type="CAUSAL_LM", r=4))
    side = side_of(model).trunk.config
    assert (side.hidden_size, side.num_heads, side.head_dim, side.n_groups) == (36, 18, 4, 2)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, ids, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("model_type", STATE_SPACE)
def test_cached_step_given_a_mask_over_every_token_so_far_takes_the_new_tokens_columns(model_type):
    """A generation loop written for attention models passes, at each cached step, a mask over all the tokens so far.
    Mamba's and Falcon-Mamba's mixers multiply each token's state by its mask entry, so a step's one token was
    broadcast against the whole mask: the base model returns logits for every mask position, all wrong, and QST
    refused, saying it did not support the model. The step's own columns are the mask it takes; a mask of any other
    length is refused naming the shapes, before the cache is touched. Their own generate() passes no mask after the
    first step, and keeps giving the uncached tokens."""
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM", r=4)).eval()
    train_steps(model, IDS, steps=2, lr=3e-2)
    model.eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        cache = model(input_ids=IDS[:, :-2], use_cache=True).cache
        step = model(input_ids=IDS[:, -2:-1], attention_mask=mask[:, :-1], cache=cache, use_cache=True)
        assert step.logits.shape[1] == 1
        torch.testing.assert_close(step.logits[:, -1], full[:, -2], rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match=r"covers 3 tokens, where the step has 1 new token\(s\) and its cache "
                                             r"holds 8.*shape \(batch, 1\)"):
            model(input_ids=IDS[:, -1:], attention_mask=mask[:, :3], cache=step.cache, use_cache=True)
        step = model(input_ids=IDS[:, -1:], attention_mask=mask, cache=step.cache, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=0, atol=1e-4)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=IDS, attention_mask=mask, **kwargs),
                       model.generate(input_ids=IDS, attention_mask=mask, use_cache=False, **kwargs))


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["mamba", "llama"])
def test_output_hidden_states_given_as_indices_return_what_the_base_model_returns(model_type):
    """Mamba's trunk collects its hidden states in its own loop and reads ``output_hidden_states`` as a flag: given
    indices it returns all of them, each block's output and then the normed last one. QST returned only the selected
    ones (None at the others), and in its own layout (the embedding output first), so even ``True`` gave other
    tensors than the base model. A trunk that records them through transformers' output capturing (Llama) keeps its
    selection: None at the positions not selected. Untrained, the adapter's start equals the base model entry for
    entry."""
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM", r=4)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # as on both sides of the comparison (conftest.parameters_frozen)
    for selection in (True, [0, -1], [1], -1):
        adapted = model(input_ids=IDS, output_hidden_states=selection).hidden_states
        with model.disable_adapter():
            base = model(input_ids=IDS, output_hidden_states=selection).hidden_states
        assert [h is None for h in adapted] == [h is None for h in base], selection
        assert all(a is None or torch.equal(a, b) for a, b in zip(adapted, base)), selection
    assert (None in base) == (model_type == "llama")


@pytest.mark.parametrize("model_type", ["mamba", "llama"])
def test_cache_passed_to_a_checkpointed_training_forward_is_left_as_transformers_leaves_it(model_type):
    """With gradient checkpointing on, in training mode with gradients, transformers turns the cache off: use_cache
    becomes False and each checkpointed block drops the cache it is handed, so the base model neither reads nor
    fills a cache passed in. QST's backbone runs under no_grad, where the blocks keep it: the caller's cache was
    filled (on Mamba the backbone's half alone, without the side state the next step needs). Now the forward runs
    without a cache, backbone and side networks alike, with a warning, and computes the base model's loss."""
    base = tiny(model_type)
    base.gradient_checkpointing_enable()
    base.train()
    given = DynamicCache(config=base.config)
    expected = base(input_ids=IDS, labels=IDS, cache=given).loss
    assert given.get_seq_length() == 0
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.gradient_checkpointing_enable()
    model.train()
    for cache in (DynamicCache(config=model.config), None):
        if cache is None:  # a paired cache, filled by an eval step: left as it was, both halves
            model.eval()
            with torch.no_grad():
                cache = model(input_ids=IDS[:, :4], use_cache=True).cache
            model.train()
        before = int(cache.get_seq_length())
        with pytest.warns(UserWarning, match="transformers turns the cache off there"):
            out = model(input_ids=IDS, labels=IDS, cache=cache)
        assert out.cache is None and int(cache.get_seq_length()) == before
        out.loss.backward()
        if before == 0:
            torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)
        else:
            assert all(int(half.get_seq_length()) == before for half in cache.side.values())
