"""The QST part of an adapter's model card (``README.md``), written next to PEFT's own card.

PEFT writes the card (``library_name: peft``, ``base_model``, tags; QST adds the ``qst`` tag through the base model's
``model_tags``) before it saves each adapter. Loading a QST adapter needs one extra line, ``import peft_qst``, which no
PEFT user would guess, so the card says it.
"""

from __future__ import annotations

import json
import os
import re

from .serialization import CONFIG_NAME, saved_tensor_shapes

MARKER = "<!-- peft-qst usage -->"

#: the first line of the card's loading code: PEFT without it fails with a bare ``KeyError: 'QST'``, which names
#: neither peft-qst nor the import, so the line says it where a reader copies the code from
_IMPORT_LINE = "import peft_qst  # registers \"QST\" with PEFT; without it, loading fails with KeyError: 'QST'"

#: a section as :func:`usage_section` writes it: the marker, the heading and text, and the code block up to its closing
#: fence (the card's last line where PEFT's card update has dropped the final newline)
_SECTION = re.compile(re.escape(MARKER) + r"\n.*?```python\n.*?\n```(?=\n|$)", re.DOTALL)


#: the transformers Auto class that builds the base model for each PEFT task type (CAUSAL_LM, and no task type, load
#: as causal LMs; a composite vision-language model as an image-text-to-text model, see usage_section)
AUTO_CLASS_OF_TASK = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}

#: task types whose saved head has one row per label, so that the base model must be built with ``num_labels``
LABELLED_TASKS = ("SEQ_CLS", "TOKEN_CLS")


#: where the card tells the reader to load from (the card lies at the root of the repository or folder it describes)
_THIS_FOLDER = "<this repository id, or the folder holding this card>"


def _literal(text: str) -> str:
    """``text`` as a Python string literal in double quotes: an adapter name (any string PEFT accepts, ``it's "x"``
    or ``C:\\new`` among them) or a base model's path put between quotes as it stands broke the card's code
    (a quote ends the literal early: a SyntaxError) or changed it (``\\n`` read as a newline). JSON's string
    escapes (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX``) are Python's, with the same meaning."""
    return json.dumps(text, ensure_ascii=False)


def _loading_lines(adapter_names: list[str]) -> str:
    """The code that loads the named adapters onto ``base``: PEFT saves the adapter called ``"default"`` in the folder
    itself, every other one in a subfolder of its name, which ``PeftModel.from_pretrained`` only finds when told
    (``subfolder=``); ``adapter_name=`` keeps the name it was trained under (``set_adapter``, ``adapter_names=``, a
    Trainer resuming it). The first loads with ``from_pretrained``, the others with ``load_adapter``."""
    if adapter_names == ["default"]:
        return f'model = PeftModel.from_pretrained(base, "{_THIS_FOLDER}")'

    def where(name: str) -> str:
        return "" if name == "default" else f", subfolder={_literal(name)}"

    first, *others = adapter_names
    if not others:
        return (f'model = PeftModel.from_pretrained(base, "{_THIS_FOLDER}"{where(first)},\n'
                f'                                  adapter_name={_literal(first)})')
    lines = [f'adapters = "{_THIS_FOLDER}"',
             f"model = PeftModel.from_pretrained(base, adapters{where(first)}, adapter_name={_literal(first)})"]
    lines += [f"model.load_adapter(adapters, adapter_name={_literal(name)}{where(name)})" for name in others]
    lines.append(f"model.set_adapter({_literal(first)})  # the adapter that runs; switch with set_adapter(name)")
    return "\n".join(lines)


def _where_saved(adapter_names: list[str]) -> str:
    """The sentence naming the adapters a card describes and where each lies, for any but the single default."""
    if adapter_names == ["default"]:
        return ""
    places = [f"`{name}` (" + ("at the top level" if name == "default" else f"in `{name}/`") + ")"
              for name in adapter_names]
    if len(places) == 1:
        return f"\nThe adapter is saved under the name {places[0]}.\n"
    return f"\nThis repository holds {len(places)} QST adapters: {', '.join(places)}.\n"


#: ``BitsAndBytesConfig`` options a card repeats where the trained-on base model set them otherwise than the default
#: (the value to leave out): the quantized weights and which modules stay unquantized decide what the adapter was
#: trained against; a TOKEN_CLS or QUESTION_ANS head skipped by ``llm_int8_skip_modules`` does not load without it
_BNB_4BIT_OPTIONS = (("bnb_4bit_quant_type", None), ("bnb_4bit_use_double_quant", False),
                     ("bnb_4bit_compute_dtype", None), ("bnb_4bit_quant_storage", "uint8"),
                     ("llm_int8_skip_modules", None))
