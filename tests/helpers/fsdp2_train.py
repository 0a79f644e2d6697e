"""Worker for test_sharding: a tiny SaRA UNet trained with attach() (regulariser, progressive step, clipping), either
plainly in one process or under FSDP2 (`fully_shard` on every block and the root) in each of two gloo processes,
which all see the same batches, so that their averaged gradients are the plain run's."""

import os
import sys

import torch
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_unet, unet_inputs  # noqa: E402

from peft_sara import SaRAConfig, attach  # noqa: E402
from peft_sara.sharding import full_tensor  # noqa: E402


def sara_model():
    """The tiny SaRA UNet (regulariser on, progressive step after 2 steps), the same in every process."""
    torch.manual_seed(0)
    config = SaRAConfig(threshold=0.02, init_weights=False, rank_min_dim=8, lambda_rank=0.2, progressive_step=2)
    return get_peft_model(tiny_unet(), config)


def sara_training(sharded: bool):
    """The tiny SaRA UNet, sharded or not, its AdamW and attach."""
    model = sara_model()
    unet = model.base_model.model
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return model, optimizer, attach(model, optimizer)


def train(output_dir: str, sharded: bool) -> dict:
    model, optimizer, training = sara_training(sharded)
    unet = model.base_model.model
    losses = []
    for step in range(4):
        loss = model(**unet_inputs(unet, seed=step)).sample.square().mean()
        loss.backward()
        frozen = training.state_dict()["frozen_positions"]
        frozen_gradient = max(
            (
                full_tensor(u.values.grad)[frozen[u.key]].abs().max().item()
                for u in training.updates
                if u.key in frozen
            ),
            default=0.0,
        )
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())
    main_process = not sharded or torch.distributed.get_rank() == 0
    model.save_pretrained(output_dir, is_main_process=main_process)  # every process gathers, the first writes
    report = {
        "losses": losses,
        "frozen_fraction": training.frozen_fraction,
        "frozen_gradient": frozen_gradient,  # at the last step, after backward
        "training": training.state_dict(),
    }
    if main_process:
        torch.save(report, os.path.join(output_dir, "report.pt"))
    return report


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    train(sys.argv[1], sharded=True)
    torch.distributed.destroy_process_group()
