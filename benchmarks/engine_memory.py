"""Memory per process of SaRA under each engine it trains with, side by side in one run: DDP (every process holds
the whole model), DeepSpeed ZeRO-2 and ZeRO-3, and FSDP2 (`fully_shard` on every block, or with `--fsdp2-units
layers` on each of their layers, and on the root).

Each engine trains the same SaRA UNet (the paper's regulariser on, AdamW, clipping at 1.0) for a few steps on N
processes (`torch.distributed.run`; gloo with DeepSpeed's CPU accelerator on a CPU, NCCL on GPUs), every process on
the same batch. Per process it reports what the model, engine and optimizer hold after the steps and the peak
during them, both above what the process held before the model was built:
- on a GPU, CUDA's allocated bytes (`max_memory_allocated` over the steps);
- on a CPU, resident memory (RSS), the peak sampled every 2 ms. The model is built whole on every process before an
  engine shards it, so the CPU figures start after that: each engine's held memory is what it keeps of the model.

    python -m benchmarks.engine_memory --model sd15 --processes 2 --output docs/engine_memory_sd15.json
    python -m benchmarks.engine_memory --model sdxl --processes 8 --batch-size 8 --device cuda  # on 8 GPUs

Ratios are against DDP's figures in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .benchmark import CHILD_ENV, REPO_ROOT, unet_config

ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sd15", choices=("sd15", "sdxl", "small"), help="UNet architecture.")
    parser.add_argument("--processes", type=int, default=2, help="Processes (GPUs) per engine.")
    parser.add_argument("--engines", default=",".join(ENGINES), help="Comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--batch-size", type=int, default=1, help="Batch size per process.")
    parser.add_argument("--latent-size", type=int, default=32, help="Latent height and width (64 = 512 px).")
    parser.add_argument("--steps", type=int, default=2, help="Training steps.")
    parser.add_argument("--target-fraction", type=float, default=0.058, help="Share of weights SaRA trains.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument(
        "--zero3-live-parameters",
        type=float,
        help="ZeRO-3's stage3_max_live_parameters, stage3_max_reuse_distance and stage3_prefetch_bucket_size (how "
        "many gathered parameters it keeps and prefetches; DeepSpeed's defaults: 1e9, 1e9, 5e7).",
    )
    parser.add_argument(
        "--fsdp2-units",
        default="blocks",
        choices=("blocks", "layers"),
        help="What FSDP2 shards as one unit besides the root: the UNet's down, mid and up blocks, or each of their "
        "resnets, attention transformers and samplers.",
    )
    parser.add_argument("--output", help="Write the results as JSON to this file.")
    parser.add_argument("--run-engine", choices=ENGINES, help=argparse.SUPPRESS)  # in each launched process
    parser.add_argument("--report-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * _PAGE_BYTES


class PeakSampler:
    """The highest RSS seen while running, sampled by a thread (a CPU has no allocator high-water mark to reset)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def held_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else resident_bytes()


def fsdp2_units(unet, units: str) -> list[torch.nn.Module]:
    """The UNet's modules FSDP2 shards as units of their own (`--fsdp2-units`), innermost first."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    if units == "blocks":
        return blocks
    parts = ("resnets", "attentions", "downsamplers", "upsamplers")
    return [layer for block in blocks for part in parts for layer in (getattr(block, part, None) or [])]


def wrap(
    engine: str,
    model,
    optimizer_params,
    device: str,
    zero3_live_parameters: float | None = None,
    units: str = "blocks",
):
    """The model and optimizer as `engine` trains them; returns (model to call, optimizer to step, clip function)."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model.to(device))
        optimizer = torch.optim.AdamW(optimizer_params(model), lr=1e-4)
        return wrapped, optimizer, lambda: torch.nn.utils.clip_grad_norm_(optimizer_params(model), 1.0)
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for unit in fsdp2_units(model.base_model.model, units):
            fully_shard(unit)
        fully_shard(model)
        optimizer = torch.optim.AdamW(optimizer_params(model), lr=1e-4)
        return model, optimizer, lambda: torch.nn.utils.clip_grad_norm_(optimizer_params(model), 1.0)
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,  # the engine clips in its step
        "zero_optimization": {"stage": int(engine[-1])},
        "steps_per_print": 1_000_000,
    }
    if engine == "zero3" and zero3_live_parameters is not None:
        for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size"):
            config["zero_optimization"][key] = int(zero3_live_parameters)
    optimizer = torch.optim.AdamW(optimizer_params(model), lr=1e-4)
    wrapped, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return wrapped, zero, lambda: None