_BNB_8BIT_OPTIONS = (("llm_int8_threshold", 6.0), ("llm_int8_has_fp16_weight", False),
                     ("llm_int8_skip_modules", None))


def base_loading(quantization: dict | None, dtype: str | None = None) -> tuple[str, list[str]]:
    """(the lines that build the quantization config, the ``from_pretrained`` keyword arguments) that load the base
    model as the adapter was trained on it, from the base model's ``quantization_config`` (as ``to_dict()`` gives
    it; None for a model loaded unquantized) and its dtype's name (``"bfloat16"``). float32 is written too:
    transformers 5 loads a checkpoint in the dtype it was saved in (``dtype="auto"``, its default), so a card that
    left float32 out built a base saved in bfloat16 (SmolLM2's) and trained on in float32 in bfloat16, with other
    logits.

    A card that always showed QLoRA's NF4 recipe loaded an adapter trained on an 8-bit, an FP4 or an unquantized base
    onto another base than its own, and a classifier whose head ``llm_int8_skip_modules`` kept unquantized onto a
    quantized head, which loading refuses."""
    keywords = [f"dtype=torch.{dtype}"] if dtype else []
    if not quantization:
        return "", keywords
    method = str(getattr(quantization.get("quant_method"), "value", quantization.get("quant_method")))
    four_bit, eight_bit = quantization.get("load_in_4bit"), quantization.get("load_in_8bit")
    if method != "bitsandbytes" or not (four_bit or eight_bit):
        return (f"# the base model was quantized with {method} when this adapter was trained: pass the same "
                f"quantization_config\n"), keywords
    options = ["load_in_4bit=True"] if four_bit else ["load_in_8bit=True"]
    for name, default in _BNB_4BIT_OPTIONS if four_bit else _BNB_8BIT_OPTIONS:
        value = quantization.get(name)
        if value is None or value == default:
            continue
        if name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            options.append(f"{name}=torch.{str(value).replace('torch.', '')}")
        else:
            options.append(f"{name}={value!r}".replace("'", '"'))
    return _call("bnb = BitsAndBytesConfig(", options) + "\n", ["quantization_config=bnb"] + keywords


def _call(opening: str, arguments: list[str]) -> str:
    """``opening`` (``"name = f("``) followed by ``arguments``, wrapped under the first one within 115 columns."""
    lines, line = [], opening
    for index, argument in enumerate(arguments):
        piece = argument + (", " if index < len(arguments) - 1 else ")")
        if line.strip() and line != opening and len(line) + len(piece.rstrip()) > 115:
            lines.append(line.rstrip())
            line = " " * len(opening)
        line += piece
    lines.append(line)
    return "\n".join(lines)


def usage_section(
    base_model: str | None,
    task_type: str | None = None,
    num_labels: int | None = None,
    model_type: str | None = None,
    auto_model: bool = False,
    adapter_names: list[str] | None = None,
    quantization: dict | None = None,
    dtype: str | None = None,
    resized_vocab_size: int | None = None,
) -> str:
    """The card's loading section for the adapters ``adapter_names`` (by default the one saved in the card's own
    folder, ``"default"``), all made on the same base model, which the section loads as the first one's facts say,
    quantized as the model saving them was (:func:`base_loading`), its token embeddings resized to
    ``resized_vocab_size`` where the adapter was trained on a resized vocabulary (:func:`_resized_vocab_size`)."""
    from .model import SUPPORTED_COMPOSITE_TYPES

    adapter_names = list(adapter_names or ["default"])

    base = base_model or "<base model>"
    # a composite (vision-language) base model, by the type the adapter recorded (base_model_signature), loads with
    # AutoModelForImageTextToText: AutoModelForCausalLM refuses most of them ("Unrecognized configuration class" for
    # Llava, Qwen2-VL, ...)
    causal_lm = "AutoModelForImageTextToText" if model_type in SUPPORTED_COMPOSITE_TYPES else "AutoModelForCausalLM"
    auto_class = AUTO_CLASS_OF_TASK.get(task_type or "", causal_lm)
    if auto_model:
        # an adapter made on what AutoModel loads (task_type="FEATURE_EXTRACTION" on a bare decoder trunk, or on a
        # composite model without its LM head) loads onto that alone: its trunk has another name in a model with a head
        auto_class = "AutoModel"
    quantization_lines, keywords = base_loading(quantization, dtype)
    if task_type in LABELLED_TASKS:
        # the saved head has num_labels rows; the base model must be built with the same number
        keywords.append(f"num_labels={num_labels if num_labels is not None else '<number of labels>'}")
    imports = ", BitsAndBytesConfig" if "BitsAndBytesConfig(" in quantization_lines else ""
    building = quantization_lines + _call(f"base = {auto_class}.from_pretrained(", [_literal(base)] + keywords)
    if resized_vocab_size is not None:
        building += (f"\n# the adapter was trained with tokens added to the vocabulary: resize as then (the added "
                     f"tokens'\n# embeddings are saved with the adapter and load with it)\n"
                     f"base.resize_token_embeddings({resized_vocab_size})")
    uses_torch = "torch." in building
    return f"""{MARKER}
## How to load this QST adapter

This adapter was trained with [Quantized Side Tuning](https://arxiv.org/abs/2401.07159) through `peft-qst`, a PEFT
tuner type. Install `peft-qst` and import it before loading: the import registers the `QST` method with PEFT, which
has no plug-in discovery. Without it, `PeftModel.from_pretrained` and PEFT's `AutoPeftModel...` classes fail with
`KeyError: 'QST'`.
{_where_saved(adapter_names)}
```python
{"import torch" + chr(10) if uses_torch else ""}{_IMPORT_LINE}
from peft import PeftModel
from transformers import {auto_class}{imports}

{building}
{_loading_lines(adapter_names)}
```
"""


