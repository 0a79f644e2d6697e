"""Loading SaRA adapters into a diffusers pipeline in one call."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from peft import PeftConfig, PeftType, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from torch import nn

from .config import SaRAConfig
from .layer import SaRALayer
from .model import check_saved_adapter, remove_sara_adapter
from .peft_type import SARA
from .tokens import (
    EMBEDDINGS_FILE_SUFFIX,
    add_new_tokens,
    check_new_tokens,
    read_token_embeddings,
    token_embedding_targets,
)

# What each key of a token-embeddings file needs in the pipeline, for messages.
ENCODER_KINDS = {"clip_l": "a CLIP text_encoder", "clip_g": "a second CLIP encoder", "t5": "a T5 encoder"}
# Written by the training scripts into every adapter file of one save (safetensors metadata): the save's id and its
# components, so that a folder mixing two saves (a save killed half-way) is refused instead of loaded.
SAVE_ID_KEY = "sara_save_id"
COMPONENTS_KEY = "sara_components"
# The token-embeddings file saved with the adapters (pivotal tuning), named in the adapter files' metadata.
EMBEDDINGS_KEY = "sara_embeddings"

# Pipeline components that training scripts adapt, in the folders they save them to.
ADAPTABLE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _download_adapter(repo_id: str, subfolder: str, hub_kwargs: dict[str, Any]) -> str | None:
    """Fetch one adapter folder of a Hub repo into the cache; its local path, or None if the repo has none there."""
    try:
        config_file = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder or None, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    with contextlib.suppress(EntryNotFoundError, LocalEntryNotFoundError):  # reported when the weights are read
        hf_hub_download(repo_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder or None, **hub_kwargs)
    return os.path.dirname(config_file)


def _adapter_folders(
    path_or_repo_id: str, components: list[str], hub_kwargs: dict[str, Any]
) -> tuple[dict[str, str], bool]:
    """Map each component to a local folder holding its adapter, downloading from the Hub when needed; and whether
    the source is a single adapter folder rather than a training output.

    A source with no component subfolders but an adapter at its top level serves the first component (the denoiser).
    """
    if os.path.isdir(path_or_repo_id):
        found = {
            name: os.path.join(path_or_repo_id, name)
            for name in components
            if os.path.isfile(os.path.join(path_or_repo_id, name, CONFIG_NAME))
        }
        if not found and os.path.isfile(os.path.join(path_or_repo_id, CONFIG_NAME)):
            return {components[0]: path_or_repo_id}, True
        return found, False
    found = {name: _download_adapter(path_or_repo_id, name, hub_kwargs) for name in components}
    found = {name: folder for name, folder in found.items() if folder is not None}
    if not found and (top_level := _download_adapter(path_or_repo_id, "", hub_kwargs)):
        return {components[0]: top_level}, True
    return found, False


def load_sara_weights(
    pipeline: Any,
    path_or_repo_id: str,
    adapter_name: str = "default",
    components: list[str] | None = None,
    **hub_kwargs: Any,
) -> list[str]:
    """Load the SaRA adapters saved under `path_or_repo_id` into the matching components of a diffusers pipeline.

    `path_or_repo_id` is a local folder or a Hub repo id laid out as the training scripts save it (`unet/`,
    `text_encoder/`, ... each a PEFT adapter folder), or a single adapter folder, which goes to the pipeline's
    denoiser (`unet` or `transformer`). The components keep their class, so the pipeline runs as before, and
    diffusers' `set_adapters`, `disable_adapters`, `fuse_lora` and `unload_lora` work on them. `hub_kwargs`
    (`revision`, `token`, `cache_dir`, ...) go to the Hub download. Returns the names of the adapted components.

    A training output of pivotal tuning also holds the new tokens' embeddings (`<name>_emb.safetensors`): their
    tokens are added to every tokenizer and text encoder among `components` that trained them (`clip_l` to
    `tokenizer`/`text_encoder`, `clip_g` to SDXL's and SD3's `tokenizer_2`/`text_encoder_2`, `t5` to the T5 encoder
    of Flux or SD3), so that the prompts the model was trained with work as they are (see
    `pipeline.tokenizer.get_added_vocab()`).

    The load is all or nothing: configs, weights files, every saved update and the token embeddings are checked
    before any component changes, and a load refused later still leaves every component and tokenizer as it was, so
    a retry can follow.
    """
    available = [name for name in (components or ADAPTABLE_COMPONENTS) if getattr(pipeline, name, None) is not None]
    if not available:
        raise ValueError(f"The pipeline has none of the components {list(components or ADAPTABLE_COMPONENTS)}.")
    if not os.path.isdir(path_or_repo_id) and (
        os.path.exists(path_or_repo_id) or path_or_repo_id.startswith((".", "/", "~"))
    ):
        raise ValueError(f"No adapter folder at {path_or_repo_id}: pass the folder a training script saved to.")
    folders, single_adapter = _adapter_folders(path_or_repo_id, available, hub_kwargs)
    if not folders:
        raise ValueError(
            f"Found no adapter ({CONFIG_NAME}) for the components {available} in {path_or_repo_id}: pass the output "
            "folder of a training script or a PEFT adapter folder."
        )
    configs = {name: _read_config(name, folder, path_or_repo_id) for name, folder in folders.items()}
    for name in configs:
        if adapter_name in (getattr(getattr(pipeline, name), "peft_config", None) or {}):
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pass another adapter_name.")
    weights = {name: _read_weights(name, folder, path_or_repo_id) for name, folder in folders.items()}
    saves = _save_metadata(folders)
    _check_one_save(saves, folders, available, path_or_repo_id)
    new_tokens = [] if single_adapter else _read_new_tokens(pipeline, path_or_repo_id, saves, available, hub_kwargs)
    for name, state_dict in weights.items():
        try:
            check_saved_adapter(getattr(pipeline, name), state_dict)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    # Everything that can be checked without changing a component has been; anything failing from here on undoes
    # every component's injection, so that a retry (or the pipeline as it was) works.
    snapshots = [_ComponentSnapshot(getattr(pipeline, name)) for name in configs]
    undo_tokens = []
    name = "tokens"
    try:
        for name, config in configs.items():
            component = getattr(pipeline, name)
            config.inference_mode = True
            inject_adapter_in_model(config, component, adapter_name=adapter_name)
            set_peft_model_state_dict(component, weights[name], adapter_name=adapter_name)
            component._hf_peft_config_loaded = True  # lets diffusers' adapter methods (set_adapters, fuse_lora) see it
        for encoder_name, tokenizer, text_encoder, tokens, embeddings in new_tokens:
            name = f"{encoder_name} (new tokens)"
            undo_tokens.append(add_new_tokens(tokenizer, text_encoder, tokens, embeddings))
    except BaseException as error:
        for undo in reversed(undo_tokens):
            undo()
        for snapshot in snapshots:
            snapshot.restore(adapter_name)
        if isinstance(error, ValueError):
            raise ValueError(f"{name}: {error}") from error
        raise
    return list(configs)


def _read_new_tokens(
    pipeline: Any, source: str, saves: dict[str, dict[str, str]], available: list[str], hub_kwargs: dict[str, Any]
) -> list[tuple[str, Any, nn.Module, list[str], Any]]:
    """The new tokens of a pivotal-tuning output, checked against the pipeline's tokenizers and text encoders:
    (text encoder name, tokenizer, text encoder, tokens, embeddings) for each text encoder among `available`."""
    path = _embeddings_file(source, saves, hub_kwargs)
    if path is None:
        return []
    tensors, tokens, metadata = read_token_embeddings(path)
    save_ids = {save[SAVE_ID_KEY] for save in saves.values() if SAVE_ID_KEY in save}
    if SAVE_ID_KEY in metadata and save_ids and save_ids != {metadata[SAVE_ID_KEY]}:
        raise ValueError(
            f"The token embeddings {os.path.basename(path)} and the adapters in {source} are not one whole save (a "
            "save was interrupted): save or train again."
        )
    targets = token_embedding_targets(pipeline)
    # every CLIP encoder among `available` takes the tokens; T5 only where the run trained them there (diffusers'
    # --enable_t5_ti), else it reads the prompt as written, as it did in training
    missing = sorted(
        key for key, (name, _) in targets.items() if key != "t5" and name in available and key not in tensors
    )
    absent = sorted(set(tensors) - set(targets))
    if missing or absent:
        problem = (
            f"no {missing[0]} embeddings for the pipeline's {targets[missing[0]][0]}"
            if missing
            else f"{absent[0]} embeddings for {ENCODER_KINDS[absent[0]]} the pipeline lacks"
        )
        raise ValueError(
            f"The token embeddings {os.path.basename(path)} in {source} hold {problem}: they were trained for "
            "another kind of pipeline (Stable Diffusion: clip_l; SDXL: clip_l and clip_g; Flux: clip_l, and t5 with "
            "--enable_t5_ti; SD3: clip_l and clip_g, and t5 with --enable_t5_ti)."
        )
    wanted = {key: targets[key] for key in tensors if targets[key][0] in available}
    loads = []
    for key, (encoder_name, tokenizer_name) in wanted.items():
        tokenizer, text_encoder = getattr(pipeline, tokenizer_name, None), getattr(pipeline, encoder_name)
        if tokenizer is None:
            raise ValueError(f"The pipeline has a {encoder_name} but no {tokenizer_name} for the new tokens {tokens}.")
        try:
            check_new_tokens(tokenizer, text_encoder, tokens, tensors[key])
        except ValueError as error:
            raise ValueError(f"{encoder_name}: {error}") from error
        loads.append((encoder_name, tokenizer, text_encoder, tokens, tensors[key]))
    return loads


def _embeddings_file(source: str, saves: dict[str, dict[str, str]], hub_kwargs: dict[str, Any]) -> str | None:
    """The local path of a training output's token embeddings (downloaded from the Hub when needed), or None.

    The adapters of our scripts name the file in their metadata; otherwise a folder's one `*_emb.safetensors` file,
    or on the Hub `<repo name>_emb.safetensors`, as diffusers' advanced scripts name it, is taken.
    """
    named = {save[EMBEDDINGS_KEY] for save in saves.values() if save.get(EMBEDDINGS_KEY)}
    if len(named) > 1:
        raise ValueError(f"The adapters in {source} name different token embeddings files {sorted(named)}.")
    if os.path.isdir(source):
        if named:
            path = os.path.join(source, named.pop())
            if not os.path.isfile(path):
                raise ValueError(
                    f"The adapters in {source} were saved with the token embeddings {os.path.basename(path)}, which "
                    "is missing: copy it next to the adapter folders (or train again)."
                )
            return path
        found = sorted(glob.glob(os.path.join(glob.escape(source), f"*{EMBEDDINGS_FILE_SUFFIX}")))
        if len(found) > 1:
            names = [os.path.basename(path) for path in found]
            raise ValueError(f"{source} holds several token embeddings files {names}: keep the one trained with it.")
        return found[0] if found else None
    filename = named.pop() if named else f"{source.rstrip('/').split('/')[-1]}{EMBEDDINGS_FILE_SUFFIX}"
    try:
        return hf_hub_download(source, filename, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        if saves and any(save.get(EMBEDDINGS_KEY) for save in saves.values()):
            raise ValueError(
                f"The adapters in {source} were saved with the token embeddings {filename}, which the repo lacks: "
                "upload it next to the adapter folders."
            ) from None
        return None


def _save_metadata(folders: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each component's adapter-file metadata (which save wrote it, and what else that save wrote)."""
    from safetensors import safe_open

    saves = {}
    for name, folder in folders.items():
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as handle:
                saves[name] = handle.metadata() or {}
    return saves


