"""peft_sara.script_utils.loop: steps per epoch, and the stop at the first non-finite loss or gradient."""

from __future__ import annotations

import argparse

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import MLPConv
from peft import get_peft_model

import peft_sara
from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.loop import LoopSettings, train, updates_per_epoch


def test_updates_per_epoch_counts_each_process_share():
    batches = list(range(10))
    assert updates_per_epoch(batches, num_processes=1, accumulation=1) == 10
    assert updates_per_epoch(batches, num_processes=2, accumulation=2) == 3  # 5 batches each, in steps of 2
    assert updates_per_epoch(batches, num_processes=4, accumulation=1) == 3
    args = argparse.Namespace(
        max_train_steps=None,
        num_train_epochs=3,
        train_batch_size=1,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        output_dir="out",
        checkpointing_steps=5,
        checkpoints_total_limit=None,
        validation_steps=None,
        validation_epochs=1,
    )
    assert LoopSettings.from_args(args, batches, num_processes=2).max_train_steps == 9  # 3 epochs of 3
    args.max_train_steps = 4
    settings = LoopSettings.from_args(args, batches, num_processes=2)
    assert (settings.max_train_steps, settings.num_epochs) == (4, 2)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_training_stops_before_a_non_finite_step(tmp_path, poison):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = get_peft_model(MLPConv(), peft_sara.SaRAConfig(threshold=0.05))
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    data = torch.utils.data.DataLoader(torch.randn(8, 3, 4, 4), batch_size=2)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, data, scheduler)
    training = peft_sara.attach(model, optimizer)
    calls = []

    def batch_loss(batch):
        calls.append(1)
        output = model(batch).pow(2).mean()
        if len(calls) == 3:  # the third step goes wrong
            if poison == "loss":
                return output * float("nan")
            total = model(batch).sum()
            return output + torch.sqrt(total - total.detach())  # adds 0 to the loss, an infinite gradient
        return output

    settings = LoopSettings(10, 4, 2, 1, 1.0, str(tmp_path), 100, None, None, 100)
    with pytest.raises(UserInputError, match=f"diverged at step 3: the {poison}"):
        train(
            accelerator,
            {"model": model},
            params,
            optimizer,
            scheduler,
            data,
            batch_loss,
            lambda step: None,
            training,
            settings,
        )
    assert training.step == 2  # the bad step never reached the optimizer
    assert all(torch.isfinite(param).all() for param in params)


def test_a_resumed_run_trains_at_its_own_learning_rate(tmp_path):
    from peft_sara.script_utils.checkpoints import save_checkpoint

    def run(learning_rate: float):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        data = torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=2)
        return accelerator, *accelerator.prepare(model, optimizer, data, scheduler)

    accelerator, model, optimizer, data, scheduler = run(1e-2)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    checkpoint = save_checkpoint(accelerator, str(tmp_path), 2, total_limit=None, run_settings={})
    accelerator, model, optimizer, data, scheduler = run(1e-5)
    settings = LoopSettings(2, 4, 2, 1, 1.0, str(tmp_path), 100, None, None, 100)
    train(
        accelerator,
        {"model": model},
        list(model.parameters()),
        optimizer,
        scheduler,
        data,
        lambda batch: model(batch).mean(),
        lambda step: None,
        peft_sara_free_training(),
        settings,
        checkpoint,
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 / 3)  # step 2 of the schedule, at 1e-5


def peft_sara_free_training():
    """The loop reads only `rank_loss` of SaRA's training state."""
    return argparse.Namespace(rank_loss=0.0)
