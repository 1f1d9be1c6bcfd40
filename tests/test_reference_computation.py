"""What QST computes, checked against an independent plain-PyTorch re-implementation of the documented computation.

The reference below is written from the README ("How it works", "Options", the offsets of parameters that start at a
constant) and `QSTConfig`'s docstring, not from the package's forward code. It reads the adapter's trained weights
from ``get_peft_model_state_dict`` (the saved form: norm weights, the output gate and the side gates' logits as
offsets from their documented starting values) and computes:

- the frozen backbone with ``output_hidden_states=True``: h_0 (embedding output), h_1 .. h_L, the last one after the
  trunk's final norm (transformers' convention, the ``h_L`` of ``h_L + a * up(s)``);
- ``g = down_0(h_0)``; for side block i = 1 .. L: ``g = block_i((1 - sigmoid(z_i)) * down_i(h_i) + sigmoid(z_i) * g)``,
  each block a Llama decoder layer at width d/r (RMSNorm, rotary attention with the documented ``side_heads`` rule,
  SwiGLU MLP at FFN width / r), written out by hand;
- ``s = side_final_norm(g)``; ``last_hidden_state = h_L + a * up(s)``; the model's frozen LM head.

Logits are compared on both of the package's paths (the general one, which runs with gradients, and the fast
inference path under ``no_grad``), and the gradients of the loss with respect to every side parameter against
autograd's through the reference (the package's own backward through the LM head is a low-rank one).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model, get_peft_model_state_dict

from peft_qst import QSTConfig

from .conftest import tiny_causal_lm, train_steps

#: a tiny Llama whose head layout tells the side_heads rules apart: 8 heads of 8, 4 key/value heads (grouping 2)
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4)
R = 4
PREFIX = "base_model.model.model.qst_side."


# ------------------------------------------------------------------------------------------------------------------
# the documented computation, in plain PyTorch
# ------------------------------------------------------------------------------------------------------------------


def documented_side_heads(config, r: int, side_heads) -> tuple[int, int]:
    """(heads, key/value heads) of the side blocks as the README's ``side_heads`` row states them."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if side_heads is None:  # the model's own counts
        return heads, kv_heads
    side_hidden, head_dim = config.hidden_size // r, config.hidden_size // heads
    if side_heads == "auto":  # the count whose head dimension is closest to the model's, by ratio (even: rotary)
        fitting = [n for n in range(1, side_hidden + 1) if side_hidden % n == 0 and (side_hidden // n) % 2 == 0]
        side_heads = min(fitting, key=lambda n: (abs(math.log(side_hidden / n / head_dim)), n))
    group = heads // kv_heads  # key/value heads keep the model's grouping where it divides, else one
    return side_heads, (side_heads // group if side_heads % group == 0 else 1)


def effective_weights(state_dict: dict, qst: QSTConfig) -> dict:
    """The adapter's weights as the computation uses them: saved offsets plus their documented starting values
    (norm weights 1, the output gate ``output_gate_init``, the side gates' logits logit(``side_gate_init``))."""
    weights = {}
    for key, value in state_dict.items():
        assert key.startswith(PREFIX), key
        name = key[len(PREFIX):]
        if name.endswith(".parametrizations.weight.original"):
            name = name.replace(".parametrizations.weight.original", ".weight")
            value = value + (qst.output_gate_init if name == "output_gate.weight" else 1.0)
        elif name.endswith(".parametrizations.gate_logit.original"):
            name = name.replace(".parametrizations.gate_logit.original", ".gate_logit")
            value = value + math.log(qst.side_gate_init / (1 - qst.side_gate_init))
        weights[name] = value.detach().clone().float().requires_grad_()
    return weights


def downsample(w: dict, prefix: str, h: torch.Tensor, kind: str, r: int) -> torch.Tensor:
    if kind == "adapter":  # Linear d->rank, activation (silu), Linear rank->d/r, LayerNorm
        x = F.linear(h, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"])
        x = F.linear(F.silu(x), w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"])
        return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.3.weight"], w[f"{prefix}.3.bias"], eps=1e-5)
    if kind == "lora":  # d->rank->d/r, no activation
        return F.linear(F.linear(h, w[f"{prefix}.0.weight"]), w[f"{prefix}.1.weight"])
    if kind == "linear":
        return F.linear(h, w[f"{prefix}.weight"], w[f"{prefix}.bias"])
    grouped = h.unflatten(-1, (-1, r))  # each group of r consecutive channels
    return grouped.amax(-1) if kind == "maxpool" else grouped.mean(-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    head_dim = x.shape[-1]
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions[:, None].float() * inverse[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return x * cos + torch.cat([-second, first], -1) * sin


def llama_block(w: dict, p: str, x, heads: int, kv_heads: int, key_bias, config) -> torch.Tensor:
    """One Llama decoder layer at the side width: pre-norm rotary attention (causal, padded keys masked), pre-norm
    SwiGLU MLP, both residual."""
    batch, length, width = x.shape
    head_dim, eps = width // heads, config.rms_norm_eps
    a = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
    q = F.linear(a, w[f"{p}.self_attn.q_proj.weight"]).view(batch, length, heads, head_dim).transpose(1, 2)
    k = F.linear(a, w[f"{p}.self_attn.k_proj.weight"]).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = F.linear(a, w[f"{p}.self_attn.v_proj.weight"]).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    positions, theta = torch.arange(length), config.rope_parameters["rope_theta"]
    q, k = rotate(q, positions, theta), rotate(k, positions, theta)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + key_bias
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
    x = x + F.linear(attended, w[f"{p}.self_attn.o_proj.weight"])
    m = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
    up = F.silu(F.linear(m, w[f"{p}.mlp.gate_proj.weight"])) * F.linear(m, w[f"{p}.mlp.up_proj.weight"])
    return x + F.linear(up, w[f"{p}.mlp.down_proj.weight"])


def reference_logits(base, w: dict, qst: QSTConfig, input_ids, attention_mask, dropout: float = 0.0) -> torch.Tensor:
    """``dropout`` (training mode): dropout on each downsampled hidden state, ``down_0(h_0)`` first and then
    ``down_i(h_i)`` block by block, the order the documented computation reads them in."""
    config = base.config
    with torch.no_grad():  # the frozen backbone
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    layers = config.num_hidden_layers
    assert len(hidden) == layers + 1
    heads, kv_heads = documented_side_heads(config, qst.r, qst.side_heads)
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    key_bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    g = F.dropout(downsample(w, "embed_downsample", hidden[0], qst.downsample, qst.r), dropout)
    for i in range(layers):
        p = f"trunk.layers.{i}"
        s = torch.sigmoid(w[f"{p}.gate_logit"])
        down = F.dropout(downsample(w, f"{p}.downsample", hidden[i + 1], qst.downsample, qst.r), dropout)
        g = (1 - s) * down + s * g
        g = llama_block(w, f"{p}.block", g, heads, kv_heads, key_bias, config)
    side = rms_norm(g, w["trunk.norm.weight"], config.rms_norm_eps)
    last = hidden[-1] + w["output_gate.weight"] * F.linear(side, w["upsample.weight"])
    return base.lm_head(last)


def causal_lm_loss(logits, labels) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------------------------


def _inputs():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    # nor the first real token: a pad position's logits (a query with no key to attend to) would predict it
    labels[1, 3] = -100
    return input_ids, attention_mask, labels


CASES = {
    "default": {},
    "lora": dict(downsample="lora"),
    "linear": dict(downsample="linear"),
    "avgpool": dict(downsample="avgpool"),
    "maxpool": dict(downsample="maxpool"),
    "model_heads": dict(side_heads=None),
    # 4 side heads keep the model's grouping of 2 query heads per key/value head: 2 key/value heads
    "grouped_side_heads": dict(side_heads=4),
    "side_dtype_float32": dict(side_dtype="float32"),
    "gate_offsets": dict(side_gate_init=0.8, output_gate_init=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_the_documented_computation(case):
    qst = QSTConfig(task_type="CAUSAL_LM", r=R, **CASES[case])
    model = get_peft_model(tiny_causal_lm(**SIZES), qst)
    base = tiny_causal_lm(**SIZES)  # the same frozen weights (same seed), never wrapped
    if qst.side_heads == "auto":  # resolved by the documented rule, and recorded in the config
        assert model.peft_config["default"].side_heads == documented_side_heads(base.config, R, "auto")[0] == 2
        qst = model.peft_config["default"]
    input_ids, attention_mask, labels = _inputs()
    train_steps(model, input_ids, steps=3, lr=1e-2)  # gates, output gate and upsample away from their start
    weights = effective_weights(get_peft_model_state_dict(model), qst)

    valid = attention_mask.bool()
    expected = reference_logits(base, weights, qst, input_ids, attention_mask)
    with torch.no_grad():  # the fast inference path
        fast = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(fast[valid], expected.detach()[valid], atol=1e-5, rtol=1e-5)

    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)  # the general path, with gradients
    torch.testing.assert_close(out.logits[valid], expected.detach()[valid], atol=1e-5, rtol=1e-5)
    expected_loss = causal_lm_loss(expected, labels)
    torch.testing.assert_close(out.loss, expected_loss.detach(), atol=1e-5, rtol=1e-5)

    out.loss.backward()
    expected_loss.backward()
    package = {
        name[len(PREFIX):].replace("default.", "", 1): p.grad
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    package = {
        name.replace(".parametrizations.weight.original", ".weight").replace(
            ".parametrizations.gate_logit.original", ".gate_logit"
        ): grad
        for name, grad in package.items()
    }
    assert set(package) == set(weights)
    for name, weight in weights.items():
        assert package[name] is not None, name
        torch.testing.assert_close(package[name], weight.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # and the comparison was made away from the start, where a gate's value and its logit's could be confused
    gates = [value for name, value in weights.items() if name.endswith("gate_logit")]
    start = math.log(qst.side_gate_init / (1 - qst.side_gate_init))
    assert len(gates) == SIZES["num_hidden_layers"] and all((g - start).abs().max() > 1e-3 for g in gates)
    assert (weights["output_gate.weight"] - qst.output_gate_init).abs().max() > 1e-3


def test_training_mode_dropout_matches_the_documented_computation():
    """``dropout`` drops entries of every downsampled hidden state in training mode, the embedding's ``down_0(h_0)``
    and each block's ``down_i(h_i)``: the general path's logits and gradients are the reference's computed with the
    same random draws (the backbone and the side blocks draw none: no attention dropout in these Llama blocks)."""
    p = 0.3
    qst = QSTConfig(task_type="CAUSAL_LM", r=R, dropout=p)
    model = get_peft_model(tiny_causal_lm(**SIZES), qst)
    base = tiny_causal_lm(**SIZES)
    input_ids, attention_mask, labels = _inputs()
    train_steps(model, input_ids, steps=3, lr=1e-2)
    weights = effective_weights(get_peft_model_state_dict(model), model.peft_config["default"])
    valid = attention_mask.bool()

    model.train()
    torch.manual_seed(5)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.manual_seed(5)
    expected = reference_logits(base, weights, qst, input_ids, attention_mask, dropout=p)
    torch.manual_seed(5)
    undropped = reference_logits(base, weights, qst, input_ids, attention_mask)
    assert (expected - undropped)[valid].abs().max() > 1e-2  # the dropout visibly changes the logits
    torch.testing.assert_close(out.logits[valid], expected.detach()[valid], atol=1e-5, rtol=1e-5)

    expected_loss = causal_lm_loss(expected, labels)
    out.loss.backward()
    expected_loss.backward()
    for name, parameter in model.named_parameters():
        if name.endswith("default.upsample.weight"):  # every side parameter's gradient flows through it
            torch.testing.assert_close(parameter.grad, weights["upsample.weight"].grad, atol=1e-6, rtol=1e-4)


def test_the_check_run_at_construction_draws_no_random_numbers_and_keeps_the_training_flags():
    """A new side network runs once on made-up states (``_check_runs``) to refuse models the shrink rules do not cover.
    That run is in eval mode, so its dropout draws nothing from the global random state (seeded runs stay
    reproducible whether or not a side network was built in between), and it restores every module's training flag:
    a side network built in training mode keeps its dropout on."""
    model = get_peft_model(tiny_causal_lm(**SIZES), QSTConfig(task_type="CAUSAL_LM", r=R, dropout=0.3))
    side = next(m for n, m in model.named_modules() if n.endswith("qst_side.default"))
    side.train()
    side.trunk.layers[0].training = False  # flags that differ between modules come back as they were, each its own
    state = torch.get_rng_state()
    side._check_runs(model.get_base_model().config, model.peft_config["default"])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training == (m is not side.trunk.layers[0]) for m in side.modules())