def _check_one_save(
    saves: dict[str, dict[str, str]], folders: dict[str, str], available: list[str], source: str
) -> None:
    """Refuse components written by different saves, or a save whose other components are missing: loading them
    would silently combine adapters that were never trained together."""
    saves = {
        name: (metadata[SAVE_ID_KEY], metadata.get(COMPONENTS_KEY, "").split(","))
        for name, metadata in saves.items()
        if SAVE_ID_KEY in metadata
    }
    save_ids = {save_id for save_id, _ in saves.values()}
    missing = sorted(
        {component for _, listed in saves.values() for component in listed} & set(available) - set(folders)
    )
    if len(save_ids) > 1 or missing:
        problem = f"{', '.join(missing)} missing" if missing else "its components come from different saves"
        raise ValueError(
            f"The adapters in {source} are not one whole save ({problem}): a save was interrupted. Save or train "
            "again, or load the components you trust with components=[...]."
        )


def _read_config(name: str, folder: str, source: str) -> SaRAConfig:
    """One component's adapter config, refused with one clear error unless it is a valid SaRA config."""
    try:
        with open(os.path.join(folder, CONFIG_NAME)) as file:
            saved = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not read the adapter config for {name} in {source}: {error}") from error
    peft_type = saved.get("peft_type") if isinstance(saved, dict) else None
    if not isinstance(peft_type, str) or peft_type not in {member.value for member in PeftType}:
        raise ValueError(
            f"The adapter config for {name} in {source} has peft_type={peft_type!r}; expected a PEFT method name such "
            f"as {SARA.value!r}."
        )
    if peft_type != SARA.value:
        raise ValueError(
            f"The adapter for {name} in {source} is a {peft_type} adapter, not SaRA; load LoRA adapters with "
            "pipeline.load_lora_weights()."
        )
    try:
        return PeftConfig.from_pretrained(folder)
    except ValueError as error:
        raise ValueError(f"The adapter config for {name} in {source} is invalid: {error}") from error


