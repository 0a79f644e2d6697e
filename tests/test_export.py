"""export_lora: a SaRA adapter as a LoRA that diffusers' load_lora_weights (and kohya-format tools) load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import generate, tiny_clip_text_model, tiny_pipeline, tiny_unet, unet_inputs
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_sara import SaRAConfig, attach, export_lora


def visible_update(model, std: float = 0.05) -> None:
    """SaRA values that change the images clearly (as a trained adapter does; init_weights=False gives tiny ones)."""
    generator = torch.Generator().manual_seed(3)
    for name, parameter in model.named_parameters():
        if "sara_values" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory):
    """A training output folder (unet/, text_encoder/) whose UNet adapter went through two optimizer steps across a
    progressive step, and the SaRA pipeline's images."""
    output_dir = tmp_path_factory.mktemp("runs") / "sks-dog"
    pipeline = tiny_pipeline()
    torch.manual_seed(0)
    unet = get_peft_model(pipeline.unet, SaRAConfig(threshold=0.02, progressive_step=1, lambda_rank=0))
    text_encoder = get_peft_model(pipeline.text_encoder, SaRAConfig(target_fraction=0.05))
    visible_update(unet)
    visible_update(text_encoder)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    training = attach(unet, optimizer)
    for _ in range(2):
        unet(**unet_inputs(unet.base_model.model)).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert training.frozen_fraction > 0  # the progressive step froze part of the set: its values are exported too
    training.detach()
    unet.save_pretrained(output_dir / "unet")
    text_encoder.save_pretrained(output_dir / "text_encoder")
    pipeline.unet, pipeline.text_encoder = unet.base_model.model, text_encoder.base_model.model
    images = generate(pipeline)
    assert np.abs(images - generate(tiny_pipeline())).max() > 0.05  # the adapter changes the images
    return output_dir, images


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_full_rank_export_loads_into_diffusers_and_draws_the_sara_images(trained_output, tmp_path, format):
    output_dir, expected = trained_output
    result = export_lora(output_dir, tmp_path / "lora", rank=1.0, format=format)
    assert result.path == tmp_path / "lora" / (
        "pytorch_lora_weights.safetensors" if format == "diffusers" else "sks-dog.safetensors"
    )
    assert result.file_size == result.path.stat().st_size
    assert {layer.component for layer in result.layers} == {"unet", "text_encoder"}
    assert all(layer.rank == layer.full_rank for layer in result.layers)
    assert result.energy_retained == pytest.approx(1, abs=1e-6)
    assert not result.left_out
    pipeline = tiny_pipeline()
    if format == "diffusers":
        pipeline.load_lora_weights(str(tmp_path / "lora"))
    else:
        pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name=result.path.name)
    assert len(pipeline.get_list_adapters()) == 2  # unet and text encoder
    assert np.abs(generate(pipeline) - expected).max() < 2e-3


def test_kohya_keys_alphas_and_convolutions_in_the_locon_layout(trained_output, tmp_path):
    output_dir, _ = trained_output
    result = export_lora(output_dir, tmp_path, rank=8, format="kohya")
    tensors = load_file(result.path)
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for key in tensors)
    down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    assert down.shape == (8, 16, 3, 3) and up.shape == (16, 8, 1, 1)
    assert {float(tensors[key]) for key in tensors if key.endswith(".alpha")} == {8.0}  # one alpha: loaders agree
    with safe_open(str(result.path), framework="pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora"


def test_an_int_rank_keeps_the_top_singular_directions(trained_output, tmp_path):
    output_dir, _ = trained_output
    result = export_lora(output_dir, tmp_path, rank=4)
    assert max(layer.rank for layer in result.layers) == 4
    assert result.energy_retained < 0.9
    lora = load_file(result.path)
    layer = next(layer for layer in result.layers if layer.module.endswith("attn1.to_q"))
    update = _dense_update(output_dir / "unet", layer.module)
    singular = torch.linalg.svdvals(update.double())
    assert layer.energy_retained == pytest.approx(float((singular[:4] ** 2).sum() / (singular**2).sum()), rel=1e-6)
    product = lora[f"unet.{layer.module}.lora_B.weight"] @ lora[f"unet.{layer.module}.lora_A.weight"]
    assert float((update - product).square().sum()) == pytest.approx(layer.energy - layer.energy_kept, rel=1e-3)


def _dense_update(adapter_dir, module: str) -> torch.Tensor:
    """A layer's dense update, rebuilt through PEFT from the saved adapter (an independent decoding)."""
    unet = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02))
    unet.load_adapter(str(adapter_dir), adapter_name="saved")
    return unet.base_model.model.get_submodule(module).get_delta_weight("saved").float()


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_a_float_rank_keeps_at_least_that_share_of_each_layers_energy(trained_output, tmp_path, share):
    output_dir, _ = trained_output
    result = export_lora(output_dir, tmp_path, rank=share)
    assert all(layer.energy_retained >= share - 1e-9 for layer in result.layers)
    assert result.energy_retained >= share
    assert any(layer.rank < layer.full_rank for layer in result.layers)  # not everything was kept
    smaller = export_lora(output_dir, tmp_path / "smaller", rank=share / 2)
    assert smaller.file_size < result.file_size


