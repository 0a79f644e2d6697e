"""peft_sara.script_utils.models: the SaRA configurations of a run, the run's dtype, the frozen base."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_unet
from test_checkpoints import SETTINGS

from peft_sara.script_utils.models import freeze, make_optimizer, sara_configs, weight_dtype_of


def test_configs_take_the_resolved_threshold_of_a_resumed_run():
    unet, text_encoder = sara_configs({**SETTINGS, "threshold": None, "target_fraction": 0.1})
    assert (unet.threshold, unet.target_fraction, unet.progressive_step) == (2e-3, 0.1, 2)
    assert text_encoder.target_fraction is None
    resumed = {**SETTINGS, "threshold": None, "target_fraction": 0.1, "unet_threshold": 0.0123}
    unet, text_encoder = sara_configs(resumed)
    assert (unet.threshold, unet.target_fraction, text_encoder.threshold) == (0.0123, None, 2e-3)  # as at the start
    _, text_encoder = sara_configs({**SETTINGS, "text_encoder_threshold": 0.5, "seed": 7})
    assert (text_encoder.threshold, text_encoder.rank_seed) == (0.5, 7)


def test_weight_dtype_follows_mixed_precision():
    assert [weight_dtype_of(name) for name in ("no", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]


def test_freeze_casts_without_warnings_and_trains_nothing():
    unet = tiny_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze([unet], torch.device("cpu"), torch.float32)
    assert not any(param.requires_grad for param in unet.parameters())
    freeze([unet], torch.device("cpu"), torch.bfloat16)
    assert unet.dtype == torch.bfloat16


def test_optimizer_is_adamw_with_the_given_settings():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer([param], 1e-3, (0.8, 0.9), 0.01, 1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6


def test_sdxl_base_loads_two_text_encoders_and_keeps_the_vae_in_fp32(tiny_sdxl_pipeline_dir, tmp_path):
    import pytest
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from peft_sara.script_utils.cli import UserInputError
    from peft_sara.script_utils.models import load_sdxl_base_models

    tokenizers, text_encoders, vae, unet, _ = load_sdxl_base_models(
        str(tiny_sdxl_pipeline_dir), None, None, None, torch.bfloat16, vae_path=str(tiny_sdxl_pipeline_dir / "vae")
    )
    assert len(tokenizers) == 2 and [type(encoder) for encoder in text_encoders] == [
        CLIPTextModel,
        CLIPTextModelWithProjection,
    ]
    assert {text_encoders[0].dtype, text_encoders[1].dtype, unet.dtype} == {torch.bfloat16}
    assert vae.dtype == torch.float32, "SDXL's VAE overflows in half precision"
    with pytest.raises(UserInputError, match="Could not load the VAE"):
        load_sdxl_base_models(str(tiny_sdxl_pipeline_dir), None, None, None, vae_path=str(tmp_path / "none"))


def test_a_text_encoder_takes_the_adapter_whatever_peft_transformers_asks_for(monkeypatch):
    """transformers' own add_adapter refuses any peft older than its MIN_PEFT_VERSION (5.24: a 0.22 not yet released);
    the scripts add SaRA to a text encoder through PEFT's API instead, and diffusers' adapter functions see it."""
    import transformers.integrations.peft as transformers_peft
    from conftest import tiny_clip_text_model
    from diffusers.utils.peft_utils import set_adapter_layers

    from peft_sara import SaRAConfig, SaRALayer
    from peft_sara.script_utils.models import add_sara_adapter

    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0")
    text_encoder = tiny_clip_text_model()
    with pytest.raises(ValueError, match="99.0"):
        text_encoder.add_adapter(SaRAConfig(threshold=0.02))
    add_sara_adapter(text_encoder, SaRAConfig(threshold=0.02, init_weights=False), "text encoder")
    layers = [module for module in text_encoder.modules() if isinstance(module, SaRALayer)]
    assert layers and text_encoder._hf_peft_config_loaded and "default" in text_encoder.peft_config
    ids = torch.tensor([[1, 2, 3]])
    adapted = text_encoder(ids).last_hidden_state
    set_adapter_layers(text_encoder, enabled=False)
    assert not torch.allclose(adapted, text_encoder(ids).last_hidden_state)
