"""QSTConfig(init="pruned"): side blocks start as slices of the (dequantised) backbone blocks, chosen by weight
magnitude; the model still starts at the pretrained output, trains, saves and loads; unmapped models are refused."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig, QSTUnsupportedModelError
from peft_qst.pruning import select_indices

from .conftest import bnb_config, tiny_causal_lm, train_steps
from .test_architectures import TINY

V = 128
IDS = torch.randint(3, V, (2, 11), generator=torch.Generator().manual_seed(3))

#: the role of each dimension of each Llama-layout weight: (output segments, input) -- the specification under test
ROLES = {
    "q_proj": (("q",), ("residual",)),
    "k_proj": (("k",), ("residual",)),
    "v_proj": (("v",), ("residual",)),
    "qkv_proj": (("q", "k", "v"), ("residual",)),
    "o_proj": (("residual",), ("o",)),
    "gate_proj": (("ffn",), ("residual",)),
    "up_proj": (("ffn",), ("residual",)),
    "gate_up_proj": (("ffn", "ffn"), ("residual",)),
    "down_proj": (("residual",), ("ffn",)),
}


def side_network(model):
    return model.base_model.model.model.qst_side["default"]


def dense(parameter):
    """A backbone weight as float32; a 4-bit weight dequantised."""
    if getattr(parameter, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(parameter.data, parameter.quant_state).float()
    return parameter.detach().float()


def segmented(index_sets, roles, sizes):
    parts, offset = [], 0
    for role in roles:
        parts.append(index_sets[role] + offset)
        offset += sizes[role]
    return torch.cat(parts)


def expected_slice(name, weight, index_sets, sizes):
    """The backbone weight ``name`` indexed along each dimension by its role's kept indices."""
    parts = name.split(".")
    leaf, kind = parts[-2], parts[-1]
    if leaf in ROLES:
        out_roles, in_roles = ROLES[leaf]
        weight = weight.index_select(0, segmented(index_sets, out_roles, sizes))
        if kind == "weight":
            weight = weight.index_select(1, segmented(index_sets, in_roles, sizes))
        return weight
    if leaf in ("q_norm", "k_norm"):
        return weight[index_sets["qk_dim"]]
    return weight[index_sets["residual"]]  # the block's norms


def role_sizes(config):
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv, head_dim = config.num_key_value_heads, getattr(config, "head_dim", None) or hidden // heads
    return {"residual": hidden, "ffn": config.intermediate_size, "q": heads * head_dim, "o": heads * head_dim,
            "k": kv * head_dim, "v": kv * head_dim, "qk_dim": head_dim}


def assert_side_blocks_are_backbone_slices(model, read=dense):
    """Every parameter of every side block (and the side final norm) equals the backbone parameter of the same name
    (as ``read`` gives it), indexed along each dimension by the kept indices of that dimension's role."""
    base_trunk = model.base_model.model.model.get_base_layer()
    config = model.base_model.model.config
    side = side_network(model)
    selected = select_indices(side, base_trunk, config, side.trunk.config)
    sizes = role_sizes(config)
    checked = 0
    for base_block, wrapped, index_sets in zip(base_trunk.layers, side.trunk.layers, selected):
        base_parameters = dict(base_block.named_parameters())
        for module_name, module in wrapped.block.named_modules():
            for kind in ("weight", "bias"):
                if not isinstance(getattr(module, kind, None), torch.Tensor):
                    continue
                name = f"{module_name}.{kind}"
                value = getattr(module, kind)  # the effective value, also when stored as an offset
                expected = expected_slice(name, read(base_parameters[name]), index_sets, sizes)
                assert value.shape == expected.shape, name
                assert torch.equal(value, expected.to(value.dtype)), name
                checked += 1
    final_norm = side.trunk.norm.weight
    assert torch.equal(final_norm, base_trunk.norm.weight[selected[0]["residual"]].to(final_norm.dtype))
    return selected, checked


