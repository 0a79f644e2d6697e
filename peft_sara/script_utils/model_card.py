"""The model card of a run's output folder: the Hub's metadata as diffusers' cards carry it, and code that runs when
copied, from the Hub repo the run was pushed to or, for a local folder, from its absolute path."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import peft_sara

from .models import PIPELINE_CLASSES

# The licences diffusers' DreamBooth scripts put on their cards (a run inherits its base model's; Flux.1 [dev] and
# SD3 have licences of their own), the family tags, the denoiser's folder and the text encoders that train.
LICENSES = {"sd": "creativeml-openrail-m", "sdxl": "openrail++", "flux": "other", "sd3": "other"}
FAMILY_TAGS = {
    "sd": ["stable-diffusion"],
    "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
    "flux": ["flux", "flux-diffusers"],
    "sd3": ["sd3", "sd3-diffusers"],
}
DENOISERS = {"sd": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}
TRAINED_TEXT_ENCODERS = {
    "sd": ["text_encoder"],
    "sdxl": ["text_encoder", "text_encoder_2"],
    "flux": ["text_encoder"],
    "sd3": ["text_encoder", "text_encoder_2"],
}


def write_model_card(
    output_dir: str,
    repo_id: str | None,
    base_model: str,
    images: list[Path],
    train_text_encoder: bool,
    instance_prompt: str | None = None,
    validation_prompt: str | None = None,
    new_tokens: dict[str, list[str]] | None = None,
    embeddings_file: str | None = None,
    embedding_keys: Sequence[str] = ("clip_l",),
    family: str = "sd",
    vae_path: str | None = None,
) -> Path:
    """Write output_dir/README.md. `repo_id`: the Hub repo the folder is pushed to (None: the card loads from the
    folder's absolute path). With pivotal tuning, `new_tokens` by abstraction, saved in `embeddings_file` under
    `embedding_keys`. `family`: the base's kind (a key of PIPELINE_CLASSES), sampled with the VAE at `vae_path`."""
    source = repo_id or str(Path(output_dir).resolve())
    prompt = instance_prompt or validation_prompt or "a photo"
    pipeline_lines = _pipeline_lines(base_model, family, vae_path)
    front_matter = _front_matter(output_dir, base_model, images, instance_prompt, validation_prompt, family)
    denoiser = DENOISERS[family]
    folders = [denoiser] + TRAINED_TEXT_ENCODERS[family] * train_text_encoder
    what = f"DreamBooth on `{instance_prompt}`" if instance_prompt else "text-to-image fine-tuning"
    base_link = (
        f"`{base_model}`" if os.path.isdir(base_model) else f"[{base_model}](https://huggingface.co/{base_model})"
    )
    body = f"""
# SaRA {what}: {repo_id or Path(output_dir).resolve().name}

SaRA adapter weights ({", ".join(folders)}) for {base_link}, trained with peft-sara (SaRA, [Progressive Sparse
Low-Rank Adaptation](https://arxiv.org/abs/2409.06633)): only the base weights with |w| below a threshold were
fine-tuned.

## How to use

```bash
pip install "peft-sara=={peft_sara.__version__}" diffusers transformers accelerate
```

```python
import peft_sara  # registers the SaRA adapter type with PEFT
{pipeline_lines}
peft_sara.load_sara_weights(pipe, "{source}")
image = pipe({json.dumps(prompt)}).images[0]
image.save("sara.png")
```

The folders {", ".join(f"`{folder}/`" for folder in folders)} are standard PEFT adapters:
`PeftModel.from_pretrained(pipe.{denoiser}, "{source}", subfolder="{denoiser}")` loads one of them too, after
`import peft_sara`.
"""
    if new_tokens:
        body += _new_tokens_section(
            source, repo_id is not None, pipeline_lines, new_tokens, embeddings_file, embedding_keys, family
        )
    if validation_prompt and images:
        gallery = "\n".join(f"![{path.stem}]({path.relative_to(output_dir).as_posix()})" for path in images)
        body += f"\n## Validation images\n\nPrompt: `{validation_prompt}`\n\n{gallery}\n"
    path = Path(output_dir) / "README.md"
    path.write_text(front_matter + body, encoding="utf-8")
    return path


def _front_matter(
    output_dir: str,
    base_model: str,
    images: list[Path],
    instance_prompt: str | None,
    validation_prompt: str | None,
    family: str,
) -> str:
    """The Hub's YAML metadata: library, base model, licence, pipeline tag, tags, and a widget of the images."""
    tags = ["sara", "peft", "diffusers", "text-to-image"] + (["dreambooth"] if instance_prompt else [])
    tags += FAMILY_TAGS[family]
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_model}",
        f"license: {LICENSES[family]}",
        "pipeline_tag: text-to-image",
        "tags:",
        *(f"- {tag}" for tag in tags),
    ]
    if instance_prompt:
        lines.append(f"instance_prompt: {json.dumps(instance_prompt)}")
    if validation_prompt and images:
        lines.append("widget:")
        for image in images:
            lines += [f"- text: {json.dumps(validation_prompt)}", "  output:"]
            lines.append(f"    url: {Path(image).relative_to(output_dir).as_posix()}")
    return "\n".join([*lines, "---"]) + "\n"


