"""Training memory and step time of SaRA against its peers, each method in a fresh process.

Methods (all with AdamW, weight decay 1e-2 unless said, gradient clipping 1.0; torch's fused AdamW with
`--fused-adamw`):
- `frozen`: the memory floor, UNet frozen, gradient only to the input;
- `dense_grad`: the time floor of any method that adapts every Linear/Conv2d weight: each such weight's dense
  gradient is computed and dropped at once (no optimizer), the least SaRA's backward must do;
- `full`: full fine-tuning;
- `sara`: this package, the sparse values of `target_fraction` of the Linear/Conv2d weights, `attach` with the
  paper's regulariser;
- `masked_dense`: selective fine-tuning with dense gradients and dense optimizer state, the gradient multiplied by
  the same |w| < θ mask (LT-SFT style, the paper's comparison); no weight decay, so unselected entries stay put;
- `lora_attention`: PEFT LoRA r=4 on the attention projections, as diffusers' LoRA scripts;
- `lora_matched`: the same, at the rank whose trainable count is closest to SaRA's;
- `supertuning`: PEFT Super-Tuning keeping the smallest weights (`select_top=False`) at SaRA's count, Linear only;
- `shira`: PEFT SHiRA (random sparse) at the rank closest to SaRA's count, Linear only.
Each runs a few training steps on the same model and batch; peak memory is CUDA's max allocated on a GPU and peak
RSS on CPU, step time the mean after a warm-up step (the mean, so that SaRA's regulariser, which costs more on a large
layer than on a small one, counts in full); adapter methods also report bytes on disk and the time to load the
adapter onto a fresh model. The SaRA budget of the tuner issue is checked on the measured figures:

    peak(sara) <= 1.10 * (peak(frozen) + 24 B * trainable values + bytes of the largest single weight)
    peak(sara) <= 0.5 * peak(full)
    step(sara) <= 1.20 * step(dense_grad),   step(sara) <= 0.75 * step(full)

Example (SD 1.5's UNet architecture with random weights, 5.8% trainable, on CPU), from the repository root:

    python -m benchmarks.benchmark --model sd15 --target-fraction 0.058 --output docs/benchmark_sd15.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = (
    "frozen",
    "dense_grad",
    "full",
    "sara",
    "masked_dense",
    "lora_attention",
    "lora_matched",
    "supertuning",
    "shira",
)
ADAPTER_METHODS = {"sara", "lora_attention", "lora_matched", "supertuning", "shira"}
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
# MALLOC_MMAP_THRESHOLD_ keeps glibc from recycling freed weight-sized blocks into a fragmented heap, which adds
# several hundred MB of RSS at random (SPEC §6); every method runs with the same setting.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
# Each method runs as `python -m benchmarks.benchmark` from here, the repository root, whatever the caller's folder.
REPO_ROOT = Path(__file__).resolve().parent.parent


def unet_config(model: str) -> dict:
    """UNet2DConditionModel configs: `sd15` is Stable Diffusion 1.5's architecture (859.5M parameters), `sdxl` SDXL
    base 1.0's (2.57B parameters; the values of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json)."""
    if model == "sd15":
        return {"sample_size": 64, "cross_attention_dim": 768}
    if model == "sdxl":
        return {
            "sample_size": 128,
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": (5, 10, 20),
            "block_out_channels": (320, 640, 1280),
            "cross_attention_dim": 2048,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "projection_class_embeddings_input_dim": 2816,
            "transformer_layers_per_block": (1, 2, 10),
            "use_linear_projection": True,
        }
    if model == "small":
        return {
            "sample_size": 32,
            "block_out_channels": (64, 128),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 4,
            "layers_per_block": 2,
            "norm_num_groups": 16,
        }
    raise ValueError(f"unknown model {model!r}: choose sd15, sdxl or small")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sd15", choices=("sd15", "sdxl", "small"), help="UNet architecture.")
    parser.add_argument("--batch-size", type=int, default=1, help="Training batch size.")
    parser.add_argument("--latent-size", type=int, default=32, help="Latent height and width (64 = 512 px).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps after one warm-up step.")
    parser.add_argument("--target-fraction", type=float, default=0.058, help="Share of weights SaRA trains.")
    parser.add_argument(
        "--methods", default="frozen,full,sara", help="Comma-separated subset of " + ", ".join(METHODS)
    )
    parser.add_argument(
        "--fused-adamw",
        action="store_true",
        help="Step every method's AdamW with torch's fused kernel (`fused=True`) instead of the default one; on a "
        "2-core CPU 0.04 s instead of 0.14 s for SaRA's 49.8M values at SD 1.5 size.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=24.0,
        help="Full fine-tuning is reported as not run when its weights, gradients and AdamW states (16 bytes per "
        "parameter) alone exceed this.",
    )
    parser.add_argument(
        "--no-load-timing",
        action="store_true",
        help="Save each adapter to measure its size, but do not time loading it onto a second freshly built model "
        "(which needs that model's memory as well: SDXL's is 10 GB).",
    )
    parser.add_argument("--output", help="Write the results as JSON to this file.")
    parser.add_argument("--plot", help="Draw peak memory and step time per method into this PNG file.")
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="FILE",
        help="Plot these saved results (files written by --output) into --plot, side by side, without running.",
    )
    parser.add_argument("--run-method", choices=METHODS, help=argparse.SUPPRESS)  # child process
    return parser.parse_args(argv)


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_method(args: argparse.Namespace) -> dict:
    """Build the model, train a few steps with one method and report its figures (runs in a child process)."""
    from diffusers import UNet2DConditionModel

    import peft_sara

    torch.manual_seed(0)
    device = args.device
    with torch.device(device):  # random initialisation on the device itself: seconds on a GPU, not a minute on its CPU
        unet = UNet2DConditionModel(**unet_config(args.model))
    largest_weight_bytes = max(p.numel() * p.element_size() for p in unet.parameters())
    total_parameters = sum(p.numel() for p in unet.parameters())
    model, weight_decay, masked_values = build_method(args.run_method, unet, args.target_fraction)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if trainable and weight_decay is not None:  # dense_grad has no optimizer
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=weight_decay, fused=args.fused_adamw or None)
    training = peft_sara.attach(model, optimizer) if args.run_method == "sara" else None

    config = unet.config
    latents = torch.randn(args.batch_size, config.in_channels, args.latent_size, args.latent_size, device=device)
    text = torch.randn(args.batch_size, 77, config.cross_attention_dim, device=device)
    added = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and six size/crop ids
        pooled_size = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device)
        added = {"text_embeds": torch.randn(args.batch_size, pooled_size, device=device)}
        added["time_ids"] = time_ids.expand(args.batch_size, 6)
    target = torch.randn_like(latents)
    step_times = []
    for step in range(args.steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        noisy = latents.clone().requires_grad_(args.run_method == "frozen")
        timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
        prediction = model(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added or None).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step > 0:
            step_times.append(time.perf_counter() - start)
    peak_memory = peak_memory_bytes(device)  # before the save/load below, which builds a second model
    adapter_bytes = load_seconds = None
    if args.run_method in ADAPTER_METHODS:
        adapter_bytes, load_seconds = save_and_load(model, args.model, device, load=not args.no_load_timing)
    return {
        "method": args.run_method,
        "peak_memory_bytes": peak_memory,
        "adapter_bytes": adapter_bytes,
        "adapter_load_seconds": load_seconds,
        "mean_step_seconds": statistics.mean(step_times),
        "median_step_seconds": statistics.median(step_times),
        "step_seconds": step_times,
        # what the method trains: for the masked dense baseline the masked entries, not its dense gradients
        "trainable_values": masked_values if masked_values is not None else sum(p.numel() for p in trainable),
        "values_with_gradients": sum(p.numel() for p in trainable),
        "total_parameters": total_parameters,
        "largest_weight_bytes": largest_weight_bytes,
        "rank_loss": training.rank_loss if training else None,
        "optimizer": None if optimizer is None else "AdamW (fused)" if optimizer.defaults["fused"] else "AdamW",
    }


def build_method(method: str, unet, target_fraction: float, sara_config=None):
    """The model to train with `method`, the AdamW weight decay to use (None: no optimizer), and (masked dense only)
    the count of masked entries. Matched methods aim at the count SaRA trains, `target_fraction` of the Linear/Conv2d
    weights.
    `sara_config` replaces SaRA's default configuration (its `target_fraction` should be the same)."""
    from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model

    import peft_sara
    from peft_sara.model import threshold_for_fraction

    layers = {name: m for name, m in unet.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)}
    linears = {name: m for name, m in layers.items() if type(m) is torch.nn.Linear}
    attention = {
        name: m for name, m in linears.items() if name.endswith(tuple("." + p for p in ATTENTION_PROJECTIONS))
    }
    target_count = round(target_fraction * sum(m.weight.numel() for m in layers.values()))
    unet.requires_grad_(method == "full")
    if method in ("frozen", "full"):
        return unet, 1e-2, None
    if method == "dense_grad":
        for module in layers.values():
            module.weight.requires_grad_(True)
            module.weight.register_post_accumulate_grad_hook(lambda weight: setattr(weight, "grad", None))
        return unet, None, None
    if method == "sara":
        config = sara_config or peft_sara.SaRAConfig(target_fraction=target_fraction)
        return get_peft_model(unet, config), 1e-2, None
    if method == "masked_dense":
        threshold = threshold_for_fraction([m.weight for m in layers.values()], target_fraction)
        masked = 0
        for module in layers.values():
            mask = module.weight.detach().abs() < threshold  # bool: 1 byte per weight, kept for the whole run
            masked += int(mask.sum())
            module.weight.requires_grad_(True)
            module.weight.register_hook(lambda grad, mask=mask: grad * mask)
        return unet, 0.0, masked
    if method == "lora_attention":
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=ATTENTION_PROJECTIONS)
        return get_peft_model(unet, config), 1e-2, None
    if method == "lora_matched":
        rank = max(1, round(target_count / sum(m.in_features + m.out_features for m in attention.values())))
        config = LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ATTENTION_PROJECTIONS
        )
        return get_peft_model(unet, config), 1e-2, None
    linear_weights = sum(m.weight.numel() for m in linears.values())
    if method == "supertuning":
        sparsity = max(0.0, 1 - target_count / linear_weights)
        config = SupertuningConfig(target_modules=list(linears), sparsity=sparsity, select_top=False)
        return get_peft_model(unet, config), 1e-2, None
    if method == "shira":
        rank = round(target_count / sum(m.in_features + m.out_features for m in linears.values()))
        largest_allowed = min(
            m.in_features * m.out_features // (m.in_features + m.out_features) for m in linears.values()
        )
        config = ShiraConfig(r=max(1, min(rank, largest_allowed)), target_modules=list(linears))
        return get_peft_model(unet, config), 1e-2, None
    raise ValueError(f"unknown method {method!r}")


