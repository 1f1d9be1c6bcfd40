"""Architectures beyond the README's main table: the shrink rules for layouts the main families do not have, and the
refusals at `get_peft_model` (or, where only running the model shows it, at its first forward) for models QST cannot
side-tune.

Each family here stands for a rule (found by running every causal-LM type of transformers 5.24 through QST):
multi-head latent attention (DeepSeek-V3), a rotated fraction of each head (`rotary_dim`, GPT-J), Mamba heads that
tile a width derived from the hidden size (Bamba, Zamba2), per-layer token inputs (Gemma 4), mixture-of-experts FFN
widths (Qwen2-MoE), a trunk that `get_decoder()` does not return (Llama 4), RoBERTa-style positions counted from the
padding index, configs that refuse None token ids (CWM), block parts configured in sub-configs (DBRX), an attention
width that is a multiple of the hidden size (Zamba), "auto" side heads the model's class refuses (DiffLlama), and
pure state-space models without attention heads (Mamba, Falcon-Mamba, Mamba-2), and a trunk that fills the cache it is
given and returns none (RecurrentGemma).
`integration/arch_sweep.py` runs every type.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig, QSTUnsupportedModelError

from .conftest import REPO, load_script, parameters_frozen, train_steps
from .test_architectures import check_default_config_end_to_end, generate_both_ways

V = 128
# Every key a type's config knows is passed (the others are left out), so one set of sizes fits all the types below
SIZES = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, vocab_size=V, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    initializer_range=0.1, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, n_embd=128, n_layer=2, n_head=4,
    n_positions=128, rotary_dim=16, embedding_size=128,
)
#: per type: sizes that differ from SIZES (None: leave the key out)
OVERRIDES = {
    "deepseek_v3": dict(head_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, kv_lora_rank=32,
                        q_lora_rank=48, first_k_dense_replace=1, n_group=1, topk_group=1),
    "bamba": dict(mamba_n_heads=16, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, attn_layer_indices=[1]),
    "roberta": dict(is_decoder=True),
    "llama4_text": dict(num_experts_per_tok=1, interleave_moe_layer_step=2, intermediate_size_mlp=256),
    "gemma4_text": dict(hidden_size_per_layer_input=16, vocab_size_per_layer_input=V, global_head_dim=32,
                        layer_types=["sliding_attention", "full_attention"]),
    "gemma3n_text": dict(num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"],
                         intermediate_size=[256, 256], hidden_size_per_layer_input=16, vocab_size_per_layer_input=V,
                         laurel_rank=8, activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2),
    # several residual streams: hyper-connections (DeepSeek-V4 and HY-V4 stacked, Qwen4-Exp side by side along the
    # hidden dimension), AltUp (Gemma 3n, above). DeepSeek-V4's two layers both route experts by token id (hash_moe)
    "deepseek_v4": dict(q_lora_rank=32, o_lora_rank=64, index_head_dim=16, index_n_heads=2, index_topk=8,
                        moe_intermediate_size=64),
    "hy_v4": dict(head_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, kv_lora_rank=32, q_lora_rank=32,
                  index_topk=8, index_head_dim=16, index_n_heads=2, indexer_types=["full", "shared"]),
    "qwen4_exp_text": dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                           linear_value_head_dim=16, hc_count=2, hc_lowrank=16, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32,
                           indexer_budget=8, indexer_compress_ratio=2, ngram_vocab_size_base=1024,
                           layer_types=["linear_attention", "indexed_attention"]),
    "dbrx": dict(d_model=128, n_heads=4, n_layers=2, max_seq_len=128,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 256, "moe_num_experts": 4, "moe_top_k": 2}),
    # a Mamba layer, then two hybrid ones (shared attention on [hidden, embeddings], then Mamba): the shared attention
    # block is tied between hybrid layers, which transformers needs two of
    "zamba": dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "hybrid"], n_mamba_heads=4,
                  attention_head_dim=32),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], n_mamba_heads=16, mamba_headdim=16, mamba_ngroups=1),
    # pure state-space models: no attention heads (16 Mamba-2 heads of 16 tile expand 2 x 128; 4 groups of B/C)
    "mamba": dict(state_size=16),
    "falcon_mamba": dict(state_size=16),
    "mamba2": dict(num_heads=16, head_dim=16, n_groups=4, state_size=16, chunk_size=8),
    # a recurrent (RG-LRU) block, then a local-attention one: the recurrent state lives in the blocks' modules, the
    # attention's keys and values in the cache, which the trunk fills in place and does not return
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=128, attention_window_size=16),
    # two blocks of two attention sublayers each: num_hidden_layers (derived: 2 x num_layers) counts the sublayers
    "longcat_flash": dict(num_layers=2, num_hidden_layers=None, head_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16,
                          v_head_dim=32, kv_lora_rank=32, q_lora_rank=32, expert_ffn_hidden_size=64,
                          ffn_hidden_size=256, zero_expert_num=2),
}
#: families that run end to end (init equals the base model, only the side network learns, training changes the
#: output, cached generation equals uncached)
WORKING = ["deepseek_v3", "gptj", "bamba", "gemma4_text", "qwen2_moe", "llama4_text", "roberta", "cwm", "dbrx", "zamba",
           "zamba2", "diffllama", "mimo_v2_flash", "mamba", "falcon_mamba", "mamba2", "recurrent_gemma", "longcat_flash"]
#: blocks that pass several residual streams; run end to end by their own test below, as some of their side
#: parameters get no gradient from a language-model loss, as the backbone's would not (an indexer's top-k selection,
#: a compressor's position bias at 9 positions)
SEVERAL_STREAMS = ["deepseek_v4", "gemma3n_text", "hy_v4", "qwen4_exp_text"]


def tiny_config(model_type, **extra):
    known = AutoConfig.for_model(model_type)
    names = set(known.to_dict()) | set(getattr(known, "attribute_map", {}) or {})
    kwargs = {k: v for k, v in SIZES.items() if k in names}
    for name, value in {**OVERRIDES.get(model_type, {}), **extra}.items():
        if value is None:
            kwargs.pop(name, None)
        else:
            kwargs[name] = value
    return AutoConfig.for_model(model_type, **kwargs)


def tiny(model_type, **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **extra)).eval()


def side_of(model):
    return next(m for m in model.modules() if type(m).__name__ == "QSTLayer").qst_side["default"]


def test_readme_lists_exactly_these_families():
    text = open(f"{REPO}/README.md").read()
    section = text.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    listed = section.split("Also run end to end", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"`([a-z0-9_-]+)`", listed.split(":", 1)[1]) == WORKING + SEVERAL_STREAMS


@pytest.mark.parametrize("model_type", WORKING)
def test_family_runs_end_to_end(model_type):
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    check_default_config_end_to_end(tiny(model_type), ids)


@pytest.mark.parametrize("model_type", SEVERAL_STREAMS)
def test_family_with_several_residual_streams_runs_end_to_end(model_type, tmp_path):
    """The architecture sweep's checks: the start equals the base model, the loss is finite and only side parameters
    get gradients (the backbone none), training changes the logits, disable_adapter() gives the base back, cached
    greedy generation equals uncached, and save/load gives the same logits."""
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    base = tiny(model_type)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad and all(".qst_side." in name for name in with_grad)
    assert any("downsample" in name for name in with_grad)
    model.zero_grad()
    train_steps(model, ids, lr=3e-2)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, expected)
    assert not torch.allclose(adapted, expected)
    cached, uncached = generate_both_ways(model, ids)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(model_type), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)


def test_prompt_lookup_decoding_on_a_hybrid_model():
    """transformers >= 5.25 runs assisted decoding on hybrid Mamba/attention models (rolling linear layers back to a
    recorded recurrent state); the side trunk's Mamba layers must keep as many states as the backbone's. Before 5.25
    transformers refuses such (stateful) models itself."""
    model = get_peft_model(tiny("bamba"), QSTConfig(task_type="CAUSAL_LM", r=4))
    torch.manual_seed(7)
    train_steps(model, torch.randint(3, V, (4, 24)), steps=8, lr=3e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    greedy = model.generate(input_ids=ids, **kwargs)
    try:
        lookup = model.generate(input_ids=ids, prompt_lookup_num_tokens=3, **kwargs)
    except ValueError as error:
        if "stateful" not in str(error):
            raise
        pytest.skip(f"this transformers version refuses assisted decoding here: {error}")
    assert torch.equal(lookup, greedy)


def test_an_r_whose_side_mamba_width_the_mamba_heads_do_not_tile_is_refused_with_the_fitting_values():
    """Bamba's 16 Mamba heads must tile mamba_expand x the side width: r=32 leaves a width of 8 (2 x 4), refused
    naming the widths, the r values that fit the model's heads, and those that fit with side_heads="auto"."""
    with pytest.raises(ValueError, match=re.escape(
            "r=32 gives a side Mamba width of 8 (mamba_expand x 4), which the model's 16 Mamba heads (mamba_n_heads) "
            "do not split into equal heads. Values of r that fit this model: [1, 2, 4, 8]. side_heads='auto' (the "
            "default: heads about as wide as the model's) fits r in [1, 2, 4, 8, 16].")):
        get_peft_model(tiny("bamba"), QSTConfig(task_type="CAUSAL_LM", r=32, side_heads=None))


