"""peft_sara.script_utils.checkpoints: atomic, verified checkpoints with no pickle of ours, and resume decisions."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import MLPConv
from peft import get_peft_model

import peft_sara
from peft_sara.script_utils.checkpoints import (
    MANIFEST_NAME,
    checkpoint_folders,
    compare_run_settings,
    find_resume_checkpoint,
    load_training_state,
    parse_checkpoint_name,
    read_run_settings,
    resume_settings,
    save_checkpoint,
    save_training_state,
)
from peft_sara.script_utils.cli import UserInputError

SETTINGS = {
    "threshold": 0.02,
    "target_fraction": None,
    "include_bias": False,
    "train_text_encoder": False,
    "text_encoder_threshold": None,
    "lambda_rank": 5e-3,
    "progressive_step": 2,
    "seed": 0,
    "num_processes": 1,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "no",
    "max_train_steps": 4,
}


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def test_only_finished_checkpoint_folders_count():
    assert parse_checkpoint_name("checkpoint-12") == 12
    for name in ("checkpoint-12.unfinished", "checkpoint-12.deleting", "checkpoint-best", "chkpt-3", "checkpoint-"):
        assert parse_checkpoint_name(name) is None


def test_checkpoint_folders_skip_unfinished_half_deleted_and_foreign_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-30.unfinished", "checkpoint-40.deleting", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-50").write_text("a file, not a checkpoint")
    assert [path.name for path in checkpoint_folders(str(tmp_path))] == ["checkpoint-2", "checkpoint-10"]


def test_save_checkpoint_is_atomic_keeps_the_limit_and_records_the_run(tmp_path, accelerator):
    (tmp_path / "checkpoint-1.deleting").mkdir()  # left by a run killed while pruning
    for step in (1, 2, 3):
        save_checkpoint(accelerator, str(tmp_path), step, total_limit=2, run_settings=SETTINGS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    manifest = json.loads((tmp_path / "checkpoint-3" / MANIFEST_NAME).read_text())
    assert manifest["step"] == 3 and "random_states_0.pkl" in manifest["files"]
    assert read_run_settings(tmp_path / "checkpoint-3") == SETTINGS
    assert find_resume_checkpoint("latest", str(tmp_path)).name == "checkpoint-3"
    assert find_resume_checkpoint(None, str(tmp_path)) is None


def test_a_damaged_checkpoint_is_never_resumed(tmp_path, accelerator, caplog):
    for step in (2, 4):
        save_checkpoint(accelerator, str(tmp_path), step, total_limit=None, run_settings=SETTINGS)
    state = tmp_path / "checkpoint-4" / "random_states_0.pkl"
    state.write_bytes(state.read_bytes()[:10])  # truncated
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint("latest", str(tmp_path)).name == "checkpoint-2"
    assert "checkpoint-4 is damaged (random_states_0.pkl is truncated" in caplog.text
    with pytest.raises(
        UserInputError, match=r"checkpoint-4 is damaged: .* older one \(--resume_from_checkpoint .*2\)"
    ):
        find_resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))
    (tmp_path / "checkpoint-2" / MANIFEST_NAME).unlink()
    with pytest.raises(UserInputError, match="Every checkpoint .* is damaged"):
        find_resume_checkpoint("latest", str(tmp_path))


def test_latest_without_any_checkpoint_starts_a_new_run(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint("latest", str(tmp_path)) is None
    assert "starting a new run" in caplog.text


def test_training_state_is_saved_as_safetensors_and_restored(tmp_path):
    model = get_peft_model(MLPConv(), peft_sara.SaRAConfig(threshold=0.05, progressive_step=1))
    optimizer = torch.optim.AdamW(model.parameters())
    training = peft_sara.attach(model, optimizer)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()  # the progressive step: some entries freeze
    path = tmp_path / "sara_training.safetensors"
    save_training_state(training, path)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    restored = peft_sara.attach(model, torch.optim.AdamW(model.parameters()))
    load_training_state(restored, path)
    assert restored.step == 1
    saved, loaded = training.state_dict()["frozen_positions"], restored.state_dict()["frozen_positions"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_a_resume_that_would_train_other_weights_is_refused():
    for key, value in {"target_fraction": 0.1, "threshold": 0.01, "include_bias": True}.items():
        with pytest.raises(UserInputError, match=f"trained with --{key}"):
            compare_run_settings(SETTINGS, {**SETTINGS, key: value})


def test_a_resume_keeps_the_checkpoints_theta_and_progressive_step_and_says_what_differs(caplog):
    saved = {**SETTINGS, "unet_threshold": 0.0199}
    current = {**SETTINGS, "progressive_step": 4, "max_train_steps": 8, "num_processes": 2}
    with caplog.at_level(logging.WARNING):
        settings = resume_settings(saved, current, explicit=set())
    assert settings["progressive_step"] == 2 and settings["unet_threshold"] == 0.0199
    assert "num_processes 1 -> 2" in caplog.text and "max_train_steps" not in caplog.text
    assert resume_settings(saved, current, explicit={"progressive_step"})["progressive_step"] == 4


def test_a_checkpoint_that_fails_to_load_names_itself(tmp_path, accelerator):
    from peft_sara.script_utils.checkpoints import load_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    folder = save_checkpoint(accelerator, str(tmp_path), 3, total_limit=None, run_settings=SETTINGS)
    state = folder / "optimizer.bin"
    state.write_bytes(b"\0" * state.stat().st_size)  # same size, so the manifest cannot tell: loading does
    with pytest.raises(UserInputError, match=r"checkpoint-3 is damaged \(.*\); resume from an older one"):
        load_checkpoint(accelerator, folder)


def test_a_progressive_step_after_the_last_step_is_named(caplog):
    import argparse

    from peft_sara.script_utils.checkpoints import run_settings

    flags = {key: value for key, value in SETTINGS.items() if key not in ("num_processes", "mixed_precision")}
    args = argparse.Namespace(**{**flags, "progressive_step": 2500, "no_progressive": False}, explicit=set())
    accelerator = argparse.Namespace(num_processes=1, mixed_precision="no")
    with caplog.at_level(logging.WARNING):
        settings = run_settings(args, accelerator, max_train_steps=100)
    assert settings["progressive_step"] == 2500 and settings["mixed_precision"] == "no"
    assert "The progressive step (2500) comes after the run's last step (100)" in caplog.text
