"""`QSTLayer`: the PEFT tuner layer that wraps a model's decoder trunk.

QST lives *inside* the Hugging Face model, in place of its decoder trunk (``model.model`` for Llama-likes). The
model's own forward, LM head, loss, ``logits_to_keep``, ``generate`` and TRL's fused LM-head loss all call the trunk
and so run unchanged; the wrapped trunk only returns a better ``last_hidden_state``:

1. the original trunk runs under ``torch.no_grad()``, one hook per block recording its hidden states: no autograd
   graph is ever recorded through the backbone, whatever hooks a training script installed
   (``enable_input_require_grads``, gradient checkpointing, ``prepare_model_for_kbit_training``);
2. the active adapter's side network reads those hidden states (detached) and runs with gradients;
3. ``last_hidden_state = h_L + a * up(side)``.

With the adapters disabled the layer is a pass-through: outputs equal the base model's exactly.
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache, StaticCache

from .cache import (
    BackboneRouting,
    QSTCache,
    cache_field,
    has_cache_field,
    paired_cache,
    past_length,
    remember_pairing,
    with_cross_attention_half,
)
from .config import QSTConfig
from .backbone_lora import token_rows, top_block_linears
from .fast_path import fsdp2_unit
from .per_call import call_state, hold_call_state
from .serialization import user_stacklevel
from .side import (
    UNREACHED_BLOCK_PARTS,
    QSTSideNetwork,
    QSTUnsupportedModelError,
    ResidualStreams,
    _non_reentrant,
    copy_key_mask,
    find_layer_list,
    onloaded_tensor,
)
from .side_config import block_count_attribute, is_state_space_model, num_blocks

#: the adapter name that routes a row of a mixed batch to the base model, as in PEFT's LoRA
BASE_ADAPTER_NAME = "__base__"

#: trunk keyword arguments that belong to the backbone only; the rest (masks, positions, packing metadata) are shared.
#: ``num_items_in_batch`` (the Trainer's token count for the loss) reaches the trunk through the model's **kwargs and
#: means nothing to the side network; passed on, it would keep evaluation off the inference fast path.
#: ``token_type_ids`` (GPT-2, GPT-J) are embedded with the token embedding the side trunk does not have; the backbone's
#: embedding output, which the side network reads, already holds them. ``encoder_hidden_states`` and
#: ``encoder_attention_mask`` (a decoder of an encoder-decoder model run alone, BART's or Whisper's) feed the backbone's
#: cross-attention, whose outputs the side network reads in the backbone's hidden states; the side blocks have none
#: (:data:`peft_qst.side.UNREACHED_BLOCK_PARTS`), and handed backbone-width encoder states they failed ("mat1 and mat2
#: shapes cannot be multiplied"). ``deepstack_visual_embeds`` and ``visual_pos_masks`` (Qwen3-VL's language model) are
#: visual features the backbone adds to its hidden states at the image tokens after each of its first blocks: the
#: side network reads them there, in the next block's output and the trunk's final one, as the paper's side network
#: reads every backbone state, downsampled; handed to the narrower side trunk of the same class, the backbone-width
#: features would be added to its own states ("The size of tensor a must match the size of tensor b").
_BACKBONE_ONLY_KWARGS = (
    "input_ids", "inputs_embeds", "output_hidden_states", "output_attentions", "return_dict", "num_items_in_batch",
    "token_type_ids", "encoder_hidden_states", "encoder_attention_mask", "deepstack_visual_embeds",
    "visual_pos_masks",
)

#: model types whose decoder with cross-attention wraps a plain cache it is given into an ``EncoderDecoderCache`` itself
#: (the given cache as the self-attention half): GPT-2 built with ``add_cross_attention``. The other transformers 5.25
#: decoders with cross-attention that run alone as causal LMs write the encoder's keys and values into the
#: self-attention's layers of a plain cache (BART, mBART, Marian, Pegasus, Blenderbot, Blenderbot-small, PLBart, MVP,
#: BigBird-Pegasus, TrOCR, XGLM, RemBERT, RoFormer: cached logits wrong) or fail on one (BERT, RoBERTa, XLM-RoBERTa,
#: CamemBERT, ELECTRA, ERNIE, Data2VecText, RoBERTa-PreLayerNorm, RoCBert, XLM-RoBERTa-XL, BertGeneration:
#: ``AttributeError``), checked by generating from a plain cache against uncached generation
#: (``tests/test_generation_more.py`` covers gpt2, xglm and bart)
_WRAPS_GIVEN_PLAIN_CACHE = frozenset({"gpt2"})

#: the cache that a decoder with cross-attention which fills a plain cache wrong takes from a caller, named by the
#: refusals' fixes (:meth:`QSTLayer._with_cross_attention_half`, :meth:`QSTLayer._fresh_cache_advice`)
_ENCODER_DECODER_CACHE = "EncoderDecoderCache(DynamicCache(), DynamicCache())"

#: the trunk's methods that count or measure the parameters of the model they are called on. On a bare trunk's wrapper,
#: the root model under ``task_type="FEATURE_EXTRACTION"``, ``PeftModel.num_parameters()`` reached the trunk's own and
#: counted the trunk alone (``only_trainable=True``: 0, where PEFT's ``get_nb_trainable_parameters()`` counts the side
#: networks), and the Trainer's ``total_flos`` (``num_parameters(exclude_embeddings=True)``) missed them too. Bound to
#: the wrapper they cover the side networks as well, as on a model with a head (and as LoRA's, whose layers lie inside
#: the trunk, are counted).
_WHOLE_MODEL_MEASURES = frozenset({"num_parameters", "get_memory_footprint"})


#: transformers' continuous batching (``generate_batch``, TRL's ``use_transformers_continuous_batching``) runs the model
#: on a paged cache of the backbone's attention layout, and a side network has no paged cache of its own
CONTINUOUS_BATCHING_REFUSAL = (
    "QST does not support transformers' continuous batching (generate_batch, or TRL's "
    "use_transformers_continuous_batching=True): its paged KV cache holds the backbone's attention layers only, and "
    "the side network keeps a cache of its own. Use generate() (TRL: leave use_transformers_continuous_batching off)."
)


#: attribute holding the side networks inside a QSTLayer; every saved key goes through it
SIDE_ATTR = "qst_side"


def is_side_network_key(key: str) -> bool:
    """Whether state-dict or saved key ``key`` names a tensor of a QST side network (it passes through ``qst_side``)."""
    return f".{SIDE_ATTR}." in f".{key}"

#: the attribute of a side cache (or copy memory) holding the layout of the side network that filled it
_LAYOUT_ATTR = "_peft_qst_side_layout"
#: the attribute of a side cache (or copy memory) holding the identity of the side network that filled it
_IDENTITY_ATTR = "_peft_qst_side_identity"


def record_cache_layout(half, side: QSTSideNetwork) -> None:
    """Record on a side half (a side cache or copy memory) the layout and the identity of the side network that
    fills it (:meth:`QSTSideNetwork.cache_layout`, :meth:`QSTSideNetwork.cache_identity`). Attributes of the half
    itself: they travel with it wherever the half goes (paired with the caller's own cache, deep-copied, pickled)."""
    attributes = getattr(half, "__dict__", None)
    if attributes is not None and _LAYOUT_ATTR not in attributes:
        attributes[_LAYOUT_ATTR] = side.cache_layout()
        attributes[_IDENTITY_ATTR] = side.cache_identity()


def layers_holding(model: nn.Module, adapter_name: str) -> list[tuple[str, "QSTLayer"]]:
    """The QST layers of ``model`` that hold a side network of adapter ``adapter_name``, with their module names (one
    per adapted trunk)."""
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, QSTLayer) and adapter_name in module.qst_side
    ]


def identify_loaded_adapter(model: nn.Module, adapter_name: str, weights_digest: Optional[str]) -> None:
    """Give the side networks of ``adapter_name``, just built by loading the saved weights of digest
    ``weights_digest`` (``PeftModel.from_pretrained``, ``load_adapter`` into a new name), that digest as their
    identity (:meth:`QSTSideNetwork.cache_identity`): a cache filled by the same saved adapter, loaded in another
    process or again after ``delete_adapter``, continues. Weights loaded into an existing adapter keep its identity."""
    if not weights_digest:
        return
    for _, layer in layers_holding(model, adapter_name):
        layer.qst_side[adapter_name].identify_as_loaded(weights_digest)


def _side_cache_like(backbone_cache, side_config) -> Optional[Cache]:
    """A side cache of the backbone cache's kind where the side network cannot start with its own default.

    - A static backbone cache (``generate(cache_implementation="static")``, a ``StaticCache`` passed in): generate
      builds the decoding steps' 4-D attention masks over the cache's full preallocated length, and the side network
      reads the same masks, so its cache is static, of the same length, too.
    - A ``DynamicCache()`` made without a config (the caller's own, as in transformers' multi-turn examples): its
      layers are all full-attention layers, also on a sliding-window model, so it can be cropped anywhere (to
      regenerate a reply) and assisted decoding can roll it back without recording its past. The side cache is made
      the same way: with the side trunk's default sliding layers, a ``crop`` past the window cropped the caller's
      cache and then failed on the side cache (asking for ``activate_past_recording``), and prompt-lookup decoding
      with such a cache failed, where LoRA's continue.
    - A backbone cache that records past states (assisted and prompt-lookup decoding, and generate's deferred stop
      check, call ``activate_past_recording`` before the first forward, so that ``crop`` can roll back sliding-window
      layers): the side cache must record them from its first token too, or its sliding layers cannot be cropped.

    For every other backbone cache the side trunk starts its own ``DynamicCache`` (None here). An
    ``EncoderDecoderCache`` (a decoder with cross-attention) counts as its self-attention half, the one the side
    network's cache stands beside."""
    if isinstance(backbone_cache, EncoderDecoderCache):
        backbone_cache = backbone_cache.self_attention_cache
    if backbone_cache is None:
        return None
    if isinstance(backbone_cache, StaticCache):
        lengths = [layer.max_cache_len for layer in backbone_cache.layers if hasattr(layer, "max_cache_len")]
        return StaticCache(config=side_config, max_cache_len=max(lengths), offloading=backbone_cache.offloading)
    lazy_layers = getattr(backbone_cache, "layer_class_to_replicate", None)
    if type(backbone_cache) is DynamicCache and lazy_layers is DynamicLayer:
        return DynamicCache(offloading=backbone_cache.offloading)
    recording = [layer for layer in getattr(backbone_cache, "layers", ()) if getattr(layer, "record_past", False)]
    if recording:
        cache = DynamicCache(config=side_config)
        # transformers >= 5.25: linear-attention layers also keep their last recurrent states, as many as generate
        # asked the backbone's to keep (the side trunk's layers are of the backbone's kinds); none before 5.25
        keep = [layer.recurrent_states_to_keep for layer in recording
                if getattr(layer, "recurrent_states_to_keep", None) is not None]
        cache.activate_past_recording(**({"recurrent_states_to_keep": max(keep)} if keep else {}))
        return cache
    return None


