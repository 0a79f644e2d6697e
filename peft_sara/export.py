"""Export a SaRA adapter as a LoRA, for tools that load LoRA but not PEFT's other methods (diffusers'
`load_lora_weights`, ComfyUI, AUTOMATIC1111, kohya's scripts).

A SaRA adapter is an additive sparse update ΔW of each adapted weight. Its best rank-r approximation is the truncated
SVD of the dense ΔW (Eckart–Young), which a LoRA stores as two factors with scale 1: up · down = U_r S_r V_rᵀ. The
decomposition is done one layer at a time in float64 on the CPU, from the adapter file alone (no base model): the
singular vectors come from the eigen-decomposition of the smaller Gram matrix and the other factor is the exact
projection of ΔW onto them, so the energy reported as retained is measured, not estimated.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .flux_layout import fuse_to_bfl_layout, is_flux_transformer
from .loading import ADAPTABLE_COMPONENTS, _check_one_save, _read_config, _read_weights, _save_metadata
from .lora_tools import TOOLS, summary_lines, unloaded_layers
from .model import read_saved_updates
from .tokens import TOKEN_EMBEDDING_KEYS

FORMATS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights looks for
ADAPTER_CONFIG = "adapter_config.json"
DENOISERS = ("unet", "transformer")  # the components whose layers keep their module paths in every format
# The relative (Frobenius) error at which a layer counts as reproduced exactly: the directions the export drops at
# full rank hold less than this share of the update's norm. fp32 factors add about 1e-7 of rounding.
EXACT_RELATIVE_ERROR = 1e-7
# SDXL's added-conditioning MLP: kohya's tools name it after the original (sgm) UNet, and diffusers' kohya loader only
# maps that spelling back to add_embedding.
KOHYA_MODULE_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


@dataclass
class LayerExport:
    """One exported layer: its rank in the LoRA and the share of its update's energy (squared Frobenius norm) kept."""

    component: str
    module: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int  # the rank at which the export is exact: relative error at most EXACT_RELATIVE_ERROR
    energy: float  # squared Frobenius norm of the update
    energy_kept: float
    relative_error: float  # ‖ΔW - up · down‖ / ‖ΔW‖ of the factors as written (in the export's dtype)

    @property
    def energy_retained(self) -> float:
        return self.energy_kept / self.energy if self.energy else 1.0


@dataclass
class LoraExport:
    """What `export_lora` wrote and what it kept; `print()` it for a summary."""

    path: Path
    format: str
    requested_rank: int | float
    layers: list[LayerExport]
    file_size: int
    embeddings_path: Path | None = None
    num_new_tokens: int = 0
    left_out: list[str] = field(default_factory=list)  # parts of the adapter a LoRA cannot express
    zero_updates: list[str] = field(default_factory=list)  # layers whose update is exactly zero: nothing to export
    dtype_name: str = "float32"  # the dtype the factors were written in
    # per tool of lora_tools.TOOLS, the exported layers it will not load ("component.module")
    unloaded_by: dict[str, list[str]] = field(default_factory=dict)

    @property
    def energy_retained(self) -> float:
        """Share of the whole adapter's energy kept: Σ kept / Σ total over all exported layers."""
        total = sum(layer.energy for layer in self.layers)
        return sum(layer.energy_kept for layer in self.layers) / total if total else 1.0

    @property
    def ranks(self) -> dict[str, int]:
        return {f"{layer.component}.{layer.module}": layer.rank for layer in self.layers}

    def __str__(self) -> str:
        ranks = [layer.rank for layer in self.layers]
        worst = sorted(self.layers, key=lambda layer: layer.energy_retained)[:5]
        lines = [
            f"LoRA ({self.format}) written to {self.path} ({self.file_size / 2**20:.2f} MiB)",
            f"  requested rank {self.requested_rank!r}: {len(self.layers)} layers, ranks {min(ranks, default=0)}-"
            f"{max(ranks, default=0)} (mean {sum(ranks) / max(1, len(ranks)):.1f}), "
            f"{sum(layer.rank == layer.full_rank for layer in self.layers)} of them exact",
            f"  energy retained: {self.energy_retained:.4%} overall",
        ]
        inexact = [layer for layer in self.layers if layer.relative_error > 1e-6]
        if self.requested_rank == 1.0:
            lines.append(
                f"  rank 1.0: {len(self.layers) - len(inexact)} of {len(self.layers)} layers reproduced to a relative "
                "error below 1e-6"
                + (f"; above it, from the {self.dtype_name} factors' rounding: " if inexact else "")
                + ", ".join(f"{layer.component}.{layer.module} {layer.relative_error:.1e}" for layer in inexact[:5])
            )
        if worst and worst[0].energy_retained < 1:
            least = [
                f"{layer.component}.{layer.module} {layer.energy_retained:.2%} (rank {layer.rank}/{layer.full_rank})"
                for layer in worst
            ]
            lines.append("  least retained: " + ", ".join(least))
        if self.unloaded_by:
            lines.append("  what each tool loads of this file:")
            lines += summary_lines(self.unloaded_by, self.format, len(self.layers))
        if self.embeddings_path is not None:
            lines.append(f"  new-token embeddings ({self.num_new_tokens} tokens) copied to {self.embeddings_path}")
        if self.zero_updates:
            lines.append(f"  {len(self.zero_updates)} layers with a zero update (nothing to export)")
        if self.left_out:
            more = f"; ... and {len(self.left_out) - 10} more (LoraExport.left_out)" if len(self.left_out) > 10 else ""
            lines.append(f"  left out ({len(self.left_out)}): " + "; ".join(self.left_out[:10]) + more)
        return "\n".join(lines)


