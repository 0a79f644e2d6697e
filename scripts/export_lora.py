#!/usr/bin/env python
"""Export a SaRA adapter as a LoRA, for diffusers' load_lora_weights, ComfyUI, AUTOMATIC1111 and kohya's tools.

    python scripts/export_lora.py sks-dog sks-dog-lora --rank 64
    python scripts/export_lora.py sks-dog sks-dog-lora --rank 0.9 --format kohya

The source is a training script's output folder (unet/, text_encoder/, ...) or one SaRA adapter folder; no base model
is needed. Each layer's sparse update is replaced by its best approximation of the given rank (truncated SVD), and the
script prints how much of each update's energy the LoRA keeps.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from peft_sara.export import FORMATS, LoraExport, export_lora
from peft_sara.lora_tools import TOOLS
from peft_sara.script_utils.arguments import ArgumentParser, lora_rank
from peft_sara.script_utils.cli import UserInputError, run_main
from peft_sara.script_utils.output import SAVE_DTYPES


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Export a SaRA adapter as a LoRA (truncated SVD of each layer's update).")
    parser.add_argument("source", help="A training output folder (unet/, text_encoder/, ...) or an adapter folder.")
    parser.add_argument("output_dir", help="Folder the LoRA (and any new-token embeddings) is written to.")
    parser.add_argument(
        "--rank",
        type=lora_rank,
        default=64,
        help="LoRA rank of every layer (an integer, default 64), or the share of each layer's energy to keep (a "
        "number in (0, 1], e.g. 0.9; 1.0 exports every layer exactly).",
    )
    parser.add_argument(
        "--format",
        default="diffusers",
        choices=FORMATS,
        help="diffusers: pytorch_lora_weights.safetensors for pipe.load_lora_weights(output_dir). kohya: "
        "<name>.safetensors with lora_unet_/lora_te keys, for ComfyUI and AUTOMATIC1111 (diffusers loads it too); "
        "a Flux transformer in its original layout (fused qkv), as ComfyUI and kohya's scripts name it.",
    )
    parser.add_argument(
        "--save_precision", default="fp32", choices=list(SAVE_DTYPES), help="Precision of the LoRA's weights."
    )
    parser.add_argument(
        "--allow_partial",
        action="store_true",
        help="Export even if the adapter holds parts a LoRA cannot express (bias updates, modules_to_save), leaving "
        "them out (they are listed).",
    )
    parser.add_argument(
        "--only_loadable_by",
        choices=TOOLS,
        default=None,
        help="Leave out the layers this tool would not load (they are listed), e.g. 'kohya sd-scripts', which has no "
        "module for conv_in, conv_out and the time embedding.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an export already in output_dir, or write into a folder inside the source folder.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> LoraExport:
    args = make_parser().parse_args(argv)
    try:
        result = export_lora(
            args.source,
            args.output_dir,
            rank=args.rank,
            format=args.format,
            allow_partial=args.allow_partial,
            dtype=SAVE_DTYPES[args.save_precision],
            overwrite=args.overwrite,
            only_loadable_by=args.only_loadable_by,
        )
    except ValueError as error:  # every bad input is named by export_lora before anything is written
        raise UserInputError(str(error)) from error
    print(result)
    return result


if __name__ == "__main__":
    run_main(main)
