"""configs/: accelerate configs that accelerate reads, and presets whose every key is a flag of their script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

from peft_sara.script_utils.arguments import read_config_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESET_SCRIPTS = {
    "paper_style.yaml": "train_text_to_image_sara",
    "dreambooth.yaml": "train_dreambooth_sara",
    "demo.yaml": "train_dreambooth_sara",
}


@pytest.mark.parametrize(
    "name, distributed_type",
    [
        ("single_gpu.yaml", "NO"),
        ("multi_gpu_ddp.yaml", "MULTI_GPU"),
        ("deepspeed_zero2.yaml", "DEEPSPEED"),
        ("deepspeed_zero3.yaml", "DEEPSPEED"),
    ],
)
def test_accelerate_configs_load(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / name))
    assert config.distributed_type == distributed_type


def test_every_shipped_accelerate_config_launches_an_engine_the_scripts_run_under():
    from accelerate.commands.config.config_args import load_config_from_file

    from peft_sara.sharding import unsupported_launch

    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        deepspeed = config.deepspeed_config or {}
        if "deepspeed_config_file" in deepspeed:  # a DeepSpeed config of its own, by its path from the repository root
            deepspeed = deepspeed_file_settings(CONFIGS.parent / deepspeed["deepspeed_config_file"])
        offload = any(deepspeed.get(f"offload_{part}_device", "none") != "none" for part in ("optimizer", "param"))
        refusal = unsupported_launch(config.distributed_type, deepspeed.get("zero_stage"), offload)
        assert refusal is None, path.name
        if config.distributed_type == "DEEPSPEED":  # DeepSpeed clips in place of the scripts' --max_grad_norm
            assert deepspeed["gradient_clipping"] == 1.0, "the scripts' default --max_grad_norm"


def deepspeed_file_settings(path: Path) -> dict:
    """A DeepSpeed JSON config's settings under the names accelerate's own DeepSpeed config gives them."""
    config = json.loads(path.read_text(encoding="utf-8"))
    zero = config["zero_optimization"]
    return {
        "zero_stage": zero["stage"],
        "gradient_clipping": config["gradient_clipping"],
        **{
            f"offload_{part}_device": zero.get(f"offload_{part}", {}).get("device", "none")
            for part in ("optimizer", "param")
        },
    }


def test_every_preset_names_a_known_script():
    presets = sorted(path.name for path in (CONFIGS / "presets").glob("*.yaml"))
    assert presets and set(presets) <= set(PRESET_SCRIPTS)


@pytest.mark.parametrize("preset", sorted(p.name for p in (CONFIGS / "presets").glob("*.yaml")))
def test_presets_use_only_known_flags(preset):
    parser = load_script(PRESET_SCRIPTS[preset]).make_parser()
    values = read_config_file(parser, str(CONFIGS / "presets" / preset))
    assert values and all(isinstance(key, str) for key in values)