def _gathered_head_weight(head: nn.Module) -> torch.Tensor:
    """The LM head's weight for looking up the input tokens' rows, which copy heads add. The trunk runs before the
    head, so where FSDP2 made the head an FSDP unit of its own (as accelerate wraps it) its weight is still sharded
    here: the head is gathered now (``FSDPModule.unshard``, collective, as every rank runs this forward), and its own
    forward later in the step finds it gathered. Where accelerate offloads the head (``device_map`` with ``lm_head`` on
    ``"disk"``, or on ``"cpu"`` beside GPUs), its weight waits on the meta device outside its forward: the stored
    weight is read through accelerate's hook instead (:func:`~peft_qst.side.onloaded_tensor`)."""
    if fsdp2_unit(head):
        head.unshard()
    weight = onloaded_tensor(head, "weight")
    if weight is None:
        raise RuntimeError(
            "This QST adapter has copy heads, which read rows of the LM head's weight, but that weight is on the meta "
            "device and no accelerate offload hook holds its values. Load the model's weights (or dispatch it with "
            "accelerate, which keeps offloaded weights in its hooks), or use copy_heads=0."
        )
    return weight


def _head_rows(weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The LM-head rows of ``input_ids``. Under DeepSpeed ZeRO-3 the head's weight is an empty placeholder outside the
    head's own forward: in a forward called through the DeepSpeed engine, DeepSpeed gathers it as soon as it is read,
    but not in calls on the model itself (``model.generate``, as the Trainer and TRL generate under ZeRO-3), where the
    lookup failed. There the weight is gathered for the lookup alone (collective, as every rank runs this forward) and
    partitioned again: the rows are a copy, and the frozen head needs no gradient."""
    input_ids = input_ids.to(weight.device)
    if getattr(weight, "ds_status", None) is not None and weight.ds_status.name == "NOT_AVAILABLE":
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return nn.functional.embedding(input_ids, weight)
    return nn.functional.embedding(input_ids, weight)


def _mix_as_fsdp_forward(side: nn.Module) -> None:
    """``QSTSideNetwork.mix`` uses the upsample, the output gate and the copy head after the side network's forward
    has returned. Where ``fully_shard`` made the side network itself an FSDP unit (a size-based wrap policy, say),
    their weights are shards again by then: register ``mix`` as a forward method of that unit, so FSDP gathers them
    for it (and again for its backward). A no-op otherwise, and once per side network."""
    if "mix" not in vars(side) and fsdp2_unit(side):
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(side, "mix")


class _ModelReference:
    """A weak reference to the model whose LM head copy heads read (:meth:`QSTLayer.bind_output_embeddings`). The model
    holds the layer: a strong reference back made a cycle, and ``del model`` (then ``torch.cuda.empty_cache()``) no
    longer freed the model's weights until the garbage collector ran. A deep copy of the model refers to the copied
    model, a layer copied without it to none (it keeps the head it last saw); pickled, it is the model (the pickle's
    memo makes that the unpickled model)."""

    __slots__ = ("_ref",)

    def __init__(self, model: Optional[nn.Module]):
        self._ref = weakref.ref(model) if model is not None else None

    def __call__(self) -> Optional[nn.Module]:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo) -> "_ModelReference":
        model = self()
        return _ModelReference(memo.get(id(model)) if model is not None else None)

    def __reduce__(self):
        return _ModelReference, (self(),)


class _LayerMethod:
    """A method of a :class:`QSTLayer`, with leading arguments, called through a weak reference to the layer: the
    hooks and the checkpointing switch the layer puts on its own trunk (its blocks, their linear layers, the trunk
    itself). A bound method there made a cycle (layer -> trunk -> block -> hook -> layer), so ``del model`` (then
    ``torch.cuda.empty_cache()``) left the backbone's weights in memory until the garbage collector's next run. Like
    the bound method it replaces it follows ``copy.deepcopy`` to the copy's layer and pickles with the layer
    (:class:`_ModelReference`); once the layer is gone it does nothing."""

    def __init__(self, layer: "QSTLayer", name: str, *args) -> None:
        self.layer = _ModelReference(layer)
        self.name = name
        self.args = args

    def __call__(self, *args, **kwargs):
        layer = self.layer()
        return None if layer is None else getattr(layer, self.name)(*self.args, *args, **kwargs)


def _selected_hidden_states(value) -> Optional[list[int]]:
    """The hidden-state indices an ``output_hidden_states`` value selects, or None where it is a flag. transformers 5
    takes an index or a list of indices there (negative ones counting from the end; a falsy value, ``0`` included,
    asks for none, as its own models read it), and its models return every position, None at the ones not
    selected. An adapted forward builds its hidden states itself and read any selection as ``True``: every position
    came back, where the base model (and the adapter disabled) gave None at those not selected."""
    if not value or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    return [int(index) for index in value]


def _early_exit_drafting() -> bool:
    """Whether transformers' self-speculative decoding is drafting on this thread: an
    ``EarlyExitCandidateGenerator`` (or a subclass) is in its ``get_candidates``, the only place transformers lowers
    the config's ``num_hidden_layers`` (:meth:`QSTLayer._drafting_early_exit`). Walked only where the count is lowered.
    """
    try:
        from transformers.generation.candidate_generator import EarlyExitCandidateGenerator
    except ImportError:  # a transformers without self-speculative decoding
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "get_candidates" and isinstance(
            frame.f_locals.get("self"), EarlyExitCandidateGenerator
        ):
            return True
        frame = frame.f_back
    return False


def _router_logits_recorded() -> Optional[int]:
    """How many router logits the running transformers forward has recorded so far (its output recorder, which
    collects ``output_router_logits`` from hooks on the router modules, in call order), or None where none are being
    recorded."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without the output recorder
        return None
    collected = _active_collector.get()
    if not isinstance(collected, dict) or not isinstance(collected.get("router_logits"), list):
        return None
    return len(collected["router_logits"])


class QSTLayer(nn.Module, BaseTunerLayer):
    """Wraps a decoder trunk; holds one :class:`~peft_qst.side.QSTSideNetwork` per adapter in ``qst_side``."""

    adapter_layer_names = ("qst_side",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.qst_side = nn.ModuleDict()
        hold_call_state(self, ("captured", "skipped", "lora_routing", "lora_seq_len", "grad_from", "routers_below"))
        self._disable_adapters = False
        self.merged_adapters = []
        # PEFT's disable_input_dtype_casting toggles this on every tuner layer (LoRA layers define it); QST casts the
        # backbone's hidden states into the side network's dtype by design and keeps doing so, but the flag must exist:
        # read through __getattr__ it was looked up on the trunk and failed
        self.cast_input_dtype_enabled = True
        self.kwargs = kwargs
        params = inspect.signature(type(base_layer).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._positional_names = [
            name
            for name, p in params.items()
            if name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def __getattr__(self, name: str) -> Any:
        # Code around the trunk reads its attributes (``model.model.embed_tokens``, ``.layers``, ``.config``,
        # ``.gradient_checkpointing``): they are the wrapped trunk's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "qst_side"):
                raise
            value = getattr(self.base_layer, name)
            if name in _WHOLE_MODEL_MEASURES and getattr(value, "__self__", None) is self.base_layer:
                return types.MethodType(value.__func__, self)
            return value

    def __setattr__(self, name: str, value: Any) -> None:
        # ... and write them: transformers' set_input_embeddings does ``setattr(model.model, "embed_tokens", new)``.
        # A submodule of the trunk assigned through the wrapper goes to the trunk, which runs it; registered on the
        # wrapper instead, the trunk kept its old module (a new embedding was silently ignored) and a resized one was
        # registered twice (saved twice in every adapter file).
        modules = self.__dict__.get("_modules")
        base_layer = modules.get("base_layer") if modules is not None else None
        if base_layer is not None and name not in modules and name in base_layer._modules:
            setattr(base_layer, name, value)
            return
        super().__setattr__(name, value)

    # ---------------------------------------------------------------------------------------------------------------
    # adapters
    # ---------------------------------------------------------------------------------------------------------------

    def bind_output_embeddings(self, model: Optional[nn.Module]) -> None:
        """The model whose LM head's rows copy heads add (see :class:`~peft_qst.side.CopyHead`). Kept as a plain
        reference, not a submodule: the head belongs to the model and is neither trained nor saved with the adapter.
        The head is looked up again at each forward (:meth:`_output_head`): ``resize_token_embeddings`` after
        ``get_peft_model`` replaces an untied head with a new, larger module, and a head bound once kept the old rows
        (the added tokens' ids failed the lookup)."""
        self.__dict__["_output_model"] = _ModelReference(model)
        self._output_head()

    def _output_head(self) -> Optional[nn.Module]:
        """The model's LM head as it is now; under ``modules_to_save`` (PEFT's wrapper around the head) its frozen
        original, not the adapter's trained copy, as in training so in generation; inside an FSDP1 unit of its own,
        the wrapped head. A layer copied or unpickled without its model keeps the head it last saw."""
        reference = self.__dict__.get("_output_model")
        model = reference() if reference is not None else None
        if model is None:
            return self.__dict__.get("_output_embeddings")
        get_output_embeddings = getattr(model, "get_output_embeddings", None)
        head = get_output_embeddings() if callable(get_output_embeddings) else None
        for wrapped in ("original_module", "_fsdp_wrapped_module"):
            inner = getattr(head, wrapped, None)
            head = head if inner is None else inner
        self.__dict__["_output_embeddings"] = head
        return head

    def _copy_inputs(self, kwargs: dict, hidden_states: tuple, memory) -> dict:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "This QST adapter has copy heads, which add the LM-head rows of the input tokens and so need "
                "input_ids; the decoder trunk got inputs_embeds without them (generate(inputs_embeds=...) runs its "
                "first step on the embeddings alone, even when input_ids are given too). Pass input_ids only."
            )
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError(
                "This QST adapter has copy heads, which read which positions are padding from a 2-D attention mask, "
                f"but the model was given a {type(attention_mask).__name__} mask of another form (generate with a "
                "static cache builds 4-D masks over the preallocated length). Generate with the default dynamic "
                "cache, or pass a 2-D attention_mask."
            )
        weight = _gathered_head_weight(self._output_head())
        past = memory.get_seq_length() if memory is not None else 0
        batch, length = input_ids.shape
        key_mask = copy_key_mask(
            batch, length, past, attention_mask, kwargs.get("position_ids"), weight.device
        )
        return {
            "key_hidden": hidden_states[-2],
            "token_rows": _head_rows(weight, input_ids),
            "key_mask": key_mask,
            "memory": memory,
        }

    @property
    def _model_type(self) -> str:
        """The backbone's model type, for errors."""
        return getattr(self.base_layer.config, "model_type", type(self.base_layer).__name__)

    def update_layer(self, adapter_name: str, config: QSTConfig, dtype: torch.dtype) -> None:
        base = self.get_base_layer()
        self.qst_side[adapter_name] = QSTSideNetwork(base, base.config, config, dtype)
        self._follow_gradient_checkpointing(self.qst_side[adapter_name])
        self._install_checkpointing_hook()
        self._install_capture_hooks()
        self._install_backbone_lora_hooks(self.qst_side[adapter_name])
        self.set_adapter(self.active_adapters)

    def _follow_gradient_checkpointing(self, side: QSTSideNetwork) -> None:
        """A side network built after gradient checkpointing was switched on (PEFT's QLoRA recipe:
        ``prepare_model_for_kbit_training`` before ``get_peft_model``; or ``add_adapter`` later) checkpoints as if it
        had been there when it was: transformers sets the flag and function on every module that has the flag (the
        trunk, which then runs without a cache, and its blocks), and side block i follows backbone block i (which
        ``every_n_layers`` may have left out)."""
        flagged = next((m for m in self.base_layer.modules() if getattr(m, "gradient_checkpointing", False)), None)
        function = vars(flagged).get("_gradient_checkpointing_func") if flagged is not None else None
        if function is None:  # off in the trunk: off in the side network (switched off after it was on)
            for module in side.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.gradient_checkpointing = False
            return
        parent, attr = find_layer_list(self.base_layer, len(side._blocks))
        per_block = {
            id(block.block): bool(getattr(backbone_block, "gradient_checkpointing", True))
            for block, backbone_block in zip(side._blocks, getattr(parent, attr))
        }
        for module in side.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = function
                module.gradient_checkpointing = per_block.get(id(module), True)

    def _install_checkpointing_hook(self) -> None:
        """Have the side networks follow every checkpointing switch of the trunk. On a bare trunk's wrapper
        (``task_type="FEATURE_EXTRACTION"``) the trunk does not hold the side networks, and its switches
        (``gradient_checkpointing_enable``/``_disable``, ``activation_checkpointing_enable``/``_disable``) are reached
        through the ``PeftModel`` (the Trainer's ``gradient_checkpointing=True``) and through ``get_base_model()``,
        the trunk itself: ``get_base_model().gradient_checkpointing_enable()`` checkpointed no side block, whose
        activations are what QST trains through, and its ``_disable()`` left them checkpointed. Every switch sets the
        flags through the trunk's ``_set_gradient_checkpointing``, so the hook sits there, on the trunk instance (a
        model with a head sets every module it holds, side networks too). A :class:`_LayerMethod`, not a closure:
        ``copy.deepcopy`` rebinds it to the copy's layer. Removed by :meth:`remove_hooks`. Trunks of transformers'
        pre-4.35 format (``_set_gradient_checkpointing(module, value)``, applied module by module) are left alone."""
        trunk = self.base_layer
        setter = getattr(type(trunk), "_set_gradient_checkpointing", None)
        if setter is None or "_set_gradient_checkpointing" in vars(trunk):
            return
        if "value" in inspect.signature(setter).parameters:
            return
        vars(trunk)["_set_gradient_checkpointing"] = _LayerMethod(self, "_set_trunk_checkpointing")

    def _set_trunk_checkpointing(self, *args, **kwargs) -> None:
        """The trunk's own ``_set_gradient_checkpointing``, then every side network follows what it left on or off."""
        type(self.base_layer)._set_gradient_checkpointing(self.base_layer, *args, **kwargs)
        for side in self.qst_side.values():
            self._follow_gradient_checkpointing(side)

    # ---------------------------------------------------------------------------------------------------------------
    # reading the backbone's hidden states
    # ---------------------------------------------------------------------------------------------------------------

    def _install_capture_hooks(self) -> None:
        """One forward hook per backbone block records the hidden states the side network reads: the first block's
        input (the embedding output) and every block's output, while this thread's ``captured`` list is set (during an
        adapted forward), and does nothing otherwise.

        transformers' own ``output_hidden_states=True`` records the same tensors, but through hooks on every block and
        on every attention module (each hooked module call takes PyTorch's slower path): on a decoding step of the
        4-bit SmolLM2-135M on a CPU that capture cost about 1 ms of 20, these hooks about 0.4 ms. Installed once;
        removed by :meth:`remove_hooks`.
        """
        if "_hook_handles" in self.__dict__:
            return
        parent, attr = find_layer_list(self.base_layer, num_blocks(self.base_layer.config))
        blocks = getattr(parent, attr)
        handles = [blocks[0].register_forward_hook(_LayerMethod(self, "_capture_first_block"), with_kwargs=True)]
        handles += [
            block.register_forward_hook(_LayerMethod(self, "_capture_block_at", index))
            for index, block in enumerate(blocks)
            if index
        ]
        self.__dict__["_hook_handles"] = handles
        self.__dict__["_num_blocks"] = len(blocks)

    def _capture_first_block(self, module, args, kwargs, output) -> None:
        captured = call_state(self).get("captured")
        if captured is not None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    def _capture_block(self, module, args, output) -> None:
        """The hook of blocks after the first in a model pickled before :meth:`_capture_block_at`."""
        captured = call_state(self).get("captured")
        if captured is not None:  # (OpenAI GPT's blocks return a list)
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    def _capture_block_at(self, index: int, module, args, output) -> None:
        """Record the output of block ``index`` (after the first). Blocks the trunk skipped before it passed their
        input through unchanged: where this block is handed the very tensor that the last block recorded returned,
        each block between gets that tensor as its output, which is what the trunk computed, and is noted in
        ``skipped``. Mllama's text model skips its cross-attention layers so when it is given no
        ``cross_attention_states`` (text without an image); its side trunk, of the same class and called the same
        way, skips its own, so the side network reads the states of the blocks that ran, as for a model without
        those layers. Before, such a model recorded fewer hidden states than blocks and was refused as "a model that
        loops over its blocks". A skip that cannot be seen so (a block handed another tensor, the first or the last
        blocks not run, an input handed by keyword: the hook, as those before it, is registered without
        ``with_kwargs``) still leaves fewer hidden states, refused by the forward."""
        state = call_state(self)
        captured = state.get("captured")
        if captured is None:
            return
        recorded = len(captured) - 1  # the blocks whose outputs are recorded (the first entry is the first's input)
        if 1 <= recorded < index and args and args[0] is captured[-1]:
            captured.extend([args[0]] * (index - recorded))
            state["skipped"].extend(range(recorded, index))
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)  # (OpenAI GPT's: a list)

    def remove_hooks(self) -> None:
        """Remove every hook QST put on the backbone (hidden-state capture, backbone low-rank adapters, checkpointing
        switches): ``unload()`` hands back the trunk as it was."""
        setter = vars(self.base_layer).get("_set_gradient_checkpointing")
        if isinstance(setter, _LayerMethod) and setter.layer() is self:
            del vars(self.base_layer)["_set_gradient_checkpointing"]
        for handle in self.__dict__.pop("_hook_handles", ()):
            handle.remove()
        self._remove_unused_backbone_hooks(())

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's deletion (the side network and its backbone adapters go), then the backbone hooks that no
        remaining adapter needs: see :meth:`_remove_unused_backbone_hooks`."""
        super().delete_adapter(adapter_name)
        self._remove_unused_backbone_hooks(self.qst_side.values())

    # ---------------------------------------------------------------------------------------------------------------
    # backbone low-rank adapters (QSTConfig.backbone_lora_layers)
    # ---------------------------------------------------------------------------------------------------------------

    def _install_backbone_lora_hooks(self, side: QSTSideNetwork) -> None:
        """Hooks on the top backbone blocks: each linear layer adds the deltas of the adapters that adapt the current
        forward (``lora_routing``); each block turns gradients on for itself and the blocks above it when the
        current forward trains such an adapter (``grad_from``). Installed once per module, shared by adapters."""
        if side.backbone_lora is None:
            return
        hooks = self.__dict__.setdefault("_backbone_hooks", {})
        parent, attr = find_layer_list(self.base_layer, len(side._blocks))
        blocks = getattr(parent, attr)
        self.__dict__["_backbone_blocks"] = blocks
        num_top = len(blocks) - side.backbone_lora.first_block
        # gradients go through these blocks' frozen 4-bit layers, which bitsandbytes' CPU packed layout gets wrong: the
        # routing every 4-bit layer of a QST model gets (bnb_compat.route_4bit_layers_by_mode) runs calls with a
        # gradient on the standard layout, and leaves the packed kernel to eval forwards without one
        # The hooks are _LayerMethods, not closures: copy.deepcopy rebinds them to the copy, so a deep-copied model's
        # blocks call its own layer (a closure would keep calling the original's). Keyed by position, not by
        # id(module), so that the copy finds them installed too.
        for index, name, module in top_block_linears(blocks, num_top):
            if ("lora", index, name) not in hooks:
                hooks[("lora", index, name)] = module.register_forward_hook(
                    _LayerMethod(self, "_add_backbone_deltas", index, name)
                )
        for index in range(side.backbone_lora.first_block, len(blocks)):
            if ("grad", index) not in hooks:
                hooks[("grad", index)] = blocks[index].register_forward_pre_hook(
                    _LayerMethod(self, "_enable_grad_from", index)
                )

    def _remove_unused_backbone_hooks(self, sides) -> None:
        """Remove the backbone hooks :meth:`_install_backbone_lora_hooks` installed that none of the side networks
        ``sides`` (the adapters that remain) uses: the linear-layer hook where none of them has a delta, the block
        pre-hook below the lowest block any of them adapts. After ``delete_adapter`` of an adapter with backbone
        adapters, its hooks stayed on the backbone: inert, but every call of those layers took PyTorch's slower hooked
        path."""
        hooks = self.__dict__.get("_backbone_hooks")
        if not hooks:
            return
        blocks = self.__dict__["_backbone_blocks"]
        loras = [side.backbone_lora for side in sides if side.backbone_lora is not None]
        lowest = min((lora.first_block for lora in loras), default=len(blocks))
        for key in list(hooks):
            if key[0] == "lora":
                if any(lora.delta(key[1], key[2]) is not None for lora in loras):
                    continue
            elif key[1] >= lowest:
                continue
            hooks.pop(key).remove()
        if not hooks:
            del self.__dict__["_backbone_hooks"]
            del self.__dict__["_backbone_blocks"]

    def _add_backbone_deltas(self, index: int, name: str, module, args, output):
        """Forward hook of a top block's linear layer: adds the deltas of the adapters routed in this forward."""
        routing = call_state(self).get("lora_routing")
        if not routing:
            return None
        for adapter_name, rows in routing:
            delta_module = self.qst_side[adapter_name].backbone_lora.delta(index, name)
            if delta_module is None:
                continue
            delta = delta_module(args[0])
            if rows is not None:  # a mixed-adapter batch: only this adapter's rows
                mask = token_rows(rows, call_state(self).get("lora_seq_len"), args[0], index, name)
                delta = delta * mask.to(delta.device, delta.dtype)
            output = output + delta.to(output.dtype)
        return output

    def _enable_grad_from(self, index: int, module, args) -> None:
        """Forward pre-hook of a top block: inside the backbone's no_grad, from block ``grad_from`` up, autograd
        records (into the adapters); the no_grad context restores the previous mode when the backbone returns. Also
        notes how many router logits the backbone has recorded before this block (``routers_below``): those of the
        blocks a hybrid adapts, from its first one up, join the side routers' in the aux loss."""
        state = call_state(self)
        start = state.get("grad_from")
        if start is not None and index >= start:
            torch.set_grad_enabled(True)
        routers_below = state.get("routers_below")
        if routers_below is not None:  # (an adapted forward's first run of its blocks, not a checkpoint's recompute)
            recorded = _router_logits_recorded()
            if recorded is not None:
                routers_below[index] = recorded

    def _suspend_backbone_layerdrop(self) -> Callable[[], None]:
        """Turn off the backbone's LayerDrop (``config.layerdrop`` > 0: OPT, XGLM, BioGPT read it into their trunk's
        ``layerdrop`` and, in training mode, skip each block with that probability) for one forward; returns what
        turns it back on. The backbone is frozen, so LayerDrop trains nothing in it; a skipped first or last block
        left QST fewer hidden states than blocks, and a training run stopped at a random step with a
        QSTUnsupportedModelError (a skipped block between passed on its input, which the side block read in place of
        a state it never reads at inference). The side trunk, of the same class, keeps its config's LayerDrop: it
        regularizes the network that trains. The modules holding ``layerdrop`` are looked up once."""
        holders = self.__dict__.get("_layerdrop_holders")
        if holders is None:
            holders = self.__dict__["_layerdrop_holders"] = [
                module
                for module in self.base_layer.modules()
                if type(getattr(module, "layerdrop", None)) in (int, float) and not isinstance(module, QSTLayer)
            ]
        suspended = [(module, module.layerdrop) for module in holders if module.training and module.layerdrop > 0]
        for module, _ in suspended:
            module.layerdrop = 0.0

        def restore() -> None:
            for module, value in suspended:
                module.layerdrop = value

        return restore

    def _checkpoint_adapted_blocks(self, grad_from: Optional[int]) -> Callable[[], None]:
        """Prepare the gradient checkpointing of the backbone blocks that train adapters in this forward (from block
        ``grad_from`` up); returns what undoes it once the forward is over.

        Under gradient checkpointing (``gradient_checkpointing_enable()``, TRL's default) a block's forward runs again
        in backward, after this forward's adapter routing (``lora_routing``) is gone. So each checkpointed block from
        ``grad_from`` up gets a checkpoint function that re-installs this forward's routing around both runs of the
        block's ``forward``; backward then keeps each such block's input only, as QLoRA's checkpointing does.
        transformers checkpoints a block's ``forward``, not its hooks, and only while gradients are enabled: the
        block's pre-hook that turns them on (:meth:`_enable_grad_from`) has run by then, and the hidden-state capture
        hooks run once. With reentrant checkpointing (``use_reentrant=True``) the first of these blocks is not
        checkpointed: its input comes from the blocks below, computed under ``no_grad``, and a reentrant checkpoint
        whose inputs require no gradient records no graph.
        """
        if grad_from is None:
            return lambda: None
        routing = call_state(self)["lora_routing"]
        routed, unchecked = [], []  # (block, its own checkpoint function); blocks run without checkpointing
        for index, block in enumerate(self.__dict__["_backbone_blocks"][grad_from:], start=grad_from):
            if not getattr(block, "gradient_checkpointing", False):
                continue
            checkpoint = vars(block).get("_gradient_checkpointing_func")
            if checkpoint is None or (index == grad_from and not _non_reentrant(checkpoint)):
                # not set by gradient_checkpointing_enable(), or reentrant checkpointing of the first adapted block,
                # whose input (computed under no_grad) does not require grad: reentrant checkpointing would then
                # record no graph at all. Such a block keeps its activations.
                unchecked.append(block)
                block.gradient_checkpointing = False
            else:
                routed.append((block, checkpoint))
                block._gradient_checkpointing_func = self._routed_checkpoint(checkpoint, routing)

        def restore() -> None:
            for block, checkpoint in routed:
                block._gradient_checkpointing_func = checkpoint
            for block in unchecked:
                block.gradient_checkpointing = True

        return restore

    def _routed_checkpoint(self, checkpoint: Callable, routing) -> Callable:
        """``checkpoint`` (a block's ``_gradient_checkpointing_func``) whose function runs with ``routing`` installed,
        in the forward and in backward's recomputation alike."""

        def routed_checkpoint(function, *args, **kwargs):
            def run_routed(*inner_args, **inner_kwargs):
                state = call_state(self)  # backward's recomputation may run on another thread than the forward
                previous = state.get("lora_routing")
                state["lora_routing"] = routing
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:
                    state["lora_routing"] = previous

            return checkpoint(run_routed, *args, **kwargs)

        return routed_checkpoint

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT's default moves and casts an adapter to its base layer's single device and dtype; a side network is
        # spread like the backbone it reads from and keeps its own dtype
        if adapter_name in self.qst_side:
            self.qst_side[adapter_name].place(self.get_base_layer())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "QST adapters cannot be merged into the base weights: the side network is a separate computation path, "
            "not a weight delta. Keep the adapter loaded with PeftModel, or use unload() to get the base model back."
        )

    def unmerge(self) -> None:
        pass

    # ---------------------------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------------------------

    def _as_kwargs(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self._positional_names):
            raise TypeError(f"{type(self.base_layer).__name__}.forward got too many positional arguments")
        for name, value in zip(self._positional_names, args):
            if name in kwargs:
                raise TypeError(f"{type(self.base_layer).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
        return kwargs

    def _pop_cache(self, kwargs: dict):
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        return cache if cache is not None else legacy

    def forward(self, *args, **kwargs):
        kwargs = self._as_kwargs(args, kwargs)
        cache = paired_cache(self._pop_cache(kwargs))
        if type(cache).__name__ == "PagedAttentionCache":  # not a transformers Cache; not imported to check
            raise QSTUnsupportedModelError(CONTINUOUS_BATCHING_REFUSAL)
        row_adapters = kwargs.pop("adapter_names", None)
        if self.disable_adapters or self._drafting_early_exit():
            return self._forward_base(cache, kwargs)
        if row_adapters is not None:
            return self._forward_adapted(self._adapters_of_rows(row_adapters), cache, kwargs, row_adapters)
        active = [name for name in self.active_adapters if name in self.qst_side]
        if not active:
            return self._forward_base(cache, kwargs)
        if len(active) > 1:
            raise ValueError(
                f"QST runs one adapter at a time, but adapters {active} are active. Call set_adapter(name) to pick "
                "one, or pass adapter_names=[...] to route each row of a batch to an adapter."
            )
        return self._forward_adapted(active, cache, kwargs)

    def _checkpointing_turns_cache_off(self) -> bool:
        """Whether transformers would run this forward without a cache: a trunk with gradient checkpointing on, in
        training mode, with gradients enabled (``merge_with_config_defaults`` sets ``use_cache=False`` then, whatever
        the config or the caller said, as a recomputed block would write the cache twice).

        The backbone runs under ``torch.no_grad()`` inside QST, so it no longer sees that condition and kept the cache
        on: a padding-free batch (``DataCollatorWithFlattening``: position ids restarting per sequence, no attention
        mask) in a ``Trainer(gradient_checkpointing=True)`` step, which passes no ``use_cache``, then attended across
        its sequences in the backbone and the side network, because transformers derives the per-sequence mask from
        the position ids only without a cache; the base model (and LoRA) kept them apart. Each training step also
        built caches nobody reads. The trunk's own flag, as transformers reads it (blocks flagged alone drop only
        their own cache layer, and the trunk's mask is built with a cache)."""
        trunk = self.base_layer
        return bool(getattr(trunk, "gradient_checkpointing", False)) and trunk.training and torch.is_grad_enabled()

    def _drop_cache_under_checkpointing(self, cache):
        """What transformers does with a cache passed into a forward that :meth:`_checkpointing_turns_cache_off`:
        ``merge_with_config_defaults`` sets ``use_cache=False`` (with a warning) and each checkpointed block drops the
        cache it is handed (``GradientCheckpointingLayer``: "Setting `cache=None`"), so the base model neither reads
        nor fills it (Mamba's trunk turns ``use_cache`` off itself and its blocks drop the cache alike). The backbone
        runs under ``no_grad`` inside QST, where its blocks keep the cache: QST filled the caller's cache (the
        backbone's half, and the side halves on an attention model; on Mamba the backbone's alone, which the next
        step refused as having no side state) in a training forward the base model leaves it untouched in. The forward
        now runs without a cache, backbone and side networks alike, and the cache, all its halves, is left as given.
        Where the cache holds past tokens the base model failed on attention models (its mask counted them, its
        blocks did not see them) and ignored them on Mamba; QST ignores them too, with the warning saying so."""
        past = int(past_length(cache.backbone if isinstance(cache, QSTCache) else cache))
        warnings.warn(
            f"A cache was passed to a forward of this {self._model_type} model in training mode with gradient "
            "checkpointing on and gradients enabled: transformers turns the cache off there (use_cache=False; a "
            "checkpointed block would write it twice), so the forward runs without it, leaves it as it was"
            + (f" and does not read the {past} past tokens it holds" if past else "")
            + ", and returns none. Call model.eval(), run under torch.no_grad(), or call "
            "gradient_checkpointing_disable() to run with the cache.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return None

    def _state_space_step_mask(self, backbone_cache, kwargs: dict) -> None:
        """The attention mask of a cached step of a pure state-space model (Mamba, Falcon-Mamba, Mamba-2), cut to the
        new tokens. Their mixers multiply each token's state by its mask entry (``hidden_states *
        attention_mask[:, :, None]``), so the mask they take covers the tokens given, not the cached ones; their own
        ``generate`` passes none after the first step. A generation loop written for attention models passes one over
        every token so far (cached and new): Mamba's and Falcon-Mamba's mixers broadcast a step's one token against it
        and the base model returns logits for as many positions as the mask has, all wrong (4.2 off on a tiny Mamba),
        and they write those states into its cache; QST refused, naming the model as unsupported. Such a mask is
        unambiguous (its last entries are the new tokens'), so the adapted forward takes those, as Mamba-2's mixers,
        which skip the mask for one token, in effect do: the logits equal the uncached forward's. A mask of another
        length is refused before the backbone runs, the cache left as it was."""
        mask = kwargs.get("attention_mask")
        if backbone_cache is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None or inputs.dim() < 2 or mask.shape[-1] == inputs.shape[1]:
            return
        if not is_state_space_model(self.base_layer.config):
            return
        new, past = inputs.shape[1], int(past_length(backbone_cache))
        if mask.shape[-1] == past + new:
            kwargs["attention_mask"] = mask[:, -new:]
            return
        raise ValueError(
            f"The attention mask of this cached {self._model_type} step covers {mask.shape[-1]} tokens, where the "
            f"step has {new} new token(s) and its cache holds {past}: a state-space model's mixers mask the new "
            f"tokens' states only, so pass a mask of shape (batch, {new}) for the new tokens, one over all "
            f"{past + new} tokens so far (the last {new} columns are used), or none (as its generate() does after "
            "the first step)."
        )

    def _collects_own_hidden_states(self) -> bool:
        """Whether the trunk collects its hidden states itself in its forward (Mamba, Falcon-Mamba, Bloom: ``if
        output_hidden_states: all_hidden_states += ...``) rather than through transformers' output capturing
        (``_can_record_outputs["hidden_states"]``, which Llama and Mamba-2 declare). Such a trunk reads
        ``output_hidden_states`` as a flag: given indices (``[0, -1]``), it returns all of them, where QST returned
        only those selected (None at the others). Its layout is its own too: Mamba's tuple is each block's output and
        then the normed last one, with no embedding output, where QST returned the embedding output first, as the
        trunks that capture them do. Such a trunk is asked for its own (no hooks are installed for them), and the
        adapted forward returns those, the last one adapted. A trunk any of whose submodels records them (a composite
        model's language model, Fuyu's) passes the selection on to it and keeps QST's own. Looked up once."""
        own = self.__dict__.get("_own_hidden_states")
        if own is None:
            own = self.__dict__["_own_hidden_states"] = not any(
                "hidden_states" in (getattr(module, "_can_record_outputs", None) or {})
                for module in self.base_layer.modules()
            )
        return own

    def _drafting_early_exit(self) -> bool:
        """Whether transformers' self-speculative decoding (``generate(assistant_early_exit=n)``) is drafting: it
        lowers the trunk config's ``num_hidden_layers`` to ``n`` while the model, its own assistant, proposes tokens
        from its first ``n`` blocks, and restores it for the full forwards that check them.

        A side network reads every block's output, so it cannot run on the first ``n``: the drafts are the frozen
        backbone's own early exit (QST leaves those blocks as they are; ``backbone_lora_layers`` are not applied), in
        the assistant's own cache. Only drafts: the full adapted forwards accept or replace each token, so the output
        is the adapted model's greedy tokens. Before, the drafting forward failed as a "model that loops over its
        blocks", and transformers left ``num_hidden_layers`` lowered, so every later forward of the model failed too.

        Only while transformers drafts (:func:`_early_exit_drafting` on this thread's stack): a count lowered
        otherwise, by a caller running a truncated model or left so by an early-exit generate interrupted while
        drafting (transformers restores it without ``finally``), was taken for a draft, and every later forward
        returned the base model's outputs with the adapter silently dropped. The adapted forward runs there (GPT-2's
        blocks ignore the count; the others' refusal names it). Compared with the blocks QST was built on, so that a
        model pickled before this check drafts too.
        """
        return self._lowered_block_count() is not None and _early_exit_drafting()

    def _lowered_block_count(self) -> Optional[int]:
        """The trunk config's block count where it is lower than the number of blocks QST was built on
        (:meth:`_drafting_early_exit`), else None. The count is :func:`~peft_qst.side_config.block_count_attribute`'s:
        ``num_hidden_layers``; where the config maps that to the encoder's count, as Whisper's does, its decoder's
        ``decoder_layers``; LongCat-Flash's ``num_layers``, which its ``num_hidden_layers`` (2 x ``num_layers``, two
        sublayers per block) sets to half the value transformers lowers it to. Read as ``num_hidden_layers``, its
        lowered count (2 of 2 blocks for an early exit at 2) was never lower than the blocks: the drafting forward was
        refused as "a model that loops over its blocks", and a count left lowered got no hint to restore it."""
        config = self.base_layer.config
        current = getattr(config, block_count_attribute(config), None)
        return current if isinstance(current, int) and current < self.__dict__.get("_num_blocks", 0) else None

    def _lowered_layers(self) -> str:
        """A hint for the refusal of a forward whose blocks did not all run, where the config's count is lowered."""
        current, blocks = self._lowered_block_count(), self.__dict__["_num_blocks"]
        if current is None:
            return ""
        count = block_count_attribute(self.base_layer.config)
        return (
            f" Its config's {count} is {current}, lower than the {blocks} blocks QST was built on, so the "
            "backbone ran only the first ones (a generate(assistant_early_exit=...) interrupted while drafting leaves "
            f"it lowered): restore it with model.config.{count} = {blocks}."
        )

    def _adapters_of_rows(self, row_adapters) -> list[str]:
        if isinstance(row_adapters, str) or not all(isinstance(name, str) for name in row_adapters):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got {row_adapters!r}.")
        names = list(dict.fromkeys(name for name in row_adapters if name != BASE_ADAPTER_NAME))
        unknown = [name for name in names if name not in self.qst_side]
        if unknown:
            raise ValueError(
                f"adapter_names refers to adapter(s) {unknown} that this model does not have; available: "
                f"{sorted(self.qst_side)} and {BASE_ADAPTER_NAME!r} for the base model."
            )
        return names

    def _forward_base(self, cache, kwargs: dict):
        """The trunk exactly as without QST; a paired cache keeps its side halves for later adapted steps."""
        backbone_cache = cache.backbone if isinstance(cache, QSTCache) else cache
        if isinstance(cache, QSTCache):
            self._check_routing(cache, None)
        out = self.base_layer(**kwargs, **{self._cache_kwarg: backbone_cache})
        if isinstance(cache, QSTCache) and not isinstance(out, tuple):
            keeps_cache = not has_cache_field(out)  # filled in place, none returned (RecurrentGemma)
            new_backbone_cache = backbone_cache if keeps_cache else out.get(cache_field(out))
            if new_backbone_cache is not None:
                cache.backbone = new_backbone_cache
                cache.routing.record(None)
                remember_pairing(cache)
                if not keeps_cache:
                    out[cache_field(out)] = cache
        return out

    def _forward_adapted(self, adapter_names: list[str], cache, kwargs: dict, row_adapters=None):
        """The backbone once under no_grad, then the side network of each adapter in ``adapter_names``.

        Without ``row_adapters`` there is one adapter and it adapts every row. With ``row_adapters`` (one name per
        row, ``"__base__"`` for the base model) each row takes its own adapter's output. Each side network runs over
        the whole batch, so that its cache keeps the batch layout that generate reorders and selects; side networks are
        small next to the backbone, which still runs once.
        """
        config = self.base_layer.config
        if kwargs.get("cross_attention_states") is not None:
            # Mllama's text model: its cross-attention layers run only with them; the side trunk, at side width, was
            # handed the backbone-width states and failed deep inside ("mat1 and mat2 shapes cannot be multiplied")
            raise QSTUnsupportedModelError(
                f"QST side-tunes the {self._model_type} model on text alone: given cross_attention_states (image "
                "states), its cross-attention layers attend to them, which the side network would not follow. Call it "
                "without cross_attention_states (it then skips those layers, as for text without an image)."
            )
        return_dict = kwargs.pop("return_dict", None)
        want_hidden = kwargs.pop("output_hidden_states", None)
        if want_hidden is None:
            want_hidden = getattr(config, "output_hidden_states", False)
        # an index or a list of indices (transformers 5's select_hidden_states) asks for those hidden states only,
        # where the trunk records them with transformers' output capturing; a trunk that collects them itself reads
        # the value as a flag and gives all of them, in its own layout (see _collects_own_hidden_states)
        own_hidden = self._collects_own_hidden_states()
        selected = None if own_hidden else _selected_hidden_states(want_hidden)
        want_hidden = bool(want_hidden) if selected is None else True
        checkpointing_off = self._checkpointing_turns_cache_off()
        if cache is not None and checkpointing_off:
            cache = self._drop_cache_under_checkpointing(cache)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            # a cache passed in is continued also where the config says use_cache=False (QLoRA recipes set it for
            # training): the trunk writes to the cache it is given and returns it, so the side networks keep theirs
            # in step. Without them the caller's next step got a backbone cache alone, refused as having no side state
            use_cache = cache is not None or getattr(config, "use_cache", False)
        if use_cache and checkpointing_off:
            # transformers turns the cache off here (it checks under the gradients the backbone runs without below,
            # so the backbone would keep it on), and without a cache its masks separate packed sequences
            use_cache = False
            if "use_cache" in kwargs or "use_cache" in inspect.signature(type(self.base_layer).forward).parameters:
                kwargs["use_cache"] = False
        if kwargs.get("logits_to_keep") is not None:
            # a trunk that takes logits_to_keep (Gemma 4's, with KV-shared layers: num_kv_shared_layers) runs the
            # positions before the last logits_to_keep through none of its blocks from its first KV-shared one on,
            # as generate's prefill asks for the last position's logits only. The side networks read every block's
            # states at every position (their caches hold the whole prompt), and the side trunk, of the same class,
            # would drop them too: the first generate was refused as a model whose blocks pass states of another
            # shape. Both trunks run every position; the LM head keeps the last logits_to_keep, as for other trunks
            kwargs["logits_to_keep"] = 0

        cache = self._with_cross_attention_half(cache, kwargs)
        backbone_cache, side_caches, memories = self._split_cache(cache, adapter_names)
        self._state_space_step_mask(backbone_cache, kwargs)
        routing = self._routing(adapter_names, row_adapters)
        if isinstance(cache, QSTCache):
            self._check_routing(cache, routing)
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if row_adapters is not None and inputs is not None and len(row_adapters) != inputs.shape[0]:
            raise ValueError(
                f"adapter_names has {len(row_adapters)} entries for a batch of {inputs.shape[0]} rows; give "
                "one adapter name per row."
            )
        lora_routing = []
        for name in adapter_names:
            lora = self.qst_side[name].backbone_lora
            if lora is not None:
                rows = None if row_adapters is None else torch.tensor([n == name for n in row_adapters])
                lora_routing.append((name, rows, lora.first_block))
        state = call_state(self)
        state["lora_routing"] = [(name, rows) for name, rows, _ in lora_routing]
        # the tokens per row, for the layers that see the batch flattened to (batch * sequence, hidden)
        state["lora_seq_len"] = inputs.shape[1] if inputs is not None and inputs.dim() >= 2 else None
        grad_from = min(first for _, _, first in lora_routing) if lora_routing and torch.is_grad_enabled() else None
        state["grad_from"] = grad_from
        # how many router logits the backbone has recorded when each adapted block starts: the logits of the blocks a
        # hybrid adapts are those recorded from its first block on (see _adapted_router_logits)
        routers_below = state["routers_below"] = {}
        restore_checkpointing = self._checkpoint_adapted_blocks(grad_from)
        restore_layerdrop = self._suspend_backbone_layerdrop()
        captured = state["captured"] = []
        skipped = state["skipped"] = []
        try:
            with torch.no_grad():
                # never the backbone's own hidden states where transformers records them (output capturing), even
                # where the caller asks for them: the capture hooks record the same tensors, and the output's
                # hidden_states are built from those below. Asked once, transformers installs its recording hooks on
                # every block and attention module and keeps them: every later forward and decoding step took the
                # slower hooked path, for hidden states that were dropped. A trunk that collects its own in its loop
                # (Mamba) is asked for them, as their layout is its own (_collects_own_hidden_states)
                out = self.base_layer(
                    **kwargs, **{self._cache_kwarg: backbone_cache}, output_hidden_states=own_hidden and want_hidden,
                    return_dict=True,
                )
        finally:
            state["captured"] = state["skipped"] = state["lora_routing"] = state["grad_from"] = None
            state["routers_below"] = None
            state["lora_seq_len"] = None
            restore_checkpointing()
            restore_layerdrop()
        backbone_last = out.last_hidden_state
        if len(captured) != self.__dict__["_num_blocks"] + 1:
            more = len(captured) > self.__dict__["_num_blocks"] + 1
            raise QSTUnsupportedModelError(
                f"QST does not support this {self._model_type} model as it runs: QST recorded {len(captured)} hidden "
                f"states from the {type(self.base_layer).__name__} backbone, expected "
                f"{self.__dict__['_num_blocks'] + 1} (the embedding output and one per block): "
                + (
                    "some of its blocks ran more than once (a model that loops over its blocks)"
                    if more
                    else "some of its blocks did not run (QST follows a block the trunk skips only where the next "
                    "block is handed that block's input unchanged; not the first or the last block)"
                )
                + ", or something replaced their hooks."
                + self._lowered_layers()
            )
        streams = ResidualStreams.of(self.base_layer.config)
        if streams is not None:  # several residual streams (hyper-connections, AltUp): the side network reads one
            captured = [streams.single(h) for h in captured]
        unexpected = next((tuple(h.shape) for h in captured[:-1] if h.shape != backbone_last.shape), None)
        if unexpected is not None:
            raise QSTUnsupportedModelError(
                f"QST does not support the {self._model_type} model: its blocks pass hidden states of shape "
                f"{unexpected} between them, not {tuple(backbone_last.shape)} as its output is (several residual "
                "streams, or time-major states), so no side network can read them."
            )
        # the last entry is the last block's output; the side network reads the trunk's output after its final norm.
        # The first entry is the first block's input, which for many trunks is the inputs_embeds tensor they were
        # handed, computed outside the no_grad above: a composite (multimodal) model merges image features into it,
        # and with enable_input_require_grads (prepare_model_for_kbit_training, gradient checkpointing) it carries the
        # graph of the frozen vision tower. Detached, the side network's backward never reaches that graph.
        hidden_states = (captured[0].detach(),) + tuple(captured[1:-1]) + (backbone_last,)

        side_kwargs = {k: v for k, v in kwargs.items() if k not in _BACKBONE_ONLY_KWARGS}
        side_kwargs["use_cache"] = bool(use_cache)
        mixed = backbone_last
        new_side_caches, new_memories, side_router_logits = {}, {}, {}
        returned_cache = out.get(cache_field(out))
        # a trunk that fills the cache it is given in place and returns none (RecurrentGemma, whose generate keeps
        # passing the cache it made): its side trunk, of the same class, does the same, so the side network gets a
        # cache made here, and both travel on the backbone's cache object (remember_pairing, as a caller's own cache)
        keeps_cache = bool(use_cache) and backbone_cache is not None and not has_cache_field(out)
        for name in adapter_names:
            side = self.qst_side[name]
            side_cache = side_caches.get(name)
            if side_cache is None and use_cache:
                side_cache = _side_cache_like(backbone_cache, side.trunk.config)
                if (
                    side_cache is None
                    and side.training
                    and not torch.is_grad_enabled()
                    and type(returned_cache) is DynamicCache
                ):
                    # a trunk that starts its cache only outside training mode (CohereCompassModel: "use_cache and
                    # cache is None and not self.training"): a side network in training mode (as get_peft_model
                    # leaves it, and as it is when generate runs inside a training loop) returned none beside the
                    # eval-mode backbone's, and the next decoding step was refused as having no side state. The
                    # side trunk's own default is this same cache. Only without gradients (generation): a training
                    # forward given a cache left its side blocks to their own checkpointing, which drops the cache,
                    # instead of QST's (see the side blocks' forward), and they ran once instead of being recomputed
                    side_cache = DynamicCache(config=side.trunk.config)
            if side_cache is None and keeps_cache:
                side_cache = DynamicCache(config=side.trunk.config)  # what such a trunk makes for itself
            side_out, new_side_caches[name], side_router_logits[name] = side(
                hidden_states, cache=side_cache, **side_kwargs
            )
            if new_side_caches[name] is None and keeps_cache:
                new_side_caches[name] = side_cache
            copy_inputs = None
            if side.copy_head is not None:
                memory = memories.get(name)
                if memory is None and use_cache:
                    memory = DynamicCache()
                new_memories[name] = memory
                copy_inputs = self._copy_inputs(kwargs, hidden_states, memory)
            _mix_as_fsdp_forward(side)
            adapted = side.mix(backbone_last, side_out, copy_inputs, low_rank_head=not want_hidden)
            if row_adapters is None:
                mixed = adapted
            else:
                rows = torch.tensor([n == name for n in row_adapters], device=adapted.device)
                mixed = torch.where(rows.view(-1, *([1] * (adapted.dim() - 1))), adapted, mixed)

        fields = dict(out.items())
        fields["last_hidden_state"] = mixed
        if fields.get("router_logits") is not None:
            adapted_from = {name: routers_below.get(first) for name, _, first in lora_routing}
            fields["router_logits"] = self._adapted_router_logits(
                out.router_logits, side_router_logits, row_adapters, adapted_from
            )
        # the last hidden state is the adapted one; the backbone's are dropped unless asked for
        returned_hidden = out.get("hidden_states") if own_hidden and want_hidden else None
        listed = hidden_states if returned_hidden is None else returned_hidden
        fields["hidden_states"] = tuple(listed[:-1]) + (mixed,) if want_hidden else None
        if want_hidden and skipped and returned_hidden is None:
            # blocks the trunk skipped: none of theirs, as the base model returns (a trunk that collects its own
            # hidden states lists those of the blocks it ran already)
            dropped = {index + 1 for index in skipped}
            fields["hidden_states"] = tuple(h for i, h in enumerate(fields["hidden_states"]) if i not in dropped)
        if selected is not None:
            count = len(fields["hidden_states"])
            kept = {i % count for i in selected if -count <= i < count}
            fields["hidden_states"] = tuple(h if i in kept else None for i, h in enumerate(fields["hidden_states"]))
        new_backbone_cache = backbone_cache if keeps_cache else out.get(cache_field(out))
        if use_cache and new_backbone_cache is not None:
            paired = cache if isinstance(cache, QSTCache) else QSTCache(new_backbone_cache)
            paired.backbone = new_backbone_cache
            paired.routing.record(routing)
            remember_pairing(paired)
            for name, side_cache in new_side_caches.items():
                paired.with_side(name, side_cache)
                record_cache_layout(side_cache, self.qst_side[name])
            for name, memory in new_memories.items():
                paired.with_copy_memory(name, memory)
                record_cache_layout(memory, self.qst_side[name])
            if not keeps_cache:  # (an output without a cache field: the caller holds the backbone's cache already)
                fields[cache_field(out)] = paired
        out = type(out)(**fields)
        if return_dict is False:
            return out.to_tuple()
        return out

    def _adapted_router_logits(
        self, backbone_logits: tuple, side_logits: dict, row_adapters=None, adapted_from: Optional[dict] = None
    ) -> tuple:
        """The router logits an adapted forward returns where they are asked for (``output_router_logits``, in a
        mixture-of-experts model's config or forward): each side network's own, one tensor per side router, in place
        of the frozen backbone's. The model's causal-LM head computes its load-balancing ``aux_loss`` from these (and
        adds ``router_aux_loss_coef`` times it to the loss), so the side routers, which train, are balanced as the
        model balances its routers. The backbone's, computed under no_grad, added only a constant: the side experts were
        left unbalanced although the loss asked for balance. With ``row_adapters`` each row takes the logits of the
        network that adapts it (the backbone's for ``"__base__"`` rows).

        A hybrid adapter (``backbone_lora_layers``) adds the logits of the backbone routers in the blocks it adapts,
        after its side routers: those routers route LoRA-adapted states and their logits carry a gradient (into the
        LoRA below them), so their experts' use is balanced too; before, they were replaced with the rest and their
        use could drift as the LoRA trained. The frozen blocks below stay out: their routers see the base model's
        states and carry no gradient. ``adapted_from`` maps each hybrid of the forward to the index of its first
        adapted block's first router logit in ``backbone_logits`` (recorded in call order, block by block; None where
        the backbone records them some other way, refused).

        The side blocks have the backbone's number of experts and experts per token (the shrink rules divide widths
        only) and route the same tokens, so the model's load-balancing function, its attention mask included, applies
        unchanged. It takes any number of layers (it concatenates them, each with the batch's mask): a side network
        may have more routers than the backbone records (DeepSeek-V4's hash-routed layers pick experts by token id and
        record none; their side layers, which see no token ids, route with a learned router), each with logits of the
        backbone's shape. Only rows of several adapters, combined layer by layer, need the backbone's count, and, with
        gradients enabled, the same number of adapted backbone routers in every row (without gradients, in generation
        and evaluation, such rows take the layers they all have, leaving the adapted backbone routers out).
        """
        if not backbone_logits and not any(side_logits.values()):
            return backbone_logits  # no routers recorded on either side (Nemotron-H as configured: no expert layers)
        shapes = {tuple(logits.shape) for logits in backbone_logits}
        for name, logits in side_logits.items():
            count = None if logits is None else len(logits)
            # (a backbone whose expert layers all route by token id records none, and its shapes are unknown)
            fits = bool(count) and (not shapes or all(tuple(layer.shape) in shapes for layer in logits))
            if not fits or (row_adapters is not None and count != len(backbone_logits)):
                raise QSTUnsupportedModelError(
                    f"QST's side network {name!r} of this {self._model_type} model returned "
                    f"{count or 'no'} router logits where the backbone returned {len(backbone_logits)}"
                    + ("" if fits else f" of shapes {sorted(shapes)}")
                    + (
                        ", so the load-balancing loss cannot be computed over its routers"
                        if not fits
                        else ", so the rows of several adapters (adapter_names) cannot take theirs layer by layer"
                    )
                    + ". Pass output_router_logits=False (or set model.config.output_router_logits = False) to go "
                    "without it."
                )
        adapted = self._adapted_backbone_router_logits(backbone_logits, side_logits, adapted_from or {})
        if row_adapters is None:
            ((name, logits),) = side_logits.items()
            return tuple(logits) + adapted.get(name, ())
        counts = {name: len(adapted.get(name, ())) for name in dict.fromkeys(row_adapters)}
        if len(set(counts.values())) > 1 and not torch.is_grad_enabled():
            # generation and evaluation (adapter_names batches are refused in training mode): nothing trains from this
            # aux_loss, and generate() computes it at every step where the config asks for router logits. It covers
            # the layers every row has, its side routers' (the backbone's for "__base__" rows), as before the hybrid's
            # adapted routers were added; refusing failed a mixed-adapter generate() of a hybrid on such a model
            adapted = {}
        elif len(set(counts.values())) > 1:
            raise QSTUnsupportedModelError(
                f"QST cannot compute one load-balancing loss over the rows of this adapter_names batch of a "
                f"{self._model_type} model: with output_router_logits, the rows of a hybrid adapter "
                "(backbone_lora_layers) are balanced over its side routers and the backbone routers of the blocks it "
                "adapts, and the rows here take different numbers of those backbone routers ("
                + ", ".join(f"{name!r}: {count}" for name, count in counts.items())
                + "), which one aux_loss over the batch's layers cannot hold where it trains (gradients are enabled "
                "here). Pass output_router_logits=False (or set model.config.output_router_logits = False), run the "
                "forward under torch.no_grad(), or batch the rows of each adapter apart."
            )
        batch = len(row_adapters)
        layers = []
        for index, combined in enumerate(backbone_logits):
            shape = combined.shape
            for name, logits in side_logits.items():
                rows = torch.tensor([n == name for n in row_adapters], device=combined.device).view(batch, 1, 1)
                side = logits[index].to(combined.device).reshape(batch, -1, shape[-1])
                combined = torch.where(rows, side, combined.reshape(batch, -1, shape[-1])).reshape(shape)
            layers.append(combined)
        # every row is of a hybrid adapting the same blocks here (or none is): those blocks ran each row with its own
        # adapter's LoRA, so their logits are each row's own
        return tuple(layers) + next(iter(adapted.values()), ())

    def _adapted_backbone_router_logits(self, backbone_logits: tuple, side_logits: dict, adapted_from: dict) -> dict:
        """For each hybrid adapter among ``side_logits``, the backbone's router logits of the blocks it adapts (see
        :meth:`_adapted_router_logits`); refused where they cannot be told apart, or where they and the side routers
        have different numbers of experts, which one call of the model's load-balancing function cannot take."""
        adapted = {}
        for name, logits in side_logits.items():
            if name not in adapted_from:
                continue  # not a hybrid: its backbone blocks are all frozen
            start = adapted_from[name]
            if start is None or start > len(backbone_logits):  # (recorded by another model than the trunk's)
                raise QSTUnsupportedModelError(
                    f"QST cannot tell which router logits of this {self._model_type} model come from the backbone "
                    f"blocks that the hybrid adapter {name!r} (backbone_lora_layers) adapts: the model does not record "
                    "them with transformers' output recorder while its blocks run. Their routers carry a gradient and "
                    "belong in the load-balancing loss. Pass output_router_logits=False (or set "
                    "model.config.output_router_logits = False) to go without it."
                )
            adapted[name] = tuple(backbone_logits[start:])
            experts = {layer.shape[-1] for layer in tuple(logits) + adapted[name]}
            if len(experts) > 1:
                raise QSTUnsupportedModelError(
                    f"QST cannot balance the side routers of the hybrid adapter {name!r} of this {self._model_type} "
                    f"model together with the backbone routers of the blocks it adapts: their logits are over "
                    f"{sorted(experts)} experts, and the model's load-balancing function takes one number of experts. "
                    "Pass output_router_logits=False (or set model.config.output_router_logits = False) to go "
                    "without it."
                )
        return adapted

    def _routing(self, adapter_names: list[str], row_adapters=None):
        """The :class:`~peft_qst.cache.BackboneRouting` rows of a forward of ``adapter_names`` (one per row with
        ``row_adapters``): which hybrid adapter's backbone LoRA adapts each row's backbone blocks."""
        def hybrid(name):
            return name if name in self.qst_side and self.qst_side[name].backbone_lora is not None else None

        if row_adapters is None:
            return hybrid(adapter_names[0])
        return BackboneRouting.uniform(tuple(hybrid(name) for name in row_adapters))

    def _check_routing(self, cache: QSTCache, routing) -> None:
        """Refuse to continue a backbone cache whose keys and values were computed under other backbone adapters
        than this forward's: a hybrid adapter's cache continued with adapters disabled (or by another adapter)
        attended to keys and values of another model and generated neither model's tokens, without an error."""
        filled = cache.routing.rows
        if filled == routing or not cache.routing.recorded or past_length(cache.backbone) == 0:
            return
        def described(rows):
            if rows is None:
                return "no backbone adapter (adapters disabled, or adapters without backbone_lora_layers)"
            if isinstance(rows, str):
                return f"the backbone LoRA of adapter {rows!r}"
            return f"per-row backbone LoRA {list(rows)} (None: none)"
        raise ValueError(
            f"The cache holds {past_length(cache.backbone)} past tokens whose backbone keys and values were "
            f"computed with {described(filled)}, but this forward runs {described(routing)}: adapters with "
            "backbone_lora_layers change the backbone's keys and values, so the continuation would attend to another "
            "model's history. Continue a cache only with the adapter (and adapter_names rows) that filled it, or "
            "start generation again with a fresh cache."
        )

    def _check_cache_layout(self, name: str, cache: QSTCache, past: int) -> None:
        """Refuse to continue the side halves of adapter ``name`` that a side network of another shape filled: the
        adapter was deleted and added again under the same name with another config (``r``, ``side_heads``, copy
        heads) since the cache was filled. Continuing them failed inside attention with a bare "Sizes of tensors must
        match" where their head sizes differ, and attended silently to another network's history where they happen
        to fit (``r=2`` after ``r=4``, with one key-value head of the same size). A side network of the same shape is
        told apart by its identity (:meth:`QSTSideNetwork.cache_identity`): re-added with fresh weights or loaded
        from other saved weights, it attended silently to the deleted network's history. The same network with
        weights loaded in place, a copy of it, or the same saved adapter loaded again continues the cache."""
        if past == 0:
            return
        layout = self.qst_side[name].cache_layout()
        for half in (cache.side_cache(name), cache.copy_memory(name)):
            recorded = getattr(half, "__dict__", {}).get(_LAYOUT_ATTR)
            if recorded is None or recorded == layout:
                continue  # a half filled before halves recorded their layout is not checked
            recorded, layout = dict(recorded), dict(layout)
            changed = ", ".join(
                f"{key} {recorded.get(key)} -> {layout.get(key)}"
                for key in sorted(set(recorded) | set(layout))
                if recorded.get(key) != layout.get(key)
            )
            raise ValueError(
                f"The cache holds {past} past tokens whose side-network state for adapter {name!r} was computed by a "
                f"side network of another shape than adapter {name!r} has now ({changed}): the adapter was deleted "
                "and added again under the same name with another config (or loaded again onto a base model of "
                "another config) since the cache was filled, so those keys and values are another network's "
                f"history. {self._fresh_cache_advice()}, or continue the old one only with the adapter that "
                "filled it."
            )
        identity = self.qst_side[name].cache_identity()
        for half in (cache.side_cache(name), cache.copy_memory(name)):
            recorded = getattr(half, "__dict__", {}).get(_IDENTITY_ATTR)
            if recorded is None or recorded == identity:
                continue  # a half filled before halves recorded their side network is not checked
            raise ValueError(
                f"The cache holds {past} past tokens whose side-network state for adapter {name!r} was computed by "
                f"another side network than the one adapter {name!r} has now: the adapter was deleted and added "
                "again under the same name (add_adapter, or load_adapter of other weights) since the cache was "
                "filled, or this model loaded it from saved weights (PeftModel.from_pretrained, load_adapter) and "
                "the cache was filled by another model, such as the one that trained and saved them (a cache "
                "continues with the model that filled it, its copies, or the same saved adapter loaded again), so "
                f"those keys and values are another network's history. {self._fresh_cache_advice()}, or continue "
                "the old one only with the adapter that filled it."
            )

    def _filled_by_another(self, name: str, half) -> bool:
        """Whether the side half ``half`` records (:func:`record_cache_layout`) another layout or identity than the
        side network adapter ``name`` has now. A half without a record (filled before halves recorded theirs) is not."""
        attributes = getattr(half, "__dict__", {})
        side = self.qst_side[name]
        return any(
            attributes.get(attribute) is not None and attributes[attribute] != current
            for attribute, current in ((_LAYOUT_ATTR, side.cache_layout()), (_IDENTITY_ATTR, side.cache_identity()))
        )

    def _has_cross_attention(self) -> bool:
        """Whether the backbone's blocks have a cross-attention (:data:`peft_qst.side.UNREACHED_BLOCK_PARTS`): the
        decoder of an encoder-decoder model run alone (BART's, TrOCR's), a BERT-style decoder built with
        ``add_cross_attention``. Looked up once."""
        known = self.__dict__.get("_cross_attention")
        if known is None:
            known = any(
                name.rpartition(".")[2] in UNREACHED_BLOCK_PARTS for name, _ in self.base_layer.named_modules()
            )
            self.__dict__["_cross_attention"] = known
        return known

    def _with_cross_attention_half(self, cache, kwargs: dict):
        """``cache`` with a backbone half that keeps the cross-attention's keys and values apart from the
        self-attention's, where the backbone has a cross-attention and this forward is given ``encoder_hidden_states``
        (on GPT-2, with or without them).

        Most of transformers' decoders with cross-attention write the encoder's keys and values into a plain cache
        (one that is not an ``EncoderDecoderCache``) at the self-attention's layer index, and generate hands such a
        model (not an encoder-decoder model itself) a plain ``DynamicCache``: the base model's cached scores are then
        not its uncached ones (a transformers problem), and an adapted generation was refused at its second step with
        a misleading "tokens were added to it with adapters disabled" (the backbone half counted the encoder's
        positions too, the side half did not). An empty plain ``DynamicCache`` that the caller did not hand to
        generate (generate's own, or one passed to a forward) becomes the self-attention half of an
        ``EncoderDecoderCache``, as the decoder builds for itself when given no cache: cached generation is then
        uncached recomputation. One the caller handed to generate, or kept to continue, is refused with the fix: the
        base model's own results with it are wrong, or fail, and continued with adapters disabled it would be filled
        so.

        GPT-2 with ``add_cross_attention`` (:data:`_WRAPS_GIVEN_PLAIN_CACHE`) wraps any cache it is given that way
        itself, with or without encoder states, so the caller's own ``DynamicCache`` or ``StaticCache`` is right there
        across turns. QST wraps it first, the same way, so that the side halves are recorded on the caller's object
        (:func:`~peft_qst.cache.with_cross_attention_half`): wrapped by the model, they were recorded on the model's
        wrapper, and the caller's next turn was refused as a plain cache without side-network state (and then, by
        earlier versions of this method, its first turn, with a false claim that its cache would be filled wrong, or
        for a static cache that GPT-2's own generation fails with, which it does not). The base model (adapters
        disabled) is left as it is."""
        backbone = cache.backbone if isinstance(cache, QSTCache) else cache
        if backbone is None or isinstance(backbone, EncoderDecoderCache) or not self._has_cross_attention():
            return cache
        if self._wraps_given_plain_cache():
            # a plain cache that holds tokens but no side halves is left to _split_cache, which refuses it as such
            if not isinstance(cache, QSTCache) and past_length(backbone) > 0:
                return cache
        elif kwargs.get("encoder_hidden_states") is None:
            return cache
        elif (
            # generate marks a cache the caller passed it with ``_is_user_defined`` (transformers 5); without the mark
            # a caller's fresh cache is paired too, and their object (the self-attention half) is refused when
            # continued
            not isinstance(backbone, DynamicCache)
            or past_length(backbone) > 0
            or getattr(backbone, "_is_user_defined", False)
        ):
            raise ValueError(
                f"This {self._model_type} decoder has cross-attention and was given encoder_hidden_states, but its "
                f"cache is a plain {type(backbone).__name__} ({past_length(backbone)} past tokens), not an "
                f"EncoderDecoderCache: the {self._model_type} cross-attention writes the encoder's keys and values "
                "into the self-attention's cache layers of a plain cache, so cached results would be wrong (the base "
                f"model's own are wrong there, or fail). Pass cache={_ENCODER_DECODER_CACHE} (from transformers) and "
                "keep that object for later turns, or pass no cache and keep generate's default dynamic cache (QST "
                "then gives it a cross-attention half); in a loop of forwards, continue with the cache the model "
                "returned."
            )
        halves = with_cross_attention_half(backbone)
        if isinstance(cache, QSTCache):
            cache.backbone = halves
            return cache
        return halves

    def _fresh_cache_advice(self) -> str:
        """The fix that refusals to continue a cache name: start again with a fresh cache. A new ``DynamicCache()``,
        except on a backbone with cross-attention that fills a plain cache wrong (the BART family; not GPT-2, which
        wraps a plain cache itself): given encoder states, :meth:`_with_cross_attention_half` refuses a caller's
        plain cache there, so advising one led to a second refusal. The advice names the cache it takes instead."""
        fresh = "DynamicCache()"
        if self._has_cross_attention() and not self._wraps_given_plain_cache():
            fresh = f"{_ENCODER_DECODER_CACHE} (from transformers)"
        return (
            f"Start generation again with a fresh cache (call generate without past_key_values, or pass a new {fresh})"
        )

    def _wraps_given_plain_cache(self) -> bool:
        """Whether the backbone wraps a plain cache it is given into an ``EncoderDecoderCache`` itself
        (:data:`_WRAPS_GIVEN_PLAIN_CACHE`)."""
        config = self.base_layer.config
        return self._model_type in _WRAPS_GIVEN_PLAIN_CACHE and bool(getattr(config, "add_cross_attention", False))

    def _split_cache(self, cache, adapter_names: list[str]):
        """The backbone half of whatever cache the caller passed, and the side halves (side-trunk caches, copy-head
        memories) of the given adapters."""
        if cache is None:
            return None, {}, {}
        if isinstance(cache, QSTCache):
            past = past_length(cache.backbone)
            missing = [
                name
                for name in adapter_names
                if cache.side_cache(name) is None
                or (self.qst_side[name].copy_head is not None and cache.copy_memory(name) is None)
            ]
            if missing and past > 0:
                raise ValueError(
                    f"The cache holds {past} past tokens but no side-network state for adapter(s) {missing}: it was "
                    "filled with other adapters or with adapters disabled. Start generation again with a fresh cache."
                )
            for name in adapter_names:
                self._check_cache_layout(name, cache, past)

            def kept(name: str, half):
                # an emptied cache (cache.reset(), how a static cache is reused for the next prompt) starts afresh: a
                # side half filled by another side network than the adapter has now (added again, or loaded from
                # other weights, since) is replaced by a new one. Kept, it kept that network's record, and the second
                # step of the new generation was refused as continuing another network's history
                return None if past == 0 and self._filled_by_another(name, half) else half

            sides = {name: kept(name, cache.side_cache(name)) for name in adapter_names}
            memories = {name: kept(name, cache.copy_memory(name)) for name in adapter_names}
            # a side half that fell behind: tokens were added while this adapter was disabled or another one was
            # active (the backbone half moves on at every step, a side half only when its adapter runs)
            behind = {}
            for name in adapter_names:
                for half in (sides[name], memories[name]):
                    length = past_length(half) if half is not None else past
                    if length != past:
                        behind[name] = length
            if behind:
                held = ", ".join(f"{name!r} {length}" for name, length in behind.items())
                raise ValueError(
                    f"The cache holds {past} past tokens but the side-network state of adapter(s) {held}: tokens were "
                    "added to it with adapters disabled or with another adapter active, so this adapter never saw "
                    "them, or the cache was cropped or changed outside the model. Continue a cache only with the "
                    "adapter that filled it, or start generation again with a fresh cache."
                )
            return cache.backbone, sides, memories
        if past_length(cache) > 0:
            raise ValueError(
                f"A plain {type(cache).__name__} with {past_length(cache)} past tokens was passed to a QST model; "
                "it has no side-network state. Pass the cache the QST model returned (a QSTCache), or a fresh one."
            )
        return cache, {}, {}


def model_class_name(model: nn.Module) -> str:
    """The class to name for ``model`` in a message. A bare trunk (``AutoModel``) is wrapped whole, so the model that
    ``add_adapter`` and ``load_adapter`` check a further adapter against is the root ``QSTLayer``: their refusals
    named ``QSTLayer`` ("match no module of QSTLayer") where the user's model is a ``LlamaModel``."""
    return type(model.get_base_layer() if isinstance(model, QSTLayer) else model).__name__
