"""Worker for test_training's two-process run: a few DDP steps of a tiny SaRA UNet with attach()."""

import os
import sys

import torch
from accelerate import Accelerator
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_unet, unet_inputs  # noqa: E402

from peft_sara import SaRAConfig, attach  # noqa: E402


def main(output_dir: str) -> None:
    accelerator = Accelerator()
    model = get_peft_model(
        tiny_unet(), SaRAConfig(threshold=0.02, rank_min_dim=8, lambda_rank=0.2, progressive_step=2)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    training = attach(model, optimizer)
    rank_layers, first_batch = [], None
    for step in range(4):
        inputs = unet_inputs(accelerator.unwrap_model(model), seed=100 * accelerator.process_index + step)
        first_batch = inputs["sample"] if first_batch is None else first_batch
        accelerator.backward(model(**inputs).sample.square().mean())
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        rank_layers.append(training.last_rank_layers)
    values = {n: p.detach().cpu() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    torch.save(
        {
            "num_processes": accelerator.num_processes,
            "rank_layers": rank_layers,
            "frozen_fraction": training.frozen_fraction,
            "values": values,
            "first_batch": first_batch,
        },
        os.path.join(output_dir, f"rank{accelerator.process_index}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
