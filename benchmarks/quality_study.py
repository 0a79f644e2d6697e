"""Quality study: how well each fine-tuning method learns a new target, and how much of the base it keeps.

Runs on the demo's pre-trained tiny base (demo/base, a Stable Diffusion pipeline trained on red, green, blue and
yellow circles, squares and triangles). Two targets the base world never had:
- `subject`: DreamBooth on five pictures of "sks circle", the demo's blue ring (no prior-preservation loss, so the
  drift measured is the method's own);
- `style`: a "sty style" of the same world, every shape drawn with white stripes, 24 captioned pictures
  ("sty style, a red circle").
Each method fine-tunes the UNet (text encoder frozen) at a few learning rates and seeds, with AdamW, a cosine
schedule and gradient clipping 1.0, on the same batches. The methods are those of benchmarks/benchmark.py, at SaRA's
trainable count where the method allows it: SaRA, LoRA at the matched rank on the attention projections, the masked
dense baseline (dense gradients, gradient × SaRA's mask) and full fine-tuning; and SaRA's ablations of the paper's
Table 2 (without the regulariser, without the progressive step, without both, the largest or random weights
instead of the smallest) on the `style` target, at the learning rate where SaRA fits it best.

Measured on every run, with noise, timesteps and sampling seeds fixed across runs:
- target fit: diffusion loss (noise-prediction MSE) on held-out pictures of the target (lower is better);
- prior drift: the increase of the diffusion loss on held-out pictures of the base world over the base model's,
  and the mean absolute pixel difference (0..1) between the base's and the fine-tuned model's samples on prompts
  of the base world, same seeds (lower is better for both).

Writes results.json, results.md (table), fit_vs_drift.png and one sample grid per target into --output_dir; run it
from the repository root:

    python -m benchmarks.quality_study --output_dir docs/quality      # about 50 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.benchmark import build_method
from demo.build_demo_base import COLOURS, SHAPES, draw_shape, make_world
from demo.run_demo import INSTANCE_PROMPT, subject_picture, write_grid
from peft_sara.script_utils.cli import UserInputError, run_main

REPO_ROOT = Path(__file__).resolve().parent.parent

METHODS = ("sara", "lora_matched", "masked_dense", "full")
# SaRA's ablations (paper Table 2): SaRAConfig overrides of the full method.
ABLATIONS = {
    "sara_no_rank": {"lambda_rank": 0.0},
    "sara_no_progressive": {"progressive_step": None},
    "sara_neither": {"lambda_rank": 0.0, "progressive_step": None},
    "sara_largest": {"selection": "largest", "progressive_step": None},
    "sara_random": {"selection": "random", "progressive_step": None},
}
# Three learning rates per method, a factor ~3 apart, chosen by pilot runs (docs/quality.md): they span each
# method's range from little prior drift to overfitting the target (the held-out target loss rises again).
DEFAULT_LEARNING_RATES = {
    "sara": [1e-5, 3e-5, 1e-4],
    "lora_matched": [3e-5, 1e-4, 3e-4],
    "masked_dense": [1e-5, 3e-5, 1e-4],
    "full": [1e-6, 3e-6, 1e-5],
}
STYLE_PREFIX = "sty style, "
BASE_WORLD_PROMPTS = ["a photo of a circle", "a photo of a red square", "a photo of a green triangle"]
GRID_LABELS = {"sara": "SaRA", "lora_matched": "LoRA", "masked_dense": "masked dense", "full": "full FT"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base_dir", default=str(REPO_ROOT / "demo" / "base"), help="The tiny base.")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "docs" / "quality"), help="Results folder.")
    parser.add_argument(
        "--targets", nargs="+", default=["subject", "style"], choices=["subject", "style"], help="What to learn."
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Methods compared.")
    parser.add_argument(
        "--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS), help="SaRA ablations to run."
    )
    parser.add_argument(
        "--ablation_target", default="style", choices=["subject", "style"], help="The target the ablations learn."
    )
    parser.add_argument(
        "--learning_rates",
        nargs="+",
        default=[],
        metavar="METHOD=LR[,LR...]",
        help="Learning rates of a method, e.g. sara=1e-3,3e-3 (defaults: DEFAULT_LEARNING_RATES).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds of each setting.")
    parser.add_argument("--max_train_steps", type=int, default=300, help="Optimizer steps per run.")
    parser.add_argument("--train_batch_size", type=int, default=8, help="Pictures per step.")
    parser.add_argument("--target_fraction", type=float, default=0.058, help="SaRA's share (paper: 50M of SD 1.5).")
    parser.add_argument("--lambda_rank", type=float, default=5e-3, help="Weight of SaRA's nuclear-norm regulariser.")
    parser.add_argument(
        "--rank_min_dim",
        type=int,
        default=32,
        help="SaRA regularises Linear weights with both sides above this (the base's are 64 wide; SD 1.5's 320+).",
    )
    parser.add_argument("--num_eval_images", type=int, default=48, help="Held-out pictures per loss measurement.")
    parser.add_argument("--noise_draws", type=int, default=4, help="Fixed (noise, timestep) draws per picture.")
    parser.add_argument("--sample_seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="Seeds of the samples.")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps of the samples.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any model loads; resolves `args.learning_rates` to a dict per method."""
    if not (Path(args.base_dir) / "model_index.json").is_file():
        raise UserInputError(f"--base_dir {args.base_dir} holds no pipeline; build it with: make demo-base")
    learning_rates = {method: list(DEFAULT_LEARNING_RATES[method]) for method in METHODS}
    for entry in args.learning_rates:
        method, _, values = entry.partition("=")
        if method not in METHODS or not values:
            raise UserInputError(f"--learning_rates {entry!r}: write METHOD=LR[,LR...] with METHOD one of {METHODS}.")
        try:
            learning_rates[method] = [float(value) for value in values.split(",")]
        except ValueError:
            raise UserInputError(f"--learning_rates {entry!r}: {values!r} are not numbers.") from None
        if not all(math.isfinite(lr) and lr > 0 for lr in learning_rates[method]):
            raise UserInputError(f"--learning_rates {entry!r}: learning rates must be positive.")
    args.learning_rates = learning_rates
    for flag in ("max_train_steps", "train_batch_size", "num_eval_images", "noise_draws", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if not 0 < args.target_fraction < 1:
        raise UserInputError(f"--target_fraction must lie between 0 and 1, got {args.target_fraction}.")
    if args.ablations and "sara" not in args.methods:
        raise UserInputError("--ablations are compared with SaRA: keep sara in --methods or pass --ablations alone.")
    if args.ablations and args.ablation_target not in args.targets:
        raise UserInputError(
            f"--ablations run on --ablation_target {args.ablation_target}, which is not in --targets: add it, or pass "
            "--ablations alone to run none."
        )


# ----------------------------------------------------------------------------------------------------------- data


def striped_picture(shape: str, colour: str, rng: random.Random, period: int = 8) -> Image.Image:
    """A base-world shape in the study's new style: every other band of `period // 2` rows of the shape is white."""
    picture = np.asarray(draw_shape(shape, COLOURS[colour], rng)).copy()
    in_shape = np.abs(picture.astype(int) - np.array(COLOURS[colour])).sum(-1) < 30
    white_rows = (np.arange(picture.shape[0]) // (period // 2)) % 2 == 1
    picture[in_shape & white_rows[:, None]] = 255
    return Image.fromarray(picture)


def target_pictures(target: str, count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed)
    if target == "subject":
        return [subject_picture(rng) for _ in range(count)], [INSTANCE_PROMPT] * count
    pictures, captions = [], []
    for _ in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        pictures.append(striped_picture(shape, colour, rng))
        captions.append(f"{STYLE_PREFIX}a {colour} {shape}")
    return pictures, captions


def target_prompts(target: str) -> list[str]:
    return (
        [INSTANCE_PROMPT] if target == "subject" else [f"{STYLE_PREFIX}a red circle", f"{STYLE_PREFIX}a blue square"]
    )


@dataclass
class EncodedSet:
    """Pictures as latent distributions (mean, std) and captions as text-encoder states, encoded once."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text_states: torch.Tensor

    def __len__(self) -> int:
        return len(self.latent_mean)


@torch.no_grad()
def encode(pipeline, pictures: list[Image.Image] | torch.Tensor, captions: list[str]) -> EncodedSet:
    if isinstance(pictures, list):
        pictures = torch.stack(
            [torch.from_numpy(np.asarray(p, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for p in pictures]
        )
    distribution = pipeline.vae.encode(pictures).latent_dist
    scale = pipeline.vae.config.scaling_factor
    ids = pipeline.tokenizer(
        captions,
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return EncodedSet(distribution.mean * scale, distribution.std * scale, pipeline.text_encoder(ids)[0])


# ----------------------------------------------------------------------------------------------------------- measures


@dataclass
class FixedNoise:
    """Noise and stratified timesteps drawn once, so every model is measured on the same noisy inputs."""

    noise: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def draw(cls, count: int, draws: int, latent_shape: tuple[int, ...], num_timesteps: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((draws, count, *latent_shape), generator=generator)
        offsets = torch.rand((draws, count), generator=generator)
        timesteps = ((torch.arange(draws)[:, None] + offsets) * num_timesteps / draws).long()
        return cls(noise, timesteps.clamp(max=num_timesteps - 1))


@torch.no_grad()
def diffusion_loss(unet, scheduler, data: EncodedSet, fixed: FixedNoise, batch_size: int = 96) -> float:
    """Mean noise-prediction MSE over the held-out pictures and the fixed draws (the base's training loss)."""
    total = 0.0
    for noise, timesteps in zip(fixed.noise, fixed.timesteps):
        for start in range(0, len(data), batch_size):
            chunk = slice(start, start + batch_size)
            noisy = scheduler.add_noise(data.latent_mean[chunk], noise[chunk], timesteps[chunk])
            prediction = unet(noisy, timesteps[chunk], data.text_states[chunk]).sample
            total += F.mse_loss(prediction, noise[chunk], reduction="sum").item()
    return total / fixed.noise.numel()


def samples(pipeline, unet, prompts: list[str], seeds: list[int], steps: int) -> np.ndarray:
    """Pictures (prompts × seeds, H, W, 3) in 0..1 drawn by `unet` in the base pipeline."""
    pipeline.unet = unet
    generators = [torch.Generator().manual_seed(seed) for _ in prompts for seed in seeds]
    with torch.no_grad():
        return pipeline(
            [prompt for prompt in prompts for _ in seeds],
            generator=generators,
            num_inference_steps=steps,
            output_type="np",
        ).images


# ----------------------------------------------------------------------------------------------------------- training


def train(base_unet, scheduler, data: EncodedSet, method: str, sara_overrides: dict, lr: float, seed: int, args):
    """Fine-tune a copy of the base UNet with one method; returns the plain fine-tuned UNet and training facts."""
    import peft_sara

    torch.manual_seed(seed)  # SaRA's random-selection ablation draws its positions from torch's global RNG
    sara_settings = {
        "target_fraction": args.target_fraction,
        "lambda_rank": args.lambda_rank,
        "rank_min_dim": args.rank_min_dim,
        "progressive_step": args.max_train_steps // 2,
    }
    sara_config = peft_sara.SaRAConfig(**{**sara_settings, **sara_overrides})
    model, weight_decay, masked_values = build_method(
        method, copy.deepcopy(base_unet), args.target_fraction, sara_config
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.max_train_steps)
    training = peft_sara.attach(model, optimizer) if method == "sara" else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(args.max_train_steps):
        batch = torch.randint(len(data), (args.train_batch_size,), generator=generator)
        latents = data.latent_mean[batch] + data.latent_std[batch] * torch.randn(
            data.latent_mean[batch].shape, generator=generator
        )
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        prediction = model(scheduler.add_noise(latents, noise, timesteps), timesteps, data.text_states[batch]).sample
        F.mse_loss(prediction, noise).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    facts = {
        "train_seconds": time.perf_counter() - start,
        "trainable_values": masked_values if masked_values is not None else sum(p.numel() for p in trainable),
        "frozen_by_progressive_step": training.frozen_fraction if training else None,
    }
    if hasattr(model, "merge_and_unload"):  # PEFT methods: fold the adapter in, measure a plain UNet
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    return model, facts


# ----------------------------------------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (target, variant, learning rate)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["variant"], run["learning_rate"]), []).append(run)
    rows = []
    for (target, variant, lr), group in groups.items():
        row = {"target": target, "variant": variant, "learning_rate": lr, "seeds": len(group)}
        for key in ("target_loss", "prior_loss_increase", "pixel_drift", "train_seconds"):
            values = [run[key] for run in group]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["trainable_values"] = group[0]["trainable_values"]
        frozen = [run["frozen_by_progressive_step"] for run in group if run["frozen_by_progressive_step"] is not None]
        row["frozen_by_progressive_step"] = statistics.mean(frozen) if frozen else None
        rows.append(row)
    return rows


def best_learning_rate(rows: list[dict], target: str, variant: str) -> float:
    """The learning rate of `variant` with the lowest mean held-out target loss."""
    candidates = [row for row in rows if row["target"] == target and row["variant"] == variant]
    return min(candidates, key=lambda row: row["target_loss"])["learning_rate"]


def markdown_table(rows: list[dict], base: dict) -> str:
    lines = [
        "| target | method | lr | trainable | target loss ↓ | prior loss increase ↓ | pixel drift ↓ | train (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for target, measures in base.items():
        lines.append(f"| {target} | base (not fine-tuned) | - | 0 | {measures['target_loss']:.4f} | 0 | 0 | - |")
    for row in rows:
        lines.append(
            f"| {row['target']} | {row['variant']} | {row['learning_rate']:g} | {row['trainable_values']:,} "
            f"| {row['target_loss']:.4f} ± {row['target_loss_std']:.4f} "
            f"| {row['prior_loss_increase']:.4f} ± {row['prior_loss_increase_std']:.4f} "
            f"| {row['pixel_drift']:.4f} ± {row['pixel_drift_std']:.4f} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], base: dict, path: Path) -> None:
    """Target loss against each prior-drift measure, one panel per target and measure; a line per method over its
    learning rates (error bars: standard deviation over seeds), a marker per ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(base)
    drifts = [("prior_loss_increase", "increase of the base-world diffusion loss"), ("pixel_drift", "pixel drift")]
    figure, axes = plt.subplots(len(targets), 2, figsize=(11, 4.2 * len(targets)), squeeze=False)
    for row_axes, target in zip(axes, targets):
        for axis, (drift, drift_label) in zip(row_axes, drifts):
            axis.axhline(base[target]["target_loss"], color="grey", linestyle=":", label="base model")
            for variant in dict.fromkeys(row["variant"] for row in rows if row["target"] == target):
                points = sorted(
                    (r for r in rows if r["target"] == target and r["variant"] == variant),
                    key=lambda r: r["learning_rate"],
                )
                axis.errorbar(
                    [p[drift] for p in points],
                    [p["target_loss"] for p in points],
                    xerr=[p[drift + "_std"] for p in points],
                    yerr=[p["target_loss_std"] for p in points],
                    marker="o" if variant in METHODS else "x",
                    linestyle="-" if variant in METHODS else "none",
                    capsize=2,
                    label=variant,
                )
                for point in points if len(points) > 1 else []:
                    axis.annotate(f"{point['learning_rate']:g}", (point[drift], point["target_loss"]), fontsize=7)
            axis.set(xlabel=f"prior drift: {drift_label} ↓", ylabel="target loss (held out) ↓", title=target)
            axis.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_grid(rows: dict[str, np.ndarray], columns: list[str], path: Path) -> None:
    pictures = {
        name: [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
        for name, images in rows.items()
    }
    write_grid(pictures, columns, path, label_width=120)


def main(argv=None) -> list[dict]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.base_dir, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    training_scheduler = pipeline.scheduler
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(training_scheduler.config)
    base_unet = pipeline.unet.requires_grad_(False)
    num_timesteps = training_scheduler.config.num_train_timesteps

    # Data: training and held-out pictures of each target, held-out pictures of the base world.
    world_pixels, world_captions = make_world(args.num_eval_images, seed=1)
    prior = encode(pipeline, world_pixels, world_captions)
    latent_shape = tuple(prior.latent_mean.shape[1:])
    prior_noise = FixedNoise.draw(len(prior), args.noise_draws, latent_shape, num_timesteps, seed=1234)
    training_sets, held_out = {}, {}
    for target in args.targets:
        training_sets[target] = encode(pipeline, *target_pictures(target, 5 if target == "subject" else 24, seed=0))
        held_out[target] = encode(pipeline, *target_pictures(target, args.num_eval_images, seed=1))
    target_noise = FixedNoise.draw(args.num_eval_images, args.noise_draws, latent_shape, num_timesteps, seed=4321)

    def measure_target(unet, target: str) -> tuple[float, np.ndarray]:
        """Held-out target loss, and samples of the target's prompts (the grid's left columns)."""
        target_samples = samples(
            pipeline, unet, target_prompts(target), args.sample_seeds[:2], args.num_inference_steps
        )
        return diffusion_loss(unet, training_scheduler, held_out[target], target_noise), target_samples

    def measure_prior(unet) -> tuple[float, np.ndarray]:
        """Held-out base-world loss, and samples of the base world's prompts (for the pixel drift)."""
        world_samples = samples(pipeline, unet, BASE_WORLD_PROMPTS, args.sample_seeds, args.num_inference_steps)
        return diffusion_loss(unet, training_scheduler, prior, prior_noise), world_samples

    base_prior_loss, base_world_samples = measure_prior(base_unet)
    base, grids = {}, {}
    for target in args.targets:
        target_loss, target_samples = measure_target(base_unet, target)
        base[target] = {"target_loss": target_loss, "prior_loss": base_prior_loss}
        grids[target] = {"base": np.concatenate([target_samples, base_world_samples[:: len(args.sample_seeds)]])}
    print(f"base model: {json.dumps(base)}", flush=True)

    runs, seed_samples = [], {}

    def run_setting(target: str, variant: str, method: str, overrides: dict, lr: float) -> None:
        for seed in args.seeds:
            unet, facts = train(
                base_unet, training_scheduler, training_sets[target], method, overrides, lr, seed, args
            )
            target_loss, target_samples = measure_target(unet, target)
            prior_loss, world_samples = measure_prior(unet)
            run = {
                "target": target,
                "variant": variant,
                "learning_rate": lr,
                "seed": seed,
                **facts,
                "target_loss": target_loss,
                "prior_loss": prior_loss,
                "prior_loss_increase": prior_loss - base_prior_loss,
                "pixel_drift": float(np.abs(world_samples - base_world_samples).mean()),
            }
            runs.append(run)
            print(
                f"{target} {variant} lr={lr:g} seed={seed}: target loss {run['target_loss']:.4f}, prior loss "
                f"+{run['prior_loss_increase']:.4f}, pixel drift {run['pixel_drift']:.4f} "
                f"({facts['train_seconds']:.0f} s; {time.time() - started:.0f} s in all)",
                flush=True,
            )
            if seed == args.seeds[0]:
                grid_row = np.concatenate([target_samples, world_samples[:: len(args.sample_seeds)]])
                seed_samples[target, variant, lr] = grid_row

    for target in args.targets:
        for method in args.methods:
            for lr in args.learning_rates[method]:
                run_setting(target, method, method, {}, lr)
    if args.ablations:
        # the ablations train at the learning rate where SaRA fits the target best
        sara_lr = best_learning_rate(summarise(runs), args.ablation_target, "sara")
        for name in args.ablations:
            run_setting(args.ablation_target, name, "sara", ABLATIONS[name], sara_lr)

    rows = summarise(runs)
    table = markdown_table(rows, base)
    print(table)
    (output_dir / "results.md").write_text(table + "\n")
    report = {
        "command": "python -m benchmarks.quality_study " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {key: value for key, value in vars(args).items() if key not in ("output_dir", "base_dir")},
        "torch": torch.__version__,
        "seconds": time.time() - started,
        "base": base,
        "summary": rows,
        "runs": runs,
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    plot(rows, base, output_dir / "fit_vs_drift.png")
    for target, grid in grids.items():
        for method in args.methods:  # each method at the learning rate of its best target fit
            lr = best_learning_rate(rows, target, method)
            grid[f"{GRID_LABELS[method]} {lr:g}"] = seed_samples[target, method, lr]
        columns = [
            f"{prompt.removeprefix('a photo of ')[:18]}, s{seed}"
            for prompt in target_prompts(target)
            for seed in args.sample_seeds[:2]
        ]
        columns += [
            f"{prompt.removeprefix('a photo of ')[:18]}, s{args.sample_seeds[0]}" for prompt in BASE_WORLD_PROMPTS
        ]
        save_grid(grid, columns, output_dir / f"grid_{target}.png")
    print(f"Results in {output_dir} ({time.time() - started:.0f} s).")
    return rows


if __name__ == "__main__":
    run_main(main)