def check_rank(rank: object) -> int | float:
    """The rank as `export_lora` takes it, or a ValueError saying what a rank can be."""
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1:
        return rank
    if isinstance(rank, float) and 0 < rank <= 1:
        return rank
    raise ValueError(
        f"rank must be an integer >= 1 (the LoRA rank of every layer) or a number in (0, 1] (the share of each "
        f"update's energy to keep, e.g. 0.9), got {rank!r}."
    )


def parse_rank(text: str) -> int | float:
    """A rank written on a command line: '16' is a rank, '0.9' or '1.0' a share of energy."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = text
    return check_rank(value)


def export_lora(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    rank: int | float = 64,
    format: str = "diffusers",
    allow_partial: bool = False,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    only_loadable_by: str | None = None,
) -> LoraExport:
    """Export the SaRA adapter(s) in `source` as one LoRA file in `output_dir`, by truncated SVD of each update.

    `source` is a training script's output folder (`unet/`, `text_encoder/`, `text_encoder_2/`, ... and a
    pivotal-tuning `<name>_emb.safetensors`) or one adapter folder (the UNet's, unless the folder is named after
    another component). `rank`: an int is the rank of every layer (lower where the update's own rank is lower); a
    float in (0, 1] keeps, in each layer, the fewest singular directions that hold at least that share of the
    update's energy (as PEFT's `convert_to_lora`). `format="diffusers"` writes `pytorch_lora_weights.safetensors` for
    `pipe.load_lora_weights(output_dir)`; `format="kohya"` writes `<name>.safetensors` with `lora_unet_…`/`lora_te…`
    keys and alphas (scale 1), for ComfyUI, AUTOMATIC1111 and also diffusers. New-token embeddings are copied next to
    it as `<name>_emb.safetensors` (keys `clip_l`, `clip_g`, and `t5` from Flux and SD3 runs with --enable_t5_ti),
    which diffusers' `load_textual_inversion` loads key by key, and ComfyUI and AUTOMATIC1111 load for CLIP.
    `<name>` is the training output folder's name.

    A LoRA cannot express bias updates (`include_bias=True`) or fully trained modules (`modules_to_save`): they are
    refused unless `allow_partial=True`, which leaves them out and names them in the result. Convolutions are exported
    in the LoCon layout (down: a convolution of the layer's kernel, up: 1x1), which fits convolutions without groups
    or dilation, as in Stable Diffusion's UNets. Values are written in `dtype`.

    The result names, for each tool of `lora_tools.TOOLS`, the layers it will not load from this file (see
    `peft_sara.lora_tools`). `only_loadable_by="kohya sd-scripts"` (any tool of TOOLS) leaves those layers out of the
    file and lists them with what was left out. An existing export in `output_dir`, or an `output_dir` inside
    `source`, is refused unless `overwrite=True`.
    """
    rank = check_rank(rank)
    if only_loadable_by is not None and only_loadable_by not in TOOLS:
        raise ValueError(f"only_loadable_by must be one of {', '.join(TOOLS)}, got {only_loadable_by!r}.")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}.")
    source, output_dir = Path(source), Path(output_dir)
    folders, name = _adapter_folders(source)
    path = output_dir / (DIFFUSERS_WEIGHT_NAME if format == "diffusers" else f"{name}.safetensors")
    _check_output_dir(source, output_dir, [path, output_dir / f"{name}_emb.safetensors"], overwrite)
    kohya_components = {"unet", "transformer", "text_encoder", "text_encoder_2"}
    if format == "kohya" and (unknown := sorted(set(folders) - kohya_components)):
        raise ValueError(
            f"The kohya format names UNet, Flux transformer and CLIP text-encoder layers only; {source} also adapts "
            f"{', '.join(unknown)}. Export it with format='diffusers'."
        )
    weights = {}
    for component, folder in folders.items():
        _read_config(component, str(folder), str(source))  # refuses other PEFT methods and invalid configs
        weights[component] = _read_weights(component, str(folder), str(source))
    if folders != {component: source for component in folders}:  # a run's folder must hold one whole save
        folder_paths = {component: str(folder) for component, folder in folders.items()}
        _check_one_save(_save_metadata(folder_paths), folder_paths, list(ADAPTABLE_COMPONENTS), str(source))
    decoded, left_out = {}, []
    for component, state_dict in weights.items():
        try:
            updates, others = read_saved_updates(state_dict)
        except ValueError as error:
            raise ValueError(f"{component}: {error}") from error
        decoded[component] = [update for update in updates if update.tensor_name == "weight"]
        left_out += [f"{component}.{u.module_name}.bias (a bias update)" for u in updates if u.tensor_name == "bias"]
        left_out += [f"{component}: {key} (not a SaRA update, e.g. modules_to_save)" for key in others]
    if left_out and not allow_partial:
        raise ValueError(
            f"A LoRA cannot express {len(left_out)} part(s) of this adapter: {'; '.join(left_out[:5])}"
            f"{' ...' if len(left_out) > 5 else ''}. Pass allow_partial=True (--allow_partial) to export without them."
        )
    embeddings = _embeddings_file(source, name)
    flux = is_flux_transformer(update.module_name for update in decoded.get("transformer", []))
    if format == "kohya" and "transformer" in decoded:
        if not flux:
            raise ValueError(
                f"The kohya format of {source}'s transformer is not written (only Flux's is): export it with "
                "format='diffusers', which diffusers and ComfyUI load."
            )
        decoded["transformer"] = fuse_to_bfl_layout(decoded["transformer"])  # ComfyUI's and kohya's layer names

    # SDXL: two text encoders, or a UNet with added conditioning (its only other mark without a base model)
    sdxl = "text_encoder_2" in folders or any(u.module_name in KOHYA_MODULE_NAMES for u in decoded.get("unet", []))
    if only_loadable_by is not None:
        names = [(component, update.module_name) for component, updates in decoded.items() for update in updates]
        skipped = set(unloaded_layers(format, names, sdxl)[only_loadable_by])
        if len(skipped) == len(names):
            raise ValueError(
                f"{only_loadable_by} loads none of the layers in format={format!r}: export with format='kohya' "
                "(--format kohya), which it reads."
            )
        left_out += [f"{layer} (not loaded by {only_loadable_by})" for layer in sorted(skipped)]
        decoded = {c: [u for u in us if f"{c}.{u.module_name}" not in skipped] for c, us in decoded.items()}
    factors, layers, zero_updates = {}, [], []
    for component, updates in decoded.items():
        for update in updates:
            module = update.module_name
            exported = _low_rank_factors(update, rank, dtype)
            if exported is None:
                zero_updates.append(f"{component}.{module}")
                continue
            down, up, layer_rank, full_rank, energy, energy_kept, error = exported
            layers.append(
                LayerExport(component, module, update.shape, layer_rank, full_rank, energy, energy_kept, error)
            )
            factors[component, module] = down, up
    if not layers:
        raise ValueError(f"Every update of the SaRA adapter in {source} is zero: there is nothing to export.")
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors, metadata = _lora_file_contents(layers, factors, format, sdxl or flux, dtype)
    metadata.update(format="pt", sara_export=json.dumps({"source": name, "rank": rank}))
    _write_atomically(path, lambda staging: _save(tensors, staging, metadata))
    result = LoraExport(
        path,
        format,
        rank,
        layers,
        path.stat().st_size,
        left_out=left_out,
        zero_updates=zero_updates,
        dtype_name=str(dtype).removeprefix("torch."),
        unloaded_by=unloaded_layers(format, [(layer.component, layer.module) for layer in layers], sdxl),
    )
    if embeddings is not None:
        result.embeddings_path = output_dir / f"{name}_emb.safetensors"
        result.num_new_tokens = embeddings
        if result.embeddings_path.resolve() != (source / f"{name}_emb.safetensors").resolve():
            _write_atomically(
                result.embeddings_path, lambda staging: shutil.copyfile(source / f"{name}_emb.safetensors", staging)
            )
    return result


def _check_output_dir(source: Path, output_dir: Path, paths: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that is a file, and (unless `overwrite`) one that already holds an export or lies in
    the source folder, whose files an export would mix with or replace."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir} is a file, not a folder: pass the folder the LoRA is to be written to.")
    if overwrite:
        return
    if output_dir.resolve().is_relative_to(source.resolve()):
        raise ValueError(
            f"{output_dir} is inside the source folder {source}: pass another output folder, or overwrite=True "
            "(--overwrite) to write the LoRA there."
        )
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise ValueError(
            f"{existing[0]} exists already: pass another output folder, or overwrite=True (--overwrite) to replace it."
        )


def _adapter_folders(source: Path) -> tuple[dict[str, Path], str]:
    """The adapter folder of each component in `source`, and the name the export's files take (the run's folder)."""
    if not source.is_dir():
        raise ValueError(f"No folder at {source}: pass a training output folder or a SaRA adapter folder.")
    folders = {c: source / c for c in ADAPTABLE_COMPONENTS if (source / c / ADAPTER_CONFIG).is_file()}
    if folders:
        return folders, source.resolve().name
    if (source / ADAPTER_CONFIG).is_file():
        resolved = source.resolve()
        if resolved.name in ADAPTABLE_COMPONENTS:
            return {resolved.name: source}, resolved.parent.name
        return {"unet": source}, resolved.name
    raise ValueError(
        f"Found no adapter in {source}: expected {ADAPTER_CONFIG} in it or in component subfolders "
        f"({', '.join(ADAPTABLE_COMPONENTS)}). Pass the output folder of a training script or a SaRA adapter folder."
    )


def _embeddings_file(source: Path, name: str) -> int | None:
    """Number of new tokens in the run's pivotal-tuning embeddings file, if it has one; refuse one that is not."""
    path = source / f"{name}_emb.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"Could not read the new-token embeddings {path}: {error}") from error
    if "clip_l" not in shapes or set(shapes) - set(TOKEN_EMBEDDING_KEYS) or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(
            f"{path} is not a new-token embeddings file: expected 2-D tensors under the keys clip_l (and clip_g for "
            f"SDXL and SD3, t5 for a T5 encoder), found {shapes}."
        )
    counts = {shape[0] for shape in shapes.values()}
    if len(counts) != 1:
        raise ValueError(f"{path}: its text encoders' rows are different numbers of tokens ({shapes}).")
    return counts.pop()


