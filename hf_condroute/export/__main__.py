"""python -m hf_condroute.export ADAPTER_DIR --out DIR [--base MODEL] [--target T] [--dtype D] [--expert-loras]

Loads a saved routed adapter on its base model (read from adapter_config.json, or --base) and writes the native
transformers model (with the tokenizer when the base has one, and a model card), or with --expert-loras one ordinary
PEFT LoRA adapter per expert and experts.json."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_condroute.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("adapter_dir", help="a folder written by save_pretrained of a routed FFN or routed LoRA")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--base", help="base model id or path (default: the adapter config's base_model_name_or_path)")
    parser.add_argument("--target", help="mixtral, qwen2_moe or switch_transformers (default: the exact one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the base model's")
    parser.add_argument(
        "--no-shared-expert", action="store_true", help="keep shared neurons inside each expert (for llama.cpp)"
    )
    parser.add_argument("--expert-loras", action="store_true", help="write per-expert LoRAs + experts.json instead")
    args = parser.parse_args(argv)

    import transformers
    from peft import PeftConfig, PeftModel

    # `python -m hf_condroute.export` ran the package's __init__ first, which registered the routed PEFT types
    from . import ExportError, save_expert_loras, save_native

    config = PeftConfig.from_pretrained(args.adapter_dir)
    base_id = args.base or config.base_model_name_or_path
    if not base_id:
        parser.error(f"{args.adapter_dir}'s adapter_config.json names no base model: pass --base MODEL.")
    base_config = transformers.AutoConfig.from_pretrained(base_id)
    auto = transformers.AutoModelForSeq2SeqLM if base_config.is_encoder_decoder else transformers.AutoModelForCausalLM
    base = auto.from_pretrained(base_id, dtype="auto")
    model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    if args.expert_loras:
        try:
            folders = save_expert_loras(model, args.out)
        except ExportError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        print("\n".join(folders))
        return
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_id)
    except (OSError, ValueError):
        tokenizer = None  # a base saved without a tokenizer
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        native = save_native(
            model,
            args.out,
            target=args.target,
            dtype=dtype,
            tokenizer=tokenizer,
            shared_expert=not args.no_shared_expert,
        )
    except ExportError as err:  # the blocker and the fix, without a traceback around them
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"{type(native).__name__} written to {args.out}")


if __name__ == "__main__":
    main()