def test_side_widths_follow_the_rules():
    """What each rule does to the side config (r=16, side width 8): the expert FFNs are divided like the dense one;
    latent attention keeps its head widths and divides its compressions; GPT-J rotates the same fraction of a side
    head; Bamba's Mamba heads tile mamba_expand x the side width."""
    moe = side_of(get_peft_model(tiny("qwen2_moe"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert (moe.moe_intermediate_size, moe.shared_expert_intermediate_size, moe.intermediate_size) == (4, 4, 16)
    mla = side_of(get_peft_model(tiny("deepseek_v3"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert (mla.qk_rope_head_dim, mla.qk_nope_head_dim, mla.v_head_dim) == (16, 16, 32)
    assert (mla.kv_lora_rank, mla.q_lora_rank) == (2, 3)
    gptj = side_of(get_peft_model(tiny("gptj"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert (gptj.n_head, gptj.rotary_dim) == (1, 4)  # 16 of each 32-wide head rotated: 4 of the one side head of 8
    with pytest.raises(ValueError, match="too small for the model's rotary fraction"):
        get_peft_model(tiny("gptj"), QSTConfig(task_type="CAUSAL_LM", side_heads=None))  # 4 heads of 2: 1 rotated
    bamba = side_of(get_peft_model(tiny("bamba"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert bamba.mamba_n_heads * bamba.mamba_d_head == bamba.mamba_expand * 8
    zamba2 = side_of(get_peft_model(tiny("zamba2"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert zamba2.n_mamba_heads * zamba2.mamba_headdim == zamba2.mamba_expand * 8  # Zamba2's names for the same rule
    assert zamba2.attention_hidden_size == 16  # 2 d: the block input and the embeddings, side by side
    zamba = side_of(get_peft_model(tiny("zamba"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert zamba.attention_hidden_size == 16
    # DBRX configures its blocks in sub-configs: the experts' widths and the attention's key/value heads live there
    dbrx = side_of(get_peft_model(tiny("dbrx"), QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert (dbrx.ffn_config.hidden_size, dbrx.ffn_config.ffn_hidden_size, dbrx.attn_config.kv_n_heads) == (8, 16, 1)
    assert (dbrx.n_heads, dbrx.ffn_config.moe_num_experts) == (1, 4)


def test_gptj_side_heads_rotate_an_even_number_of_channels():
    """GPT-J rotates channel pairs: a side head gets the backbone's fraction of rotated channels rounded down to an
    even number. Heads of 24 rotating 12 (half), at r=4 and four side heads of 6: half is 3, so 2 are rotated, and
    the side network trains; an odd rotary_dim made GPT-J's rotary embedding fail inside the side blocks."""
    base = tiny("gptj", hidden_size=96, rotary_dim=12)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=4))
    side = side_of(model).trunk.config
    assert (side.n_embd, side.n_head, side.rotary_dim) == (24, 4, 2)
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    assert all(torch.isfinite(torch.tensor(train_steps(model, ids, steps=2))))


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "mamba2"])
def test_state_space_models_shrink_their_mixers_and_reload_exactly(model_type, tmp_path):
    """Pure state-space models have no attention heads, which the side network's shape was derived from: they were
    refused at get_peft_model ("its config has no num_attention_heads"). Their mixers' widths follow the side width
    instead (r=16: 8): the inner width is expand x 8, the time-step rank is divided by r, Mamba-2 keeps its 16 heads,
    narrowed to tile the inner width, and divides its 4 groups of B/C projections (to 1); the state size and the
    convolution kernel are kept. The adapter records the state-space widths in its signature and reloads exactly."""
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM"))
    side = side_of(model).trunk.config
    assert side.hidden_size == 8 and side.state_size == 16 and side.conv_kernel == 4
    assert side.time_step_rank == 1  # ceil(128 / 16) = 8 in the backbone
    if model_type == "mamba2":
        assert (side.num_heads, side.head_dim, side.n_groups) == (16, 1, 1)
    else:
        assert side.intermediate_size == 16
    assert model.peft_config["default"].side_heads is None  # no heads to choose
    signature = model.peft_config["default"].base_model_signature
    assert signature["num_attention_heads"] == 0 and signature["state_size"] == 16
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    train_steps(model, ids, lr=3e-2)
    with torch.no_grad(), parameters_frozen(model):  # as the reloaded adapter's are (its side blocks are Mamba mixers)
        adapted = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(model_type), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)
    with pytest.raises(ValueError, match="state_size 16 against 8"):
        PeftModel.from_pretrained(tiny(model_type, state_size=8), str(tmp_path))


def test_state_space_model_refuses_side_heads_and_names_the_fitting_r():
    with pytest.raises(ValueError, match="this state-space model has none"):
        get_peft_model(tiny("mamba"), QSTConfig(task_type="CAUSAL_LM", side_heads=2))
    with pytest.raises(ValueError, match=re.escape("16 Mamba heads (num_heads) do not split into equal heads. Values "
                                                   "of r that fit this model: [1, 2, 4, 8, 16]")):
        get_peft_model(tiny("mamba2"), QSTConfig(task_type="CAUSAL_LM", r=64))


def test_sub_configs_of_towers_are_left_alone():
    """Only sub-configs of block parts (DBRX's, which have no model type of their own) take the shrink rules. Phi-4
    multimodal's trunk holds its audio tower, whose config counts its layers as ``num_blocks``: the rules divided its
    ``intermediate_size`` (and its ``hidden_size`` where it equals the text model's), so the unused tower the side trunk
    builds changed shape and adapters saved before no longer loaded."""
    audio = dict(hidden_size=128, intermediate_size=256, num_blocks=2, num_attention_heads=4,
                 depthwise_separable_out_channel=128, nemo_conv_channels=128, ext_pw_out_channel=128)
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    base = tiny("phi4_multimodal", audio_config=audio, vision_config=vision)
    side = side_of(get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))).trunk.config
    assert side.hidden_size == 8  # the text model's width is divided
    assert side.audio_config.to_dict() == base.config.audio_config.to_dict()
    assert side.vision_config.to_dict() == base.config.vision_config.to_dict()


def test_auto_side_heads_try_the_next_count_that_the_model_accepts():
    """"auto" prefers one side head of 8 (r=16) for the tiny DiffLlama, whose class refuses it (one key/value head:
    its differential attention needs an even number); two heads (one key/value head) are refused too, and the model's
    own four heads (two key/value heads) work: get_peft_model records 4. A head count the user chose is not replaced."""
    config = QSTConfig(task_type="CAUSAL_LM")
    model = get_peft_model(tiny("diffllama"), config)
    assert model.peft_config["default"].side_heads == 4
    assert side_of(model).trunk.config.num_key_value_heads == 2
    with pytest.raises(QSTUnsupportedModelError, match="DiffLlamaModel refuses its config") as raised:
        get_peft_model(tiny("diffllama"), QSTConfig(task_type="CAUSAL_LM", side_heads=1))
    assert "also tried" not in str(raised.value)


def test_side_heads_split_among_key_value_heads_multiplied_in_some_layers():
    """MiMo-V2-Flash's sliding-window layers have twice num_key_value_heads key/value heads (its modeling code, not its
    config, says so): "auto"'s one side head (8 channels, nearest the model's heads of 32) leaves them no query head
    each, and that side network does not run, so "auto" takes the next count, 2 heads of 4 with one key/value head
    (two in the sliding layers). Its value heads (128 beside query/key heads of 32) follow the side head width in
    that ratio; kept at 128, the side blocks' values were as wide as the backbone's."""
    model = get_peft_model(tiny("mimo_v2_flash"), QSTConfig(task_type="CAUSAL_LM"))
    side = side_of(model).trunk.config
    assert model.peft_config["default"].side_heads == 2
    assert (side.num_attention_heads, side.num_key_value_heads, side.head_dim, side.v_head_dim) == (2, 1, 4, 16)


def test_an_adapter_whose_auto_side_heads_took_a_later_count_loads_with_the_config_it_was_made_with(tmp_path):
    """transformers' load_adapter(peft_config=QSTConfig(...)) checks the given config against the saved one before
    binding it, resolving "auto" to its first choice: the DiffLlama adapter "auto" gave 4 heads (the first choice, one
    head, is refused by the model) was refused as saved with another head count. The check of the head count now
    waits for the binding, which tries the counts as get_peft_model did; a saved count the binding does not reach
    (a Llama without grouped key/value heads, so both layouts have weights of the same shapes: "auto" builds one
    head, an adapter saved with side_heads=2) is still refused, and the load undone."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])
    for model_type, extra, saved_heads, loads in [("diffllama", {}, "auto", True),
                                                   ("llama", dict(num_key_value_heads=4), 2, False)]:
        base_dir, folder = tmp_path / model_type / "base", tmp_path / model_type / "adapter"
        tiny(model_type, **extra).save_pretrained(base_dir)
        trained = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                 QSTConfig(task_type="CAUSAL_LM", side_heads=saved_heads))
        train_steps(trained, ids, steps=1)
        trained.save_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        if loads:
            base.load_adapter(str(folder), peft_config=QSTConfig(task_type="CAUSAL_LM"))
            assert base.peft_config["default"].side_heads == 4
            with torch.no_grad():
                assert torch.equal(base(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
        else:
            modules = [name for name, _ in base.named_modules()]
            with pytest.raises(ValueError, match=r"side_heads=2 \(adapter 'default': 1\)"):
                base.load_adapter(str(folder), peft_config=QSTConfig(task_type="CAUSAL_LM"))
            assert [name for name, _ in base.named_modules()] == modules and not getattr(base, "peft_config", None)


def test_auto_side_heads_name_every_count_tried_when_none_works():
    """Kolibri 1.1 rounds keys and values in blocks of 16 channels; the tiny model's side width at r=16 (8) fits no
    such head, so every count "auto" tries fails: the error names the first count's problem and the others tried, and
    suggests another r, not the model's own heads it tried; at r=8 one side head of 16 works."""
    extra = dict(index_num_heads=1, layer_types=["sliding_attention", "indexed_attention"], index_layers=[1],
                 kv_source_layers=[0, 1], mlp_only_layers=[0], mlp_only_intermediate_size=256, index_topk=8,
                 index_pool_size=32, index_compression=4, index_num_local_tokens=4, index_num_sink_tokens=1)
    base = tiny("kolibri1_1", **extra)
    trunk_before = {name for name, _ in base.named_modules()}
    with pytest.raises(QSTUnsupportedModelError, match=re.escape("side_heads=1: the side network")) as raised:
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    assert "also tried the other head counts that fit r=16 (2, 4 (the model's own))" in str(raised.value)
    assert "side_heads=None" not in str(raised.value)  # the model's own heads were tried: not suggested again
    assert {name for name, _ in base.named_modules()} == trunk_before  # nothing was wrapped
    model = get_peft_model(tiny("kolibri1_1", **extra), QSTConfig(task_type="CAUSAL_LM", r=8))
    assert model.peft_config["default"].side_heads == 1


@pytest.mark.parametrize(
    "model_type, extra, message",
    [
        ("electra", dict(embedding_size=64, is_decoder=True), "embedding_size=64 differs from hidden_size=128"),
        ("big_bird", dict(attention_type="original_full"), "bidirectional"),
        ("xlm", dict(emb_dim=128, n_layers=2, n_heads=4), "bidirectional"),
        ("rwkv", dict(attention_hidden_size=128), "no num_attention_heads"),
        # reversible (RevNet) blocks; before, refused for its axial position embeddings as if another r might fit
        ("reformer", dict(is_decoder=True, attn_layers=["local", "local"], axial_pos_shape=[8, 16],
                          axial_pos_embds_dim=[64, 64], feed_forward_size=256, attention_head_size=32,
                          local_attn_chunk_length=8, max_position_embeddings=None),
         "its blocks are reversible (ReformerLayer defines backward_pass"),
        # logits from the n-gram predicting streams; before, refused as a side network that "does not run"
        ("prophetnet", dict(num_encoder_layers=2, num_decoder_layers=2, num_encoder_attention_heads=4,
                            num_decoder_attention_heads=4, decoder_ffn_dim=256, encoder_ffn_dim=256),
         "computes its logits from the decoder's 2 n-gram predicting streams"),
    ],
    ids=["embedding-width", "bert-style-encoder", "xlm-encoder", "recurrent-without-mamba-layout",
         "reversible-blocks", "logits-from-ngram-streams"],
)
def test_unsupported_model_is_refused_at_get_peft_model(model_type, extra, message):
    base = tiny(model_type, **extra)
    trunk_before = {name for name, _ in base.named_modules()}
    with pytest.raises(QSTUnsupportedModelError, match=re.escape(message)) as raised:
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    assert model_type in str(raised.value)
    assert {name for name, _ in base.named_modules()} == trunk_before  # nothing was wrapped


def test_an_embedding_width_equal_to_the_hidden_size_becomes_the_side_width():
    """ELECTRA holds its embedding width apart from its hidden size (``embedding_size``), refused above where the two
    differ. Where they are equal, as a decoder (``is_decoder=True``), it runs end to end: the side trunk's embedding
    width is its own hidden width (8 at r=16). Left at the backbone's 128, the side trunk's embeddings were 128 wide
    with a projection to its 8 channels, and its side network did not run."""
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    model, _ = check_default_config_end_to_end(tiny("electra", is_decoder=True), ids)
    side = side_of(model).trunk.config
    assert (side.hidden_size, side.embedding_size) == (8, 8)


def test_blocks_of_several_sublayers_are_side_tuned_as_blocks():
    """LongCat-Flash's blocks each hold two attention sublayers (lists of two attention, MLP and norm modules), and its
    num_hidden_layers counts those (2 x num_layers). Read as the block count, it matched no list at its config's
    defaults (refused: "no nn.ModuleList of 56 modules"), and where a block's sublayer lists happened to have that length
    QST side-tuned them instead of the blocks (the architecture sweep's one-block model: the first block's two attention
    modules). The side network reads the blocks, one per block, also where the sublayer lists are as long as the block
    list (two blocks of two sublayers)."""
    from peft_qst.side import find_layer_list

    base = tiny("longcat_flash")
    assert base.config.num_hidden_layers == 4 and len(base.model.layers) == 2
    assert len(base.model.layers[0].self_attn) == 2  # as long as the block list
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    trunk = model.base_model.model.model.get_base_layer()
    assert find_layer_list(trunk, 2) == (trunk, "layers")
    side = side_of(model)
    assert len(side.trunk.layers) == 2 and len(side.trunk.layers[0].self_attn) == 2
    reads = []
    hooks = [block.register_forward_hook(lambda *_: reads.append(1)) for block in trunk.layers]
    with torch.no_grad():
        model(input_ids=torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(0)))
    assert len(reads) == 2
    for hook in hooks:
        hook.remove()


def test_a_blocks_sublayer_list_is_never_taken_for_the_block_list(monkeypatch):
    """Where the block count is misread (a model whose num_hidden_layers counts sublayers, and no rule says so: here
    LongCat-Flash with its rule removed), a one-block model's lists of two sublayers inside its block are not taken
    for the block list: refused, naming the list that holds the blocks, instead of side-tuning the first block's two
    attention modules."""
    import peft_qst.side_config

    monkeypatch.setattr(peft_qst.side_config, "BLOCK_COUNT_ATTRIBUTES", {})
    base = tiny("longcat_flash", num_layers=1)
    with pytest.raises(QSTUnsupportedModelError, match=r"no nn\.ModuleList of 2 modules \('layers' holds 1\)"):
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    monkeypatch.undo()
    model = get_peft_model(tiny("longcat_flash", num_layers=1), QSTConfig(task_type="CAUSAL_LM"))
    assert len(side_of(model).trunk.layers) == 1


def test_a_block_count_left_lowered_names_the_attribute_that_counts_the_blocks():
    """transformers' self-speculative decoding lowers the config's num_hidden_layers to n while it drafts, and leaves it
    lowered where the draft fails (it restores it without ``finally``). LongCat-Flash's num_hidden_layers sets
    num_layers to n // 2, the blocks its forward runs: read as num_hidden_layers, the lowered count (2, for an early
    exit at 2 of its 2 blocks) was not lower than the blocks, so QST took the forward for "a model that loops over its
    blocks" and gave no hint to restore the count. QST reads the block count (num_layers) there, as it counts the
    blocks by, and names it and the value that restores it."""
    model = get_peft_model(tiny("longcat_flash"), QSTConfig(task_type="CAUSAL_LM"))
    train_steps(model, torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0)), steps=2)
    model.eval()
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    model.config.num_hidden_layers = 2  # what generate(assistant_early_exit=2) sets, and leaves if drafting fails
    assert model.config.num_layers == 1
    with torch.no_grad(), pytest.raises(
        QSTUnsupportedModelError, match=r"num_layers is 1, lower than the 2 blocks.*model\.config\.num_layers = 2\.$"
    ):
        model(input_ids=ids)
    model.config.num_layers = 2  # as the refusal says
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted)


def test_longcat_flash_adapter_on_another_block_count_is_refused_naming_its_blocks(tmp_path):
    """LongCat-Flash's config.json holds num_layers (its blocks); its num_hidden_layers (2 x num_layers) is derived. An
    adapter of 2 blocks loaded onto a 1-block model was refused naming only "4 layers" against "2 layers" and
    num_hidden_layers 4 against 2, values that neither config.json holds: the refusal names the blocks and num_layers
    beside them."""
    get_peft_model(tiny("longcat_flash"), QSTConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    other = tiny("longcat_flash", num_layers=1)
    with pytest.raises(ValueError, match=re.escape("num_hidden_layers 4 against 2 (num_layers 2 against 1)")) as raised:
        PeftModel.from_pretrained(other, str(tmp_path))
    assert "built for a longcat_flash model (hidden_size=128, 2 blocks (num_layers=2, num_hidden_layers=4)," in str(
        raised.value
    )
    assert "onto a longcat_flash model (hidden_size=128, 1 block (num_layers=1, num_hidden_layers=2)," in str(
        raised.value
    )


def test_blocks_run_in_cycles_are_refused_naming_the_cycles():
    """HRM runs two stacks of 2 blocks in cycles and counts each run as a layer (num_hidden_layers 4, the cache's
    slots): no list holds 4 blocks, and the refusal says why besides a changed num_hidden_layers."""
    base = tiny("hrm_text", num_layers_per_stack=2, H_cycles=1, L_cycles=1, L_bp_cycles=[1], num_hidden_layers=4)
    with pytest.raises(QSTUnsupportedModelError, match=re.escape("runs them more than once per forward")) as raised:
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    assert "num_hidden_layers=4" in str(raised.value) and "'L_module.layers' holds 2" in str(raised.value)


def _looping_config(model_type: str):
    """A model of ``model_type`` whose config has it run blocks 1 and 2 of 4 twice in each forward."""
    config = arch_sweep.make_config(model_type)
    if model_type == "inkling2_loop_text":
        config.num_hidden_layers, config.n_layers_per_attn_res_block = 4, 1
        config.loop_layer_index_start, config.loop_layer_index_end, config.loop_num_passes = 1, 3, 2
    else:  # dory
        config.num_hidden_layers, config.n_input_layers, config.n_recurrent_layers = 4, 1, 2
        config.n_output_layers, config.n_recurrent_loops = 1, 2
    config.layer_types = (config.layer_types * 4)[:4]
    return config


@pytest.mark.parametrize(
    ("model_type", "named"),
    [
        ("inkling2_loop_text", "loop_layer_index_start=1, loop_layer_index_end=3, loop_num_passes=2"),
        ("dory", "n_input_layers=1, n_recurrent_layers=2, n_recurrent_loops=2"),
    ],
)
def test_blocks_looped_over_are_refused_at_get_peft_model(model_type, named):
    """Inkling2-Loop runs its layers from loop_layer_index_start to loop_layer_index_end loop_num_passes times, Dory its
    n_recurrent_layers after the n_input_layers first n_recurrent_loops times: the side network reads each block's
    output once. Such models were refused only at their first forward, after get_peft_model had built a side network
    (the architecture sweep's two-layer Inkling2-Loop has no layer in the range, runs each once and is supported); now
    get_peft_model refuses them from the config, naming the attributes and their values."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_looping_config(model_type)).eval()
    with pytest.raises(QSTUnsupportedModelError, match=re.escape("run blocks 1 to 2 (of 4) 2 times")) as raised:
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    assert f"({named})" in str(raised.value)


def test_blocks_looped_over_without_the_config_saying_so_are_refused_at_the_first_forward():
    """The count of hidden states at the first forward stays as the backstop for a model whose config did not say it
    loops when it was wrapped (here one pass, changed to two afterwards): more hidden states than blocks, refused
    naming the loop."""
    config = _looping_config("inkling2_loop_text")
    config.loop_num_passes = 1
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), QSTConfig(task_type="CAUSAL_LM"))
    model.config.loop_num_passes = 2
    with pytest.raises(QSTUnsupportedModelError, match=r"recorded 7 hidden states .* expected 5 .* loops over its"):
        model(input_ids=torch.randint(3, arch_sweep.VOCAB, (1, 8), generator=torch.Generator().manual_seed(0)))


def _mllama_text_model():
    """Mllama's language model with a cross-attention layer between two self-attention ones."""
    from transformers import MllamaForCausalLM

    config = AutoConfig.for_model(
        "mllama_text_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    base = MllamaForCausalLM(config).eval()
    # non-zero gates, as trained ones are (transformers starts them at 0, where the layer adds nothing)
    with torch.no_grad():
        base.model.layers[1].cross_attn_attn_gate.fill_(0.5)
        base.model.layers[1].cross_attn_mlp_gate.fill_(0.5)
    return base


def test_mllama_text_model_skipping_its_cross_attention_layers_is_side_tuned(tmp_path):
    """Mllama's text model skips its cross-attention layers when given no cross_attention_states (text without an
    image), so such a block's output is its input. QST recorded fewer hidden states than blocks and refused at the
    first forward, blaming "a model that loops over its blocks". The skipped block's state is now its input (its side
    block is skipped by the side trunk too): the model starts at the base model (hidden states included, as many as the
    base model returns), trains (every side parameter but the skipped block's side layer gets a gradient), generates
    cached as uncached, and reloads. Given image states, the cross-attention layers run, which the side network would
    not follow: refused, naming them."""
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    base = _mllama_text_model()
    assert type(base.model.layers[1]).__name__ == "MllamaCrossAttentionDecoderLayer"
    with torch.no_grad(), parameters_frozen(base):
        expected = base(input_ids=ids, output_hidden_states=True)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        start = model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(start.logits, expected.logits)
    assert len(start.hidden_states) == len(expected.hidden_states) == 3
    assert all(torch.equal(a, b) for a, b in zip(start.hidden_states, expected.hidden_states))

    # the side layer of the skipped block (its block, downsampler and gate) is the only one without a gradient: what
    # the docs tell DDP users (find_unused_parameters=True)
    model(input_ids=ids, labels=ids).loss.backward()
    unused = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unused and all(".qst_side.default.trunk.layers.1." in name for name in unused)
    assert any(name.endswith("trunk.layers.1.gate_logit") for name in unused)
    model.zero_grad(set_to_none=True)

    losses = train_steps(model, ids, lr=3e-2)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, expected.logits)
    assert not torch.allclose(adapted, expected.logits)
    cached, uncached = generate_both_ways(model, ids)
    assert torch.equal(cached, uncached)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_mllama_text_model(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)
    image_states = torch.randn(2, 5, 64)
    with pytest.raises(QSTUnsupportedModelError, match="on text alone: given cross_attention_states"):
        reloaded(input_ids=ids, cross_attention_states=image_states)


def test_a_model_whose_own_heads_fit_runs_with_side_heads_none():
    model = get_peft_model(tiny("diffllama"), QSTConfig(task_type="CAUSAL_LM", side_heads=None))
    assert model.peft_config["default"].side_heads is None
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    train_steps(model, ids, lr=3e-2)


def test_causality_left_open_by_flags_and_config_is_measured():
    """GPT-NeoX-Japanese's config says is_decoder=False and its attention modules carry no flag; it is causal, and
    accepted. A RoFormer with is_decoder=False has neither either, attends both ways, and is refused."""
    get_peft_model(tiny("gpt_neox_japanese"), QSTConfig(task_type="CAUSAL_LM"))
    with pytest.raises(QSTUnsupportedModelError, match="bidirectional"):
        get_peft_model(tiny("roformer"), QSTConfig(task_type="CAUSAL_LM"))


@pytest.mark.parametrize(
    ("model_type", "backbone_shape", "side_shape"),
    [
        ("gemma3n_text", (2, 2, 7, 128), (2, 2, 7, 8)),  # AltUp: (streams, batch, sequence, hidden)
        ("deepseek_v4", (2, 7, 4, 128), (2, 7, 4, 8)),  # hyper-connections: (batch, sequence, streams, hidden)
        ("qwen4_exp_text", (2, 7, 256), (2, 7, 16)),  # hyper-connections side by side: (batch, sequence, 2 x hidden)
    ],
)
def test_blocks_passing_several_streams_feed_the_side_network_one(model_type, backbone_shape, side_shape):
    """Blocks that pass several residual streams: each side block reads a single-stream view of its backbone block's
    output (AltUp's active stream, the hyper-connections' mean), and mixes it into every stream of its own trunk, which
    keeps the model's stream machinery at side width. They were refused at the first forward ("its blocks pass hidden
    states of shape (2, 2, 7, 128)") or, for the side networks of hyper-connection models, at get_peft_model."""
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM"))
    side = side_of(model)
    seen = {}

    def record(name):
        def hook(module, args, output=None):
            value = args[0] if name != "backbone" else (output[0] if isinstance(output, tuple) else output)
            seen.setdefault(name, tuple(value.shape))

        return hook

    side._blocks[1].block.register_forward_pre_hook(record("side"))
    side._blocks[1].downsample.register_forward_pre_hook(record("down"))
    model.get_base_model().model.layers[0].register_forward_hook(record("backbone"))
    # the values too: the documented single-stream view of block 0's output is what side block 0's downsampler reads
    values = {}
    side._blocks[0].downsample.register_forward_pre_hook(lambda module, args: values.setdefault("down", args[0]))
    model.get_base_model().model.layers[0].register_forward_hook(
        lambda module, args, output: values.setdefault("backbone", output[0] if isinstance(output, tuple) else output)
    )
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids)
    assert tuple(seen["backbone"]) == backbone_shape
    assert tuple(seen["down"]) == (2, 7, 128)
    assert tuple(seen["side"]) == side_shape
    backbone = values["backbone"]
    if model_type == "gemma3n_text":  # AltUp: the active stream
        view = backbone[model.get_base_model().config.altup_active_idx]
    elif model_type == "deepseek_v4":  # stacked hyper-connections: their mean
        view = backbone.mean(dim=2)
    else:  # hyper-connections side by side: the mean of the hidden dimension's 2 slices
        view = (backbone[..., :128] + backbone[..., 128:]) / 2
    torch.testing.assert_close(values["down"], view)


def test_side_networks_of_deepseek_v4_and_gemma3n_follow_the_shrink_rules():
    """DeepSeek-V4's hash-routed expert layers pick experts by token id, which the side trunk never sees: its side
    layers route with a learned router (it failed with "'NoneType' object has no attribute 'reshape'"); its grouped
    output projection's low rank is divided by r. Gemma 3n's per-layer FFN widths are divided layer by layer (kept,
    they were as wide as the backbone's)."""
    deepseek = side_of(get_peft_model(tiny("deepseek_v4"), QSTConfig(task_type="CAUSAL_LM", r=16))).trunk.config
    assert deepseek.mlp_layer_types == ["moe", "moe"] and deepseek.o_lora_rank == 4
    gemma = side_of(get_peft_model(tiny("gemma3n_text"), QSTConfig(task_type="CAUSAL_LM", r=16))).trunk.config
    assert gemma.intermediate_size == [16, 16]


arch_sweep = load_script("integration/arch_sweep.py", "arch_sweep")

#: per type, at the architecture sweep's tiny config and r=16: widths inside the side blocks that follow no hidden-size
#: rule (ranks, head counts of parts whose head width is set apart, Mamba widths set apart) -> (the model's, the side
#: blocks'). Each was the model's, so that part of every side block was as wide as the backbone's
INNER_WIDTHS = {
    "qwen4_exp_text": {"hc_lowrank": (16, 1), "indexer_n_heads": (2, 1)},
    "gemma3n_text": {"laurel_rank": (8, 1)},
    "jamba": {"mamba_dt_rank": (8, 1)},
    "zamba": {"mamba_dt_rank": (8, 1)},
    "zamba2": {"adapter_rank": (128, 8)},
    "zaya": {"router_hidden_size": (256, 16)},
    "axk2": {"gated_norm_rank": (16, 1), "index_n_heads": (2, 1)},
    "deepseek_v32": {"index_n_heads": (2, 1)},
    "glm_moe_dsa": {"index_n_heads": (2, 1)},
    "deepseek_v4": {"index_n_heads": (64, 4)},
    "hy_v4": {"index_n_heads": (2, 1)},
    "minimax_m3_vl_text": {"index_n_heads": (2, 1)},  # one per key/value head, as the model's (below)
    "kimi_linear": {"linear_num_heads": (4, 1)},
    "bailing_hybrid": {"linear_num_heads": (4, 1), "index_n_heads": (2, 1)},
    "inkling_text": {"swa_num_attention_heads": (64, 4), "swa_num_key_value_heads": (16, 1)},
    "laguna": {"num_attention_heads_per_layer": ([48, 48], [12, 12])},  # 4 heads in the sweep's config, 1 side head
    "nemotron_h": {"mamba_num_heads": (8, 8), "mamba_head_dim": (32, 2)},
    "falcon_h1": {"mamba_n_heads": (4, 1), "mamba_d_ssm": (256, 64)},
}


#: changes to the sweep's tiny config where it builds no layer that reads the width
INNER_WIDTH_CONFIGS = {
    "minimax_m3_vl_text": dict(layer_types=["full_attention", "minimax_m3_sparse"], index_n_heads=2, index_head_dim=32,
                               index_block_size=2, index_topk_blocks=2),
}


def inner_width_model(model_type):
    config = arch_sweep.make_config(model_type)
    for name, value in INNER_WIDTH_CONFIGS.get(model_type, {}).items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", INNER_WIDTHS)
def test_side_blocks_divide_their_inner_widths_by_r(model_type):
    """Widths inside a block that do not follow hidden_size (Qwen4-Exp's hyper-connection rank 320 and its indexer's
    16 heads of 256, about 11% of its side network at its published shape; Jamba's time-step rank of d / 16; Kimi
    Linear's 32 linear-attention heads of 128; Nemotron-H's Mamba mixer as wide as the backbone's ...) are divided by r
    (``side_inner_widths="divided"``, the default), and the side network runs and learns; ``"backbone"`` keeps the
    model's, as adapters saved before the option existed were built."""
    model = get_peft_model(inner_width_model(model_type), QSTConfig(task_type="CAUSAL_LM"))
    config = side_of(model).trunk.config
    assert {name: getattr(config, name) for name in INNER_WIDTHS[model_type]} == {
        name: side for name, (_, side) in INNER_WIDTHS[model_type].items()
    }
    ids = torch.randint(3, arch_sweep.VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and side_of(model).upsample.weight.grad.abs().sum() > 0
    divided = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = get_peft_model(
        inner_width_model(model_type), QSTConfig(task_type="CAUSAL_LM", side_inner_widths="backbone")
    )
    assert {name: getattr(side_of(kept).trunk.config, name) for name in INNER_WIDTHS[model_type]} == {
        name: backbone for name, (backbone, _) in INNER_WIDTHS[model_type].items()
    }
    assert divided < sum(p.numel() for p in kept.parameters() if p.requires_grad)


def test_inner_widths_that_r_does_not_divide_follow_their_rounding_rules():
    """The inner-width rules where the sweep's tiny configs divide evenly and these do not. Each side network runs.
    Zamba2's shared-block adapters of rank 136 at r=16 get rank 9 (8.5, rounded up). Laguna's per-layer head counts
    48 and 46 (4 heads) beside one side head get 12 and 12 (11.5, Python's round: half to even). Nemotron-H's 18
    Mamba heads in 18 groups at r=4 divide to 4 groups, which 18 heads do not share: 2, the greatest common divisor
    of 18 and 4 (4 groups failed in the side mixer). MiniMax-M3's indexer has one head per key/value head
    (its block selection is per key/value group): with the model's own heads (side_heads=None: 4 heads, 2 key/value
    heads) its side indexer keeps 2, not 2 // 16 raised to 1."""
    def side(model_type, r=16, side_heads="auto", **overrides):
        config = arch_sweep.make_config(model_type)
        for name, value in {**INNER_WIDTH_CONFIGS.get(model_type, {}), **overrides}.items():
            setattr(config, name, value)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).eval()
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=r, side_heads=side_heads))
        ids = torch.randint(3, arch_sweep.VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        return side_of(model).trunk.config

    assert side("zamba2", adapter_rank=136).adapter_rank == 9
    laguna = side("laguna", num_attention_heads_per_layer=[48, 46])
    assert (laguna.num_attention_heads, laguna.num_attention_heads_per_layer) == (1, [12, 12])
    nemotron = side("nemotron_h", r=4, mamba_num_heads=18, n_groups=18)
    assert (nemotron.mamba_num_heads, nemotron.n_groups) == (18, 2)
    minimax = side("minimax_m3_vl_text", side_heads=None)
    assert (minimax.num_attention_heads, minimax.num_key_value_heads, minimax.index_n_heads) == (4, 2, 2)


def saved_adapter_of_backbone_widths(model_type, folder):
    """A tiny adapter of ``model_type`` with ``side_inner_widths="backbone"`` (the side blocks adapters saved before
    the option have), its side network moved off its start, saved to ``folder``; returns the model, test ids and
    their logits."""
    model = get_peft_model(
        arch_sweep.build_float(model_type), QSTConfig(task_type="CAUSAL_LM", side_inner_widths="backbone")
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.02 * torch.randn_like(parameter))
    ids = torch.randint(3, arch_sweep.VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(folder)
    return model, ids, expected


def test_an_adapter_saved_before_side_inner_widths_loads_with_the_models_inner_widths(tmp_path):
    """Side blocks kept the model's inner widths (Qwen4-Exp's ``hc_lowrank`` and indexer heads, ...) until
    ``side_inner_widths="divided"`` became the default. An ``adapter_config.json`` written before the option existed
    has no such key: it loads as ``"backbone"``, the layout its weights have, with the trained logits; refused with a
    shape error before, it would have been lost. A new value is refused naming the choices."""
    import json

    model, ids, expected = saved_adapter_of_backbone_widths("qwen4_exp_text", tmp_path)
    assert (side_of(model).trunk.config.hc_lowrank, side_of(model).trunk.config.indexer_n_heads) == (16, 2)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["side_inner_widths"]  # as the version before the option wrote it
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))

    loaded = PeftModel.from_pretrained(arch_sweep.build_float("qwen4_exp_text"), str(tmp_path)).eval()
    assert loaded.peft_config["default"].side_inner_widths == "backbone"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="side_inner_widths='narrow' is invalid"):
        QSTConfig(task_type="CAUSAL_LM", side_inner_widths="narrow")


def test_resuming_an_adapter_saved_before_the_width_options_with_todays_default_names_the_option(tmp_path):
    """A training script that builds its adapter with ``QSTConfig(...)`` and resumes a checkpoint saved before
    ``side_inner_widths`` existed (``load_adapter`` into the adapter's name, as the Trainer resumes) meets weights of
    the model's inner widths in side blocks built narrower: refused, but as "saved from a different base model or
    QST configuration", naming neither the option nor the fix. The refusal names them, and the adapter built with
    the named setting loads the checkpoint; a model whose side blocks the options do not change loads such a file
    with today's defaults as before."""
    import json

    from peft_qst.serialization import QSTAdapterFileError

    from .conftest import tiny_causal_lm

    _, ids, expected = saved_adapter_of_backbone_widths("qwen4_exp_text", tmp_path / "qwen")
    llama = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    llama.save_pretrained(tmp_path / "llama")
    for folder, written_before in (("qwen", ["side_inner_widths"]), ("llama", ["side_inner_widths",
                                                                            "side_linear_heads"])):
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        for name in written_before:  # as the versions before the options wrote it
            del saved[name]
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps(saved))

    resumed = get_peft_model(arch_sweep.build_float("qwen4_exp_text"), QSTConfig(task_type="CAUSAL_LM"))
    with pytest.raises(QSTAdapterFileError, match=r"predates side_inner_widths: .*side_inner_widths=\"backbone\""):
        resumed.load_adapter(str(tmp_path / "qwen"), "default")
    resumed = get_peft_model(
        arch_sweep.build_float("qwen4_exp_text"), QSTConfig(task_type="CAUSAL_LM", side_inner_widths="backbone")
    )
    resumed.load_adapter(str(tmp_path / "qwen"), "default")
    with torch.no_grad():
        assert torch.equal(resumed.eval()(input_ids=ids).logits, expected)
    get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4)).load_adapter(
        str(tmp_path / "llama"), "default"
    )


def written_before_the_width_options(folder, names=("side_inner_widths",)):
    """Drop ``names`` from the ``adapter_config.json`` in ``folder``, as the versions before those options wrote it."""
    import json

    saved = json.loads((folder / "adapter_config.json").read_text())
    for name in names:
        del saved[name]
    (folder / "adapter_config.json").write_text(json.dumps(saved))


def test_a_config_read_from_a_file_written_before_the_options_says_what_its_side_blocks_have(tmp_path):
    """An ``adapter_config.json`` written before ``side_heads``, ``side_linear_heads`` or ``side_inner_widths``
    existed holds side blocks of the model's heads and widths, and every loader builds the adapter so. The config
    ``PeftConfig.from_pretrained`` read from it (the user's, ``AutoPeftModel``'s, transformers') said today's
    defaults, ``"auto"`` and ``"divided"``, as QSTConfig.from_pretrained did not: given back to a loader
    (``config=``), it built side blocks the weights do not fit, and the load was refused. Every class reads such a
    file as QSTConfig does; a file holding the keys, a config built in code and another method's file keep theirs."""
    from peft import LoraConfig, PeftConfig

    old = tmp_path / "old"
    QSTConfig(task_type="CAUSAL_LM", side_heads=4).save_pretrained(old)
    written_before_the_width_options(old, ("side_heads", "side_linear_heads", "side_inner_widths"))
    for read in (PeftConfig.from_pretrained, QSTConfig.from_pretrained):
        config = read(str(old))
        assert isinstance(config, QSTConfig)
        assert (config.side_heads, config.side_linear_heads, config.side_inner_widths) == (None, "backbone", "backbone")
    QSTConfig(task_type="CAUSAL_LM", side_heads=4).save_pretrained(tmp_path / "new")
    config = PeftConfig.from_pretrained(str(tmp_path / "new"))
    assert (config.side_heads, config.side_linear_heads, config.side_inner_widths) == (4, "divided", "divided")
    config = QSTConfig(task_type="CAUSAL_LM")
    assert (config.side_heads, config.side_linear_heads, config.side_inner_widths) == ("auto", "divided", "divided")
    LoraConfig(task_type="CAUSAL_LM", r=3).save_pretrained(tmp_path / "lora")
    assert PeftConfig.from_pretrained(str(tmp_path / "lora")).r == 3

    _, ids, expected = saved_adapter_of_backbone_widths("qwen4_exp_text", tmp_path / "qwen")
    written_before_the_width_options(tmp_path / "qwen")
    folder = str(tmp_path / "qwen")
    loaded = PeftModel.from_pretrained(arch_sweep.build_float("qwen4_exp_text"), folder,
                                       config=PeftConfig.from_pretrained(folder)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_transformers_load_adapter_of_a_file_before_the_width_options_with_todays_default_names_the_option(tmp_path):
    """transformers' ``model.load_adapter(folder, peft_config=QSTConfig(...))`` with today's default, of weights
    saved before ``side_inner_widths`` existed: refused, as PEFT's loaders refuse it, naming the option and the
    setting that loads it (it reported transformers' table of mismatched shapes and "You set
    `ignore_mismatched_sizes` to `False`"); nothing stays injected, and the named setting, or no peft_config (the file
    then builds the adapter), loads the trained logits."""
    from peft_qst.serialization import QSTAdapterFileError

    _, ids, expected = saved_adapter_of_backbone_widths("qwen4_exp_text", tmp_path)
    written_before_the_width_options(tmp_path)
    model = arch_sweep.build_float("qwen4_exp_text")
    with pytest.raises(QSTAdapterFileError, match=r"predates side_inner_widths: .*side_inner_widths=\"backbone\".*"
                                                  r"load_adapter without peft_config="):
        model.load_adapter(str(tmp_path), peft_config=QSTConfig(task_type="CAUSAL_LM"))
    assert not getattr(model, "peft_config", None) and not [n for n, _ in model.named_modules() if "qst_side" in n]
    model.load_adapter(str(tmp_path), peft_config=QSTConfig(task_type="CAUSAL_LM", side_inner_widths="backbone"))
    from_the_file = arch_sweep.build_float("qwen4_exp_text")
    from_the_file.load_adapter(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, expected)
        assert torch.equal(from_the_file.eval()(input_ids=ids).logits, expected)


def test_an_adapter_saved_before_the_width_options_loads_where_they_change_no_shape(tmp_path):
    """``side_inner_widths="divided"`` changes a width attribute a model's config holds but its blocks do not build
    (MiniMax-M3's ``index_n_heads``, 4 at the config's defaults, whose layers are all full attention: no indexer).
    The side network is the same with either setting, so a checkpoint saved before the option loads into today's
    default as it did before; it was refused as predating the option (the side configs differ), naming a fix the
    adapter did not need."""
    import json

    def build():
        return arch_sweep.build_float("minimax_m3_vl_text")

    assert build().config.index_n_heads == 4 and not [n for n, _ in build().named_modules() if "indexer" in n]
    _, ids, expected = saved_adapter_of_backbone_widths("minimax_m3_vl_text", tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["side_inner_widths"]  # as the versions before the option wrote it
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))

    resumed = get_peft_model(build(), QSTConfig(task_type="CAUSAL_LM"))
    resumed.load_adapter(str(tmp_path), "default")
    with torch.no_grad():
        assert torch.equal(resumed.eval()(input_ids=ids).logits, expected)


def test_hybrid_leaves_grouped_projections_alone():
    """DeepSeek-V4's grouped output projection subclasses nn.Linear but maps each of its groups apart: the backbone
    adapters leave it alone (a delta of its in_features -> out_features shape did not add to its output), and the
    hybrid trains."""
    model = get_peft_model(tiny("deepseek_v4"), QSTConfig(task_type="CAUSAL_LM", backbone_lora_layers=1))
    adapted = list(side_of(model).backbone_lora.deltas["1"])
    assert "self_attn__o_b_proj" in adapted and "self_attn__o_a_proj" not in adapted
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, ids, lr=3e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_type", ["phimoe", "falcon"])
def test_hybrid_adapts_projections_and_leaves_mixture_of_experts_routers_alone(model_type):
    """Phi-MoE's router subclasses nn.Linear and returns routing weights: the backbone adapters leave it alone. Falcon's
    projections subclass nn.Linear too (FalconLinear), and are adapted. Both hybrids train."""
    extra = dict(head_dim=None) if model_type == "falcon" else {}
    model = get_peft_model(tiny(model_type, **extra), QSTConfig(task_type="CAUSAL_LM", backbone_lora_layers=1))
    adapted = [name for name in side_of(model).backbone_lora.deltas["1"]]
    assert adapted and not any("gate" == name.split("-")[-1] or "router" in name for name in adapted)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, ids, lr=3e-2)
    assert losses[-1] < losses[0]


def test_architecture_sweep_classifies_what_it_runs(tmp_path):
    """integration/arch_sweep.py, on a type that runs end to end and three refused at get_peft_model (the sweep's
    ``dots3_note_text`` varies its heads per layer, and its config refuses a global ``num_attention_heads``: the check
    for a state-space model read it outside the guard that names it, and the type came out BROKEN; it is refused
    naming the sizes it sets per layer. Dory's config has it run its blocks more than once, refused at its first
    forward before the config was read for it)."""
    import json
    import subprocess
    import sys

    output = tmp_path / "sweep.json"
    subprocess.run(
        [sys.executable, f"{REPO}/integration/arch_sweep.py", "--output", str(output), "llama", "bert",
         "dots3_note_text", "dory"],
        check=True, capture_output=True, timeout=600,
    )
    records = {rec["type"]: rec for rec in json.loads(output.read_text())["records"]}
    assert {name: rec["cls"] for name, rec in records.items()} == {
        "llama": "OK", "bert": "REFUSED", "dots3_note_text": "REFUSED", "dory": "REFUSED",
    }
    assert "sets head_dim, kv_lora_rank, num_attention_heads" in records["dots3_note_text"]["reason"]
    assert "n_recurrent_loops=2" in records["dory"]["reason"]


@pytest.fixture(scope="module")
def sweep_in_4bit(tmp_path_factory):
    """``arch_sweep.py --4bit llama falcon_mamba``, one process for the two tests below (each sweep process spends
    about 10 s importing before it checks anything): the report and its records by model type."""
    import json
    import subprocess
    import sys

    output = tmp_path_factory.mktemp("sweep-4bit") / "sweep.json"
    subprocess.run([sys.executable, f"{REPO}/integration/arch_sweep.py", "--4bit", "--output", str(output), "llama",
                    "falcon_mamba"], check=True, capture_output=True, timeout=600)
    report = json.loads(output.read_text())
    return report, {record["type"]: record for record in report["records"]}


def test_architecture_sweep_in_4bit_runs_the_checks_on_a_quantized_model(sweep_in_4bit):
    """``arch_sweep.py --4bit``: the same checks on the tiny model loaded back in 4-bit; the report says so, and the
    hybrid's check of its start against the base model ran (within bf16 rounding on AVX512-BF16 CPUs)."""
    report, records = sweep_in_4bit
    record = records["llama"]
    assert report["quantization"] == "4-bit NF4" and record["cls"] == "OK", record
    assert record["e_save_load"]["maxdiff"] == 0.0 and record["f_a_start_equals_base"]["pass"]


def test_architecture_sweep_runs_state_space_models_in_4bit_and_reloads_them_exactly(sweep_in_4bit):
    """Falcon-Mamba in 4-bit: refused at get_peft_model before state-space models were supported; then its reload
    was 6e-8 from the trained model's logits with bit-identical weights, because torch's matmul runs the side mixers'
    x_proj (a transposed input) by another kernel when the weight requires grad. The sweep compares the reload with
    the trained model with its side frozen, as the reloaded adapter is."""
    _, records = sweep_in_4bit
    record = records["falcon_mamba"]
    assert record["cls"] == "OK", record
    assert record["e_save_load"]["maxdiff"] == 0.0 and record["d_generate_cache"]["pass"]


def test_side_experts_keep_the_grouped_kernel_where_the_expert_widths_suit_it():
    """The side trunk falls back to the eager experts loop only where its expert widths are not multiples of 8 (see
    below): Qwen2-MoE sizes its experts by ``moe_intermediate_size``, and its dense ``intermediate_size`` runs no
    grouped product. At r=4, experts of 64 -> 16 keep ``grouped_mm`` beside a dense width of 40 -> 10; experts of
    72 -> 18 take the eager loop."""
    def side_kernel(**sizes):
        model = get_peft_model(tiny("qwen2_moe", **sizes), QSTConfig(task_type="CAUSAL_LM", r=4))
        assert model.base_model.model.config._experts_implementation == "grouped_mm"
        return side_of(model).trunk.config._experts_implementation

    assert side_kernel(intermediate_size=40) == "grouped_mm"
    assert side_kernel(moe_intermediate_size=72) == "eager"


def test_gpt_oss_real_widths_in_bf16_run_at_the_default_config():
    """gpt-oss-20b's real widths (2880, experts of 2880, 64 heads of 64) at r=16 give 180-wide side experts: 360 bytes
    a row in bf16 (the model's usual dtype), which ``torch._grouped_mm``, transformers' default experts kernel, refuses
    ("strides should be multiple of 16 bytes"), so get_peft_model refused the model. The side trunk's experts now run
    transformers' eager loop there: it builds, starts at the base model, back-propagates into the side experts and
    generates the same with and without its cache. One block, two experts and a small vocabulary: the widths are real."""
    config = AutoConfig.for_model(
        "gpt_oss", hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_hidden_layers=1, layer_types=["sliding_attention"], sliding_window=128,
        num_local_experts=2, num_experts_per_tok=1, vocab_size=64,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    assert base.config._experts_implementation == "grouped_mm"
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    side = side_of(model)
    assert (side.trunk.config.hidden_size, side.trunk.config.intermediate_size) == (180, 180)
    assert side.trunk.config._experts_implementation == "eager"
    assert base.model.config._experts_implementation == "grouped_mm"  # the backbone keeps its kernel
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
        torch.nn.init.normal_(side.upsample.weight, std=0.05)  # the side network's output now moves the logits
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    expert_grads = [p.grad for n, p in model.named_parameters() if "qst_side" in n and "experts" in n]
    assert expert_grads and all(g is not None and torch.isfinite(g).all() for g in expert_grads)
    assert any(g.abs().sum() > 0 for g in expert_grads)
    model.eval()
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, **kwargs), model.generate(input_ids=ids, use_cache=False, **kwargs))


def test_recurrent_gemma_continues_its_cache_and_shrinks_its_recurrence():
    """RecurrentGemma's trunk fills the cache generate gives it in place and returns none (its recurrent state lives in
    its blocks' modules): QST refused its first cached step ("its trunk keeps the cache it is given and returns none").
    The side network's cache now travels on the backbone's cache object, and its first, recurrent, layer counts no
    tokens (``get_seq_length()`` is 0 at every step), so the past is read from its attention layer: taken for a fresh
    cache, each step started the side attention from nothing. The RG-LRU width follows the side width (kept, it was
    the backbone's 128 beside a side width of 8)."""
    model = get_peft_model(tiny("recurrent_gemma"), QSTConfig(task_type="CAUSAL_LM"))
    side = side_of(model)
    assert (side.trunk.config.hidden_size, side.trunk.config.lru_width) == (8, 8)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    train_steps(model, ids, lr=3e-2)
    with torch.no_grad():
        torch.nn.init.normal_(side.upsample.weight, std=1.0)  # the side network's output moves the tokens
    model.eval()
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cached = model.generate(input_ids=ids, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(set(cached.sequences[:, 9:].flatten().tolist())) > 2  # not one token repeated
    padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], dim=1)
    mask = (padded != 0).long()
    assert torch.equal(model.generate(input_ids=padded, attention_mask=mask, **kwargs).sequences,
                       model.generate(input_ids=padded, attention_mask=mask, use_cache=False, **kwargs).sequences)


