"""peft_sara.script_utils.output: adapter folders written whole, the output folder's lock."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet
from safetensors import safe_open

import peft_sara
from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.output import (
    COMPONENTS_KEY,
    SAVE_ID_KEY,
    lock_output_dir,
    save_adapters,
)


def adapted_unets(count: int) -> list[torch.nn.Module]:
    unets = []
    for seed in range(count):
        torch.manual_seed(seed)
        unet = tiny_unet()
        unet.add_adapter(peft_sara.SaRAConfig(threshold=0.02, init_weights=False))
        unets.append(unet)
    return unets


def metadata(path) -> dict[str, str]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata()


def test_components_of_one_save_share_its_id_and_replace_the_old_folders(tmp_path):
    first, second = adapted_unets(2)
    save_adapters(str(tmp_path), {"unet": first, "text_encoder": second}, base_model="org/base")
    old_id = metadata(tmp_path / "unet")[SAVE_ID_KEY]
    (tmp_path / "unet.unfinished").mkdir()  # left by a killed save
    save_adapters(str(tmp_path), {"unet": second, "text_encoder": first})
    unet, text_encoder = metadata(tmp_path / "unet"), metadata(tmp_path / "text_encoder")
    assert unet[SAVE_ID_KEY] == text_encoder[SAVE_ID_KEY] != old_id
    assert unet[COMPONENTS_KEY] == "unet,text_encoder"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["text_encoder", "unet"]


def test_non_finite_values_are_never_saved(tmp_path):
    good, bad = adapted_unets(2)
    next(param for name, param in bad.named_parameters() if "sara_values" in name).data[0] = float("nan")
    with pytest.raises(UserInputError, match="text_encoder adapter holds values that are not finite"):
        save_adapters(str(tmp_path), {"unet": good, "text_encoder": bad})
    assert list(tmp_path.iterdir()) == []  # not even the good component


def test_a_process_that_only_helps_to_gather_writes_nothing(tmp_path, monkeypatch):
    (unet,) = adapted_unets(1)
    import peft.utils

    reads = []
    read = peft.utils.get_peft_model_state_dict
    monkeypatch.setattr(peft.utils, "get_peft_model_state_dict", lambda *a, **k: reads.append(1) or read(*a, **k))
    save_adapters(str(tmp_path / "out"), {"unet": unet}, write=False)
    assert reads == [1], "it reads the adapter (a collective under ZeRO-3)"
    assert not (tmp_path / "out").exists()


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    with lock_output_dir(str(tmp_path / "out")):
        with pytest.raises(UserInputError, match=r"Another run \(process \d+\) is using --output_dir"):
            with lock_output_dir(str(tmp_path / "out")):
                pass
    with lock_output_dir(str(tmp_path / "out")):  # free again once the first run ends
        pass


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is not writable"):
        with lock_output_dir(str(tmp_path / "file" / "out")):
            pass


def test_values_are_saved_in_the_precision_asked_for(tmp_path):
    from safetensors.torch import load_file

    (unet,) = adapted_unets(1)
    save_adapters(str(tmp_path), {"unet": unet}, dtype=torch.bfloat16)
    saved = load_file(tmp_path / "unet" / "adapter_model.safetensors")
    assert {tensor.dtype for key, tensor in saved.items() if "sara_values" in key} == {torch.bfloat16}
    assert all(not tensor.is_floating_point() for key, tensor in saved.items() if "sara_values" not in key)
    next(param for name, param in unet.named_parameters() if "sara_values" in name).data[0] = 1e6  # > fp16's range
    with pytest.raises(UserInputError, match="not finite in torch.float16"):
        save_adapters(str(tmp_path / "half"), {"unet": unet}, dtype=torch.float16)
