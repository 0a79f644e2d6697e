"""load_sara_weights: SaRA adapters into a diffusers pipeline in one call, from a folder or a Hub repo id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fake_hub_repo, tiny_pipeline
from peft import LoraConfig, get_peft_model

from peft_sara import SaRAConfig, SaRALayer, load_sara_weights


def generate(pipeline) -> np.ndarray:
    return pipeline(
        "a photo of a dog",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory):
    """A training script's output folder (unet/ and text_encoder/ adapters) and the adapted pipeline's images."""
    output_dir = tmp_path_factory.mktemp("sara-output")
    pipeline = tiny_pipeline()
    torch.manual_seed(0)
    unet = get_peft_model(pipeline.unet, SaRAConfig(threshold=0.02, init_weights=False))
    text_encoder = get_peft_model(pipeline.text_encoder, SaRAConfig(target_fraction=0.05, init_weights=False))
    unet.save_pretrained(output_dir / "unet")
    text_encoder.save_pretrained(output_dir / "text_encoder")
    pipeline.unet, pipeline.text_encoder = unet.base_model.model, text_encoder.base_model.model
    return output_dir, generate(pipeline)


def test_loads_unet_and_text_encoder_from_an_output_folder(trained_output):
    output_dir, expected = trained_output
    pipeline = tiny_pipeline()
    base_images = generate(pipeline)
    assert load_sara_weights(pipeline, str(output_dir)) == ["unet", "text_encoder"]
    assert any(isinstance(m, SaRALayer) for m in pipeline.text_encoder.modules())
    assert not any(p.requires_grad for p in pipeline.unet.parameters())
    np.testing.assert_array_equal(generate(pipeline), expected)
    pipeline.unet.disable_adapters()
    pipeline.text_encoder.disable_adapters()
    np.testing.assert_array_equal(generate(pipeline), base_images)


def test_a_single_adapter_folder_goes_to_the_denoiser(trained_output):
    output_dir, _ = trained_output
    pipeline = tiny_pipeline()
    assert load_sara_weights(pipeline, str(output_dir / "unet"), adapter_name="style") == ["unet"]
    assert "style" in pipeline.unet.peft_config
    with pytest.raises(ValueError, match="already has an adapter named 'style'"):
        load_sara_weights(pipeline, str(output_dir / "unet"), adapter_name="style")


def test_loads_from_a_hub_repo_id(trained_output, tmp_path, monkeypatch):
    output_dir, expected = trained_output
    fake_hub_repo(monkeypatch, tmp_path / "hub", "someone/sks-dog-sara", output_dir)
    pipeline = tiny_pipeline()
    assert load_sara_weights(pipeline, "someone/sks-dog-sara") == ["unet", "text_encoder"]
    np.testing.assert_array_equal(generate(pipeline), expected)


def test_bad_sources_get_one_clear_error(trained_output, tmp_path):
    output_dir, _ = trained_output
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match="No adapter folder at"):
        load_sara_weights(pipeline, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Found no adapter"):
        load_sara_weights(pipeline, str(tmp_path))
    lora = get_peft_model(tiny_pipeline().unet, LoraConfig(target_modules=["to_q"], r=2))
    lora.save_pretrained(tmp_path / "lora" / "unet")
    with pytest.raises(ValueError, match="is a LORA adapter, not SaRA.*load_lora_weights"):
        load_sara_weights(pipeline, str(tmp_path / "lora"))
    damaged = tmp_path / "damaged"
    (damaged / "unet").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (damaged / "unet" / name).write_bytes((output_dir / "unet" / name).read_bytes())
    (damaged / "unet" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="Could not read the adapter weights for unet"):
        load_sara_weights(pipeline, str(damaged))
    assert not any(isinstance(m, SaRALayer) for m in pipeline.unet.modules())


def test_an_adapter_for_another_base_is_refused_and_leaves_the_pipeline_as_it_was(trained_output):
    from conftest import tiny_unet

    output_dir, _ = trained_output
    pipeline = tiny_pipeline()
    pipeline.unet = tiny_unet(sdxl_style=True)  # same module names in places, other shapes
    pipeline.text_encoder = None
    with pytest.raises(ValueError, match="does not fit"):
        load_sara_weights(pipeline, str(output_dir))
    assert "default" not in (getattr(pipeline.unet, "peft_config", None) or {})
    assert not any(p.requires_grad is False and "sara_" in n for n, p in pipeline.unet.named_parameters())