#: parts of the side trunk its forward never runs (it reads downsampled hidden states, never token ids, images, audio or
#: encoder states), per variant of the architecture sweep: the name of one such part
NEVER_RUN_PARTS = {
    "bart": "encoder_attn", "whisper": "encoder_attn", "musicgen": "encoder_attn", "trocr": "encoder_attn",
    "big_bird+dec": "pooler",
}


def _tiny_phi4_multimodal():
    audio = dict(hidden_size=128, intermediate_size=256, num_blocks=2, num_attention_heads=4,
                 depthwise_separable_out_channel=128, nemo_conv_channels=128, ext_pw_out_channel=128)
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    return tiny("phi4_multimodal", audio_config=audio, vision_config=vision)


@pytest.mark.parametrize("variant", [*NEVER_RUN_PARTS, "phi4_multimodal", "roberta+cross"])
def test_side_trunk_keeps_no_part_its_forward_never_runs(variant):
    """The side trunk is a copy of the model's trunk class, which builds parts the side trunk never runs: Phi-4
    multimodal's image and audio towers (run on token ids only: 98% of its side network's trainable parameters at the
    config's defaults), the cross-attention of decoders of encoder-decoder models (built whatever the config; BERT-style
    decoders' with ``add_cross_attention``), BigBird's pooler. They were trainable, saved and counted, and never got a
    gradient. Now they are dropped: every trainable parameter gets a gradient from a training step, and the side network
    starts at the model's output. Encoder states handed to such a decoder feed the backbone's cross-attention only (the
    side network reads its outputs in the hidden states); handed to the side trunk too, they failed on its width."""
    if variant == "phi4_multimodal":
        base, part = _tiny_phi4_multimodal(), "embed_tokens_extend"
    elif variant == "roberta+cross":
        base, part = tiny("roberta", add_cross_attention=True), "crossattention"
    else:
        base, part = arch_sweep.build_float(variant), NEVER_RUN_PARTS[variant]
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    encoder = torch.randn(2, 3, base.config.hidden_size, generator=torch.Generator().manual_seed(2))
    cross = part in ("encoder_attn", "crossattention") and variant not in ("whisper", "musicgen")  # (no such input)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        expected_with_encoder = base(input_ids=ids, encoder_hidden_states=encoder).logits if cross else None
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert not [name for name in names if f".{part}." in name]
    assert f".{part}." not in "".join(f"{key}\n" for key in model.state_dict() if ".qst_side." in key)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
    model.train()
    labels = arch_sweep.labels_for(variant, ids) if variant in NEVER_RUN_PARTS else ids
    model(input_ids=ids, labels=labels).loss.backward()
    no_gradient = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_gradient
    if cross:
        with torch.no_grad():
            with_encoder = model.eval()(input_ids=ids, encoder_hidden_states=encoder).logits
        assert torch.allclose(with_encoder, expected_with_encoder, atol=1e-5)


