"""peft_sara.script_utils.model_card: the Hub metadata diffusers' cards carry, and code that runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from PIL import Image

import peft_sara
from peft_sara.script_utils.model_card import write_model_card


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_a_pushed_card_carries_the_hub_metadata_and_loads_from_the_repo(tmp_path):
    (tmp_path / "validation").mkdir()
    images = [tmp_path / "validation" / f"final-{index}.png" for index in range(2)]
    for image in images:
        Image.new("RGB", (4, 4)).save(image)
    card = write_model_card(str(tmp_path), "me/style", "org/base", images, False, validation_prompt="a castle")
    text = card.read_text()
    metadata = front_matter(text)
    assert metadata["library_name"] == "peft" and metadata["base_model"] == "org/base"
    assert metadata["license"] == "creativeml-openrail-m" and metadata["pipeline_tag"] == "text-to-image"
    assert {"sara", "text-to-image", "stable-diffusion"} <= set(metadata["tags"]) and "dreambooth" not in metadata
    assert metadata["widget"] == [
        {"text": "a castle", "output": {"url": "validation/final-0.png"}},
        {"text": "a castle", "output": {"url": "validation/final-1.png"}},
    ]
    assert f'pip install "peft-sara=={peft_sara.__version__}"' in text
    assert 'load_sara_weights(pipe, "me/style")' in text and "[org/base](https://huggingface.co/org/base)" in text
    assert "![final-0](validation/final-0.png)" in text


def test_a_local_card_loads_from_the_folder_s_absolute_path(tmp_path):
    output = tmp_path / "dog"
    output.mkdir()
    tokens = {"TOK": ["<s0>", "<s1>"]}
    text = write_model_card(
        str(output), None, str(tmp_path), [], True, instance_prompt="a <s0><s1> dog",
        new_tokens=tokens, embeddings_file="dog_emb.safetensors", embedding_keys=("clip_l", "clip_g"), family="sdxl",
        vae_path="madebyollin/sdxl-vae-fp16-fix",
    ).read_text()  # fmt: skip
    metadata = front_matter(text)
    assert metadata["license"] == "openrail++" and "stable-diffusion-xl" in metadata["tags"]
    assert metadata["instance_prompt"] == "a <s0><s1> dog" and "widget" not in metadata
    blocks = python_blocks(text)
    assert f'load_sara_weights(pipe, "{output}")' in blocks[0]
    assert 'AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix")' in blocks[0]
    assert "https://huggingface.co/" + str(tmp_path) not in text  # a local base is not linked to the Hub
    assert "hf_hub_download" not in text and f'load_file("{output / "dog_emb.safetensors"}")' in blocks[1]
    assert "tokenizer=pipe.tokenizer_2" in blocks[1]
    for block in blocks:  # each block runs on its own when copied
        assert "import peft_sara" in block and "from_pretrained(" in block


def test_the_folders_listed_are_the_adapted_components(tmp_path):
    text = write_model_card(str(tmp_path), "me/dog", "org/base", [], True, instance_prompt="sks dog").read_text()
    assert "`unet/`, `text_encoder/`" in text and "text_encoder_2" not in text
    assert Path(tmp_path, "README.md").is_file()


def test_a_flux_card_names_its_pipeline_transformer_and_licence(tmp_path):
    text = write_model_card(
        str(tmp_path), "me/flux-dog", "black-forest-labs/FLUX.1-dev", [], True, instance_prompt="a sks dog",
        family="flux",
    ).read_text()  # fmt: skip
    metadata = front_matter(text)
    assert metadata["license"] == "other" and {"flux", "flux-diffusers", "dreambooth"} <= set(metadata["tags"])
    (block,) = python_blocks(text)
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")' in block
    assert (
        "`transformer/`, `text_encoder/`" in text
        and 'PeftModel.from_pretrained(pipe.transformer, "me/flux-dog"' in text
    )
