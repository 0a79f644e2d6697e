"""Flux in the original (BFL) layout: the fused layers hold their diffusers parts' updates in ComfyUI's order, and a
kohya-format export of a Flux transformer loads through diffusers' own converter to the adapter's outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flux_pipeline

import peft_sara
from peft_sara.flux_layout import bfl_name, fuse_to_bfl_layout
from peft_sara.model import read_saved_updates


def dense(update) -> torch.Tensor:
    matrix = torch.zeros(update.shape).view(-1)
    matrix[update.positions.long()] = update.values.float()
    return matrix.view(update.shape)


def sparse_updates(transformer, threshold: float = 0.05):
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(peft_sara.SaRAConfig(threshold=threshold, init_weights=False))
    return read_saved_updates(get_peft_model_state_dict(transformer))[0]


def test_fused_layers_stack_their_parts_in_comfyui_s_order():
    updates = [u for u in sparse_updates(tiny_flux_pipeline().transformer) if u.tensor_name == "weight"]
    parts = {update.module_name: dense(update) for update in updates}
    fused = {update.module_name: dense(update) for update in fuse_to_bfl_layout(updates)}
    double, single = "transformer_blocks.0.attn", "single_transformer_blocks.0"
    torch.testing.assert_close(
        fused["double_blocks.0.img_attn.qkv"], torch.cat([parts[f"{double}.to_{p}"] for p in "qkv"])
    )
    torch.testing.assert_close(
        fused["double_blocks.0.txt_attn.qkv"], torch.cat([parts[f"{double}.add_{p}_proj"] for p in "qkv"])
    )
    linear1 = [parts[f"{single}.attn.to_{p}"] for p in "qkv"] + [parts[f"{single}.proj_mlp"]]
    torch.testing.assert_close(fused["single_blocks.0.linear1"], torch.cat(linear1))
    shift, scale = parts["norm_out.linear"].chunk(2)
    torch.testing.assert_close(fused["final_layer.adaLN_modulation.1"], torch.cat([scale, shift]))
    torch.testing.assert_close(fused["double_blocks.0.img_mod.lin"], parts["transformer_blocks.0.norm1.linear"])
    assert len(fused) == len(parts) - 2 * 2 - 3, "two qkv triples and one linear1 quadruple fused"
    # a part without an update leaves zero rows of its own size in the fused layer
    without_k = [u for u in updates if u.module_name != f"{double}.to_k"]
    qkv = next(u for u in fuse_to_bfl_layout(without_k) if u.module_name == "double_blocks.0.img_attn.qkv")
    rows = parts[f"{double}.to_q"].shape[0]
    assert dense(qkv)[rows : 2 * rows].abs().sum() == 0 and qkv.shape == (3 * rows, rows)
    with pytest.raises(ValueError, match="no counterpart in the original"):
        bfl_name("transformer_blocks.0.attn.extra_proj")


@pytest.mark.slow
def test_a_kohya_export_of_flux_at_its_published_width_loads_through_diffusers_converter(tmp_path):
    """diffusers' converter of kohya's Flux LoRAs splits the fused layers at Flux.1's own widths (3072, 12288), so
    this runs one double and one single block at them (about 2.2 GB, two minutes): every layer it loads reproduces
    the SaRA update, and the layers it drops are those the export names."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from benchmarks.transformer_memory import CONFIGS
    from peft_sara.script_utils.output import save_adapters

    config = dict(CONFIGS["flux"], num_layers=1, num_single_layers=1)
    torch.manual_seed(0)
    adapted = FluxTransformer2DModel(**config)
    loaded = FluxTransformer2DModel(**config)
    loaded.load_state_dict(adapted.state_dict())
    adapted.add_adapter(peft_sara.SaRAConfig(threshold=1e-3))
    updates = {}
    with torch.no_grad():  # updates of rank <= 4 (their first rows only): a quick exact export
        for name, module in adapted.named_modules():
            if isinstance(module, peft_sara.SaRALayer):
                weight, positions = module.get_base_layer().weight, module.sara_indices["default"].long()
                values = module.sara_values["default"]
                values.copy_(torch.randn_like(values) * 0.05 * (positions // weight.shape[1] < 4))
                updates[name] = torch.zeros(weight.numel()).index_put_((positions,), values).view(weight.shape)
    save_adapters(str(tmp_path / "run"), {"transformer": adapted})
    export = peft_sara.export_lora(tmp_path / "run", tmp_path / "lora", rank=1.0, format="kohya")
    components = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    FluxPipeline(transformer=loaded, **components).load_lora_weights(str(export.path))  # as a user loads it
    with_lora = {}
    for name, module in loaded.named_modules():
        if "default_0" in getattr(module, "lora_A", {}):
            lora_a, lora_b = module.lora_A["default_0"].weight, module.lora_B["default_0"].weight
            with_lora[name] = (lora_b @ lora_a) * module.scaling["default_0"]
    assert len(with_lora) == 20, "every Linear of the double and single block"
    for name, update in with_lora.items():
        torch.testing.assert_close(update, updates[name], atol=1e-7, rtol=1e-5, msg=name)
    dropped = {bfl_name(name)[0] for name in set(updates) - set(with_lora)}
    assert {layer.removeprefix("transformer.") for layer in export.unloaded_by["diffusers"]} == dropped


def test_a_kohya_export_names_the_original_layers_and_holds_their_fused_updates(tmp_path):
    from safetensors.torch import load_file

    from peft_sara.script_utils.output import save_adapters

    pipeline = tiny_flux_pipeline()
    updates = [u for u in sparse_updates(pipeline.transformer) if u.tensor_name == "weight"]
    save_adapters(str(tmp_path / "run"), {"transformer": pipeline.transformer})
    export = peft_sara.export_lora(tmp_path / "run", tmp_path / "lora", rank=1.0, format="kohya")
    tensors = load_file(export.path)
    fused = {update.module_name: dense(update) for update in fuse_to_bfl_layout(updates)}
    assert {key.split(".")[0] for key in tensors} == {f"lora_unet_{name.replace('.', '_')}" for name in fused}
    for name, expected in fused.items():
        key = f"lora_unet_{name.replace('.', '_')}"
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        scale = float(tensors[f"{key}.alpha"]) / down.shape[0]  # as the loaders scale it
        torch.testing.assert_close(up @ down * scale, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert export.unloaded_by["ComfyUI"] == []
    assert sorted(export.unloaded_by["kohya sd-scripts"]) == sorted(
        f"transformer.{name}" for name in fused if not name.startswith(("double_blocks.", "single_blocks."))
    )