def test_a_single_adapter_folder_and_the_summary(trained_output, tmp_path):
    output_dir, _ = trained_output
    result = export_lora(output_dir / "text_encoder", tmp_path, rank=2, format="kohya")
    assert result.path.name == "sks-dog.safetensors"  # named after the run, not after its component folder
    assert {layer.component for layer in result.layers} == {"text_encoder"}
    summary = str(result)
    assert "energy retained" in summary and f"{result.energy_retained:.4%}" in summary and "MiB" in summary


def test_new_token_embeddings_go_along(trained_output, tmp_path):
    output_dir, _ = trained_output
    run = tmp_path / "pivotal"
    for component in ("unet", "text_encoder"):
        (run / component).mkdir(parents=True)
        for file in (output_dir / component).iterdir():
            (run / component / file.name).write_bytes(file.read_bytes())
    embeddings = {"clip_l": torch.randn(2, 32), "t5": torch.randn(2, 16)}  # t5: --enable_t5_ti (Flux, SD3)
    save_file(embeddings, run / "pivotal_emb.safetensors")
    for format in ("diffusers", "kohya"):
        result = export_lora(run, tmp_path / format, rank=4, format=format)
        assert result.embeddings_path == tmp_path / format / "pivotal_emb.safetensors"
        assert result.num_new_tokens == 2
        copied = load_file(result.embeddings_path)
        assert copied.keys() == embeddings.keys()
        assert all(torch.equal(copied[key], embeddings[key]) for key in embeddings)
        assert "2 tokens" in str(result)
    save_file({"emb_params": torch.randn(2, 32)}, run / "pivotal_emb.safetensors")
    with pytest.raises(ValueError, match="not a new-token embeddings file"):
        export_lora(run, tmp_path / "bad", rank=4)


def test_sdxl_names_in_kohya_format_load_with_diffusers(tmp_path):
    """SDXL: the text encoders are lora_te1/lora_te2 and the added-conditioning MLP takes kohya's label_emb name."""
    from diffusers import StableDiffusionXLPipeline

    run = tmp_path / "sdxl-run"
    unet = get_peft_model(tiny_unet(sdxl_style=True), SaRAConfig(threshold=0.02))
    visible_update(unet, std=0.02)
    unet.save_pretrained(run / "unet")
    for component in ("text_encoder", "text_encoder_2"):
        encoder = get_peft_model(tiny_clip_text_model(), SaRAConfig(target_fraction=0.05))
        visible_update(encoder)
        encoder.save_pretrained(run / component)
    inputs = unet_inputs(unet.base_model.model)
    expected = unet(**inputs).sample

    result = export_lora(run, tmp_path / "lora", rank=1.0, format="kohya")
    keys = load_file(result.path).keys()
    assert "lora_unet_label_emb_0_0.lora_down.weight" in keys
    assert any(key.startswith("lora_te1_") for key in keys) and any(key.startswith("lora_te2_") for key in keys)
    base = tiny_unet(sdxl_style=True)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(result.path), unet_config=base.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, base)
    assert any(".text_encoder_2." in f".{key}" for key in state_dict)
    torch.testing.assert_close(base(**inputs).sample, expected, atol=1e-4, rtol=0)


def test_bias_updates_are_refused_or_left_out_by_name(tmp_path):
    unet = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02, include_bias=True, init_weights=False))
    unet.save_pretrained(tmp_path / "run" / "unet")
    with pytest.raises(ValueError, match=r"cannot express .* bias update.*allow_partial=True"):
        export_lora(tmp_path / "run", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()  # refused before anything is written
    result = export_lora(tmp_path / "run", tmp_path / "lora", rank=2, allow_partial=True)
    assert result.left_out and all("bias" in part for part in result.left_out)
    assert "left out" in str(result)


def test_bad_input_is_one_clear_error(trained_output, tmp_path):
    output_dir, _ = trained_output
    with pytest.raises(ValueError, match="No folder at"):
        export_lora(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="Found no adapter"):
        export_lora(tmp_path, tmp_path / "out")
    lora = get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"]))
    lora.save_pretrained(tmp_path / "lora-run" / "unet")
    with pytest.raises(ValueError, match="is a LORA adapter, not SaRA"):
        export_lora(tmp_path / "lora-run", tmp_path / "out")
    for rank in (0, -3, 1.5, 0.0, True, "16", float("nan")):
        with pytest.raises(ValueError, match="rank must be an integer >= 1 .* or a number in \\(0, 1\\]"):
            export_lora(output_dir, tmp_path / "out", rank=rank)
    with pytest.raises(ValueError, match="format must be one of diffusers, kohya"):
        export_lora(output_dir, tmp_path / "out", format="comfy")
    assert not (tmp_path / "out").exists()


def test_an_all_zero_adapter_has_nothing_to_export(tmp_path):
    get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02)).save_pretrained(tmp_path / "run" / "unet")
    with pytest.raises(ValueError, match="is zero: there is nothing to export"):
        export_lora(tmp_path / "run", tmp_path / "out")


