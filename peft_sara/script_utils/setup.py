"""Setting a run up around its models: the Accelerator, memory options, optimizer, schedule and prepare."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..sharding import unsupported_launch
from .cli import UserInputError, get_logger
from .models import make_optimizer


def make_accelerator(
    output_dir: str,
    logging_dir: str,
    gradient_accumulation_steps: int,
    mixed_precision: str | None,
    report_to: str,
    seed: int | None,
    allow_tf32: bool = False,
    find_unused_parameters: bool = False,
):
    """The Accelerator of a run (precision, accumulation, trackers, logging folder), with logging and seeds set.
    `find_unused_parameters` lets DDP train a model part of which the loss does not reach (SDXL takes the first text
    encoder's penultimate layer, so its last layer gets no gradient)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    _check_deepspeed_config_file()
    _name_cpu_backend_for_deepspeed()
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(output_dir, os.path.join(output_dir, logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # reproducible shuffles, also on resume
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else [],
    )
    refusal = unsupported_launch(accelerator.distributed_type.name, *_zero_stage_and_offload(accelerator))
    if refusal is not None:  # said before any model is loaded
        raise UserInputError(refusal)
    _load_models_whole(accelerator)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if seed is not None:
        set_seed(seed)
    if allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def _check_deepspeed_config_file() -> None:
    """The DeepSpeed config file a launch names (accelerate config's deepspeed_config_file), checked before accelerate
    reads it: a relative path is taken from the folder the run starts in."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path.endswith(".json") and not os.path.isfile(path):
        raise UserInputError(
            f"The DeepSpeed config file {path} does not exist from {os.getcwd()}: launch from the folder its path is "
            "relative to (the repository root for configs/accelerate/deepspeed_zero3.yaml), or pass accelerate "
            "launch --deepspeed_config_file with its absolute path."
        )


def _name_cpu_backend_for_deepspeed() -> None:
    """On a machine without an accelerator, accelerate starts DeepSpeed's processes without a backend of its own, and
    each then takes itself for the only one (the main process of a world of 1) while DeepSpeed's engine spans them
    all: every process would save as the main one. Naming gloo before the Accelerator exists gives each its real rank
    and world, as on GPUs."""
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and "LOCAL_RANK" in os.environ
    if launched and torch.accelerator.current_accelerator() is None:
        from accelerate import PartialState

        PartialState(backend="gloo")


def _zero_stage_and_offload(accelerator) -> tuple[int | None, bool]:
    """The ZeRO stage of a DeepSpeed launch and whether it offloads anything, from accelerate's DeepSpeed config."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None, False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    devices = [zero.get(part, {}).get("device", "none") for part in ("offload_optimizer", "offload_param")]
    return zero.get("stage"), any(device not in (None, "none") for device in devices)


def _load_models_whole(accelerator) -> None:
    """Under ZeRO-3, keep transformers from partitioning the models it loads: accelerate registers its DeepSpeed
    config with transformers whatever zero3_init_flag says, and a CLIP text encoder partitioned at load, outside any
    engine, encodes nothing. The scripts load the frozen models whole and ZeRO-3 partitions the denoiser when it is
    prepared (diffusers loads it whole either way)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return
    from transformers.integrations import unset_hf_deepspeed_config

    if plugin.zero3_init_flag:
        get_logger(__name__).warning(
            "zero3_init_flag is ignored: the scripts load the frozen models whole (a text encoder partitioned at "
            "load would encode nothing) and ZeRO-3 partitions the denoiser when it is prepared."
        )
    unset_hf_deepspeed_config()


def check_deepspeed_run(
    accelerator, several_models: bool, max_grad_norm: float, layerwise_casting: str | None
) -> None:
    """Refuse, before any model is loaded, what the scripts do not do under accelerate's DeepSpeed plugin: train more
    than the denoiser (accelerate prepares one model per DeepSpeed engine), store the base in fp8 (DeepSpeed casts
    the whole model to its precision), or clip at another norm than DeepSpeed's config (which clips in place of
    --max_grad_norm)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    if several_models:
        raise UserInputError(
            "Under DeepSpeed the scripts train the denoiser alone (accelerate prepares one model per engine): drop "
            "--train_text_encoder / --train_text_encoder_ti, or train with DDP."
        )
    if layerwise_casting is not None:
        raise UserInputError(
            "--layerwise_casting is not supported under DeepSpeed (it casts the whole model to its precision): drop "
            "it, or train with DDP."
        )
    clipping = plugin.deepspeed_config.get("gradient_clipping", "auto")
    clipping = 1.0 if clipping == "auto" else float(clipping)  # accelerate fills "auto" with 1.0
    if clipping != max_grad_norm:
        raise UserInputError(
            f"DeepSpeed clips gradients at {clipping} (its config's gradient_clipping), the run asks --max_grad_norm "
            f"{max_grad_norm}: make them equal."
        )


def enable_memory_savings(
    unet,
    text_encoders: torch.nn.Module | Sequence[torch.nn.Module],
    gradient_checkpointing: bool,
    xformers: bool,
    train_text_encoder: bool,
    layerwise_casting: str | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """Gradient checkpointing (UNet, and the text encoder or encoders when they train), xformers attention in the
    UNet, and the UNet's frozen weights stored in the `layerwise_casting` dtype (a torch dtype name) and computed in
    `compute_dtype`. Call it after the adapter is added: SaRA's values stay fp32."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            for text_encoder in [text_encoders] if isinstance(text_encoders, torch.nn.Module) else text_encoders:
                text_encoder.gradient_checkpointing_enable()
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    if layerwise_casting is not None:
        unet.enable_layerwise_casting(storage_dtype=getattr(torch, layerwise_casting), compute_dtype=compute_dtype)


def prepare_optimization(
    accelerator,
    models: dict[str, torch.nn.Module],
    dataloader,
    learning_rate: float,
    args,
    max_train_steps: int,
):
    """AdamW over the models' trainable (SaRA) parameters and its schedule, all passed through accelerate's prepare.
    With --text_encoder_lr, what trains in the models named text_encoder* has that learning rate.

    Returns the prepared models (same keys), their trainable parameters, optimizer, data loader and schedule. The
    schedule steps once per process and optimizer step, so its lengths are multiplied by the number of processes.
    """
    from diffusers.optimization import get_scheduler

    trainable = {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}
    params = [param for model_params in trainable.values() for param in model_params]
    lr_scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.scale_lr:
        learning_rate *= lr_scale
    groups = params
    if args.text_encoder_lr is not None:
        text_encoder_lr = args.text_encoder_lr * (lr_scale if args.scale_lr else 1)
        by_kind = {True: [], False: []}  # in the text encoders or not
        for name, model_params in trainable.items():
            by_kind[name.startswith("text_encoder")] += model_params
        groups = [{"params": by_kind[False]}, {"params": by_kind[True], "lr": text_encoder_lr}]
    optimizer = make_optimizer(
        groups,
        learning_rate,
        (args.adam_beta1, args.adam_beta2),
        args.adam_weight_decay,
        args.adam_epsilon,
        args.use_8bit_adam,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    prepared = accelerator.prepare(*models.values(), optimizer, dataloader, lr_scheduler)
    models = dict(zip(models, prepared[: len(models)]))
    optimizer, dataloader, lr_scheduler = prepared[len(models) :]
    return models, params, optimizer, dataloader, lr_scheduler