def randomise_norms(model):
    """Random norm weights, so that keeping the right norm channels is visible (fresh models have all ones)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-norms")
    randomise_norms(tiny_causal_lm()).save_pretrained(path)
    return path


def load_base(base_dir, four_bit):
    kwargs = {"quantization_config": bnb_config()} if four_bit else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).eval()
    if four_bit:
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    return model


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "4bit"])
def test_pruned_side_is_the_most_important_slice_of_the_backbone(base_dir, four_bit):
    base = load_base(base_dir, four_bit)
    config = base.config
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    selected, checked = assert_side_blocks_are_backbone_slices(model)
    assert checked == 3 * 9  # q, k, v, o, gate, up, down, two norms per block

    # the criterion, recomputed here from the (dequantised) backbone
    layers = model.base_model.model.model.get_base_layer().layers
    weights = [{n: dense(p) for n, p in layer.named_parameters()} for layer in layers]
    residual = torch.zeros(config.hidden_size)
    for w in weights:
        for name in ("q_proj", "k_proj", "v_proj"):
            norms = w[f"self_attn.{name}.weight"].norm(dim=0)
            residual += norms / norms.mean()
        for name in ("gate_proj", "up_proj"):
            norms = w[f"mlp.{name}.weight"].norm(dim=0)
            residual += norms / norms.mean()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            norms = w[f"{name}.weight"].norm(dim=1)
            residual += norms / norms.mean()
        for name in ("input_layernorm", "post_attention_layernorm"):
            scale = w[f"{name}.weight"].abs()
            residual += scale / scale.mean()
    final = model.base_model.model.model.get_base_layer().norm.weight.detach().float().abs()
    residual += final / final.mean()
    expected_residual = residual.topk(16).indices.sort().values
    heads, kv, head_dim, side_head_dim = 4, 2, 16, 4
    for w, index_sets in zip(weights, selected):
        assert torch.equal(index_sets["residual"], expected_residual)  # one channel set for every block
        ffn = (w["mlp.gate_proj.weight"].norm(dim=1) * w["mlp.up_proj.weight"].norm(dim=1)
               * w["mlp.down_proj.weight"].norm(dim=0))
        assert torch.equal(index_sets["ffn"], ffn.topk(32).indices.sort().values)
        q = w["self_attn.q_proj.weight"].norm(dim=1).reshape(kv, heads // kv, head_dim).sum(1)
        k = w["self_attn.k_proj.weight"].norm(dim=1).reshape(kv, head_dim)
        pair = (q * k)[:, :8] + (q * k)[:, 8:]
        dims = index_sets["k"].reshape(kv, side_head_dim) - torch.arange(kv).unsqueeze(1) * head_dim
        for group in range(kv):
            top_pairs = pair[group].topk(2).indices.sort().values
            # rotary pairs (i, i + head_dim/2), the most important pairs of this key/value group
            assert torch.equal(dims[group], torch.cat([top_pairs, top_pairs + 8]))
            # the group's query heads keep the same dimensions as its key head
            q_dims = index_sets["q"].reshape(heads, side_head_dim) - torch.arange(heads).unsqueeze(1) * head_dim
            for head in range(group * 2, group * 2 + 2):
                assert torch.equal(q_dims[head], dims[group])
        v = w["self_attn.v_proj.weight"].norm(dim=1).reshape(kv, head_dim)
        o = w["self_attn.o_proj.weight"].norm(dim=0).reshape(kv, heads // kv, head_dim).sum(1)
        v_dims = index_sets["v"].reshape(kv, side_head_dim) - torch.arange(kv).unsqueeze(1) * head_dim
        assert torch.equal(v_dims, (v * o).topk(side_head_dim, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "4bit"])
def test_pruned_start_trains_and_reloads_identically(base_dir, four_bit, tmp_path):
    base = load_base(base_dir, four_bit)
    with torch.no_grad():
        pretrained = base(input_ids=IDS).logits
    random_start = get_peft_model(load_base(base_dir, four_bit), QSTConfig(task_type="CAUSAL_LM", r=4))
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    # the side blocks differ from the random initialisation, yet the model starts exactly at the pretrained output
    assert not torch.equal(side_network(model).trunk.layers[0].block.mlp.down_proj.weight,
                           side_network(random_start).trunk.layers[0].block.mlp.down_proj.weight)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, pretrained)

    losses = train_steps(model, IDS, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    assert not torch.allclose(trained, pretrained)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(base_dir, four_bit), str(tmp_path / "adapter")).eval()
    assert reloaded.peft_config["default"].init == "pruned"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, trained)


def test_linear_downsample_starts_as_the_residual_channel_selection(base_dir):
    model = get_peft_model(load_base(base_dir, False), QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned",
                                                                 downsample="linear"))
    side = side_network(model)
    residual = select_indices(side, model.base_model.model.model.get_base_layer(), model.base_model.model.config,
                              side.trunk.config)[0]["residual"]
    hidden = torch.randn(2, 5, 64)
    for downsample in [side.embed_downsample] + [block.downsample for block in side.trunk.layers]:
        with torch.no_grad():
            assert torch.equal(downsample(hidden), hidden[..., residual])


#: every other model type init="pruned" supports (Gemma 1 is not among the README's tested architectures)
CONFIGS = {name: TINY[name] for name in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")}
CONFIGS["gemma"] = dict(TINY["gemma2"], sliding_window=None)
# layouts of the supported types that the others lack (after the colon: the variant): biases on the projections that
# write the residual stream (o_proj, down_proj), which select residual channels as the weights' rows do; a rotary part
# of half of each head, whose other half is selected as plain dimensions
CONFIGS["llama:biases"] = dict(TINY["llama"], attention_bias=True, mlp_bias=True)
CONFIGS["phi3:partial-rotary"] = dict(TINY["phi3"], partial_rotary_factor=0.5)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_pruned_init_on_other_architectures(model_type):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type.partition(":")[0], **CONFIGS[model_type])
    base = randomise_norms(AutoModelForCausalLM.from_config(config)).eval()
    ids = IDS % 96
    with torch.no_grad():
        pretrained = base(input_ids=ids).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, pretrained)
    selected, checked = assert_side_blocks_are_backbone_slices(model)
    assert checked >= 2 * 6
    if model_type in ("qwen3", "gemma3_text"):  # q_norm/k_norm are shared by all heads: one dimension set
        kv, side_head_dim = base.config.num_key_value_heads, 512 // 4 // base.config.num_attention_heads
        for index_sets in selected:
            dims = index_sets["k"].reshape(kv, side_head_dim) % base.config.head_dim
            assert all(torch.equal(dims[g], index_sets["qk_dim"]) for g in range(kv))
    losses = train_steps(model, ids, steps=2, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_fused_phi3_projections_prune_as_the_same_weights_in_the_llama_layout():
    """Phi-3's fused qkv_proj and gate_up_proj count as their parts in the residual-channel criterion: a Phi-3 model
    holding a Llama model's weights keeps the same channels, neurons and head dimensions. One norm over each whole
    fused column chose other residual channels (6 of 64 here)."""
    sizes = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=96)
    torch.manual_seed(0)
    llama = randomise_norms(AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **sizes))).eval()
    phi3_config = AutoConfig.for_model("phi3", **sizes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    phi3 = AutoModelForCausalLM.from_config(phi3_config).eval()
    with torch.no_grad():
        phi3.model.norm.weight.copy_(llama.model.norm.weight)
        for fused, split in zip(phi3.model.layers, llama.model.layers):
            attention, mlp = split.self_attn, split.mlp
            fused.self_attn.qkv_proj.weight.copy_(
                torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
            fused.self_attn.o_proj.weight.copy_(attention.o_proj.weight)
            fused.mlp.gate_up_proj.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            fused.mlp.down_proj.weight.copy_(mlp.down_proj.weight)
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(fused, name).weight.copy_(getattr(split, name).weight)

    def selected(base):
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
        side = side_network(model)
        return select_indices(side, model.base_model.model.model.get_base_layer(), model.base_model.model.config,
                              side.trunk.config)

    for ours, llamas in zip(selected(phi3), selected(llama)):
        assert ours.keys() == llamas.keys()
        for role in ours:
            assert torch.equal(ours[role], llamas[role]), role


def _selected(base):
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    side = side_network(model)
    return select_indices(side, model.base_model.model.model.get_base_layer(), model.base_model.model.config,
                          side.trunk.config)


def test_biases_of_projections_into_the_residual_stream_do_not_vote_for_residual_channels():
    """The residual channels are chosen by the weights and norm scales reading and writing them; the biases o_proj and
    down_proj add to the stream (Llama with attention_bias and mlp_bias) are sliced along, not scored: the same
    channels are kept whatever the biases hold."""
    def base(biases):
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", **dict(TINY["llama"], attention_bias=True, mlp_bias=True))
        model = randomise_norms(AutoModelForCausalLM.from_config(config)).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".bias"):
                    parameter.copy_(torch.randn(parameter.shape) * 5 if biases == "large" else 0)
        return model

    large, zero = _selected(base("large")), _selected(base("zero"))
    for with_biases, without in zip(large, zero):
        assert torch.equal(with_biases["residual"], without["residual"])


def test_a_partial_rotary_head_keeps_its_most_important_pass_through_dimensions():
    """Phi-3's layout with half of each head rotated (``partial_rotary_factor``, as Phi-4-mini has): the side head
    keeps rotary pairs from the rotated half and, from the half that is not rotated, the dimensions with the largest
    query-key importance (the product of the query and key rows' norms), in each key/value group."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("phi3", **dict(TINY["phi3"], partial_rotary_factor=0.5))
    base = randomise_norms(AutoModelForCausalLM.from_config(config)).eval()
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    rotary, side_head_dim = head_dim // 2, head_dim // 4  # r=4 narrows each of the model's heads
    side_rotary = side_head_dim // 2  # the side head is rotated in the same proportion
    for layer, index_sets in zip(base.model.layers, _selected(base)):
        norms = layer.self_attn.qkv_proj.weight.detach().float().norm(dim=1)
        q = norms[: heads * head_dim].reshape(kv, heads // kv, head_dim).sum(1)
        k = norms[heads * head_dim: (heads + kv) * head_dim].reshape(kv, head_dim)
        importance = q * k
        dims = index_sets["k"].reshape(kv, side_head_dim) - torch.arange(kv).unsqueeze(1) * head_dim
        for group in range(kv):
            pairs = (importance[group, : rotary // 2] + importance[group, rotary // 2: rotary])
            pairs = pairs.topk(side_rotary // 2).indices.sort().values
            passthrough = importance[group, rotary:].topk(side_head_dim - side_rotary).indices.sort().values + rotary
            assert torch.equal(dims[group], torch.cat([pairs, pairs + rotary // 2, passthrough]))


def test_unmapped_architecture_is_refused_naming_the_model_type():
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=4, vocab_size=V, n_positions=32)
    model = AutoModelForCausalLM.from_config(config)
    config = QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned")
    with pytest.raises(QSTUnsupportedModelError, match=r'init="pruned"\) does not support the gpt2 model') as info:
        get_peft_model(model, config)
    assert 'Use init="random"' in str(info.value)
    assert config.base_model_signature is None and config.target_modules is None  # refused before anything changed
    assert type(model.transformer).__name__ == "GPT2Model"  # nothing was wrapped
    get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4))  # the paper's random start works for it


def test_a_model_without_loaded_weights_is_refused_naming_the_fix():
    """A model built on the meta device (``init_empty_weights``, no offload hook holding its values) has no weights to
    select from: refused as such, naming a loaded or dispatched model and the random start, which builds."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY["llama"]))
    refusal = r"its weights are not loaded \(meta device, and no accelerate offload hook holds them\); build the"
    with pytest.raises(QSTUnsupportedModelError, match=refusal) as info:
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    # llama is a type pruning is mapped for: the refusal does not say it is not supported (and then that it is)
    assert str(info.value).startswith('QSTConfig(init="pruned") cannot start from this llama model: ')
    assert "supports" not in str(info.value)
    get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4))  # the random start, which the refusal names, builds


def test_pruning_reads_4bit_weights_bitsandbytes_repacked_for_its_cpu_kernel(base_dir):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit weight at its first eval forward without gradients
    (codes reordered, absmax transposed to bfloat16), and dequantize_4bit then returns wrong values (off by up to 5.8
    on SmolLM2). Pruning after such a forward -- PeftModel.from_pretrained or add_adapter on a model that already
    generated -- must read the same weights, up to the bfloat16 rounding of the block scales. (Where bitsandbytes does
    not repack, the weights are simply unchanged.)"""
    from peft_qst.pruning import dequantised

    fresh = load_base(base_dir, True)
    used = load_base(base_dir, True)
    with torch.no_grad():
        used(input_ids=IDS)
    linears = [(name, m) for name, m in used.named_modules() if type(m).__name__ == "Linear4bit"]
    fresh_modules = dict(fresh.named_modules())
    for name, module in linears:
        before, after = dequantised(fresh_modules[name].weight, "llama"), dequantised(module.weight, "llama")
        assert (after - before).abs().max() <= before.abs().max() * 2**-8, name

    # the side blocks are slices of those weights (which slices may differ from a fresh model's at near-ties of the
    # importances, since the block scales were rounded)
    model = get_peft_model(used, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned", side_dtype="float32"))
    assert_side_blocks_are_backbone_slices(model, read=lambda parameter: dequantised(parameter, "llama"))


class DequantizeOnlyWeight(torch.Tensor):
    """A weight as torchao leaves it in an ``nn.Linear`` (``quantize_`` or transformers' ``TorchAoConfig``:
    ``Int8Tensor``, ``Float8Tensor``, ...): the module's ``F.linear`` and ``dequantize()`` work, the transposes,
    reductions and indexing pruning does on dense weights are not implemented (torchao raises NotImplementedError:
    "Int8Tensor dispatch: attempting to run unimplemented operator ... aten.permute")."""

    ALLOWED = {"detach", "__get__", "__set__", "requires_grad_", "numel", "dim", "size", "__repr__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if name == "linear":  # the module's forward: a plain output, as torchao's
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if name not in cls.ALLOWED:
            raise NotImplementedError(f"{cls.__name__} dispatch: unimplemented operator {func}")
        return super().__torch_function__(func, types, args, kwargs or {})

    def dequantize(self):
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).clone()


def test_pruning_reads_tensor_subclass_weights_through_their_dequantize(base_dir):
    """torchao-quantized weights are tensor subclasses whose only dense view is dequantize(): pruning read them as
    dense tensors and failed with torchao's NotImplementedError; it reads them through dequantize() now, and gives
    the side blocks the dense model's slices. A subclass that cannot be dequantized is refused, naming its class."""
    dense_base = load_base(base_dir, False)
    torch.manual_seed(0)
    expected = get_peft_model(dense_base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))

    def with_subclass_weights(weight_class):
        model = load_base(base_dir, False)
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(weight_class(module.weight.detach().clone()), requires_grad=False)
        return model

    quantized = with_subclass_weights(DequantizeOnlyWeight)
    assert type(quantized.model.layers[0].mlp.down_proj.weight) is DequantizeOnlyWeight
    torch.manual_seed(0)
    model = get_peft_model(quantized, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    side, reference = side_network(model).state_dict(), side_network(expected).state_dict()
    assert side.keys() == reference.keys()
    for name in reference:
        assert torch.equal(side[name], reference[name]), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected(input_ids=IDS).logits)

    class Undequantizable(DequantizeOnlyWeight):
        def dequantize(self):
            raise NotImplementedError("no dense view")

    config = QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned")
    with pytest.raises(QSTUnsupportedModelError, match="its weights are Undequantizable tensors"):
        get_peft_model(with_subclass_weights(Undequantizable), config)


def test_a_layer_that_keeps_its_weight_in_another_form_is_refused_naming_its_class(base_dir):
    """HQQ's quantize_model swaps each nn.Linear of the blocks for an HQQLinear, which stores W_q and its scales, not a
    weight: pruning refused it saying that the side parameter had "no backbone counterpart", as if the module were
    missing. The error names the layer and its class now, before anything is wrapped (init="random" trains there)."""

    class PackedLinear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.register_buffer("W_q", linear.weight.detach().clone())

        def forward(self, x):
            return torch.nn.functional.linear(x, self.W_q.to(x.dtype))

    model = load_base(base_dir, False)
    for layer in model.model.layers:
        layer.self_attn.q_proj = PackedLinear(layer.self_attn.q_proj)
    refusal = r"its layer 0\.self_attn\.q_proj is a PackedLinear, which holds no"
    with pytest.raises(QSTUnsupportedModelError, match=refusal):
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    assert type(model.model).__name__ == "LlamaModel"  # nothing was wrapped
    get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4))
