"""Time and accuracy of each way to compute the regulariser's U Vᵀ (`peft_sara.training.polar_factor`) on the 2-D
weight shapes of SD 1.5's UNet, with SaRA's sparsity, on one device: the figures behind `method="auto"`.

    python -m benchmarks.polar --device cpu
    python -m benchmarks.polar --device cuda --output docs/polar_cuda.json

Each row: the mean seconds of a method (after one warm-up call; CUDA synchronised) and its largest entry-wise
difference from the SVD's U Vᵀ, computed in fp64.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from peft_sara.training import POLAR_METHODS, auto_polar_method, polar_factor

# (rows, columns) of SD 1.5's regularised Linear weights: attention 320..1280 square, cross-attention 320×768,
# feed-forward in (GEGLU, 2·4·C × C) and out (C × 4·C), time embedding 1280×320
SD15_SHAPES = [(320, 320), (1280, 1280), (320, 768), (2560, 320), (1280, 5120), (10240, 1280), (1280, 320)]


def masked_update(shape: tuple[int, int], device: str, density: float = 0.058) -> torch.Tensor:
    """A matrix like SaRA's masked effective weight: small entries at a `density` share of random positions."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * 1e-3
    mask = torch.rand(shape, generator=generator) < density
    return (values * mask).to(device)


def measure(shape: tuple[int, int], device: str, repeats: int) -> dict:
    matrix = masked_update(shape, device)
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    reference = u @ vh
    row = {"shape": list(shape)}
    for method in POLAR_METHODS[1:]:
        polar_factor(matrix, method)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            polar, _ = polar_factor(matrix, method)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        row[method] = {
            "seconds": (time.perf_counter() - start) / repeats,
            "max_difference": float((polar.double() - reference).abs().max()),
        }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.polar", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed calls per method and shape.")
    parser.add_argument("--shapes", default=None, help='Comma-separated shapes, e.g. "320x320,1280x5120".')
    parser.add_argument("--output", help="Write the figures as JSON to this file.")
    args = parser.parse_args(argv)
    shapes = SD15_SHAPES
    if args.shapes:
        shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes.split(",")]
    rows = [measure(shape, args.device, args.repeats) for shape in shapes]
    methods = POLAR_METHODS[1:]
    print("| shape | " + " | ".join(f"{m} (s) | {m} max diff" for m in methods) + " | auto picks |")
    print("|---|" + "---:|" * (2 * len(methods) + 1))
    for row in rows:
        picked = auto_polar_method(tuple(row["shape"]), torch.device(args.device).type)
        cells = " | ".join(f"{row[m]['seconds']:.3f} | {row[m]['max_difference']:.1e}" for m in methods)
        print(f"| {row['shape'][0]}×{row['shape'][1]} | {cells} | {picked} |")
    if args.output:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
        report = {"device": device, "torch": torch.__version__, "rows": rows}
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
