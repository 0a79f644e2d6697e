"""Worker for test_fsdp1: the tiny SaRA UNet of fsdp2_train (regulariser, progressive step after 2 steps, clipping)
trained with attach() under FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`, a unit per down/mid/up block
and the root) in each of two gloo processes, which all see the same batches, so that their averaged gradients are the
plain run's.

    fsdp1_train.py MODE DIR

MODE `all` trains 4 steps; `straight` does the same and saves a checkpoint after 2 (model and optimizer through
torch.distributed.checkpoint, attach's state with torch.save); `resume` starts from that checkpoint and trains the
last 2. Each writes the adapter (from the full state dict, gathered on every process; the first writes) and, on
the first process, a report.
"""

import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import unet_inputs  # noqa: E402
from helpers.fsdp2_resume import CHECKPOINT_AFTER, STEPS, load_checkpoint, save_checkpoint  # noqa: E402
from helpers.fsdp2_train import sara_model  # noqa: E402

from peft_sara import attach  # noqa: E402


def wrap_blocks(model):
    """FSDP1 with a unit per down, mid and up block of the UNet and one at the root for the rest."""
    unet = model.base_model.model
    blocks = {*unet.down_blocks, unet.mid_block, *unet.up_blocks}
    return FullyShardedDataParallel(
        model,
        use_orig_params=True,
        auto_wrap_policy=lambda module, recurse, nonwrapped_numel: recurse or module in blocks,
        device_id=torch.device("cpu"),
    )


def main(mode: str, output_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    model = sara_model()
    wrapped = wrap_blocks(model)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
    training = attach(wrapped, optimizer)
    checkpoint = os.path.join(output_dir, "checkpoint")
    first_step, losses, frozen_gradient = 0, [], 0.0
    if mode == "resume":
        load_checkpoint(wrapped, optimizer, training, checkpoint)
        first_step = CHECKPOINT_AFTER
    for step in range(first_step, STEPS):
        loss = wrapped(**unet_inputs(model.base_model.model, seed=step)).sample.square().mean()
        loss.backward()
        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True, writeback=False):
            frozen = training.state_dict()["frozen_positions"]
            gradients = [u.values.grad[frozen[u.key]] for u in training.updates if u.key in frozen]
            frozen_gradient = max((gradient.abs().max().item() for gradient in gradients), default=0.0)
        wrapped.clip_grad_norm_(1.0)  # FSDP1's own: the norm of the whole gradient, from every process's part
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())
        if mode == "straight" and step + 1 == CHECKPOINT_AFTER:
            save_checkpoint(wrapped, optimizer, training, checkpoint)
    main_process = torch.distributed.get_rank() == 0
    # the whole model's state, gathered on every process (README: FSDP1); the adapter is its SaRA part
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    model.save_pretrained(os.path.join(output_dir, mode), state_dict=state, is_main_process=main_process)
    try:  # the model's own state dict holds each process's part of the values
        model.save_pretrained(os.path.join(output_dir, "parts"), is_main_process=False)
        parts_refusal = None
    except ValueError as error:
        parts_refusal = str(error)
    if main_process:
        report = {
            "losses": losses,
            "frozen_fraction": training.frozen_fraction,
            "frozen_gradient": frozen_gradient,  # at the last step, after backward
            "training": training.state_dict(),
            "parts_refusal": parts_refusal,
        }
        torch.save(report, os.path.join(output_dir, mode, "report.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