@pytest.mark.parametrize("variant", ["bart", "phi4_multimodal"])
def test_an_adapter_saved_with_parts_never_run_loads_exactly(variant, tmp_path, monkeypatch, recwarn):
    """Adapters saved while the side trunk still built parts it never runs (image and audio towers, cross-attention)
    hold their tensors: their random start, which never changed an output. They load without them, to the logits
    they had, without a warning (nothing was lost, and nothing is to be done); refused before as "saved from a
    different QST configuration"."""
    from peft_qst import side as side_module

    build = _tiny_phi4_multimodal if variant == "phi4_multimodal" else (lambda: arch_sweep.build_float(variant))
    with monkeypatch.context() as patch:  # the side trunk as an earlier peft-qst built it
        patch.setattr(side_module, "UNREACHED_TRUNK_PARTS", ())
        patch.setattr(side_module, "UNREACHED_BLOCK_PARTS", ())
        old = get_peft_model(build(), QSTConfig(task_type="CAUSAL_LM"))
    assert any(".embed_tokens_extend." in k or ".encoder_attn." in k for k in old.state_dict() if ".qst_side." in k)
    with torch.no_grad():
        for parameter in old.parameters():
            if parameter.requires_grad:
                parameter.add_(0.02 * torch.randn_like(parameter))
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = old.eval()(input_ids=ids).logits
    old.save_pretrained(tmp_path)

    recwarn.clear()
    loaded = PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert not [w for w in recwarn.list if "QST" in str(w.message)]