def _recorded_model_type(config: dict) -> str | None:
    """The base model's type an ``adapter_config.json`` records (``base_model_signature``), None where it records none.
    The card is written from the folder's old config before ``save_pretrained`` writes the new one, so saving an
    adapter again over a config edited by hand (the fix that loading's refusal of it names) must not fail on it."""
    signature = config.get("base_model_signature")
    return signature.get("model_type") if isinstance(signature, dict) else None


def _made_on_auto_model(config: dict) -> bool:
    """Whether the adapter of this ``adapter_config.json`` was made on what ``AutoModel`` loads, by the trunk it
    targets: a bare decoder trunk is the root (:data:`~peft_qst.model.ROOT_TRUNK`); a composite model's language model
    is a child of what AutoModel loads (``LlavaModel.language_model``), and lies one level deeper, under ``model.``, in
    the model with the LM head (``LlavaForConditionalGeneration.model.language_model``)."""
    from .model import ROOT_TRUNK, SUPPORTED_COMPOSITE_TYPES

    target = config.get("target_modules")
    if target == ROOT_TRUNK:
        return True
    model_type = _recorded_model_type(config)
    # target_modules holds the trunk's name as a regular expression (``model\\.language_model``)
    return model_type in SUPPORTED_COMPOSITE_TYPES and isinstance(target, str) and "." not in target


def _saved_adapter_facts(folder: str) -> dict:
    """What ``usage_section`` needs from the adapter saved beside the card: the task type recorded in
    ``adapter_config.json``, for a classification adapter the number of labels (rows of the saved head in
    ``modules_to_save``), the base model's type (``base_model_signature``), and whether it was made on what
    ``AutoModel`` loads (:func:`_made_on_auto_model`); nothing where the folder does not tell.

    The folder may hold a damaged adapter: ``save_pretrained`` updates the card from the old files before it writes
    the new ones, and saving again is the fix loading names for a weights file truncated by an interrupted save or a
    config edited by hand. What cannot be read here is left untold (the card is rewritten from the new files once they
    are saved); raising failed that save before anything was written, where a LoRA adapter saves over such a
    folder."""
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    task_type = config.get("task_type")
    facts = {
        "task_type": task_type if isinstance(task_type, str) else None,
        "model_type": _recorded_model_type(config),
        "auto_model": _made_on_auto_model(config),
    }
    # the weights file's tensor names and shapes, from its header ({} where it is missing, truncated or garbled)
    shapes = saved_tensor_shapes(folder, {})
    resized = _resized_vocab_size(config, shapes)
    if resized is not None:
        facts["resized_vocab_size"] = resized
    heads = config.get("modules_to_save") or []
    heads = [head for head in heads if isinstance(head, str)] if isinstance(heads, list) else []
    if facts["task_type"] not in LABELLED_TASKS or not heads:
        return facts
    for key, shape in shapes.items():
        if any(key.endswith(f".{head}.weight") for head in heads) and len(shape) == 2:
            return {**facts, "num_labels": int(shape[0])}
    return facts