def _read_weights(name: str, folder: str, source: str) -> dict:
    """One component's saved adapter tensors; a missing or unreadable file is named as such."""
    if not any(os.path.isfile(os.path.join(folder, file)) for file in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        # peft would take the folder for a Hub repo id and report a malformed one
        raise ValueError(
            f"The adapter for {name} in {source} has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} (in {folder}): "
            "its weights file is missing. Copy or upload it next to the config."
        )
    try:
        return load_peft_weights(folder)
    except Exception as error:  # safetensors and torch raise many types for a damaged file
        raise ValueError(f"Could not read the adapter weights for {name} in {source}: {error}") from error


class _ComponentSnapshot:
    """What loading an adapter changes in a component besides its modules, to put back if the load is refused."""

    def __init__(self, component: nn.Module) -> None:
        self.component = component
        self.peft_config = vars(component).get("peft_config")
        self.loaded_flag = vars(component).get("_hf_peft_config_loaded")
        self.requires_grad = [(param, param.requires_grad) for param in component.parameters()]
        # injecting an adapter makes it the active one of every SaRA layer, those of other adapters included
        self.active = [(m, list(m.active_adapters)) for m in component.modules() if isinstance(m, SaRALayer)]

    def restore(self, adapter_name: str) -> None:
        """Remove the adapter (and the SaRA layers it alone used), and put the configs and flags back as they were."""
        component = self.component
        for layer, active in self.active:  # first, so that removing the adapter does not pick new active ones
            layer.set_adapter(active)
        remove_sara_adapter(component, adapter_name)
        if self.peft_config is None:
            vars(component).pop("peft_config", None)
        else:
            component.peft_config = self.peft_config
        if self.loaded_flag is None:
            vars(component).pop("_hf_peft_config_loaded", None)
        else:
            component._hf_peft_config_loaded = self.loaded_flag
        for param, requires_grad in self.requires_grad:
            param.requires_grad_(requires_grad)