def _low_rank_factors(update, rank: int | float, dtype: torch.dtype):
    """(down, up, rank, full rank, energy, kept energy, relative error) of one layer's update, or None if the update
    is zero.

    down has the layer's input side ([r, in] or, for a convolution, [r, in, kh, kw]) and up its output side ([out, r]
    or [out, r, 1, 1]); the singular values are split evenly between them (√S each), which keeps both factors in range
    for half precision. The energy of each singular direction is measured on the projection of ΔW onto it, not read
    from the Gram matrix's eigenvalues (which square the condition number): the full rank is the fewest directions
    whose residual is below EXACT_RELATIVE_ERROR, so that rank 1.0 reproduces the update to float rounding. The
    relative error is measured on the factors as written in `dtype`.
    """
    shape = update.shape
    dense = torch.zeros(math.prod(shape), dtype=torch.float64)
    dense.index_add_(0, update.positions.long(), update.values.detach().to(torch.float64))
    matrix = dense.view(shape[0], -1)
    energy = float(matrix.square().sum())
    if energy == 0:
        return None
    wide = matrix.shape[0] <= matrix.shape[1]
    side = matrix if wide else matrix.T  # the Gram matrix of the smaller side: at most 1280² for SD's largest layers
    _, eigenvectors = torch.linalg.eigh(side @ side.T)
    eigenvectors = eigenvectors.flip(1)  # the largest singular directions first
    projected = eigenvectors.T @ side  # [directions, other side] = S Vᵀ (rows of norm S)
    direction_energy = projected.square().sum(1)
    residual = direction_energy.flip(0).cumsum(0).flip(0)  # residual[k]: the energy of directions k and after
    residual = torch.cat([residual[1:], residual.new_zeros(1)])  # ... after keeping the first k + 1
    full_rank = int((residual > EXACT_RELATIVE_ERROR**2 * energy).sum()) + 1
    if isinstance(rank, float):
        cumulative = direction_energy.cumsum(0)
        # the fewest directions holding `rank` of the energy, as peft's convert_to_lora picks them
        kept = int(torch.searchsorted(cumulative, rank * cumulative[-1])) + 1
    else:
        kept = rank
    kept = min(kept, full_rank)
    basis, projected = eigenvectors[:, :kept], projected[:kept]
    energy_kept = float(direction_energy[:kept].sum())
    norms = projected.norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    outer, inner = basis * norms, projected / norms[:, None]  # outer @ inner == basis @ projected
    up, down = (outer, inner) if wide else (inner.T, outer.T)
    up, down = up.to(torch.float32), down.to(torch.float32)
    error = float((up.to(dtype).double() @ down.to(dtype).double() - matrix).norm()) / math.sqrt(energy)
    down = down.reshape(kept, *shape[1:]).contiguous()
    if len(shape) == 4:
        up = up.reshape(shape[0], kept, 1, 1)
    return down, up.contiguous(), kept, full_rank, energy, energy_kept, error