def test_sizes_set_per_layer_that_no_rule_rescales_are_refused_naming_them():
    """Head widths, key/value head counts and FFN widths set per layer are rescaled layer by layer (Gemma 4 at its
    defaults: tests/test_per_layer_widths.py). dots3_note_text's sliding layers set their own number of attention
    heads (one count for the side blocks of every layer: side_heads) and their own multi-head latent attention widths
    and ranks: refused, naming them, and nothing is wrapped. (Its config refuses a global ``num_attention_heads``,
    which refused it at the check of the sizes every model needs, without naming the sizes it sets per layer.)"""
    base = tiny("dots3_note_text", num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16,
                qk_nope_head_dim=16, v_head_dim=32, head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
                mlp_layer_types=["dense", "sparse"], index_topk=64, index_head_dim=16, index_n_heads=2,
                layer_types=["indexed_attention", "sliding_attention"])
    assert "num_attention_heads" in base.config.per_layer_attributes
    trunk_before = {name for name, _ in base.named_modules()}
    with pytest.raises(QSTUnsupportedModelError, match=re.escape(
            "dots3_note_text model: its config sets head_dim, kv_lora_rank, num_attention_heads, q_lora_rank, "
            "qk_nope_head_dim, qk_rope_head_dim, v_head_dim per layer (per_layer_config: head_dim in [16, 256], ")):
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    assert {name for name, _ in base.named_modules()} == trunk_before  # nothing was wrapped