def save_and_load(model, model_name: str, device: str, load: bool = True) -> tuple[int, float | None]:
    """Bytes of the saved adapter on disk, and seconds to load it onto a freshly built base model on `device` (None
    when not `load`)."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        adapter_bytes = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        if not load:
            return adapter_bytes, None
        with torch.device(device):
            base = UNet2DConditionModel(**unet_config(model_name))
        start = time.perf_counter()
        PeftModel.from_pretrained(base, folder)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return adapter_bytes, time.perf_counter() - start


def full_fine_tuning_does_not_fit(model: str, limit_gib: float) -> str | None:
    """Why full fine-tuning cannot run within `limit_gib`, from the parameter count alone (fp32 weights, gradients and
    two AdamW moments: 16 bytes per parameter, before any activation), or None when it may fit."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        parameters = sum(p.numel() for p in UNet2DConditionModel(**unet_config(model)).parameters())
    needed_gib = 16 * parameters / 1024**3
    if needed_gib <= limit_gib:
        return None
    return (
        f"{parameters / 1e9:.2f}B parameters need {needed_gib:.1f} GiB for fp32 weights, gradients and AdamW states "
        f"alone, more than {limit_gib:g} GiB"
    )


def sara_budget_checks(results: dict[str, dict]) -> dict[str, dict]:
    """The tuner issue's memory and time targets, evaluated on the measured figures of the methods that ran."""
    sara = results["sara"]

    def check(value: float, limit: float) -> dict:
        return {"value": value, "target": f"<= {limit}", "passes": value <= limit}

    checks = {}
    if "frozen" in results:
        budget = results["frozen"]["peak_memory_bytes"] + 24 * sara["trainable_values"] + sara["largest_weight_bytes"]
        checks["memory_vs_frozen_budget"] = check(sara["peak_memory_bytes"] / budget, 1.10)
    if "full" in results:
        full = results["full"]
        checks["memory_vs_full"] = check(sara["peak_memory_bytes"] / full["peak_memory_bytes"], 0.5)
        checks["time_vs_full"] = check(sara["mean_step_seconds"] / full["mean_step_seconds"], 0.75)
    if "dense_grad" in results:
        checks["time_vs_dense_grad"] = check(
            sara["mean_step_seconds"] / results["dense_grad"]["mean_step_seconds"], 1.20
        )
    return checks