def _lora_file_contents(
    layers: list[LayerExport], factors: dict, format: str, numbered_text_encoders: bool, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The LoRA file's tensors and metadata in `format`, every layer at scale 1."""
    tensors = {}
    if format == "diffusers":
        for (component, module), (down, up) in factors.items():
            key = _diffusers_name(component, module)
            tensors[f"{key}.lora_A.weight"] = down.to(dtype)
            tensors[f"{key}.lora_B.weight"] = up.to(dtype)
        return tensors, {"lora_adapter_metadata": json.dumps(_lora_configs(layers), sort_keys=True)}
    # One alpha for every layer: loaders scale each layer by alpha / its rank, and diffusers' kohya loader drops the
    # per-layer alphas of attention layers, so a layer whose rank differs carries rank / alpha in its factors.
    alpha = _most_common(layer.rank for layer in layers)
    for layer in layers:
        down, up = factors[layer.component, layer.module]
        correction = math.sqrt(layer.rank / alpha)
        key = _kohya_name(layer.component, layer.module, numbered_text_encoders)
        tensors[f"{key}.lora_down.weight"] = (down * correction).to(dtype)
        tensors[f"{key}.lora_up.weight"] = (up * correction).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    dims = {layer.rank for layer in layers}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
        "ss_network_alpha": str(alpha),
    }
    return tensors, metadata


