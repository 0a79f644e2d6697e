"""The README's code blocks run as written: the quickstart on a tiny UNet and pipeline, the pipeline's and the model's
adapter APIs on the demo's base."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline, tiny_unet, unet_inputs
from peft import PeftModel, get_peft_model

import peft_sara
from peft_sara import SaRALayer

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DEMO_BASE = REPO / "demo" / "base"


def readme_block(marker: str) -> str:
    """The Python block that follows the README's comment `<!-- marker ... -->`."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker}\b[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, f"README.md lost its {marker} block"
    return match.group(1)


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(PeftModel, "push_to_hub", lambda self, repo_id, **kwargs: pushed.append(repo_id))
    monkeypatch.chdir(tmp_path)
    unet = tiny_unet()
    namespace = {
        "unet": unet,
        "fresh_unet": tiny_unet(),
        "pipe": tiny_pipeline(),
        "dataloader": [unet_inputs(unet, seed=seed) for seed in range(3)],
        "diffusion_loss": lambda model, batch: model(**batch).sample.square().mean(),
    }
    exec(compile(readme_block("quickstart"), str(README), "exec"), namespace)
    assert pushed == ["me/my-sara"]
    assert (tmp_path / "out" / "unet" / "adapter_model.safetensors").is_file()
    assert isinstance(namespace["unet"], PeftModel)
    assert namespace["training"].step == 3
    assert any(isinstance(module, SaRALayer) for module in namespace["pipe"].unet.modules())


def save_training_output(folder: Path, seed: int) -> None:
    """A training script's output layout, unet/ and text_encoder/, with non-zero updates on the demo base."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    for name, model_class in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        torch.manual_seed(seed)
        model = model_class.from_pretrained(DEMO_BASE, subfolder=name)
        config = peft_sara.SaRAConfig(target_fraction=0.1, init_weights=False)
        get_peft_model(model, config).save_pretrained(folder / name)


def scales(model) -> dict[str, set[float]]:
    """The weight of each adapter in the SaRA layers of `model`."""
    found: dict[str, set[float]] = {}
    for module in model.modules():
        if isinstance(module, SaRALayer):
            for name, scale in module.sara_scaling.items():
                found.setdefault(name, set()).add(scale)
    return found


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), torch.randn(1, 8, 64, generator=generator)).sample


@pytest.mark.skipif(
    not (DEMO_BASE / "model_index.json").is_file(), reason="demo/base is built by demo/build_demo_base.py"
)
def test_adapter_apis_run_as_written(tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline

    save_training_output(tmp_path / "style-sara", seed=1)
    save_training_output(tmp_path / "subject-sara", seed=2)
    (tmp_path / "demo").symlink_to(REPO / "demo")
    monkeypatch.chdir(tmp_path)
    base = StableDiffusionPipeline.from_pretrained(DEMO_BASE)
    code = readme_block("adapters")
    namespace = {}
    # everything up to the pipeline's fuse/unfuse, so that the state it leaves can be checked
    head, tail = code.split("print(pipe.get_list_adapters()", 1)
    exec(compile(head, str(README), "exec"), namespace)
    pipe = namespace["pipe"]
    assert pipe.get_active_adapters() == ["style", "subject"]
    assert scales(pipe.unet) == scales(pipe.text_encoder) == {"style": {0.6}, "subject": {0.6}}
    merged = unet_output(pipe.unet)
    pipe.disable_lora()  # the base again, up to the rounding of fuse_lora's w + Δ - Δ
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(base.unet), rtol=0, atol=1e-5)
    pipe.enable_lora()
    assert torch.equal(unet_output(pipe.unet), merged)

    exec(compile("print(pipe.get_list_adapters()" + tail, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "{'unet': ['style', 'subject'], 'text_encoder': ['style', 'subject']}" in printed
    assert pipe.get_list_adapters() == {"unet": ["subject"], "text_encoder": ["subject"]}
    assert scales(pipe.unet) == {"subject": {0.48}}  # the UNet's own weights=[1.0, 0.6], times fuse_lora's 0.8
    assert scales(pipe.text_encoder) == {"subject": {0.6}}  # the pipeline's weights