def markdown_table(results: dict[str, dict]) -> str:
    """One row per method, with ratios to the dense-gradient floor, to full fine-tuning and to LoRA (r=4 on
    attention) where those ran."""

    def ratio(row: dict, key: str, reference: str) -> str:
        return f"{row[key] / results[reference][key]:.2f}" if reference in results else "-"

    def optional(value, scale: float, digits: int) -> str:
        return "-" if value is None else f"{value / scale:.{digits}f}"

    lines = [
        "| method | trainable | peak memory (GiB) | mean step (s) | time / floor | memory / full | time / full "
        "| memory / LoRA | time / LoRA | adapter (MiB) | adapter (B/value) | adapter load (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        per_value = row["adapter_bytes"] / row["trainable_values"] if row["adapter_bytes"] else None
        lines.append(
            f"| {name} | {row['trainable_values']:,} | {row['peak_memory_bytes'] / 1024**3:.2f} "
            f"| {row['mean_step_seconds']:.2f} | {ratio(row, 'mean_step_seconds', 'dense_grad')} "
            f"| {ratio(row, 'peak_memory_bytes', 'full')} | {ratio(row, 'mean_step_seconds', 'full')} "
            f"| {ratio(row, 'peak_memory_bytes', 'lora_attention')} "
            f"| {ratio(row, 'mean_step_seconds', 'lora_attention')} "
            f"| {optional(row['adapter_bytes'], 2**20, 1)} | {optional(per_value, 1, 2)} "
            f"| {optional(row['adapter_load_seconds'], 1, 1)} |"
        )
    return "\n".join(lines)


def setting_label(report: dict) -> str:
    settings = report["settings"]
    trainable = report["results"].get("sara", {}).get("trainable_values")
    count = f"SaRA {trainable / 1e6:.1f}M" if trainable else f"fraction {settings['target_fraction']}"
    median = "" if _has_mean_steps(report) else ", median step"
    return f"{settings['model']}, batch {settings['batch_size']}, {count}{median}"


def _has_mean_steps(report: dict) -> bool:
    """Reports written before the mean step time was recorded (docs' peer tables) hold the median only."""
    return all("mean_step_seconds" in result for result in report["results"].values())


def _step_seconds(report: dict, method: str) -> float:
    result = report["results"][method]
    return result["mean_step_seconds"] if _has_mean_steps(report) else result["median_step_seconds"]


def plot_reports(reports: list[dict], path: str) -> None:
    """Bars of peak memory and step time per method, one bar per report (setting) within each method: the mean step,
    or the median for a report that predates the mean (its legend says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(m in report["results"] for report in reports)]
    figure, axes = plt.subplots(2, 1, figsize=(12, 7.5))
    width = 0.8 / len(reports)
    for axis, figure_of, label in (
        (axes[0], lambda report, m: report["results"][m]["peak_memory_bytes"] / 1024**3, "peak memory (GiB)"),
        (axes[1], _step_seconds, "step time (s)"),
    ):
        for position, report in enumerate(reports):
            xs = [index + (position - (len(reports) - 1) / 2) * width for index in range(len(methods))]
            heights = [figure_of(report, m) if m in report["results"] else float("nan") for m in methods]
            axis.bar(xs, heights, width, label=setting_label(report))
        axis.set_xticks(range(len(methods)), methods)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"Training cost per method ({reports[0]['device']}, torch {reports[0]['torch']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_method:
        print(json.dumps(run_method(args)))
        return
    if args.from_json:
        if not args.plot:
            sys.exit("error: --from-json only plots saved results: give the PNG file with --plot.")
        plot_reports([json.loads(Path(file).read_text()) for file in args.from_json], args.plot)
        return
    methods = [method.strip() for method in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
    results, not_run = {}, {}
    for method in methods:
        if method == "full" and (reason := full_fine_tuning_does_not_fit(args.model, args.memory_limit_gib)):
            print(f"not running full: {reason}", file=sys.stderr, flush=True)
            not_run[method] = reason
            continue
        command = [sys.executable, "-m", "benchmarks.benchmark", *(argv if argv is not None else sys.argv[1:])]
        command += ["--run-method", method]
        print(f"running {method} ...", file=sys.stderr, flush=True)
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            sys.exit(f"error: method {method} failed:\n{completed.stderr[-3000:]}")
        results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
    report = {
        "command": "python -m benchmarks.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "run_method")},
        "results": results,
    }
    if not_run:
        report["not_run"] = not_run
    if "sara" in results:
        report["sara_budget"] = sara_budget_checks(results)
    print(markdown_table(results))
    for method, reason in not_run.items():
        print(f"{method}: not run ({reason})")
    for name, check in report.get("sara_budget", {}).items():
        print(f"{name}: {check['value']:.3f} (target {check['target']}) {'ok' if check['passes'] else 'MISSED'}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.plot:
        plot_reports([report], args.plot)


if __name__ == "__main__":
    main()