def _diffusers_name(component: str, module: str) -> str:
    """The diffusers format's key of a layer: the component, then the module path (text encoders' as the tools
    name it)."""
    return f"{component}.{module if component in DENOISERS else _text_model_path(module)}"


def _kohya_name(component: str, module: str, numbered_text_encoders: bool) -> str:
    """kohya's key of a layer: the module path with '_' for '.', after a prefix naming the model (a Flux
    transformer's layers already in the original layout's names)."""
    if component in DENOISERS:
        prefix = "lora_unet"
        module = KOHYA_MODULE_NAMES.get(module, module)
    else:
        # kohya's SD 1.x/2.x files say lora_te, its SDXL and Flux files lora_te1 (and lora_te2)
        prefix = "lora_te2" if component == "text_encoder_2" else "lora_te1" if numbered_text_encoders else "lora_te"
        module = _text_model_path(module)
    return f"{prefix}_{module.replace('.', '_')}"


def _text_model_path(module: str) -> str:
    """A text-encoder layer's path as the tools name it: transformers 5 dropped CLIPTextModel's `text_model` level,
    which ComfyUI's and kohya's names keep (diffusers loads either)."""
    return module if module.startswith(("text_model.", "text_projection")) else f"text_model.{module}"


def _lora_configs(layers: list[LayerExport]) -> dict:
    """diffusers' `lora_adapter_metadata`: each component's LoraConfig, with per-layer ranks and alpha = rank, so the
    scale is 1 whatever a loader would otherwise infer."""
    metadata = {}
    for component in dict.fromkeys(layer.component for layer in layers):
        ranks = {layer.module: layer.rank for layer in layers if layer.component == component}
        common = _most_common(ranks.values())
        pattern = {_pattern_key(module, ranks): r for module, r in ranks.items() if r != common}
        config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": pattern}
        config["target_modules"] = sorted(ranks)
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    return metadata


def _pattern_key(module: str, modules) -> str:
    """A layer's key in a LoraConfig's rank and alpha patterns. PEFT matches a key against the end of every layer's
    name, so the key of a layer whose name ends another one's (Flux's `proj_out` and
    `single_transformer_blocks.0.proj_out`) is anchored to the start, or the other layer would take its rank."""
    return f"^{module}" if any(other.endswith(f".{module}") for other in modules) else module


def _most_common(values) -> int:
    return collections.Counter(values).most_common(1)[0][0]


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _write_atomically(path: Path, write) -> None:
    """Write through `write(staging_path)` next to `path` and rename into place: never a half-written file."""
    staging = path.with_name(path.name + ".tmp")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
