"""How close a LoRA export stays to its SaRA adapter, by rank: images, retained energy, file size.

Takes the demo's DreamBooth adapter ("sks circle", trained by `python -m demo.run_demo` if it is not there yet),
exports it with `peft_sara.export_lora` at several ranks, loads each export with diffusers' `load_lora_weights` into a
fresh copy of the demo base, and draws the same seeds as the SaRA pipeline. It writes a grid (one row per model) and a
JSON file of the figures, and prints them as a Markdown table. From the repository root:

    python -m benchmarks.export_study   # 13 minutes on 2 CPU cores shared with other jobs, given the demo adapter
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_OUTPUT = REPO_ROOT / "demo" / "output"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.export_study", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base_dir", default=str(REPO_ROOT / "demo" / "base"), help="The demo's tiny base pipeline.")
    parser.add_argument(
        "--adapter",
        default=str(DEMO_OUTPUT / "sks-circle-sara"),
        help="A training output folder; the default is the demo's, trained first if it is missing.",
    )
    parser.add_argument(
        "--ranks",
        nargs="+",
        default=["4", "16", "64", "1.0"],
        help="Export ranks: integers, or shares of energy in (0, 1] (1.0: exact).",
    )
    parser.add_argument("--prompt", default="a photo of sks circle", help="Prompt of the compared images.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="Seeds of the grid's columns.")
    parser.add_argument("--num_inference_steps", type=int, default=30, help="Denoising steps per image.")
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "export_lora"), help="Prefix of .png and .json.")
    return parser


def main(argv=None) -> list[dict]:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import peft_sara
    from demo.run_demo import sample_row, write_grid
    from peft_sara.export import parse_rank

    args = make_parser().parse_args(argv)
    ranks = [parse_rank(rank) for rank in args.ranks]
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        if adapter.resolve() != (DEMO_OUTPUT / "sks-circle-sara").resolve():
            raise SystemExit(f"error: no adapter folder at {adapter}")
        from demo import run_demo

        run_demo.main(["--output_dir", str(DEMO_OUTPUT), "--base_dir", args.base_dir])
    torch.set_num_threads(min(2, torch.get_num_threads()))

    def pipeline():
        loaded = StableDiffusionPipeline.from_pretrained(
            args.base_dir, safety_checker=None, requires_safety_checker=False
        )
        loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    def draw(loaded) -> list:
        return sample_row(loaded, [args.prompt], args.seeds, args.num_inference_steps)

    sara = pipeline()
    peft_sara.load_sara_weights(sara, str(adapter))
    sara_images = draw(sara)
    sara_pixels = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in sara_images])
    sara_bytes = sum(path.stat().st_size for path in adapter.glob("*/adapter_model.safetensors"))
    rows = {"SaRA": sara_images}
    results = [{"model": "SaRA adapter", "file_bytes": sara_bytes}]
    with tempfile.TemporaryDirectory() as scratch:
        for rank in ranks:
            export = peft_sara.export_lora(adapter, Path(scratch) / str(rank), rank=rank)
            lora = pipeline()
            lora.load_lora_weights(str(export.path.parent))
            images = draw(lora)
            pixels = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
            label = "LoRA full" if rank == 1.0 else f"LoRA r{rank}" if isinstance(rank, int) else f"LoRA {rank:.0%}"
            rows[label] = images
            results.append(
                {
                    "model": label,
                    "rank": rank,
                    "mean_rank": sum(layer.rank for layer in export.layers) / len(export.layers),
                    "max_rank": max(layer.rank for layer in export.layers),
                    "file_bytes": export.file_size,
                    "energy_retained": export.energy_retained,
                    "least_layer_energy_retained": min(layer.energy_retained for layer in export.layers),
                    "max_pixel_difference": float(np.abs(pixels - sara_pixels).max()),
                    "mean_pixel_difference": float(np.abs(pixels - sara_pixels).mean()),
                }
            )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_grid(rows, [f"seed {seed}" for seed in args.seeds], output.with_suffix(".png"), label_width=80)
    settings = {key: value for key, value in vars(args).items() if key not in ("base_dir", "adapter", "output")}
    output.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(markdown_table(results))
    print(f"Grid: {output.with_suffix('.png')}; figures: {output.with_suffix('.json')}")
    return results


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| model | ranks (mean / max) | file | energy retained (all / worst layer) | pixels vs SaRA (max / mean) |",
        "|---|---|---|---|---|",
    ]
    for row in results:
        size = f"{row['file_bytes'] / 2**20:.2f} MiB"
        if "rank" not in row:
            lines.append(f"| {row['model']} | - | {size} | 100% | 0 |")
            continue
        lines.append(
            f"| {row['model']} | {row['mean_rank']:.1f} / {row['max_rank']} | {size} | "
            f"{row['energy_retained']:.2%} / {row['least_layer_energy_retained']:.2%} | "
            f"{row['max_pixel_difference']:.4f} / {row['mean_pixel_difference']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
