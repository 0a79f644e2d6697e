"""The README's quickstart runs as written, on a tiny UNet and pipeline."""

from __future__ import annotations

import os
import re

from conftest import tiny_pipeline, tiny_unet, unet_inputs
from peft import PeftModel

from peft_sara import SaRALayer

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quickstart_code() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "README.md lost its quickstart block"
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
    exec(compile(quickstart_code(), README, "exec"), namespace)
    assert pushed == ["me/my-sara"]
    assert (tmp_path / "out" / "unet" / "adapter_model.safetensors").is_file()
    assert isinstance(namespace["unet"], PeftModel)
    assert namespace["training"].step == 3
    assert any(isinstance(module, SaRALayer) for module in namespace["pipe"].unet.modules())
