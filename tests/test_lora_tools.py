"""peft_sara/lora_tools.py against each tool's key matching, rewritten here from the tools' published source (not by
importing them) and run on the keys the export writes for every Linear/Conv2d layer of SD 1.5's and SDXL's UNets and
CLIP text encoders (built on the meta device).

Sources: ComfyUI comfy/lora.py (model_lora_keys_unet, model_lora_keys_clip) and comfy/utils.py (unet_to_diffusers);
AUTOMATIC1111 extensions-builtin/Lora/networks.py (convert_diffusers_name_to_compvis, load_network's fallbacks);
kohya-ss/sd-scripts networks/lora.py (LoRANetwork's target classes and names, create_network_from_weights).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from benchmarks.benchmark import unet_config
from peft_sara.export import _diffusers_name, _kohya_name
from peft_sara.lora_tools import TOOLS, summary_lines, unloaded_layers

CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
KOHYA_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _models(sdxl: bool) -> dict[str, nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**unet_config("sdxl" if sdxl else "sd15"))}
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072))
        if sdxl:
            config = CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20
            )
            models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return models


def _layers(models: dict[str, nn.Module]) -> list[tuple[str, str]]:
    return [
        (component, name)
        for component, model in models.items()
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, nn.Conv2d)
    ]


def _tools_path(component: str, module: str) -> str:
    """The module path in the tools' (transformers 4) naming, with CLIPTextModel's text_model level."""
    if component == "unet" or module.startswith(("text_model.", "text_projection")):
        return module
    return f"text_model.{module}"


def _comfyui_prefixes(models: dict[str, nn.Module]) -> set[str]:
    """model_lora_keys_unet and model_lora_keys_clip's key map, for SD 1.x and SDXL."""
    prefixes = set()
    for name, module in models["unet"].named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):  # unet_to_diffusers covers every one of them
            prefixes.add("lora_unet_" + name.replace(".", "_"))
            for prefix in ("", "unet."):
                key = prefix + name.replace(".to_", ".processor.to_")
                prefixes.add(key[:-2] if key.endswith(".to_out.0") else key)
    if "text_encoder_2" in models:  # lora_unet_<compvis name> of every diffusion_model weight; SDXL's label_emb here
        prefixes.update({"lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"})
    encoders = [("text_encoder", ("lora_te", "lora_te1"))]
    if "text_encoder_2" in models:
        encoders.append(("text_encoder_2", ("lora_te2",)))
    for component, kohya_prefixes in encoders:
        layers = models[component].config.num_hidden_layers
        for block in range(32):
            for path, kohya in CLIP_MAP.items():
                if block < layers:
                    prefixes.update(f"{p}_text_model_encoder_layers_{block}_{kohya}" for p in kohya_prefixes)
                    prefixes.add(f"{component}.text_model.encoder.layers.{block}.{path}")
    if "text_encoder_2" in models:
        prefixes.update({"lora_te2_text_projection", "lora_prior_te_text_projection"})  # text_encoder_2.: a TODO
    return prefixes


def _comfyui_loads(key: str, models) -> bool:
    return key.removesuffix(".lora_A.weight").removesuffix(".lora_down.weight") in _comfyui_prefixes(models)


def _a1111_compvis(name: str, up_block_types: tuple[str, ...]) -> str | None:
    """convert_diffusers_name_to_compvis for SD 1.x/SDXL, then the lookups load_network makes; None: not found."""
    conversions = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}",
        ),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_input_blocks_"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_middle_block_"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_output_blocks_"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: "diffusion_model_input_blocks_op"),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv",
        ),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"1_model_transformer_resblocks_{m[1]}"),
    ]
    for pattern, convert in conversions:
        match = re.fullmatch(pattern, name)
        if match:
            compvis = convert(match)
            upsampler = re.fullmatch(r"diffusion_model_output_blocks_(\d+)_(\d+)_conv", compvis)
            if upsampler is None:
                return compvis
            # the SGM/LDM UNet holds an upsampler at index 2 after an attention, else at index 1
            up_block = int(upsampler[1]) // 3
            with_attention = "CrossAttn" in up_block_types[up_block]
            if int(upsampler[2]) == (2 if with_attention else 1):
                return compvis
            break
    if name.startswith("lora_unet_label_emb_0_"):  # the fallback to compvis names: SDXL's label_emb exists
        return name.replace("lora_unet", "diffusion_model")
    if name.startswith("lora_te1_text_model"):
        return name.replace("lora_te1_text_model", "0_transformer_text_model")
    return None


def _a1111_loaded(keys: list[str], up_block_types: tuple[str, ...]) -> set[str]:
    names = {key.split(".", 1)[0]: key for key in keys}
    loaded = {key for name, key in names.items() if _a1111_compvis(name, up_block_types) is not None}
    # SDXL's second text encoder is open_clip's fused MultiheadAttention: patched only with all of q, k, v and out
    for name, key in names.items():
        attention = re.fullmatch(r"(lora_te2_text_model_encoder_layers_\d+_self_attn)_(q|k|v|out)_proj", name)
        if attention and not all(f"{attention[1]}_{p}_proj" in names for p in ("q", "k", "v", "out")):
            loaded.discard(key)
    return loaded


