"""The base-model signature: what a QST adapter records of the model it was built for, and how a model differs.

The side network's widths and heads are the base model's divided by ``r``, and its output is read through the base
model's LM head, so an adapter only fits a model of the same type, widths, depth, head layout, FFN width and
vocabulary. ``get_peft_model`` records them in ``QSTConfig.base_model_signature`` (:func:`model_signature`); binding a
config to a model, and the loading checks, compare them (:func:`signature_differences`). The base model's *weights*
are told apart by another record, :mod:`peft_qst.fingerprint`.
"""

from __future__ import annotations

from torch import nn

from .side_config import (
    decoder_attribute, global_size, is_state_space_model, per_layer_sizes, sizes_mapped_to_encoder,
)


def text_config_of(config):
    """The config the side network is sized from: a composite (multimodal) model's ``text_config`` where it has one
    with sizes (Llava, Gemma 3, Qwen2-VL, ...), else the config itself (text models; Phi-4-multimodal, whose text sizes
    are at its top level and which has no ``text_config``). Sizes at the top level beside a ``text_config`` do not make
    a config its own text config: a flat config.json (adept/fuyu-8b's: ``hidden_size``, ``num_hidden_layers``, ... at
    the top level and in ``text_config``) leaves them there as extra attributes, while the language model is built from
    ``text_config``; taken for a text model, a composite type was side-tuned unchecked (Fuyu was, though refused
    without them) and sized from copies its language model does not read."""
    text = getattr(config, "text_config", None)
    if text is None or not hasattr(text, "hidden_size"):
        return config
    return text


def _json_size(value):
    """A config size as JSON stores it: an int, or a list of ints for per-layer sizes (None where a layer has none)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return int(value)


def model_signature(model: nn.Module, decoder_sizes: bool = True) -> dict:
    """What an adapter must match: model type, widths, depth, head layout, FFN width and vocabulary, and the sizes a
    heterogeneous config sets per layer (``per_layer_sizes``: {name: one value per layer}).

    Every entry shapes the side network (its widths and heads are the model's divided by r) or what its output means
    (the vocabulary the frozen LM head maps it onto), so a model that differs in any of them is another base model.

    The counts are those of the decoder blocks QST side-tunes: where a config maps them to its encoder's (BART's
    family, Whisper: :func:`~peft_qst.side_config.decoder_attribute`), its decoder's, with ``"sizes_of": "decoder"``
    to say so; an adapter saved before recorded the encoder's (an adapter of whisper-large-v3-turbo's 4-block decoder
    loaded onto distil-whisper's 2-block one was told "32 layers" on both sides), which ``decoder_sizes=False`` gives
    to compare it with.
    """
    config = text_config_of(model.config)
    of_decoder = decoder_sizes and sizes_mapped_to_encoder(config)

    def size(name):
        return global_size(config, decoder_attribute(config, name) if of_decoder else name)

    # a pure state-space model (Mamba) has no attention heads: recorded as 0, so that the entry every adapter records
    # is there and an SSM adapter loaded onto a model with heads is told so
    heads = 0 if is_state_space_model(config) else int(size("num_attention_heads"))
    signature = {
        # a composite model's own type (``llava``), with its language model's sizes
        "model_type": model.config.model_type,
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(size("num_hidden_layers")),
        "num_attention_heads": heads,
    }
    if of_decoder:
        signature["sizes_of"] = "decoder"
    if config is not model.config:
        # and its language model's type: the side network is built from that model's class (a Llava with a Llama or a
        # Mistral language model of the same sizes holds side networks of the same weight names and shapes, which
        # would load into each other silently, where the text models alone are refused by their model_type)
        signature["text_model_type"] = config.model_type
    kv_heads = size("num_key_value_heads")
    signature["num_key_value_heads"] = int(kv_heads) if kv_heads is not None else heads
    head_dim = size("head_dim")
    if head_dim or heads:  # Mamba-2's head_dim is its Mamba heads' width; Mamba has none
        signature["head_dim"] = int(head_dim) if head_dim else int(config.hidden_size) // heads
    if heads == 0:
        # the widths that shape a state-space side network beside hidden_size and intermediate_size
        for name in ("state_size", "num_heads", "n_groups"):
            if getattr(config, name, None) is not None:
                signature[name] = int(getattr(config, name))
    # the FFN width's name differs between families (and the decoder's has its own beside the encoder's)
    for name in ("decoder_ffn_dim",) * of_decoder + ("intermediate_size", "ffn_dim", "n_inner"):
        value = global_size(config, name)
        if value is not None:
            signature["intermediate_size"] = _json_size(value)
            break
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None:
        signature["vocab_size"] = int(vocab_size)
    per_layer = per_layer_sizes(config)
    if per_layer:
        # a heterogeneous config (Gemma 4 at its defaults): the sizes above are those of the layers that do not set
        # their own, and each layer's own shape its side block too (a Gemma 4 whose full-attention heads are 512 wide
        # and one whose are 256, of the same global sizes, hold side networks of other shapes)
        signature["per_layer_sizes"] = {name: [_json_size(v) for v in values] for name, values in per_layer.items()}
    return signature


def signature_differences(recorded: dict, signature: dict) -> dict:
    """The recorded entries this model does not match, as {name: (recorded, this model's)}.

    Only the entries the adapter recorded are compared: adapters saved by earlier versions recorded fewer of them. The
    sizes a model sets per layer (``per_layer_sizes``) are compared whether recorded or not: versions that did not
    record them refused every such model, so an adapter without them was made for a model whose layers share their
    sizes, and its side blocks do not fit one whose layers do not (a homogeneous Gemma 4's adapter, 16-wide heads in
    every layer, onto one whose full-attention heads are 32 wide)."""
    names = dict.fromkeys([*recorded, *(["per_layer_sizes"] if "per_layer_sizes" in signature else [])])
    return {
        name: (recorded.get(name), signature.get(name))
        for name in names
        if signature.get(name) != recorded.get(name)
    }
