"""Training memory of SaRA on diffusion transformers (Flux.1, SD 3.5) against LoRA and the dense-gradient floor, per
block and extrapolated to the full model.

The published transformer configurations with random weights and a bf16 base, cut to `--blocks` depths (Flux: N
double-stream and 2N single-stream blocks, its published 19:38 ratio; SD 3.5 Large: N joint blocks), each method in
a fresh process, a few AdamW steps on one batch. Peak memory is CUDA's max allocated on a GPU and peak RSS on CPU,
taken apart for the set-up (building the model, adding the adapter: SaRA's selection holds one layer's copy at a
time) and for the training steps (the peak counter is reset in between), and the memory held after the steps
(weights, adapter, gradients kept, optimizer state). Two depths give the held memory per block and its intercept
(embedders, output, the process itself), hence the full model's by linear extrapolation; a training step's
transient above it (one layer's work, and on CPU the allocator's) does not grow with the depth and is added as
measured, the larger of the two depths'. The activations a step saves do grow with the depth (at 1024 px they
dominate), so the training peak is also extrapolated linearly, and the full model's training figure is the larger
of the two. A run needs the larger of the set-up and the training figure. Methods:
- `frozen`: the floor, nothing trains;
- `dense_grad`: every Linear weight's dense gradient computed and dropped at once (no optimizer), the least any
  method that adapts every weight must hold;
- `sara_<fraction>`: this package at each of `--fractions` of the Linear weights, `attach` with the paper's
  regulariser, values and AdamW state in fp32;
- `lora_attention`: PEFT LoRA r=16 on the attention projections (image and text streams), what Flux LoRA users
  run, its weights in fp32 as diffusers' scripts keep them.

At the default 128 px the figures are the model's, adapter's and optimizer's; `--resolution 1024 --text-tokens 512
--gradient-checkpointing` adds the activations of a real Flux run (a CPU takes about a minute a step there, so
`--methods` picks a few). Examples:

    python -m benchmarks.transformer_memory --model flux --blocks 1 2 --output docs/benchmark_flux_blocks.json
    python -m benchmarks.transformer_memory --model flux --blocks 1 2 --resolution 1024 --text-tokens 512 \
        --gradient-checkpointing --steps 1 --methods frozen,lora_attention,sara_0.02
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from benchmarks.benchmark import CHILD_ENV, REPO_ROOT, peak_memory_bytes

# Published transformer configurations: FLUX.1-dev's, and Stable Diffusion 3.5 Large's.
CONFIGS = {
    "flux": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
    "sd3": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 38,
        "attention_head_dim": 64,
        "num_attention_heads": 38,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    },
}
FULL_DEPTH = {"flux": 19, "sd3": 38}  # in blocks as --blocks counts them
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transformer_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="flux", choices=sorted(CONFIGS), help="Transformer architecture.")
    parser.add_argument(
        "--blocks", type=int, nargs=2, default=(1, 2), help="The two depths measured (Flux: N double + 2N single)."
    )
    parser.add_argument("--resolution", type=int, default=128, help="Image size in pixels (VAE factor 8).")
    parser.add_argument("--text-tokens", type=int, default=64, help="T5 tokens of the prompt.")
    parser.add_argument("--batch-size", type=int, default=1, help="Training batch size.")
    parser.add_argument("--steps", type=int, default=2, help="Optimizer steps per method.")
    parser.add_argument("--fractions", default="0.01,0.02,0.058", help="SaRA's shares of the Linear weights.")
    parser.add_argument(
        "--methods",
        help="Comma-separated methods to run (default: frozen, dense_grad, lora_attention and SaRA at --fractions).",
    )
    parser.add_argument(
        "--layerwise-casting",
        choices=["float8_e4m3fn", "float8_e5m2"],
        help="Store the frozen transformer's weights in this fp8 dtype, computing in bf16 under autocast (diffusers' "
        "enable_layerwise_casting, the training scripts' --layerwise_casting with --mixed_precision bf16), after the "
        "adapter is added.",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute each block in the backward pass, as the training scripts' --gradient_checkpointing does.",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="Rank of the LoRA peer.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--output", help="Write the results as JSON to this file.")
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "BLOCKS"), help=argparse.SUPPRESS)  # child process
    return parser.parse_args(argv)


def transformer_config(model: str, blocks: int) -> dict:
    config = dict(CONFIGS[model], num_layers=blocks)
    if model == "flux":
        config["num_single_layers"] = 2 * blocks
    return config


def build_transformer(model: str, blocks: int, device: str):
    """The transformer at `blocks` depth, built in bf16 on `device` (no fp32 copy ever exists)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model_class = FluxTransformer2DModel if model == "flux" else SD3Transformer2DModel
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return model_class(**transformer_config(model, blocks))
    finally:
        torch.set_default_dtype(default_dtype)