def run_engine(args: argparse.Namespace) -> None:
    """One process of one engine: build, wrap, train a few steps, write this process's figures."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    import peft_sara

    rank = int(os.environ["RANK"])
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if args.run_engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    else:
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    before = held_bytes(device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(args.model))
    model = get_peft_model(unet, peft_sara.SaRAConfig(target_fraction=args.target_fraction, lambda_rank=1e-3))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped, optimizer, clip = wrap(
        args.run_engine,
        model,
        lambda m: [p for p in m.parameters() if p.requires_grad],
        device,
        args.zero3_live_parameters,
        args.fsdp2_units,
    )
    training = peft_sara.attach(wrapped, optimizer)
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch_size, config.in_channels, args.latent_size, args.latent_size, generator=generator)
    text = torch.randn(args.batch_size, 77, config.cross_attention_dim, generator=generator)
    added = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and six size/crop ids
        pooled_size = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(args.batch_size, pooled_size, generator=generator)}
        added["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).expand(args.batch_size, 6)
    latents, text = latents.to(device), text.to(device)
    added = {key: value.to(device) for key, value in added.items()}
    timesteps = torch.full((args.batch_size,), 500, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    held_before_steps = held_bytes(device)
    losses, start = [], time.perf_counter()
    with PeakSampler() as sampler:
        for _ in range(args.steps):
            prediction = wrapped(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added or None)
            loss = torch.nn.functional.mse_loss(prediction.sample, torch.zeros_like(latents))
            if args.run_engine.startswith("zero"):
                wrapped.backward(loss)
                wrapped.step()
            else:
                loss.backward()
                clip()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    held = held_bytes(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else max(sampler.peak, held)
    report = {
        "engine": args.run_engine,
        "rank": rank,
        "held_bytes": held - before,
        "peak_bytes": peak - before,
        "held_before_steps_bytes": held_before_steps - before,
        "seconds_per_step": (time.perf_counter() - start) / args.steps,
        "losses": losses,
        "rank_loss": training.rank_loss,
        "trainable_values": trainable,
    }
    Path(args.report_dir, f"{args.run_engine}-{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, engine: str, report_dir: str) -> list[dict]:
    """Run one engine on `args.processes` processes; their reports, by rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
    command += ["--master_port", str(_free_port()), "-m", "benchmarks.engine_memory", "--run-engine", engine]
    command += ["--report-dir", report_dir, "--device", args.device, "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--latent-size", str(args.latent_size)]
    command += ["--steps", str(args.steps), "--target-fraction", str(args.target_fraction)]
    if args.zero3_live_parameters is not None:
        command += ["--zero3-live-parameters", str(args.zero3_live_parameters)]
    command += ["--fsdp2-units", args.fsdp2_units]
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": args.device}
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
    return [json.loads(Path(report_dir, f"{engine}-{rank}.json").read_text()) for rank in range(args.processes)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(per_engine: dict[str, list[dict]]) -> dict[str, dict]:
    """Per engine: the largest process's held and peak bytes, and both as ratios to DDP's (when DDP ran)."""
    rows = {}
    for engine, reports in per_engine.items():
        rows[engine] = {
            "held_bytes": max(report["held_bytes"] for report in reports),
            "peak_bytes": max(report["peak_bytes"] for report in reports),
            "seconds_per_step": max(report["seconds_per_step"] for report in reports),
            "losses": reports[0]["losses"],
        }
    if "ddp" in rows:
        for row in rows.values():
            row["held_vs_ddp"] = row["held_bytes"] / rows["ddp"]["held_bytes"]
            row["peak_vs_ddp"] = row["peak_bytes"] / rows["ddp"]["peak_bytes"]
    return rows


def markdown_table(rows: dict[str, dict]) -> str:
    lines = [
        "| engine | held per process | peak per process | held / DDP | peak / DDP | s / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for engine, row in rows.items():
        ratios = [f"{row[key]:.2f}" if key in row else "—" for key in ("held_vs_ddp", "peak_vs_ddp")]
        lines.append(
            f"| {engine} | {row['held_bytes'] / 2**30:.2f} GiB | {row['peak_bytes'] / 2**30:.2f} GiB | "
            f"{ratios[0]} | {ratios[1]} | {row['seconds_per_step']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_engine:
        run_engine(args)
        return
    engines = [engine for engine in args.engines.split(",") if engine]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}: choose from {', '.join(ENGINES)}")
    with tempfile.TemporaryDirectory() as report_dir:
        per_engine = {engine: launch(args, engine, report_dir) for engine in engines}
    rows = summarize(per_engine)
    print(markdown_table(rows))
    if args.output:
        import deepspeed

        report = {
            "settings": {key: value for key, value in vars(args).items() if key not in ("run_engine", "report_dir")},
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "python": platform.python_version(),
            },
            "machine": torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores",
            "engines": rows,
            "processes": per_engine,
        }
        Path(args.output).write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
