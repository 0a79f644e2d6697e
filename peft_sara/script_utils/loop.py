"""The optimization loop both scripts share: skip what a resumed run has seen, reshuffle each epoch as an
uninterrupted run would, accumulate, clip, stop at the first non-finite loss or gradient, step, log, checkpoint and
validate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..training import SaRATraining
from ..zero import whole_shape
from .checkpoints import load_checkpoint, save_checkpoint
from .cli import UserInputError, get_logger

logger = get_logger(__name__)


@dataclass
class LoopSettings:
    """How long to train and when to clip, checkpoint and validate."""

    max_train_steps: int
    updates_per_epoch: int
    train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    output_dir: str
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation_steps: int | None
    validation_epochs: int
    run_settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args, dataloader, num_processes: int) -> LoopSettings:
        """The run's plan from its flags and its (not yet prepared) data loader."""
        steps_per_epoch = updates_per_epoch(dataloader, num_processes, args.gradient_accumulation_steps)
        return cls(
            max_train_steps=args.max_train_steps or args.num_train_epochs * steps_per_epoch,
            updates_per_epoch=steps_per_epoch,
            train_batch_size=args.train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm,
            output_dir=args.output_dir,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            validation_steps=args.validation_steps,
            validation_epochs=args.validation_epochs,
        )

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.updates_per_epoch)


def updates_per_epoch(dataloader, num_processes: int, accumulation: int) -> int:
    """Optimizer steps per epoch once the data loader is sharded over the processes (each gets an even share)."""
    return math.ceil(math.ceil(len(dataloader) / num_processes) / accumulation)


def log_run_start(
    num_examples: int, num_processes: int, settings: LoopSettings, num_trainable: int, lr: float
) -> None:
    total_batch = settings.train_batch_size * num_processes * settings.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}, num epochs = {settings.num_epochs}")
    logger.info(f"  Num processes = {num_processes}")
    logger.info(f"  Instantaneous batch size per device = {settings.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}")
    logger.info(f"  Gradient accumulation steps = {settings.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {settings.max_train_steps}")
    logger.info(f"  Trainable SaRA values = {num_trainable:,}, learning rate = {lr:.4g}")


def _keep_learning_rates(lr_scheduler, base_lrs: list[float]) -> None:
    """A resumed run trains at this run's learning rate: loading the schedule's state would bring back the one the
    checkpoint was trained with (so that lowering it after a divergence would change nothing)."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if list(scheduler.base_lrs) == base_lrs or not hasattr(scheduler, "lr_lambdas"):
        return
    logger.warning("Learning rate %s from now on (the checkpoint's: %s).", base_lrs[0], scheduler.base_lrs[0])
    scheduler.base_lrs = list(base_lrs)
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, rate in zip(scheduler.optimizer.param_groups, base_lrs, rates):
        group["initial_lr"], group["lr"] = base, rate
    scheduler._last_lr = rates


def _stop_if_not_finite(accelerator, loss_finite: bool, grad_norm, step: int, output_dir: str) -> None:
    """Stop before the optimizer step that would write NaN or inf into the adapters, on every process at once (the
    flags are reduced, so no process waits for another that stopped). A skipped fp16 step is not a divergence: the
    gradient scaler handles an overflowing gradient itself, so only the loss is judged then."""
    gradient_finite = accelerator.scaler is not None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
    flags = torch.tensor([not loss_finite, not gradient_finite], dtype=torch.float32, device=accelerator.device)
    bad_loss, bad_gradient = (bool(flag) for flag in accelerator.reduce(flags, reduction="sum"))
    if bad_loss or bad_gradient:
        what = "loss" if bad_loss else "gradient norm"
        raise UserInputError(
            f"Training diverged at step {step + 1}: the {what} is not finite, and nothing of this step was saved. "
            f"Start again with a lower --learning_rate, or resume an earlier checkpoint in {output_dir} with one "
            "(the last checkpoints before a divergence may already hold values far off)."
        )


def train(
    accelerator,
    models: dict[str, torch.nn.Module],
    params: list[torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    dataloader,
    batch_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    validate: Callable[[int], None],
    training: SaRATraining,
    settings: LoopSettings,
    checkpoint: Path | None = None,
) -> int:
    """Train to `settings.max_train_steps`, from `checkpoint` when given; returns the step reached."""
    from tqdm.auto import tqdm

    num_trainable = sum(whole_shape(param).numel() for param in params)  # also where ZeRO-3 partitions them
    lr = optimizer.param_groups[0]["lr"]
    log_run_start(len(dataloader.dataset), accelerator.num_processes, settings, num_trainable, lr)
    global_step = 0
    if checkpoint is not None:
        base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        global_step = load_checkpoint(accelerator, checkpoint)
        _keep_learning_rates(lr_scheduler, base_lrs)
    first_epoch, updates_into_epoch = divmod(global_step, settings.updates_per_epoch)
    batches_to_skip = updates_into_epoch * settings.gradient_accumulation_steps
    progress = tqdm(
        range(settings.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(first_epoch, settings.num_epochs):
        if global_step >= settings.max_train_steps:
            break
        for model in models.values():
            model.train()
        batches = dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(dataloader, batches_to_skip)
        batches.set_epoch(epoch)  # the same shuffle as an uninterrupted run, also after a resume
        loss_finite = True
        for batch in batches:
            with accelerator.accumulate(*models.values()):
                loss = batch_loss(batch)
                loss_finite = loss_finite and bool(torch.isfinite(loss.detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                    _stop_if_not_finite(accelerator, loss_finite, grad_norm, global_step, settings.output_dir)
                    loss_finite = True
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                global_step += 1
                logs = {
                    "loss": loss.detach().item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "rank_loss": training.rank_loss,
                }
                progress.update(1)
                progress.set_postfix(**logs)
                accelerator.log(logs, step=global_step)
                if global_step % settings.checkpointing_steps == 0:
                    save_checkpoint(
                        accelerator,
                        settings.output_dir,
                        global_step,
                        settings.checkpoints_total_limit,
                        settings.run_settings,
                    )
                if settings.validation_steps and global_step % settings.validation_steps == 0:
                    validate(global_step)
                if global_step >= settings.max_train_steps:
                    break
        if settings.validation_steps is None and (epoch + 1) % settings.validation_epochs == 0:
            validate(global_step)
    return global_step
