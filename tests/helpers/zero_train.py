"""Worker for test_zero: the tiny SaRA UNet of fsdp2_train (regulariser, progressive step, clipping) trained with
attach() under DeepSpeed ZeRO (stage 1, 2 or 3) in each of two gloo processes on CPU, which all see the same batches,
so that their averaged gradients are the plain run's.

    zero_train.py OUTPUT STAGE GROUPS [PHASE] [PRECISION]

PHASE `all` (default) trains 4 steps and saves the adapter; `first` trains 2 and saves a DeepSpeed checkpoint with
attach's state in its client state; `rest` resumes from that checkpoint, trains steps 3 and 4 and saves the adapter.
PRECISION `bf16` has DeepSpeed cast the model to bf16 (its values too; it steps fp32 copies of them).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import unet_inputs  # noqa: E402
from fsdp2_train import sara_model  # noqa: E402

from peft_sara import attach  # noqa: E402
from peft_sara.sharding import forward_needs_every_process, reading_needs_every_process  # noqa: E402
from peft_sara.zero import whole_shape  # noqa: E402

STEPS = 4
# ZeRO-3 partitions every parameter, also the tiny model's (by default those under 1e5 entries stay whole)
STAGE3 = {"stage3_param_persistence_threshold": 0}


def train(output_dir: str, stage: int, groups: int, phase: str = "all", precision: str = "fp32") -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model = sara_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # two parameter groups (as --text_encoder_lr makes): ZeRO steps the optimizer once per group
    param_groups = [{"params": trainable}]
    if groups == 2:
        param_groups = [{"params": trainable[::2]}, {"params": trainable[1::2]}]
    optimizer = torch.optim.AdamW(param_groups, lr=0.05)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, **(STAGE3 if stage == 3 else {})},
        "steps_per_print": 1_000_000,
        "bf16": {"enabled": precision == "bf16"},
    }
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    training = attach(engine, zero)
    checkpoint = os.path.join(output_dir, "checkpoint")
    steps = range(STEPS)
    if phase == "first":
        steps = range(STEPS // 2)
    elif phase == "rest":
        _, client_state = engine.load_checkpoint(checkpoint)
        training.load_state_dict(client_state["sara"])
        steps = range(STEPS // 2, STEPS)
    unet = model.base_model.model
    losses = []
    for step in steps:
        inputs = unet_inputs(unet, seed=step)
        if precision == "bf16":
            inputs = {key: value.bfloat16() if value.is_floating_point() else value for key, value in inputs.items()}
        loss = engine(**inputs).sample.float().square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().item())
    if phase == "first":
        engine.save_checkpoint(checkpoint, client_state={"sara": training.state_dict()})
        return
    main_process = torch.distributed.get_rank() == 0
    model.save_pretrained(output_dir, is_main_process=main_process)
    # ZeRO's fp32 copies of the values (a collective: every process reads them) and, where whole, the model's own
    values = {name: param for name, param in model.named_parameters() if param.requires_grad}
    fp32_copies = {name: safe_get_full_fp32_param(param).cpu() for name, param in values.items()}
    model_values = {name: param.detach().float().cpu() for name, param in values.items() if stage < 3}
    if main_process:
        # between steps ZeRO-3 holds no parameter whole (in this process: none of its entries)
        held_whole = [p.numel() == whole_shape(p).numel() for p in model.parameters()]
        report = {
            "losses": losses,
            "frozen_fraction": training.frozen_fraction,
            "training": training.state_dict(),
            "held_whole": sum(held_whole) / len(held_whole),
            "reading_needs_every_process": reading_needs_every_process(model),
            "forward_needs_every_process": forward_needs_every_process(model),
            "fp32_copies": fp32_copies,
            "model_values": model_values,
        }
        torch.save(report, os.path.join(output_dir, "report.pt"))


if __name__ == "__main__":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    phase, precision = (sys.argv[4:] + ["all", "fp32"][len(sys.argv[4:]) :])[:2]
    train(sys.argv[1], stage=int(sys.argv[2]), groups=int(sys.argv[3]), phase=phase, precision=precision)