def test_the_side_trunks_own_tensors_go_where_its_inputs_are():
    """Zaya's trunk holds tensors of its own (``input_hidden_states_bias`` and ``input_hidden_states_scale``, no
    child's), applied to its inputs_embeds. ``place`` moved the side trunk's children and blocks to the backbone's
    devices and left those where the side network was built: a model on another device than the CPU (here the meta
    device, as ``integration/real_shapes.py`` builds published models; a GPU alike) failed its first forward
    ("Tensor on device cpu is not on the expected device meta"). 512 wide: side widths the grouped experts kernel
    takes (a tiny model's run transformers' eager experts loop, which reads values the meta device does not have)."""
    config = AutoConfig.for_model("zaya", hidden_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=V, num_experts=4, num_experts_per_tok=1)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    trunk = side_of(model).trunk
    own = [*trunk.parameters(recurse=False), *trunk.buffers(recurse=False)]
    assert own and {t.device.type for t in own} == {"meta"}
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.shape == (2, 8, V)
    assert side_of(model).upsample.weight.grad is not None


def test_a_side_network_that_runs_only_in_float32_is_refused_naming_side_dtype():
    """MiniMax in bfloat16: its lightning attention multiplies its float32 block-decay buffers into bf16 states with
    matmul, which does not promote, so its side network does not run in bf16 (the default side dtype of a bf16
    model). The refusal named other head counts and r as the fixes, which fail the same way; it names the side dtype,
    and with side_dtype="float32" the model trains, and its cache is as exact as the bf16 model's own."""
    base = arch_sweep.build_float("minimax").to(torch.bfloat16)
    with pytest.raises(QSTUnsupportedModelError) as refused:
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    message = str(refused.value)
    assert "does not run in bfloat16" in message and 'QSTConfig(side_dtype="float32")' in message
    assert "another r" not in message
    model = get_peft_model(
        arch_sweep.build_float("minimax").to(torch.bfloat16), QSTConfig(task_type="CAUSAL_LM", side_dtype="float32")
    )
    ids = torch.randint(3, arch_sweep.VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids[:, :8])
    assert losses[-1] < losses[0]

    def cache_error(model):
        """How far logits computed token by token through the cache are from those of one full forward (greedy
        generation cached and uncached parted after 7 tokens, as the backbone's bf16 rounding, not the side network,
        decided a near tie)."""
        with torch.no_grad():
            full = model(input_ids=ids).logits.float()
            out = model(input_ids=ids[:, :4], use_cache=True)
            steps, cache = [out.logits.float()], out.past_key_values
            for position in range(4, ids.shape[1]):
                out = model(input_ids=ids[:, position:position + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits.float())
                cache = out.past_key_values
        return (full - torch.cat(steps, 1)).abs().max().item()

    # equal here (0.031, one bf16 step of these logits); twice allows one rounding step more
    assert cache_error(model.eval()) <= 2 * cache_error(arch_sweep.build_float("minimax").to(torch.bfloat16).eval())


def test_an_adapter_loaded_onto_a_model_its_side_network_runs_on_only_in_float32_names_the_way_to_load_it(tmp_path):
    """An adapter saved on a float32 MiniMax (side_dtype None: float32 there) loaded onto the bf16 model, where its side
    network would be bf16 and does not run: the refusal named QSTConfig(side_dtype="float32") only, which a load
    cannot take (PEFT reads the file's values over those given to from_pretrained). It names the route, which loads
    the trained weights."""
    model = get_peft_model(arch_sweep.build_float("minimax"), QSTConfig(task_type="CAUSAL_LM"))
    torch.nn.init.normal_(side_of(model).upsample.weight, std=0.1)
    model.save_pretrained(tmp_path)
    with pytest.raises(QSTUnsupportedModelError, match=re.escape(
            "Loading a saved adapter, read its config (config = QSTConfig.from_pretrained(folder)), set "
            'config.side_dtype = "float32" and pass it: PeftModel.from_pretrained(model, folder, config=config).')):
        PeftModel.from_pretrained(arch_sweep.build_float("minimax").to(torch.bfloat16), str(tmp_path))
    config = QSTConfig.from_pretrained(str(tmp_path))
    config.side_dtype = "float32"
    bf16 = arch_sweep.build_float("minimax").to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(bf16, str(tmp_path), config=config)
    assert torch.equal(side_of(loaded).upsample.weight, side_of(model).upsample.weight)


@pytest.mark.parametrize("model_type", ["opt", "xglm"])
def test_layerdrop_is_off_in_the_frozen_backbone_and_training_runs_at_every_step(model_type):
    """OPT and XGLM skip each block with probability config.layerdrop in training mode. In the frozen backbone that
    trains nothing, and a skipped first or last block left QST fewer hidden states than blocks: training stopped at a
    random step with a QSTUnsupportedModelError (and a skipped block between had its input read as its state). The
    backbone runs every block (its layerdrop restored afterwards); the side trunk keeps its own LayerDrop."""
    extra = dict(layerdrop=0.5, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    extra["num_hidden_layers"] = 4
    model = get_peft_model(tiny(model_type, **extra), QSTConfig(task_type="CAUSAL_LM", r=4))
    trunk = next(m for m in model.modules() if type(m).__name__ == "QSTLayer").base_layer
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
    model.train()
    for seed in range(8):
        torch.manual_seed(seed)
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
        assert torch.isfinite(out.loss)
        assert len(out.hidden_states) == 5
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states[:-1], expected))
        out.loss.backward()
        assert trunk.layerdrop == 0.5
    assert side_of(model).trunk.config.layerdrop == 0.5
