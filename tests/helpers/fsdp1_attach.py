"""Worker for test_fsdp1: a tiny SaRA UNet under FSDP1 (`FullyShardedDataParallel`, use_orig_params) with every
SaRA layer a unit of its own, in a one-process gloo group; prints what attach says of it.

    fsdp1_attach.py PORT
"""

import os
import sys

import torch
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_unet  # noqa: E402

from peft_sara import SaRAConfig, SaRALayer, attach  # noqa: E402


def main(port: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02))
    wrapped = FullyShardedDataParallel(
        model,
        use_orig_params=True,
        auto_wrap_policy=lambda module, recurse, nonwrapped_numel: recurse or isinstance(module, SaRALayer),
        device_id=torch.device("cpu"),
    )
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    try:
        attach(wrapped, optimizer)
        print("accepted")
    except ValueError as error:
        print(f"refused: {error}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