def _pipeline_lines(base_model: str, family: str, vae_path: str | None) -> str:
    pipeline_class = PIPELINE_CLASSES[family]
    if not vae_path:
        return f'from diffusers import {pipeline_class}\n\npipe = {pipeline_class}.from_pretrained("{base_model}")'
    return (
        f"from diffusers import AutoencoderKL, {pipeline_class}\n\n"
        f'vae = AutoencoderKL.from_pretrained("{vae_path}")\n'
        f'pipe = {pipeline_class}.from_pretrained("{base_model}", vae=vae)'
    )


def _new_tokens_section(
    source: str,
    on_hub: bool,
    pipeline_lines: str,
    new_tokens: dict[str, list[str]],
    embeddings_file: str,
    embedding_keys: Sequence[str],
    family: str,
) -> str:
    """How to prompt with the new tokens of pivotal tuning, and how to load them with diffusers' own calls."""
    triggers = "\n".join(f"- `{abstraction}` → `{''.join(tokens)}`" for abstraction, tokens in new_tokens.items())
    all_tokens = [token for tokens in new_tokens.values() for token in tokens]
    # the pipeline attribute suffix of each key's text encoder and tokenizer: T5 is Flux's second, SD3's third
    suffixes = {"clip_l": "", "clip_g": "_2", "t5": "_3" if family == "sd3" else "_2"}
    denoiser = DENOISERS[family]
    calls = "\n".join(
        f'pipe.load_textual_inversion(state_dict["{key}"], token={json.dumps(all_tokens)}, '
        f"text_encoder=pipe.text_encoder{suffixes[key]}, tokenizer=pipe.tokenizer{suffixes[key]})"
        for key in embedding_keys
    )
    plural = "s" if len(embedding_keys) > 1 else ""
    imports = "import peft_sara\nfrom safetensors.torch import load_file"
    if on_hub:
        imports += "\nfrom huggingface_hub import hf_hub_download"
        file = f'hf_hub_download("{source}", "{embeddings_file}")'
    else:
        file = json.dumps(str(Path(source) / embeddings_file))
    return f"""
## New tokens (pivotal tuning)

The embeddings of new tokens were trained with the adapters; write them in the prompt where the training prompts
had the identifier:

{triggers}

`load_sara_weights` above adds them to the tokenizer{plural} and text encoder{plural} with the adapters. With
diffusers' own textual-inversion loader instead (the file `{embeddings_file}`):

```python
{imports}
{pipeline_lines}
peft_sara.load_sara_weights(pipe, "{source}", components=["{denoiser}"])  # the adapters without the tokens
state_dict = load_file({file})
{calls}
```
"""
