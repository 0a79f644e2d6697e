"""Per-layer CPU cost of a training step, with the compute taken out: a stack of small Linear layers.

On a GPU at a small batch a step waits for the CPU, which issues every layer's kernels and runs every Python call on
the way (SaRA's layer, its autograd function, PEFT's wrapper). This benchmark measures exactly that part on any
machine, with no GPU: each method trains the same stack of `--layers` Linear layers of width `--width` (SD 1.5's UNet
has 282 Linear/Conv2d layers), and the step time minus the floor's, per layer, is the method's own overhead.

Methods: `dense_grad` (the floor: native autograd, every weight gradient computed and dropped at once), `sara`
(this package), `lora` (PEFT LoRA r=4 on every layer). Each step is a forward and backward; with
`--optimizer`, also gradient clipping and a foreach AdamW step (as CUDA's default), which the floor does not take.
Each figure is the fastest of `--repeats` timings of `--steps` steps, one thread.

    python -m benchmarks.layer_overhead
    python -m benchmarks.layer_overhead --optimizer --output docs/layer_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

METHODS = ("dense_grad", "sara", "lora")


class LayerStack(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(method: str, layers: int, width: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model to train with `method` and its trainable parameters."""
    from peft import LoraConfig, get_peft_model

    import peft_sara
    from benchmarks.benchmark import build_method

    torch.manual_seed(0)
    model = LayerStack(layers, width)
    targets = [f"layers.{index}" for index in range(layers)]
    if method == "dense_grad":  # the same floor as the UNet benchmark's
        model, _, _ = build_method("dense_grad", model, target_fraction=0.0)
        return model, []
    model.requires_grad_(False)
    if method == "sara":
        model = get_peft_model(model, peft_sara.SaRAConfig(threshold=0.1, target_modules=targets))
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    else:
        raise ValueError(f"unknown method {method!r}: choose from {METHODS}")
    return model, [param for param in model.parameters() if param.requires_grad]


def time_method(method: str, args: argparse.Namespace) -> float:
    """Seconds per step, the fastest of `args.repeats` timings."""
    import peft_sara

    model, trainable = build(method, args.layers, args.width)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True) if args.optimizer and trainable else None
    if optimizer is not None and method == "sara":
        peft_sara.attach(model, optimizer)
    x = torch.randn(args.batch_size, args.width)

    def step() -> None:
        model(x.clone().requires_grad_(True)).square().mean().backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        timings.append((time.perf_counter() - start) / args.steps)
    return min(timings)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.layer_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--layers", type=int, default=282, help="Linear layers in the stack.")
    parser.add_argument("--width", type=int, default=32, help="Their input and output features.")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows of the input.")
    parser.add_argument("--steps", type=int, default=40, help="Steps per timing.")
    parser.add_argument("--repeats", type=int, default=15, help="Timings per method; the fastest is reported.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--optimizer", action="store_true", help="Also clip and take a foreach AdamW step.")
    parser.add_argument("--output", help="Write the figures as JSON to this file.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    methods = [method.strip() for method in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the per-call overhead, not how ops spread over cores; restored for an in-process caller
    try:
        seconds = {method: time_method(method, args) for method in methods}
    finally:
        torch.set_num_threads(threads)
    floor = seconds.get("dense_grad")
    print("| method | ms / step | µs / layer | µs / layer over the floor |")
    print("|---|---:|---:|---:|")
    for method, value in seconds.items():
        over = "-" if floor is None else f"{(value - floor) / args.layers * 1e6:.0f}"
        print(f"| {method} | {value * 1e3:.2f} | {value / args.layers * 1e6:.0f} | {over} |")
    report = {"settings": vars(args), "torch": torch.__version__, "step_seconds": seconds}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
