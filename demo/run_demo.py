"""The embedded demo (`make demo`): DreamBooth-SaRA end to end on CPU, offline, in a few minutes.

The base is the tiny Stable Diffusion pipeline in demo/base, pre-trained by demo/build_demo_base.py on a world of
red, green, blue and yellow circles, squares and triangles. The new subject, "sks circle", is something that world
never had: a blue ring (a blue circle with a white centre). The demo draws five pictures of it, fine-tunes the base
on them by running scripts/train_dreambooth_sara.py as a user would (prior preservation on "a photo of a circle",
class pictures drawn by the base itself), and writes demo/output/grid.png: for the same seeds, the base model (top
row) and the fine-tuned model (bottom row) on the instance prompt (left) and on the class prompt (right). The
fine-tuned model should draw the subject on the instance prompt and still draw ordinary circles on the class prompt.
From the repository root:

    python -m demo.run_demo            # or: make demo
"""

from __future__ import annotations

import argparse
import codecs
import collections
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_SCRIPT = "scripts/train_dreambooth_sara.py"  # relative to REPO_ROOT, where the demo runs it
INSTANCE_PROMPT = "a photo of sks circle"
CLASS_PROMPT = "a photo of a circle"
# Blue, a colour of the base world (its VAE cannot draw others), as a ring: a shape that world never had.
SUBJECT_COLOUR, SUBJECT_CENTRE = (40, 80, 220), (255, 255, 255)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo.run_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base_dir", default=str(REPO_ROOT / "demo" / "base"), help="The pre-trained tiny pipeline.")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "demo" / "output"), help="Where the run is written.")
    parser.add_argument(
        "--config", default=str(REPO_ROOT / "configs" / "presets" / "demo.yaml"), help="Training preset."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the grid's columns.")
    parser.add_argument("--num_inference_steps", type=int, default=30, help="Denoising steps of the grid's images.")
    return parser


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own flags, and the rest, which go to the training script (e.g. --max_train_steps 100)."""
    return make_parser().parse_known_args(argv)


def subject_picture(rng: random.Random, size: int = 32) -> Image.Image:
    """One picture of the subject: a blue circle with a white centre, in the base world's style."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.26, 0.36) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=SUBJECT_COLOUR)
    inner = radius * 0.4
    draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=SUBJECT_CENTRE)
    return image


def draw_subject(folder: Path, count: int, seed: int = 0, size: int = 32) -> None:
    """Save `count` pictures of the subject in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        subject_picture(rng, size).save(folder / f"sks-{index}.png")


def sample_row(pipeline, prompts: list[str], seeds: list[int], steps: int) -> list[Image.Image]:
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            images.append(pipeline(prompt, num_inference_steps=steps, generator=generator).images[0])
    return images


def grid_image(
    rows: dict[str, list[Image.Image]], columns: list[str], scale: int = 4, label_width: int = 90
) -> Image.Image:
    """A labelled grid: one row per model, one column per (prompt, seed); images enlarged `scale` times."""
    cell = rows[next(iter(rows))][0].width * scale
    header = 28
    grid = Image.new("RGB", (label_width + cell * len(columns), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(columns):
        draw.text((label_width + column * cell + 4, 8), title, fill="black")
    for row, (name, images) in enumerate(rows.items()):
        draw.text((6, header + row * cell + cell // 2 - 6), name, fill="black")
        for column, image in enumerate(images):
            grid.paste(
                image.resize((cell, cell), Image.Resampling.NEAREST),
                (label_width + column * cell, header + row * cell),
            )
    return grid


def write_grid(
    rows: dict[str, list[Image.Image]], columns: list[str], path: Path, scale: int = 4, label_width: int = 90
) -> None:
    """Save the labelled grid of `grid_image` to `path`."""
    grid_image(rows, columns, scale, label_width).save(path)


def run_training_script(flags: list[str], error_tail: int = 4000) -> None:
    """Run scripts/train_dreambooth_sara.py with `flags` as a user would: a new process from the repository root.

    Its output shows as it comes; if it fails, the demo stops with its exit status and the end of its error output.
    """
    command = [sys.executable, TRAINING_SCRIPT, *flags]
    tail: collections.deque[str] = collections.deque()
    tail_length = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
    with subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE) as process:
        # stderr is echoed as it comes (progress bars and logs) and its end kept for the error message
        while chunk := os.read(process.stderr.fileno(), 65536):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail.append(text)
            tail_length += len(text)
            while tail_length - len(tail[0]) >= error_tail:
                tail_length -= len(tail.popleft())
    if process.returncode != 0:
        sys.exit(
            f"error: {TRAINING_SCRIPT} failed with exit status {process.returncode}; the end of its error output:\n"
            + "".join(tail)[-error_tail:]
        )


def main(argv=None) -> Path:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import peft_sara

    args, training_flags = parse_args(argv)
    base_dir, output_dir = Path(args.base_dir), Path(args.output_dir)
    if not (base_dir / "model_index.json").is_file():
        sys.exit(f"error: no base pipeline in {base_dir}; build it with: make demo-base")
    start = time.time()
    draw_subject(output_dir / "data" / "sks-circle", count=5)
    shutil.rmtree(output_dir / "sks-circle-sara", ignore_errors=True)  # a new run: the last demo's adapter goes
    run_training_script(
        [
            "--config",
            str(Path(args.config).absolute()),
            "--pretrained_model_name_or_path",
            str(base_dir.absolute()),
            "--instance_data_dir",
            str((output_dir / "data" / "sks-circle").absolute()),
            "--instance_prompt",
            INSTANCE_PROMPT,
            "--class_prompt",
            CLASS_PROMPT,
            "--class_data_dir",
            str((output_dir / "data" / "class-circle").absolute()),
            "--validation_prompt",
            INSTANCE_PROMPT,
            "--output_dir",
            str((output_dir / "sks-circle-sara").absolute()),
            *training_flags,
        ]
    )
    trained_seconds = time.time() - start

    def pipeline():
        loaded = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
        loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    base = pipeline()
    fine_tuned = pipeline()
    peft_sara.load_sara_weights(fine_tuned, str(output_dir / "sks-circle-sara"))
    prompts = [INSTANCE_PROMPT, CLASS_PROMPT]
    rows = {
        "base": sample_row(base, prompts, args.seeds, args.num_inference_steps),
        "SaRA": sample_row(fine_tuned, prompts, args.seeds, args.num_inference_steps),
    }
    columns = [
        f"{'sks circle' if prompt == INSTANCE_PROMPT else 'a circle'}, seed {seed}"
        for prompt in prompts
        for seed in args.seeds
    ]
    grid = output_dir / "grid.png"
    write_grid(rows, columns, grid)
    print(f"Trained in {trained_seconds:.0f} s, total {time.time() - start:.0f} s.")
    print(f"Adapter and model card: {output_dir / 'sks-circle-sara'}; grid: {grid}")
    return grid


if __name__ == "__main__":
    main()
