"""scripts/train_text_to_image_sara.py on a tiny pipeline: captioned folder, precision, Hub upload, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script, write_images
from safetensors.torch import load_file

from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.models import weight_dtype_of


@pytest.fixture
def captioned_folder(tmp_path):
    folder = tmp_path / "style"
    write_images(folder, 3, seed=1)
    captions = ["a red castle", ["a blue tree", "a tree, blue"], "a green lake"]
    lines = [json.dumps({"file_name": f"image-{i}.png", "text": caption}) for i, caption in enumerate(captions)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def text_to_image_args(tiny_pipeline_dir, captioned_folder, tmp_path):
    return [
        "--pretrained_model_name_or_path",
        str(tiny_pipeline_dir),
        "--train_data_dir",
        str(captioned_folder),
        "--output_dir",
        str(tmp_path / "out"),
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--threshold",
        "0.02",
        "--seed",
        "0",
        "--report_to",
        "none",
        "--random_flip",
        "--num_inference_steps",
        "2",
        "--num_validation_images",
        "1",
    ]


def fake_hub(monkeypatch):
    """Intercept the Hub upload; return what would have been uploaded (filtered as upload_folder filters)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    uploads = []

    def upload_folder(repo_id, folder_path, ignore_patterns=None, **kwargs):
        from pathlib import Path

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploads.append((repo_id, sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))))

    def create_repo(repo_id, **kwargs):  # as the Hub does: a bare name goes to the token's user
        return type("Repo", (), {"repo_id": repo_id if "/" in repo_id else f"someone/{repo_id}"})

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return uploads


def test_trains_on_a_captioned_folder_and_pushes_without_checkpoints(text_to_image_args, tmp_path, monkeypatch):
    uploads = fake_hub(monkeypatch)
    args = text_to_image_args + [
        "--checkpointing_steps",
        "1",
        "--validation_prompt",
        "a red castle",
        "--push_to_hub",
        "--hub_model_id",
        "someone/style-sara",
        "--train_text_encoder",
    ]
    output = load_script("train_text_to_image_sara").main(args)
    assert (output / "checkpoint-2").is_dir()
    [(repo_id, files)] = uploads
    assert repo_id == "someone/style-sara"
    assert "unet/adapter_model.safetensors" in files and "text_encoder/adapter_config.json" in files
    assert "README.md" in files and "validation/final-0.png" in files
    assert not any(name.startswith("checkpoint-") or name.startswith("logs/") for name in files)
    card = (output / "README.md").read_text()
    assert "- text-to-image" in card and "dreambooth" not in card and "someone/style-sara" in card


def test_push_without_a_validation_prompt(text_to_image_args, monkeypatch):
    uploads = fake_hub(monkeypatch)
    output = load_script("train_text_to_image_sara").main(
        text_to_image_args + ["--push_to_hub", "--save_precision", "bf16"]
    )
    saved = load_file(output / "unet" / "adapter_model.safetensors")
    assert {tensor.dtype for key, tensor in saved.items() if "sara_values" in key} == {torch.bfloat16}
    [(repo_id, files)] = uploads
    assert "unet/adapter_model.safetensors" in files and not any(name.startswith("validation/") for name in files)
    assert repo_id == f"someone/{output.name}"
    card = (output / "README.md").read_text()
    assert f'load_sara_weights(pipe, "someone/{output.name}")' in card, "the card names the repo the Hub created"
    assert str(output) not in card


def test_bf16_run_keeps_the_sara_values_in_fp32(text_to_image_args, tmp_path):
    """Validation mid-run shares the training UNet: it must not downcast the adapter."""
    args = ["--mixed_precision", "bf16", "--validation_prompt", "a red castle", "--validation_steps", "1"]
    output = load_script("train_text_to_image_sara").main(text_to_image_args + args)
    assert (output / "validation" / "step-1-0.png").is_file()
    saved = load_file(output / "unet" / "adapter_model.safetensors")
    values = [tensor for key, tensor in saved.items() if "sara_values" in key]
    assert values and all(tensor.dtype == torch.float32 for tensor in values)
    assert any(tensor.abs().sum() > 0 for tensor in values)


def test_loss_options_train(text_to_image_args):
    args = ["--snr_gamma", "5.0", "--noise_offset", "0.1", "--prediction_type", "v_prediction"]
    args += ["--gradient_checkpointing", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine"]
    output = load_script("train_text_to_image_sara").main(text_to_image_args + args)
    saved = load_file(output / "unet" / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in saved.items() if "sara_values" in key)


def test_cached_latents_and_a_named_tracker_project(text_to_image_args, monkeypatch):
    from peft_sara.script_utils import data

    encoded = []
    original_init = data.CachedLatents.__init__

    def counting_init(self, dataset, vae, *rest):
        original_init(self, dataset, vae, *rest)
        encoded.append(len(self))

    monkeypatch.setattr(data.CachedLatents, "__init__", counting_init)
    args = ["--cache_latents", "--report_to", "tensorboard", "--tracker_project_name", "my-style"]
    args += ["--image_interpolation_mode", "lanczos"]
    output = load_script("train_text_to_image_sara").main(text_to_image_args + args)
    assert encoded == [3], "every image encoded once, before training"
    assert list((output / "logs" / "my-style").glob("events.out.tfevents.*"))
    saved = load_file(output / "unet" / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in saved.items() if "sara_values" in key)


def test_precision_chosen_by_accelerate_config_counts_too(monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate config`/`launch` set
    assert weight_dtype_of(Accelerator(cpu=True).mixed_precision) == torch.bfloat16
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda args, tmp: args + ["--dataset_name", "someone/data"], "exactly one of"),
        (lambda args, tmp: _without_data(args), "exactly one of"),
        (lambda args, tmp: _with_data(args, tmp / "nowhere"), "no such folder"),
        (lambda args, tmp: _with_data(args, _folder_without_metadata(tmp)), "has no metadata.jsonl"),
        (lambda args, tmp: _with_data(args, _folder_with_bad_metadata(tmp)), "line 1: expected a JSON object"),
        (
            lambda args, tmp: args + ["--caption_column", "caption"],
            "expected a JSON object with file_name and 'caption'",
        ),
    ],
    ids=["both-sources", "no-source", "missing-folder", "no-metadata", "bad-metadata", "wrong-caption-column"],
)
def test_bad_input_is_refused_before_models_load(text_to_image_args, tmp_path, change, message):
    with pytest.raises(UserInputError, match=message):
        load_script("train_text_to_image_sara").parse_args(change(text_to_image_args, tmp_path))


def _without_data(args):
    index = args.index("--train_data_dir")
    return args[:index] + args[index + 2 :]


def _with_data(args, folder):
    return _without_data(args) + ["--train_data_dir", str(folder)]


def _folder_without_metadata(tmp):
    write_images(tmp / "plain", 1, seed=2)
    return tmp / "plain"


def _folder_with_bad_metadata(tmp):
    write_images(tmp / "bad", 1, seed=2)
    (tmp / "bad" / "metadata.jsonl").write_text("not json\n")
    return tmp / "bad"