def test_diffusers_metadata_sets_scale_one_for_every_rank(trained_output, tmp_path):
    output_dir, _ = trained_output
    result = export_lora(output_dir, tmp_path, rank=0.7)
    with safe_open(str(result.path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    ranks = {layer.module: layer.rank for layer in result.layers if layer.component == "unet"}
    assert metadata["unet.r"] == metadata["unet.lora_alpha"]
    assert metadata["unet.rank_pattern"] == metadata["unet.alpha_pattern"]
    assert all(metadata["unet.rank_pattern"].get(module, metadata["unet.r"]) == r for module, r in ranks.items())


def test_a_run_folder_missing_part_of_its_save_is_refused(tmp_path):
    import shutil

    from peft_sara.script_utils.output import save_adapters

    pipeline = tiny_pipeline()
    models = {
        "unet": get_peft_model(pipeline.unet, SaRAConfig(threshold=0.02, init_weights=False)),
        "text_encoder": get_peft_model(pipeline.text_encoder, SaRAConfig(target_fraction=0.05, init_weights=False)),
    }
    save_adapters(str(tmp_path / "run"), models)
    assert export_lora(tmp_path / "run", tmp_path / "lora", rank=2).layers
    shutil.rmtree(tmp_path / "run" / "text_encoder")
    with pytest.raises(ValueError, match=r"not one whole save \(text_encoder missing\)"):
        export_lora(tmp_path / "run", tmp_path / "lora-2", rank=2)
    assert export_lora(tmp_path / "run" / "unet", tmp_path / "lora-3", rank=2).layers  # one adapter folder, on purpose


def _decaying_spectrum_adapter(folder) -> torch.Tensor:
    """A 3x3 convolution's update whose singular values fall from 1 to 1e-6 (trained updates have long tails of small
    ones), as a SaRA adapter training every entry; returns the update."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(64, 96, 3))
    model = get_peft_model(base, SaRAConfig(threshold=10.0, target_modules=["0"]))
    u, _ = torch.linalg.qr(torch.randn(96, 64, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(576, 64, dtype=torch.float64))
    singular = torch.logspace(0, -6, 64, dtype=torch.float64)
    update = (u * singular) @ v.T
    model.base_model.model[0].sara_values["default"].data.copy_(update.reshape(-1).float())
    model.save_pretrained(folder)
    return model.base_model.model[0].sara_values["default"].detach().double().view(96, 576)


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_rank_one_reproduces_every_layer_to_float_rounding(tmp_path, format):
    update = _decaying_spectrum_adapter(tmp_path / "adapter")
    result = export_lora(tmp_path / "adapter", tmp_path / "lora", rank=1.0, format=format)
    (layer,) = result.layers
    assert layer.rank == layer.full_rank and layer.relative_error < 1e-6
    tensors = load_file(result.path)
    down = next(t for k, t in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))).double()
    up = next(t for k, t in tensors.items() if k.endswith(("lora_B.weight", "lora_up.weight"))).double()
    scale = float(next((t for k, t in tensors.items() if k.endswith(".alpha")), torch.tensor(layer.rank))) / layer.rank
    product = scale * up.reshape(96, -1) @ down.reshape(layer.rank, -1)
    assert float((product - update).norm() / update.norm()) < 1e-6
    assert "1 of 1 layers reproduced to a relative error below 1e-6" in str(result)


def test_rank_one_in_half_precision_names_the_layers_it_cannot_reproduce(tmp_path):
    _decaying_spectrum_adapter(tmp_path / "adapter")
    result = export_lora(tmp_path / "adapter", tmp_path / "lora", rank=1.0, dtype=torch.bfloat16)
    assert result.layers[0].relative_error > 1e-6
    assert "0 of 1 layers reproduced" in str(result) and "bfloat16 factors' rounding: unet.0" in str(result)


def test_the_kohya_format_of_an_sd3_transformer_is_refused_and_its_diffusers_format_kept(tmp_path):
    from conftest import tiny_sd3_transformer

    from peft_sara.script_utils.output import save_adapters

    transformer = tiny_sd3_transformer()
    transformer.add_adapter(SaRAConfig(threshold=0.05, init_weights=False))
    save_adapters(str(tmp_path / "run"), {"transformer": transformer})
    with pytest.raises(ValueError, match="kohya format of .* transformer is not written \\(only Flux's is\\)"):
        export_lora(tmp_path / "run", tmp_path / "kohya", format="kohya")
    export = export_lora(tmp_path / "run", tmp_path / "lora", rank=1.0)
    keys = load_file(export.path)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys, "module paths kept, no text_model"
