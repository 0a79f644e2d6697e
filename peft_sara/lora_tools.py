"""Which layers of an exported LoRA each LoRA-loading tool applies, from the rules in the tools' published source.

A tool that meets a key it has no layer for skips it, at best with a log line, so `export_lora` says beforehand which
of the layers it wrote each tool will not load. The rules, for Stable Diffusion 1.x/2.x and SDXL UNets and CLIP text
encoders, and the export's key spellings (diffusers: `unet.<module>.lora_A.weight`; kohya:
`lora_unet_<module with _>.lora_down.weight`, `lora_te…`):

- diffusers (`load_lora_weights`, 0.42): every layer, in both spellings, except in a kohya-spelled Flux file the
  embedders and the final layer: its converter (`_convert_sd_scripts_to_ai_toolkit`) gives their keys no
  `transformer.` prefix, so the transformer's loader drops them (the double and single blocks load).
- ComfyUI (`comfy/lora.py`: `model_lora_keys_unet`, `model_lora_keys_clip`): every layer in the kohya spelling. In
  the diffusers spelling it maps attention projections only under the old attention-processor names
  (`attn1.processor.to_q`, `…processor.to_out`), so `to_q`, `to_k`, `to_v` and `to_out.0` are not loaded, and it does
  not map `text_encoder_2.text_projection` (commented out there). A Flux transformer's layers in the diffusers
  spelling (`transformer.<module>`) it maps through `comfy.utils.flux_to_diffusers`, which names every Linear layer
  of Flux.1's double and single blocks, embedders and output; an SD3 transformer's through
  `comfy.utils.mmdit_to_diffusers`, which names the joint blocks' projections, embedders and output (not SD 3.5's
  second attention, `attn2`).
- AUTOMATIC1111 (`extensions-builtin/Lora/networks.py`: `convert_diffusers_name_to_compvis` and the `lora_unet` /
  `lora_te1` fallbacks): the kohya spelling only. It converts an SDXL `up_blocks.0` upsampler with SD 1.x's block
  index (the SD 1.x UNet has no attention in that block, SDXL's has), so that one layer is not found; a text
  projection has no module there; SDXL's second text encoder is a fused attention, patched only where all of a
  layer's q, k, v and out projections are present.
- kohya sd-scripts (`networks/lora.py`: `LoRANetwork`): the kohya spelling only, and only Linear/Conv2d layers inside
  `Transformer2DModel`, `ResnetBlock2D`, `Downsample2D`, `Upsample2D` (the UNet) and `CLIPAttention`/`CLIPMLP`
  (the text encoders): `conv_in`, `conv_out`, `time_embedding`, `add_embedding` and `text_projection` have no module
  under any name. For Flux (`networks/lora_flux.py`) the layers of `DoubleStreamBlock` and `SingleStreamBlock`, in
  the original layout's names (`lora_unet_double_blocks_0_img_attn_qkv`); the embedders only when trained with
  `in_dims`, the final layer not at all.
- A Flux transformer in the kohya spelling (the original layout: `flux_layout`) ComfyUI maps through its own model's
  weight names, every layer; AUTOMATIC1111 has no Flux.
"""

from __future__ import annotations

import re

from .flux_layout import is_flux_transformer

TOOLS = ("diffusers", "ComfyUI", "AUTOMATIC1111", "kohya sd-scripts")
# The format each tool loads completely, for the README's advice and the summary's.
BEST_FORMAT = {"diffusers": "diffusers", "ComfyUI": "kohya", "AUTOMATIC1111": "kohya", "kohya sd-scripts": "kohya"}

_ATTENTION_PROJECTION = re.compile(r"\.to_(q|k|v|out\.0)$")
_KOHYA_UNET_BLOCK = re.compile(r"(^|\.)((attentions|resnets)\.\d+\.|(downsamplers|upsamplers)\.0\.conv$)")
_COMFYUI_FLUX_LAYER = re.compile(
    r"^(x_embedder|context_embedder|proj_out|norm_out\.linear|time_text_embed\.(timestep|guidance|text)_embedder\."
    r"linear_[12]|transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(_context)?"
    r"\.linear|ff(_context)?\.net\.(0\.proj|2))|single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|"
    r"proj_out|norm\.linear))$"
)
_COMFYUI_SD3_LAYER = re.compile(
    r"^(pos_embed\.proj|context_embedder|proj_out|norm_out\.linear|time_text_embed\.(timestep|text)_embedder\.linear_"
    r"[12]|transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(_context)?\.linear|"
    r"ff(_context)?\.net\.(0\.proj|2)))$"
)
_CLIP_LAYER = re.compile(r"(^|\.)encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def unloaded_layers(format: str, layers: list[tuple[str, str]], sdxl: bool) -> dict[str, list[str]]:
    """For each tool of TOOLS, the exported (component, module) layers it will not apply, as "component.module"."""
    present = {(component, module) for component, module in layers}
    unloaded = {}
    for tool in TOOLS:
        unloaded[tool] = [
            f"{component}.{module}"
            for component, module in layers
            if not _loads(tool, format, component, module, sdxl, present)
        ]
    return unloaded


def _loads(tool: str, format: str, component: str, module: str, sdxl: bool, present: set) -> bool:
    if tool == "diffusers":
        if format == "kohya" and component == "transformer":  # Flux, named in the original layout
            return module.startswith(("double_blocks.", "single_blocks."))
        return True
    if tool == "ComfyUI":
        if format == "kohya":
            return True
        if component == "unet":
            return not _ATTENTION_PROJECTION.search(module)
        if component == "transformer":
            is_flux = is_flux_transformer(name for _, name in present)
            return (_COMFYUI_FLUX_LAYER if is_flux else _COMFYUI_SD3_LAYER).match(module) is not None
        return _CLIP_LAYER.search(module) is not None
    if format != "kohya":  # AUTOMATIC1111 and kohya sd-scripts read kohya's spelling only
        return False
    if tool == "AUTOMATIC1111":
        if component == "unet":
            return not (sdxl and module == "up_blocks.0.upsamplers.0.conv")
        layer = _CLIP_LAYER.search(module)
        if layer is None:
            return False
        if component == "text_encoder_2" and layer.group(3).startswith("self_attn"):
            prefix = module[: layer.start(3)]
            return all((component, f"{prefix}self_attn.{p}_proj") in present for p in ("q", "k", "v", "out"))
        return True
    if component == "unet":  # kohya sd-scripts
        return _KOHYA_UNET_BLOCK.search(module) is not None
    if component == "transformer":  # Flux, named in the original layout: its LoRA network patches the blocks only
        return module.startswith(("double_blocks.", "single_blocks."))
    return _CLIP_LAYER.search(module) is not None


def summary_lines(unloaded: dict[str, list[str]], format: str, total: int) -> list[str]:
    """One line a tool: how many of the `total` exported layers it loads, which it does not, and the fix."""
    lines = []
    for tool, layers in unloaded.items():
        if not layers:
            lines.append(f"  {tool}: loads all {total} layers")
            continue
        # the kohya format names UNet and text-encoder layers only
        kohya_helps = not all(layer.startswith("transformer.") for layer in layers)
        fix = f"; format='{BEST_FORMAT[tool]}' loads more" if BEST_FORMAT[tool] != format and kohya_helps else ""
        shown = ", ".join(layers[:4]) + (" ..." if len(layers) > 4 else "")
        lines.append(f"  {tool}: will NOT load {len(layers)} of {total} layers ({shown}){fix}")
    return lines
