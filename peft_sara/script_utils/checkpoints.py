"""Resumable checkpoints: written atomically, verified before a resume, holding no pickle of ours.

A checkpoint folder `checkpoint-<step>` holds the SaRA adapters as PEFT folders (no copy of the base model),
accelerate's optimizer, schedule and RNG states, SaRA's training state as safetensors, and last a manifest
(`sara_checkpoint.json`) with the run's settings and the size of every file. Every process writes into
`checkpoint-<step>.unfinished`, which the main process renames once all are done; a replaced or pruned checkpoint is
renamed to `*.deleting` before it is removed. So a kill at any moment leaves no folder that `latest` would pick, and
a damaged one (a file missing or truncated) is found from its manifest before any model loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..training import SaRATraining
from .cli import UserInputError, get_logger
from .output import save_adapters, takes_every_process

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
UNFINISHED_SUFFIX = ".unfinished"
DELETING_SUFFIX = ".deleting"
MANIFEST_NAME = "sara_checkpoint.json"
TRAINING_STATE_NAME = "sara_training.safetensors"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a finished checkpoint's folder name `checkpoint-<step>`, else None."""
    step = name.removeprefix(CHECKPOINT_PREFIX)
    return int(step) if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else None


def checkpoint_folders(output_dir: str) -> list[Path]:
    """Finished checkpoints, oldest first (an unfinished or half-deleted one never counts)."""
    folders = [path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted(
        (path for path in folders if parse_checkpoint_name(path.name) is not None),
        key=lambda path: parse_checkpoint_name(path.name),
    )


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed (a file missing or of the wrong size), or None when it is complete."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        sizes = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_NAME} is missing or unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, {size} written)"
    return None


def resolve_checkpoint_path(resume_from: str, output_dir: str) -> Path:
    """A checkpoint named on the command line: a folder as given, or by its name inside the output folder (as
    diffusers' scripts read it)."""
    given = Path(resume_from)
    inside = Path(output_dir) / given.name
    return inside if not given.is_dir() and inside.is_dir() else given


def find_resume_checkpoint(resume_from: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: a given folder, or with 'latest' the newest complete one (an older one when
    the newest is damaged, saying so). A damaged folder that was asked for by name is refused."""
    if not resume_from:
        return None
    if resume_from != "latest":
        folder = resolve_checkpoint_path(resume_from, output_dir)
        problem = checkpoint_problem(folder)
        if problem:
            older = [path for path in checkpoint_folders(str(folder.parent)) if path != folder]
            hint = f"--resume_from_checkpoint {older[-1]}" if older else "a new run"
            raise UserInputError(f"Checkpoint {folder} is damaged: {problem}. Resume from an older one ({hint}).")
        return folder
    folders = checkpoint_folders(output_dir)
    if not folders:
        logger.warning("No checkpoint in %s to resume from: starting a new run.", output_dir)
        return None
    for folder in reversed(folders):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("Checkpoint %s is damaged (%s): trying the one before it.", folder, problem)
    raise UserInputError(
        f"Every checkpoint in {output_dir} is damaged (e.g. {folders[-1].name}: {checkpoint_problem(folders[-1])}); "
        "start a new run in another --output_dir."
    )


def read_run_settings(checkpoint: Path) -> dict[str, Any]:
    """The run settings a checkpoint was written with (see `save_checkpoint`)."""
    return json.loads((checkpoint / MANIFEST_NAME).read_text(encoding="utf-8"))["run"]


def _remove(folder: Path) -> None:
    """Delete a folder so that a kill half-way leaves a name no resume picks."""
    doomed = folder.with_name(folder.name + DELETING_SUFFIX)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(
    accelerator, output_dir: str, step: int, total_limit: int | None, run_settings: dict[str, Any]
) -> Path:
    """Save a resumable checkpoint atomically (see the module's docstring); keep the newest `total_limit`."""
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    unfinished = final.with_name(final.name + UNFINISHED_SUFFIX)
    if accelerator.is_main_process:
        for leftover in [unfinished, *Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*{DELETING_SUFFIX}")]:
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    # on every process: DeepSpeed needs all of them; its model file holds the trained parameters alone, as the
    # adapters do (not a copy of the frozen base)
    accelerator.save_state(str(unfinished), **_deepspeed_kwargs(accelerator, exclude_frozen_parameters=True))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {
            path.relative_to(unfinished).as_posix(): path.stat().st_size
            for path in sorted(unfinished.rglob("*"))
            if path.is_file()
        }
        manifest = {"step": step, "run": run_settings, "files": files}
        (unfinished / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if final.exists():
            _remove(final)
        os.replace(unfinished, final)
        if total_limit is not None:
            for old in checkpoint_folders(output_dir)[:-total_limit]:
                _remove(old)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _deepspeed_kwargs(accelerator, **kwargs: Any) -> dict[str, Any]:
    """`kwargs` for DeepSpeed's save_checkpoint / load_checkpoint, which accelerate passes on under DeepSpeed only."""
    return kwargs if getattr(accelerator.state, "deepspeed_plugin", None) is not None else {}


class CheckpointedState(Protocol):
    """More state of a run that its checkpoints hold (the new tokens of pivotal tuning, a text encoder's schedule)."""

    def save_state(self, folder: Path) -> None: ...

    def load_state(self, folder: Path) -> None: ...


def register_checkpointing(
    accelerator,
    models: dict[str, torch.nn.Module],
    training: SaRATraining,
    states: Sequence[CheckpointedState] = (),
) -> None:
    """Make accelerate's save_state/load_state store the SaRA adapters (PEFT folders), SaRA's training state
    (safetensors) and the run's other `states`, not the whole models and no pickle. `models` maps a subfolder name
    to a (prepared) model with a SaRA adapter.

    Loading restores SaRA's training state and the `states` only: a resumed run has loaded the checkpoint's adapters
    already, with `load_checkpoint_adapters`, before its optimizer was made from them.
    """

    def save_hook(hook_models, weights, output_dir):
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
        if accelerator.is_main_process or takes_every_process(unwrapped):  # the main process writes
            save_adapters(output_dir, unwrapped, write=accelerator.is_main_process)
        if accelerator.is_main_process:
            save_training_state(training, Path(output_dir) / TRAINING_STATE_NAME)
            for state in states:
                state.save_state(Path(output_dir))
        weights.clear()  # the adapters are saved above; accelerate must not write the full models

    def load_hook(hook_models, input_dir):
        load_training_state(training, Path(input_dir) / TRAINING_STATE_NAME)
        for state in states:
            state.load_state(Path(input_dir))
        hook_models.clear()  # accelerate must not load whole models

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_checkpoint(accelerator, checkpoint: Path) -> int:
    """Restore a checkpoint (adapters, optimizer, schedule, RNG states, SaRA's state); returns its step."""
    logger.info("Resuming from checkpoint %s", checkpoint)
    try:
        # the frozen base is not in a DeepSpeed checkpoint (see `save_checkpoint`): the run loaded it already
        accelerator.load_state(str(checkpoint), **_deepspeed_kwargs(accelerator, load_module_strict=False))
    except UserInputError:
        raise
    except Exception as error:  # torch, safetensors and pickle raise many types for a damaged file
        raise UserInputError(
            f"Checkpoint {checkpoint} is damaged ({type(error).__name__}: {error}); resume from an older one with "
            "--resume_from_checkpoint <folder>."
        ) from error
    return parse_checkpoint_name(checkpoint.name)


def load_checkpoint_adapters(models: dict[str, torch.nn.Module], checkpoint: Path) -> None:
    """Load a checkpoint's adapters into freshly adapted models, before the optimizer is made from their parameters:
    the resumed run then trains exactly the checkpoint's positions, whatever the base's dtype does to ties at θ."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    for name, model in models.items():
        try:
            set_peft_model_state_dict(model, load_peft_weights(str(checkpoint / name)))
        except Exception as error:
            raise UserInputError(f"Checkpoint {checkpoint} does not fit this run's {name}: {error}") from error


def save_training_state(training: SaRATraining, path: Path) -> None:
    from safetensors.torch import save_file

    state = training.state_dict()
    tensors = {key: positions.contiguous() for key, positions in state["frozen_positions"].items()}
    save_file(tensors, str(path), metadata={"step": str(state["step"])})


def load_training_state(training: SaRATraining, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
        frozen = {key: handle.get_tensor(key) for key in handle.keys()}
    training.load_state_dict({"step": step, "frozen_positions": frozen})


def compare_run_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose trainable selection differs from the checkpoint's; warn about settings whose change makes
    the result differ from an uninterrupted run's."""
    selection = (
        "threshold",
        "target_fraction",
        "include_bias",
        "train_text_encoder",
        "text_encoder_threshold",
        "train_text_encoder_ti",
        "token_abstraction",
        "num_new_tokens_per_abstraction",
    )
    changed = {key for key in saved if key in current and saved[key] != current[key]}
    refused = [key for key in selection if key in changed]
    if refused:
        details = ", ".join(f"--{key} {saved[key]} (now {current[key]})" for key in refused)
        raise UserInputError(
            f"The checkpoint was trained with {details}: a resumed run must train the same weights. Resume with the "
            "checkpoint's values, or start a new run in another --output_dir."
        )
    others = sorted(changed - {"max_train_steps", *STEP_SETTINGS})
    if others:
        logger.warning(
            "Resuming with settings that differ from the checkpoint's (%s): the result will differ from an "
            "uninterrupted run's.",
            ", ".join(f"{key} {saved[key]} -> {current[key]}" for key in others),
        )


# Settings that are optimizer steps, and the flags that ask for them: a resumed run keeps the checkpoint's unless a
# flag asks for another.
STEP_SETTINGS = {
    "progressive_step": {"progressive_step", "no_progressive"},
    "text_encoder_ti_steps": {"train_text_encoder_ti_frac"},
    "text_encoder_steps": {"train_text_encoder_frac"},
}


def _share_of_run(fraction: float, max_train_steps: int) -> int | None:
    """Optimizer steps in the first `fraction` of the run (at least one); None for the whole run, however long."""
    return None if fraction >= 1 else max(1, int(fraction * max_train_steps))


def run_settings(args, accelerator, max_train_steps: int, checkpoint: Path | None = None) -> dict[str, Any]:
    """What a run asks for that decides its result: written into every checkpoint, compared on resume. A resumed run
    takes the checkpoint's θ and progressive step (see `resume_settings`). The UNet's resolved θ (`unet_threshold`)
    is added once the adapter exists."""
    if args.no_progressive:
        progressive_step = None
    elif args.progressive_step is not None:
        progressive_step = args.progressive_step
    else:
        progressive_step = max(1, max_train_steps // 2)  # the paper's: half of the run
    if progressive_step is not None and progressive_step > max_train_steps and checkpoint is None:
        logger.warning(
            "The progressive step (%d) comes after the run's last step (%d): it will not happen in this run.",
            progressive_step,
            max_train_steps,
        )
    settings = {
        "threshold": args.threshold,
        "target_fraction": args.target_fraction,
        "include_bias": args.include_bias,
        "train_text_encoder": args.train_text_encoder,
        "text_encoder_threshold": args.text_encoder_threshold,
        "train_text_encoder_ti": getattr(args, "train_text_encoder_ti", False),
        "lambda_rank": args.lambda_rank,
        "progressive_step": progressive_step,
        "seed": args.seed,
        "num_processes": accelerator.num_processes,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "mixed_precision": accelerator.mixed_precision,
        "max_train_steps": max_train_steps,
    }
    if settings["train_text_encoder_ti"]:
        settings["token_abstraction"] = args.token_abstraction
        settings["num_new_tokens_per_abstraction"] = args.num_new_tokens_per_abstraction
        settings["text_encoder_ti_steps"] = _share_of_run(args.train_text_encoder_ti_frac, max_train_steps)
    if args.train_text_encoder and hasattr(args, "train_text_encoder_frac"):
        settings["text_encoder_steps"] = _share_of_run(args.train_text_encoder_frac, max_train_steps)
    if checkpoint is None:
        return settings
    return resume_settings(read_run_settings(checkpoint), settings, args.explicit)


def resume_settings(saved: dict[str, Any], current: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The settings of a resumed run: the checkpoint's selection and θ (or a refusal when the flags ask for another),
    the checkpoint's progressive step unless one is asked for, a warning for anything else that differs."""
    settings = dict(current)
    for key, flags in STEP_SETTINGS.items():
        if key not in saved or key not in settings:
            continue
        if not explicit & flags:
            settings[key] = saved[key]
        elif saved[key] != settings[key]:
            logger.warning("The checkpoint's %s was %s; this run uses %s as asked.", key, saved[key], settings[key])
    compare_run_settings(saved, settings)
    settings["unet_threshold"] = saved["unet_threshold"]
    return settings