def _resized_vocab_size(config: dict, shapes: dict) -> int | None:
    """The vocabulary size the base model was resized to when the adapter of this ``adapter_config.json`` and weights
    file (its tensors' ``shapes``) was trained, None where it was not resized (or the files do not tell). PEFT saves
    the token embeddings beside an adapter only when the vocabulary differs from the base model's
    (``save_embedding_layers``, which it sets itself, and QST's ``save_pretrained`` for a multimodal model, whose
    vocabulary size PEFT does not find in ``text_config``; its trunk's embeddings are
    ``...language_model.base_layer.embed_tokens.weight``): a QST adapter's weights hold a tensor of the trunk
    (``...base_layer...``) only then, one row per token (of the size ``base_model_signature`` records, where it
    records one). Loading refuses the base model as its checkpoint builds it (another vocabulary size), so the card's
    code resizes it first; without that line, QLoRA recipes that add chat tokens (PEFT's ``examples/sft``:
    ``resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)``) got a card whose code failed. The embeddings
    saved with ``save_embedding_layers=True`` on a vocabulary left as the base checkpoint has it (whose config is
    read locally, where it can be) need no resize: None then, so that the card does not say tokens were added."""
    signature = config.get("base_model_signature")
    recorded = signature.get("vocab_size") if isinstance(signature, dict) else None  # None: saved before it was
    size = next(
        (
            int(shape[0])
            for key, shape in shapes.items()
            if ".qst_side." not in key and "lora_" not in key and ".base_layer." in key and key.endswith("weight")
            and len(shape) == 2 and (recorded is None or shape[0] == recorded)
        ),
        None,
    )
    if size is not None:
        from transformers import AutoConfig

        from .vocabulary import checkpoint_vocab_size

        if checkpoint_vocab_size(config.get("base_model_name_or_path"), AutoConfig) == size:
            return None  # the checkpoint's own size: nothing was resized
    return size


def adapter_folder(folder: str, adapter_name: str) -> str:
    """Where ``PeftModel.save_pretrained(folder)`` saves the adapter ``adapter_name``: ``"default"`` in ``folder``
    itself, any other in a subfolder of its name (and only there does ``from_pretrained`` find it, by
    ``subfolder=``)."""
    return folder if adapter_name == "default" else os.path.join(folder, adapter_name)


def saved_qst_adapters(folder: str, adapter_names) -> list[str]:
    """Those of ``adapter_names`` that ``folder`` holds as QST adapters (an ``adapter_config.json`` of peft_type QST
    where :func:`adapter_folder` puts it), in the order given."""
    from .config import PEFT_TYPE

    saved = []
    for name in adapter_names:
        config_path = os.path.join(adapter_folder(folder, name), CONFIG_NAME)
        if not os.path.isfile(config_path):
            continue
        try:
            with open(config_path, encoding="utf-8") as handle:
                peft_type = json.load(handle).get("peft_type")
        except (OSError, ValueError, AttributeError):
            continue
        if peft_type == PEFT_TYPE:
            saved.append(name)
    return saved


def add_usage_section(folder: str, base_model: str | None, adapter_names, quantization: dict | None = None,
                      dtype: str | None = None) -> None:
    """Put the loading instructions for the adapters saved in ``folder`` into its card: appended where the card has
    none, rewritten where it has them already (no card, nothing to do).

    ``adapter_names``: the model's adapters, of which the section names those ``folder`` holds as QST adapters
    (:func:`saved_qst_adapters`), with the ``subfolder=`` and ``adapter_name=`` that load each; PEFT writes the card
    only at the root of a save, and saves an adapter of another name than ``"default"`` in a subfolder, where a card
    that only described the root told nothing of it. None of them there, nothing to do. The base model is loaded as
    the first one's ``adapter_config.json`` says, quantized as ``quantization`` says (:func:`base_loading`).

    Rewritten, not kept: ``PeftModel.save_pretrained`` updates the card of a folder before it writes the new
    ``adapter_config.json``, and a card update of a QST model writes the section (``registration``), from the config
    the folder still holds. A folder saved over (a causal-LM adapter, then a classifier) kept the first adapter's
    section ("AutoModelForCausalLM", no ``num_labels``) once the card had one. A section edited by hand (its code
    block changed beyond recognition) is left as it is."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    adapter_names = saved_qst_adapters(folder, adapter_names)
    if not adapter_names:
        return
    facts = _saved_adapter_facts(adapter_folder(folder, adapter_names[0]))
    section = usage_section(base_model, **facts, adapter_names=adapter_names, quantization=quantization, dtype=dtype)
    written = _SECTION.search(text)
    if written is None:
        if MARKER in text:
            return
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n" + section)
        return
    updated = text[: written.start()] + section.rstrip("\n") + text[written.end():]
    if updated != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(updated)
