"""Loading SaRA adapters into a diffusers pipeline in one call."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, load_peft_weights

from .peft_type import SARA

# Pipeline components that training scripts adapt, in the folders they save them to.
ADAPTABLE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _adapter_folders(path_or_repo_id: str, components: list[str], hub_kwargs: dict[str, Any]) -> dict[str, str]:
    """Map each component to the subfolder that holds its adapter ('' for an adapter at the top level)."""
    if os.path.isdir(path_or_repo_id):
        found = {name: name for name in components if os.path.isfile(os.path.join(path_or_repo_id, name, CONFIG_NAME))}
        if not found and os.path.isfile(os.path.join(path_or_repo_id, CONFIG_NAME)):
            found = {components[0]: ""}
        return found
    found = {}
    for name in components:
        try:
            hf_hub_download(path_or_repo_id, CONFIG_NAME, subfolder=name, **hub_kwargs)
            found[name] = name
        except EntryNotFoundError:
            continue
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
    is_local = os.path.isdir(path_or_repo_id)
    if not is_local and (os.path.exists(path_or_repo_id) or path_or_repo_id.startswith((".", "/", "~"))):
        raise ValueError(f"No adapter folder at {path_or_repo_id}: pass the folder a training script saved to.")
    folders = _adapter_folders(path_or_repo_id, available, hub_kwargs)
    if not folders:
        raise ValueError(
            f"Found no adapter ({CONFIG_NAME}) for the components {available} in {path_or_repo_id}: pass the output "
            "folder of a training script or a PEFT adapter folder."
        )
    configs = {}
    for name, subfolder in folders.items():
        config = PeftConfig.from_pretrained(path_or_repo_id, subfolder=subfolder or None, **hub_kwargs)
        if config.peft_type != SARA:
            raise ValueError(
                f"The adapter for {name} in {path_or_repo_id} is a {config.peft_type} adapter, not SaRA; load LoRA "
                "adapters with pipeline.load_lora_weights()."
            )
        configs[name] = config
        component = getattr(pipeline, name)
        if adapter_name in (getattr(component, "peft_config", None) or {}):
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}; pass another adapter_name.")
    for name, config in configs.items():
        try:
            if is_local:
                weights = load_peft_weights(os.path.join(path_or_repo_id, folders[name]))
            else:
                weights = load_peft_weights(path_or_repo_id, subfolder=folders[name], **hub_kwargs)
        except Exception as error:  # safetensors and torch raise many types for a damaged file
            raise ValueError(f"Could not read the adapter weights for {name} in {path_or_repo_id}: {error}") from error
        component = getattr(pipeline, name)
        config.inference_mode = True
        inject_adapter_in_model(config, component, adapter_name=adapter_name)
        set_peft_model_state_dict(component, weights, adapter_name=adapter_name)
        component._hf_peft_config_loaded = True  # lets diffusers' adapter methods (set_adapters, fuse_lora) see it
    return list(configs)