def prepare_method(transformer, method: str, lora_rank: int):
    """The model to train and its trainable parameters (none for the floors)."""
    from peft import LoraConfig, get_peft_model

    import peft_sara

    transformer.requires_grad_(False)
    linears = [m for m in transformer.modules() if type(m) is torch.nn.Linear]
    if method == "frozen":
        return transformer, []
    if method == "dense_grad":
        for module in linears:
            module.weight.requires_grad_(True)
            module.weight.register_post_accumulate_grad_hook(lambda weight: setattr(weight, "grad", None))
        return transformer, []
    if method == "lora_attention":
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=ATTENTION_PROJECTIONS)
        model = get_peft_model(transformer, config)
    else:
        model = get_peft_model(transformer, peft_sara.SaRAConfig(target_fraction=float(method.removeprefix("sara_"))))
    return model, [p for p in model.parameters() if p.requires_grad]


def model_inputs(model: str, config: dict, args: argparse.Namespace) -> dict:
    """One batch of transformer inputs at `args.resolution`, as the pipelines build them."""
    size, latent = args.batch_size, args.resolution // 8
    device, dtype = args.device, torch.bfloat16
    text = torch.randn(size, args.text_tokens, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(size, config["pooled_projection_dim"], device=device, dtype=dtype)
    timestep = torch.full((size,), 0.5, device=device)
    if model == "sd3":
        latents = torch.randn(size, config["in_channels"], latent, latent, device=device, dtype=dtype)
        return {"hidden_states": latents, "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": timestep * 1000}  # fmt: skip
    from diffusers import FluxPipeline

    tokens = (latent // 2) ** 2
    return {
        "hidden_states": torch.randn(size, tokens, config["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "timestep": timestep,
        "guidance": torch.full((size,), 3.5, device=device),
        "txt_ids": torch.zeros(args.text_tokens, 3, device=device, dtype=dtype),
        "img_ids": FluxPipeline._prepare_latent_image_ids(size, latent // 2, latent // 2, device, dtype),
    }


def reset_peak_memory(device: str) -> None:
    """Start the peak-memory counter again from the present use (Linux: VmHWM is reset through clear_refs)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def held_memory_bytes(device: str) -> int:
    """Memory in use now: CUDA's allocated bytes, or the resident set on CPU (Linux)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def run(args: argparse.Namespace) -> dict:
    """One method at one depth (in a child process): its peak memory over `args.steps` training steps."""
    import peft_sara

    method, blocks = args.run[0], int(args.run[1])
    torch.manual_seed(0)
    transformer = build_transformer(args.model, blocks, args.device)
    linear_weights = sum(m.weight.numel() for m in transformer.modules() if type(m) is torch.nn.Linear)
    parameters = sum(p.numel() for p in transformer.parameters())
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    model, trainable = prepare_method(transformer, method, args.lora_rank)
    if args.layerwise_casting:  # as the scripts do it: after the adapter, whose own weights diffusers leaves alone
        transformer.enable_layerwise_casting(storage_dtype=getattr(torch, args.layerwise_casting))
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2) if trainable else None
    if method.startswith("sara_"):
        peft_sara.attach(model, optimizer)
    inputs = model_inputs(args.model, transformer.config, args)
    inputs["hidden_states"].requires_grad_(method == "frozen")  # the floor's backward reaches the input only
    setup_peak = peak_memory_bytes(args.device)
    reset_peak_memory(args.device)
    start = time.perf_counter()
    # fp8 storage computes in bf16 under autocast, as the scripts run it (--mixed_precision bf16): LoRA's fp32 weights
    # then meet bf16 inputs, which diffusers' casting hooks no longer cast for PEFT layers
    autocast = torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=bool(args.layerwise_casting))
    for _ in range(args.steps):
        with autocast:
            prediction = model(**inputs, return_dict=False)[0]
        loss = prediction.float().square().mean()
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "method": method,
        "blocks": blocks,
        "setup_peak_bytes": setup_peak,
        "training_peak_bytes": peak_memory_bytes(args.device),
        "held_bytes": held_memory_bytes(args.device),
        "trainable_values": sum(p.numel() for p in trainable),
        "linear_weights": linear_weights,
        "parameters": parameters,
        "seconds_per_step": (time.perf_counter() - start) / args.steps,
    }


def methods_to_run(args: argparse.Namespace) -> list[str]:
    """`--methods`, or frozen, dense_grad, LoRA and SaRA at each of `--fractions` (without dense_grad under fp8
    storage, whose weights take no gradient); exits with one line on a name it does not know."""
    if not args.methods:
        floors = ["frozen"] if args.layerwise_casting else ["frozen", "dense_grad"]
        return floors + ["lora_attention"] + [f"sara_{fraction.strip()}" for fraction in args.fractions.split(",")]
    methods = [method.strip() for method in args.methods.split(",")]
    unknown = [m for m in methods if m not in ("frozen", "dense_grad", "lora_attention") and not is_sara(m)]
    if unknown or "frozen" not in methods:
        sys.exit(
            f"error: --methods {args.methods!r}: give frozen (the ratios' base) and any of dense_grad, "
            "lora_attention, sara_<fraction> (e.g. sara_0.02)."
        )
    if args.layerwise_casting and "dense_grad" in methods:
        sys.exit("error: dense_grad needs gradients of the stored weights, which fp8 storage does not give.")
    return methods


def is_sara(method: str) -> bool:
    """Whether a method name is SaRA at a share of the Linear weights in (0, 1], e.g. sara_0.02."""
    try:
        return method.startswith("sara_") and 0 < float(method.removeprefix("sara_")) <= 1
    except ValueError:
        return False


def extrapolate(rows: list[dict], full_depth: int) -> dict:
    """The held memory and the set-up peak per block and at the full depth from the figures at two depths (linear in
    the depth), the trainable values likewise; the training peak at the full depth is its held memory plus the largest
    measured transient or the training peak extrapolated linearly (activations grow with the depth), whichever is
    larger, and the full model's peak the larger of set-up and training."""
    low, high = sorted(rows, key=lambda row: row["blocks"])

    def linear(key: str) -> tuple[float, float]:
        per_block = (high[key] - low[key]) / (high["blocks"] - low["blocks"])
        return per_block, low[key] + per_block * (full_depth - low["blocks"])

    figures = {"full_model_trainable_values": round(linear("trainable_values")[1])}
    figures["held_per_block_bytes"], figures["held_full_model_bytes"] = linear("held_bytes")
    figures["setup_full_model_bytes"] = linear("setup_peak_bytes")[1]
    figures["training_transient_bytes"] = max(row["training_peak_bytes"] - row["held_bytes"] for row in rows)
    figures["training_full_model_bytes"] = max(
        figures["held_full_model_bytes"] + figures["training_transient_bytes"], linear("training_peak_bytes")[1]
    )
    figures["full_model_bytes"] = max(figures["setup_full_model_bytes"], figures["training_full_model_bytes"])
    return figures


def markdown_table(report: dict) -> str:
    depths = report["settings"]["blocks"]
    lines = [
        f"| method | trainable (full model) | held at {depths[0]} / {depths[1]} blocks (GiB) | held per block (GiB) "
        "| step transient (GiB) | set-up, full model (GiB) | training, full model (GiB) | full / frozen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    frozen = report["extrapolated"]["frozen"]["full_model_bytes"]
    for method, figures in report["extrapolated"].items():
        held = {row["blocks"]: row["held_bytes"] / 2**30 for row in report["results"][method]}
        lines.append(
            f"| {method} | {figures['full_model_trainable_values']:,} | {held[depths[0]]:.2f} / {held[depths[1]]:.2f} "
            f"| {figures['held_per_block_bytes'] / 2**30:.3f} | {figures['training_transient_bytes'] / 2**30:.2f} "
            f"| {figures['setup_full_model_bytes'] / 2**30:.1f} | {figures['training_full_model_bytes'] / 2**30:.1f} "
            f"| {figures['full_model_bytes'] / frozen:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run:
        print(json.dumps(run(args)))
        return
    if args.blocks[0] < 1 or args.blocks[1] <= args.blocks[0]:
        sys.exit("error: --blocks takes two depths, the second larger, e.g. --blocks 1 2")
    methods = methods_to_run(args)
    argv = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for method in methods:
        for blocks in args.blocks:
            print(f"running {method} at {blocks} blocks ...", file=sys.stderr, flush=True)
            completed = subprocess.run(
                [sys.executable, "-m", "benchmarks.transformer_memory", *argv, "--run", method, str(blocks)],
                cwd=REPO_ROOT,
                env={**os.environ, **CHILD_ENV},
                capture_output=True,
                text=True,
                check=False,
            )
            if completed.returncode != 0:
                sys.exit(f"error: {method} at {blocks} blocks failed:\n{completed.stderr[-3000:]}")
            results.setdefault(method, []).append(json.loads(completed.stdout.strip().splitlines()[-1]))
    report = {
        "command": "python -m benchmarks.transformer_memory " + " ".join(argv),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "run")},
        "full_depth": FULL_DEPTH[args.model],
        "results": results,
        "extrapolated": {method: extrapolate(rows, FULL_DEPTH[args.model]) for method, rows in results.items()},
    }
    print(markdown_table(report))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
