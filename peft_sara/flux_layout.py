"""Flux's transformer in Black Forest Labs' original layout, the one ComfyUI and kohya's sd-scripts name LoRA layers
after (`lora_unet_double_blocks_0_img_attn_qkv`): diffusers splits some of its layers, so the updates of the parts
are stacked into the fused layer's rows, in the fused layer's order:

- a double block's `img_attn.qkv` holds `attn.to_q`, `to_k`, `to_v`; `txt_attn.qkv` the `add_q/k/v_proj`;
- a single block's `linear1` holds `attn.to_q`, `to_k`, `to_v` and `proj_mlp`;
- `final_layer.adaLN_modulation.1` is diffusers' `norm_out.linear` with its two halves (shift, scale) swapped.

The names follow `comfy.utils.flux_to_diffusers` and diffusers' own conversion of kohya's Flux LoRAs.
"""

from __future__ import annotations

import re

import torch

from .model import SavedSparseUpdate

_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "norm1.linear": ("img_mod.lin", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
    "ff.net.0.proj": ("img_mlp.0", 0),
    "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0),
    "ff_context.net.2": ("txt_mlp.2", 0),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation.lin", 0),
}
_OTHERS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}
MLP_RATIO = 4  # a single block's proj_mlp rows per hidden unit, diffusers' and BFL's


def is_flux_transformer(module_names) -> bool:
    """Whether a transformer's layer names are Flux's (single-stream blocks, a patch embedder `x_embedder`)."""
    return any(name.startswith(("single_transformer_blocks.", "x_embedder")) for name in module_names)


def bfl_name(module: str) -> tuple[str, int]:
    """The original layer a diffusers Flux layer belongs to, and its part's place in it; ValueError for a layer the
    original layout has no place for."""
    block = _BLOCK.match(module)
    if block:
        kind, index, rest = block.groups()
        table, prefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        if rest in table:
            name, part = table[rest]
            return f"{prefix}.{index}.{name}", part
    elif module in _OTHERS:
        return _OTHERS[module], 0
    raise ValueError(f"The Flux layer {module} has no counterpart in the original (BFL) layout.")


def fuse_to_bfl_layout(updates: list[SavedSparseUpdate]) -> list[SavedSparseUpdate]:
    """The weight updates of a Flux transformer as updates of the original layout's layers: parts stacked in their
    fused layer's row order (a part without an update contributes zero rows), halves swapped where the layouts
    differ. Exact: the fused update is the parts' updates, moved."""
    groups: dict[str, dict[int, SavedSparseUpdate]] = {}
    for update in updates:
        name, part = bfl_name(update.module_name)
        groups.setdefault(name, {})[part] = update
    fused = []
    for name, parts in groups.items():
        in_features = next(iter(parts.values())).shape[1]
        if name.endswith("qkv"):
            rows = [in_features] * 3
        elif name.endswith("linear1"):
            mlp = parts[3].shape[0] if 3 in parts else MLP_RATIO * in_features
            rows = [in_features] * 3 + [mlp]
        else:
            rows = [parts[0].shape[0]]
        positions, values, offset = [], [], 0
        for part, part_rows in enumerate(rows):
            if part in parts:
                update = parts[part]
                if tuple(update.shape) != (part_rows, in_features):
                    raise ValueError(
                        f"The Flux layer {update.module_name} has shape {tuple(update.shape)}, not the "
                        f"{(part_rows, in_features)} its place in {name} needs."
                    )
                positions.append(update.positions.long() + offset * in_features)
                values.append(update.values)
            offset += part_rows
        position = torch.cat(positions)
        if name in SWAPPED_HALVES:
            row, column = position // in_features, position % in_features
            position = ((row + offset // 2) % offset) * in_features + column
        fused.append(SavedSparseUpdate(name, "weight", (offset, in_features), position, torch.cat(values)))
    return fused
