"""Training memory and step time of SaRA against its reference points, each method in a fresh process.

Methods: `frozen` (the floor: UNet frozen, gradient only to the input), `full` (full fine-tuning with AdamW) and
`sara` (this package, AdamW on the sparse values, `attach` with the paper's regulariser). Each runs a few training
steps on the same model and batch; peak memory is CUDA's max allocated on a GPU and peak RSS on CPU, step time the
median after a warm-up step. The SaRA budget of the tuner issue is checked on the measured figures:

    peak(sara) <= 1.10 * (peak(frozen) + 20 B * trainable values + bytes of the largest single weight)
    peak(sara) <= 0.5 * peak(full),   step(sara) <= step(full)

Example (SD 1.5's UNet architecture with random weights, 5.8% trainable, on CPU):

    python scripts/benchmark.py --model sd15 --target-fraction 0.058 --output docs/benchmark_sd15.json
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

import torch

METHODS = ("frozen", "full", "sara")
# MALLOC_MMAP_THRESHOLD_ keeps glibc from recycling freed weight-sized blocks into a fragmented heap, which adds
# several hundred MB of RSS at random (SPEC §6); every method runs with the same setting.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def unet_config(model: str) -> dict:
    """UNet2DConditionModel configs: `sd15` is Stable Diffusion 1.5's architecture (859.5M parameters)."""
    if model == "sd15":
        return {"sample_size": 64, "cross_attention_dim": 768}
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
    raise ValueError(f"unknown model {model!r}: choose sd15 or small")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=("sd15", "small"), help="UNet architecture.")
    parser.add_argument("--batch-size", type=int, default=1, help="Training batch size.")
    parser.add_argument("--latent-size", type=int, default=32, help="Latent height and width (64 = 512 px).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps after one warm-up step.")
    parser.add_argument("--target-fraction", type=float, default=0.058, help="Share of weights SaRA trains.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of " + str(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--output", help="Write the results as JSON to this file.")
    parser.add_argument("--run-method", choices=METHODS, help=argparse.SUPPRESS)  # child process
    return parser.parse_args(argv)


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_method(args: argparse.Namespace) -> dict:
    """Build the model, train a few steps with one method and report its figures (runs in a child process)."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    import peft_sara

    torch.manual_seed(0)
    device = args.device
    unet = UNet2DConditionModel(**unet_config(args.model)).to(device)
    largest_weight_bytes = max(p.numel() * p.element_size() for p in unet.parameters())
    unet.requires_grad_(args.run_method == "full")
    model, training = unet, None
    if args.run_method == "sara":
        model = get_peft_model(unet, peft_sara.SaRAConfig(target_fraction=args.target_fraction))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2) if trainable else None
    if args.run_method == "sara":
        training = peft_sara.attach(model, optimizer)

    config = unet.config
    latents = torch.randn(args.batch_size, config.in_channels, args.latent_size, args.latent_size, device=device)
    text = torch.randn(args.batch_size, 77, config.cross_attention_dim, device=device)
    target = torch.randn_like(latents)
    step_times = []
    for step in range(args.steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        noisy = latents.clone().requires_grad_(args.run_method == "frozen")
        timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
        prediction = model(noisy, timesteps, encoder_hidden_states=text).sample
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
    if args.run_method == "sara":
        adapter_bytes, load_seconds = save_and_load(model, args.model)
    return {
        "method": args.run_method,
        "peak_memory_bytes": peak_memory,
        "adapter_bytes": adapter_bytes,
        "adapter_load_seconds": load_seconds,
        "median_step_seconds": statistics.median(step_times),
        "step_seconds": step_times,
        "trainable_values": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in unet.parameters()),
        "largest_weight_bytes": largest_weight_bytes,
        "rank_loss": training.rank_loss if training else None,
    }


def save_and_load(model, model_name: str) -> tuple[int, float]:
    """Bytes of the saved adapter on disk, and seconds to load it onto a freshly built base model."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        adapter_bytes = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        base = UNet2DConditionModel(**unet_config(model_name))
        start = time.perf_counter()
        PeftModel.from_pretrained(base, folder)
        return adapter_bytes, time.perf_counter() - start


def sara_budget_checks(results: dict[str, dict]) -> dict[str, dict]:
    """The tuner issue's memory and time targets, evaluated on the measured figures."""
    sara, frozen, full = results["sara"], results["frozen"], results["full"]
    memory_budget = 1.10 * (frozen["peak_memory_bytes"] + 20 * sara["trainable_values"] + sara["largest_weight_bytes"])
    return {
        "memory_vs_frozen_budget": {
            "value": sara["peak_memory_bytes"] / memory_budget,
            "target": "<= 1.0",
            "passes": sara["peak_memory_bytes"] <= memory_budget,
        },
        "memory_vs_full": {
            "value": sara["peak_memory_bytes"] / full["peak_memory_bytes"],
            "target": "<= 0.5",
            "passes": sara["peak_memory_bytes"] <= 0.5 * full["peak_memory_bytes"],
        },
        "time_vs_full": {
            "value": sara["median_step_seconds"] / full["median_step_seconds"],
            "target": "<= 1.0",
            "passes": sara["median_step_seconds"] <= full["median_step_seconds"],
        },
    }


def markdown_table(results: dict[str, dict]) -> str:
    gib = 1024**3
    full = results.get("full")
    lines = [
        "| method | trainable | peak memory (GiB) | median step (s) | memory / full | time / full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        ratio_memory = f"{row['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}" if full else "-"
        ratio_time = f"{row['median_step_seconds'] / full['median_step_seconds']:.2f}" if full else "-"
        lines.append(
            f"| {name} | {row['trainable_values']:,} | {row['peak_memory_bytes'] / gib:.2f} | "
            f"{row['median_step_seconds']:.2f} | {ratio_memory} | {ratio_time} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_method:
        print(json.dumps(run_method(args)))
        return
    methods = [method.strip() for method in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
    results = {}
    for method in methods:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--run-method", method]
        print(f"running {method} ...", file=sys.stderr, flush=True)
        completed = subprocess.run(
            command, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            sys.exit(f"error: method {method} failed:\n{completed.stderr[-3000:]}")
        results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
    report = {
        "command": "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "run_method")},
        "results": results,
    }
    if set(METHODS) <= set(results):
        report["sara_budget"] = sara_budget_checks(results)
    print(markdown_table(results))
    if "sara" in results:
        sara = results["sara"]
        print(
            f"SaRA adapter: {sara['adapter_bytes'] / 2**20:.1f} MiB on disk, "
            f"{sara['adapter_bytes'] / sara['trainable_values']:.2f} bytes per trainable value, "
            f"loaded in {sara['adapter_load_seconds']:.1f} s"
        )
    for name, check in report.get("sara_budget", {}).items():
        print(f"{name}: {check['value']:.3f} (target {check['target']}) {'ok' if check['passes'] else 'MISSED'}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
