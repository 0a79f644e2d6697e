"""Loading SaRA adapters into a diffusers pipeline in one call."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import delete_adapter
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, load_peft_weights

from .layer import SaRALayer
from .peft_type import SARA

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


def _adapter_folders(path_or_repo_id: str, components: list[str], hub_kwargs: dict[str, Any]) -> dict[str, str]:
    """Map each component to a local folder holding its adapter, downloading from the Hub when needed.

    A source with no component subfolders but an adapter at its top level serves the first component (the denoiser).
    """
    if os.path.isdir(path_or_repo_id):
        found = {
            name: os.path.join(path_or_repo_id, name)
            for name in components
            if os.path.isfile(os.path.join(path_or_repo_id, name, CONFIG_NAME))
        }
        if not found and os.path.isfile(os.path.join(path_or_repo_id, CONFIG_NAME)):
            found = {components[0]: path_or_repo_id}
        return found
    found = {name: _download_adapter(path_or_repo_id, name, hub_kwargs) for name in components}
    found = {name: folder for name, folder in found.items() if folder is not None}
    if not found and (top_level := _download_adapter(path_or_repo_id, "", hub_kwargs)):
        found = {components[0]: top_level}
    return found


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
    """
    available = [name for name in (components or ADAPTABLE_COMPONENTS) if getattr(pipeline, name, None) is not None]
    if not available:
        raise ValueError(f"The pipeline has none of the components {list(components or ADAPTABLE_COMPONENTS)}.")
    if not os.path.isdir(path_or_repo_id) and (
        os.path.exists(path_or_repo_id) or path_or_repo_id.startswith((".", "/", "~"))
    ):
        raise ValueError(f"No adapter folder at {path_or_repo_id}: pass the folder a training script saved to.")
    folders = _adapter_folders(path_or_repo_id, available, hub_kwargs)
    if not folders:
        raise ValueError(
            f"Found no adapter ({CONFIG_NAME}) for the components {available} in {path_or_repo_id}: pass the output "
            "folder of a training script or a PEFT adapter folder."
        )
    configs = {}
    for name, folder in folders.items():
        config = PeftConfig.from_pretrained(folder)
        if config.peft_type != SARA:
            raise ValueError(
                f"The adapter for {name} in {path_or_repo_id} is a {config.peft_type.value} adapter, not SaRA; load "
                "LoRA adapters with pipeline.load_lora_weights()."
            )
        if adapter_name in (getattr(getattr(pipeline, name), "peft_config", None) or {}):
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pass another adapter_name.")
        configs[name] = config
    weights = {}
    for name, folder in folders.items():
        try:
            weights[name] = load_peft_weights(folder)
        except Exception as error:  # safetensors and torch raise many types for a missing or damaged file
            raise ValueError(f"Could not read the adapter weights for {name} in {path_or_repo_id}: {error}") from error
    for name, config in configs.items():
        component = getattr(pipeline, name)
        config.inference_mode = True
        inject_adapter_in_model(config, component, adapter_name=adapter_name)
        try:
            set_peft_model_state_dict(component, weights[name], adapter_name=adapter_name)
        except ValueError:  # the adapter does not fit this component: leave it as it was
            delete_adapter(component, adapter_name, prefix="sara_", layer_cls=SaRALayer)
            component.peft_config.pop(adapter_name, None)
            raise
        component._hf_peft_config_loaded = True  # lets diffusers' adapter methods (set_adapters, fuse_lora) see it
    return list(configs)
