"""peft_sara.script_utils.setup: the Accelerator, the optimizer and its schedule around a run's adapters."""

from __future__ import annotations

import argparse

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import tiny_unet

import peft_sara
from peft_sara.script_utils.setup import make_accelerator, prepare_optimization


@pytest.fixture
def accelerator(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return make_accelerator(str(tmp_path), "logs", 2, "no", "none", seed=3)


def optimizer_flags(**changes) -> argparse.Namespace:
    flags = dict(
        scale_lr=False,
        gradient_accumulation_steps=2,
        train_batch_size=4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=1e-2,
        adam_epsilon=1e-8,
        use_8bit_adam=False,
        lr_scheduler="linear",
        lr_warmup_steps=0,
        lr_num_cycles=1,
        lr_power=1.0,
        text_encoder_lr=None,
    )
    return argparse.Namespace(**{**flags, **changes})


def test_accelerator_settings(accelerator):
    assert accelerator.gradient_accumulation_steps == 2 and accelerator.mixed_precision == "no"
    assert accelerator.project_configuration.logging_dir.endswith("logs")


@pytest.mark.parametrize("scale_lr, expected_lr", [(False, 1e-4), (True, 1e-4 * 2 * 4)])
def test_optimizer_holds_the_sara_values_only(accelerator, scale_lr, expected_lr):
    unet = tiny_unet()
    unet.requires_grad_(False)
    unet.add_adapter(peft_sara.SaRAConfig(threshold=0.02))
    data = torch.utils.data.DataLoader(list(range(4)), batch_size=1)
    models, params, optimizer, _, scheduler = prepare_optimization(
        accelerator, {"unet": unet}, data, 1e-4, optimizer_flags(scale_lr=scale_lr), max_train_steps=10
    )
    sara = [param for name, param in unet.named_parameters() if "sara_values" in name]
    assert list(models) == ["unet"] and [id(p) for p in params] == [id(p) for p in sara]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)
    assert scheduler.scheduler.lr_lambdas[0](10) == 0.0  # the linear schedule ends at the run's last step


def test_gradient_checkpointing_reaches_every_trained_text_encoder():
    from conftest import tiny_clip_text_model

    from peft_sara.script_utils.setup import enable_memory_savings

    unet, encoders = tiny_unet(), [tiny_clip_text_model(), tiny_clip_text_model()]
    enable_memory_savings(unet, encoders, gradient_checkpointing=True, xformers=False, train_text_encoder=True)
    assert unet.is_gradient_checkpointing and all(encoder.is_gradient_checkpointing for encoder in encoders)
    single = tiny_clip_text_model()
    enable_memory_savings(tiny_unet(), single, gradient_checkpointing=True, xformers=False, train_text_encoder=False)
    assert not single.is_gradient_checkpointing, "a frozen text encoder is not checkpointed"


def test_text_encoder_lr_gives_the_text_encoders_values_their_own_rate(accelerator):
    from conftest import tiny_clip_text_model

    from peft_sara.script_utils.models import add_sara_adapter

    unet, text_encoder = tiny_unet(), tiny_clip_text_model()
    for model in (unet, text_encoder):
        model.requires_grad_(False)
        add_sara_adapter(model, peft_sara.SaRAConfig(threshold=0.02), "model")
    data = torch.utils.data.DataLoader(list(range(4)), batch_size=1)
    flags = optimizer_flags(text_encoder_lr=1e-5, scale_lr=True)
    _, params, optimizer, _, _ = prepare_optimization(
        accelerator, {"unet": unet, "text_encoder": text_encoder}, data, 1e-4, flags, max_train_steps=10
    )
    unet_group, text_group = optimizer.param_groups
    assert unet_group["lr"] == pytest.approx(1e-4 * 8) and text_group["lr"] == pytest.approx(1e-5 * 8)
    assert {id(p) for p in text_group["params"]} == {id(p) for p in text_encoder.parameters() if p.requires_grad}
    assert len(params) == len(unet_group["params"]) + len(text_group["params"])
    assert peft_sara.attach([unet, text_encoder], optimizer) is not None, "SaRA trains with the two groups"


def deepspeed_accelerator(**config):
    """An accelerator as accelerate's DeepSpeed plugin leaves it: its DeepSpeed config on the state's plugin."""
    plugin = argparse.Namespace(deepspeed_config={"zero_optimization": {"stage": 2}, **config})
    return argparse.Namespace(state=argparse.Namespace(deepspeed_plugin=plugin))


def test_deepspeed_runs_train_the_denoiser_alone_clipped_as_deepspeed_clips():
    from peft_sara.script_utils.cli import UserInputError
    from peft_sara.script_utils.setup import check_deepspeed_run

    check_deepspeed_run(deepspeed_accelerator(gradient_clipping="auto"), False, 1.0, None)  # "auto" is 1.0
    check_deepspeed_run(deepspeed_accelerator(gradient_clipping=0.5), False, 0.5, None)
    no_deepspeed = argparse.Namespace(state=argparse.Namespace(deepspeed_plugin=None))
    check_deepspeed_run(no_deepspeed, True, 3.0, "float8_e4m3fn")  # DDP runs are not this check's business
    cases = [
        ((deepspeed_accelerator(), True, 1.0, None), "train the denoiser alone"),
        ((deepspeed_accelerator(), False, 1.0, "float8_e4m3fn"), "--layerwise_casting is not supported"),
        ((deepspeed_accelerator(gradient_clipping=1.0), False, 0.5, None), "clips gradients at 1.0"),
    ]
    for arguments, message in cases:
        with pytest.raises(UserInputError, match=message):
            check_deepspeed_run(*arguments)


def test_a_deepspeed_config_file_missing_from_where_the_run_starts_is_one_line(tmp_path, monkeypatch):
    """accelerate reads the launch's deepspeed_config_file when the Accelerator is made, relative to where the run
    starts: configs/accelerate/deepspeed_zero3.yaml names configs/deepspeed/zero3.json."""
    from peft_sara.script_utils.cli import UserInputError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/zero3.json")
    with pytest.raises(UserInputError, match="configs/deepspeed/zero3.json does not exist from .*absolute path"):
        make_accelerator(str(tmp_path), "logs", 1, "no", "none", seed=0)
