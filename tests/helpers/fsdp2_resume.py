"""Worker for test_sharding: FSDP2 training stopped and resumed. `straight DIR` trains 4 steps, saving a checkpoint
after 2 (model and optimizer through torch.distributed.checkpoint, attach's state with torch.save); `resume DIR`
starts new processes from that checkpoint and trains the last 2 steps. Both write the final adapter."""

import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import unet_inputs  # noqa: E402
from helpers.fsdp2_train import sara_training  # noqa: E402

STEPS, CHECKPOINT_AFTER = 4, 2


def save_checkpoint(model, optimizer, training, folder: str) -> None:
    """Model and optimizer through torch.distributed.checkpoint (every process), attach's state with torch.save (the
    first process): what the README's FSDP2 and FSDP1 sections show."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    if torch.distributed.get_rank() == 0:
        torch.save(training.state_dict(), os.path.join(folder, "sara_training.pt"))


def load_checkpoint(model, optimizer, training, folder: str) -> None:
    """`save_checkpoint`'s folder into the freshly sharded model, its optimizer and attach's state."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    training.load_state_dict(torch.load(os.path.join(folder, "sara_training.pt")))


def main(mode: str, output_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    model, optimizer, training = sara_training(sharded=True)
    checkpoint = os.path.join(output_dir, "checkpoint")
    first_step = 0
    if mode == "resume":
        load_checkpoint(model, optimizer, training, checkpoint)
        first_step = CHECKPOINT_AFTER
    for step in range(first_step, STEPS):
        model(**unet_inputs(model.base_model.model, seed=step)).sample.square().mean().backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if mode == "straight" and step + 1 == CHECKPOINT_AFTER:
            save_checkpoint(model, optimizer, training, checkpoint)
    model.save_pretrained(os.path.join(output_dir, mode), is_main_process=torch.distributed.get_rank() == 0)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