def _kohya_modules(models: dict[str, nn.Module], sdxl: bool) -> set[str]:
    """The names LoRANetwork gives its modules: Linear/Conv2d children of the target classes."""
    names = set()
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    for component, model in models.items():
        classes = KOHYA_UNET_CLASSES if component == "unet" else KOHYA_TEXT_CLASSES
        for name, module in model.named_modules():
            if type(module).__name__ in classes:
                for child_name, child in module.named_modules():
                    if type(child) in (nn.Linear, nn.Conv2d):
                        path = _tools_path(component, f"{name}.{child_name}")
                        names.add(f"{prefixes[component]}_{path.replace('.', '_')}")
    return names


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_each_tool_s_unloaded_layers_match_its_published_key_matching(sdxl, format):
    models = _models(sdxl)
    layers = _layers(models)
    keys = {
        layer: f"{_diffusers_name(*layer)}.lora_A.weight"
        if format == "diffusers"
        else f"{_kohya_name(*layer, sdxl)}.lora_down.weight"
        for layer in layers
    }
    comfyui_prefixes = _comfyui_prefixes(models)
    up_block_types = models["unet"].config.up_block_types
    a1111 = _a1111_loaded(list(keys.values()), up_block_types) if format == "kohya" else set()
    kohya_modules = _kohya_modules(models, sdxl)
    expected = {
        "diffusers": [],
        "ComfyUI": [
            layer
            for layer, key in keys.items()
            if key.removesuffix(".lora_A.weight").removesuffix(".lora_down.weight") not in comfyui_prefixes
        ],
        "AUTOMATIC1111": [layer for layer, key in keys.items() if key not in a1111],
        "kohya sd-scripts": [
            layer for layer, key in keys.items() if format != "kohya" or key.split(".", 1)[0] not in kohya_modules
        ],
    }
    unloaded = unloaded_layers(format, layers, sdxl)
    assert list(unloaded) == list(TOOLS)
    for tool in TOOLS:
        assert unloaded[tool] == [f"{c}.{m}" for c, m in expected[tool]], tool


def test_the_known_gaps_are_named():
    """What the tools' sources say outright, on SD 1.5's names."""
    models = _models(sdxl=False)
    layers = _layers(models)
    kohya = unloaded_layers("kohya", layers, sdxl=False)
    assert kohya["ComfyUI"] == kohya["AUTOMATIC1111"] == kohya["diffusers"] == []
    assert sorted(kohya["kohya sd-scripts"]) == [
        "unet.conv_in",
        "unet.conv_out",
        "unet.time_embedding.linear_1",
        "unet.time_embedding.linear_2",
    ]
    diffusers = unloaded_layers("diffusers", layers, sdxl=False)
    assert len(diffusers["ComfyUI"]) == 128 and all(".attn" in name for name in diffusers["ComfyUI"])
    assert len(diffusers["AUTOMATIC1111"]) == len(diffusers["kohya sd-scripts"]) == len(layers)


def test_comfyui_maps_every_linear_layer_of_a_flux_transformer_in_the_diffusers_spelling():
    """comfy.utils.flux_to_diffusers names each of Flux.1's Linear layers (fused into its qkv and linear1 weights);
    a module outside that map is reported."""
    from conftest import tiny_flux_pipeline

    transformer = tiny_flux_pipeline().transformer
    layers = [("transformer", name) for name, module in transformer.named_modules() if isinstance(module, nn.Linear)]
    assert len(layers) == 30
    unloaded = unloaded_layers("diffusers", [*layers, ("transformer", "extra_adapter.linear")], sdxl=False)
    assert unloaded["diffusers"] == [] and unloaded["ComfyUI"] == ["transformer.extra_adapter.linear"]


def test_comfyui_maps_an_sd3_transformer_s_joint_blocks_in_the_diffusers_spelling():
    """comfy.utils.mmdit_to_diffusers names SD3's layers; SD 3.5's second attention (attn2) it does not."""
    from conftest import tiny_sd3_pipeline

    transformer = tiny_sd3_pipeline().transformer
    layers = [
        ("transformer", name) for name, module in transformer.named_modules() if type(module) in (nn.Linear, nn.Conv2d)
    ]
    assert ("transformer", "pos_embed.proj") in layers
    unloaded = unloaded_layers("diffusers", [*layers, ("transformer", "transformer_blocks.0.attn2.to_q")], sdxl=False)
    assert unloaded["ComfyUI"] == ["transformer.transformer_blocks.0.attn2.to_q"]
    summary = "\n".join(summary_lines(unloaded, "diffusers", len(layers) + 1))
    assert "format='kohya'" not in summary, "the kohya format holds no transformer layers"
