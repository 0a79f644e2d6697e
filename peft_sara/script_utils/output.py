"""What a run leaves behind: the adapters as PEFT folders, their LoRA export, and the upload to the Hub (the model
card is `model_card.py`'s)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..loading import COMPONENTS_KEY, EMBEDDINGS_KEY, SAVE_ID_KEY
from ..sharding import reading_needs_every_process
from ..tokens import TOKENS_KEY
from .cli import UserInputError, get_logger, is_main_process
from .model_card import write_model_card
from .pivotal import embeddings_file_name

try:
    import fcntl
except ImportError:  # Windows: runs on one output folder are not kept apart
    fcntl = None

LOCK_NAME = ".sara-run.lock"


@contextlib.contextmanager
def lock_output_dir(output_dir: str) -> Iterator[None]:
    """Hold the output folder for the length of a run, so that a second run on it is refused instead of crashing
    both. The lock is the operating system's: it goes when the process ends, however it ends."""
    if fcntl is None or not is_main_process():
        yield
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle = open(Path(output_dir) / LOCK_NAME, "a+", encoding="utf-8")
    except OSError as error:
        raise UserInputError(f"--output_dir {output_dir} is not writable: {error.strerror}.") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UserInputError(
                f"Another run (process {handle.read().strip() or '?'}) is using --output_dir {output_dir}: wait for "
                "it to finish, or choose another folder."
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_adapters(
    output_dir: str,
    components: dict[str, torch.nn.Module],
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    token_embeddings: dict[str, torch.Tensor] | None = None,
    tokens: Sequence[str] = (),
    write: bool = True,
) -> None:
    """Write each component's SaRA adapter as a standard PEFT adapter folder output_dir/<component>/, and with
    pivotal tuning the new `tokens`' `token_embeddings` (by key: `clip_l`, `clip_g`) as
    output_dir/<output folder name>_emb.safetensors, in fp32 (they are small).

    The keys carry PEFT's `base_model.model.` prefix, as `PeftModel.save_pretrained` writes them, so the folder loads
    with `PeftModel.from_pretrained` as well as into a plain diffusers or transformers model. Nothing is written when
    a value is not finite (also after the cast to `dtype`, the values' precision on disk: they load back as fp32).
    Each folder is written beside its final name and then renamed into place. Where reading the adapters is a
    collective (`takes_every_process`), every process calls this, and only the one with `write` writes.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state_dicts = {}
    for name, model in components.items():
        state_dict = {
            f"base_model.model.{key}": tensor.detach()
            .to(dtype if tensor.is_floating_point() else tensor.dtype)
            .contiguous()
            .cpu()
            for key, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items()
        }
        if not all(torch.isfinite(tensor).all() for tensor in state_dict.values() if tensor.is_floating_point()):
            raise UserInputError(
                f"The {name} adapter holds values that are not finite in {dtype} (training diverged, or they exceed "
                "the range of --save_precision): nothing was saved."
            )
        state_dicts[name] = state_dict
    if not write:
        return
    metadata = {"format": "pt", SAVE_ID_KEY: uuid.uuid4().hex, COMPONENTS_KEY: ",".join(components)}
    if token_embeddings:
        metadata[EMBEDDINGS_KEY] = embeddings_file_name(output_dir)
        target = Path(output_dir) / metadata[EMBEDDINGS_KEY]
        staging = target.with_name(f"{target.name}.tmp")
        tensors = {key: tensor.detach().float().cpu().contiguous() for key, tensor in token_embeddings.items()}
        token_metadata = {"format": "pt", SAVE_ID_KEY: metadata[SAVE_ID_KEY], TOKENS_KEY: json.dumps(list(tokens))}
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(staging), metadata=token_metadata)
        os.replace(staging, target)
    for name, state_dict in state_dicts.items():
        folder = Path(output_dir) / name
        staging, doomed = folder.with_name(f"{name}.unfinished"), folder.with_name(f"{name}.deleting")
        for leftover in (staging, doomed):
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(state_dict, str(staging / "adapter_model.safetensors"), metadata=metadata)
        config = copy.copy(components[name].peft_config["default"])
        config.inference_mode, config.base_model_name_or_path = True, base_model
        config.save_pretrained(str(staging))
        if folder.exists():
            os.replace(folder, doomed)
        os.replace(staging, folder)
        shutil.rmtree(doomed, ignore_errors=True)


def takes_every_process(components: dict[str, torch.nn.Module]) -> bool:
    """Whether reading these (unwrapped) models' adapters is a collective: values ZeRO-3 partitions, ZeRO's fp32
    copies of half-precision values, FSDP2 shards. Then every process calls `save_adapters`."""
    return any(map(reading_needs_every_process, components.values()))


def save_final_adapters(accelerator, args, models: dict[str, torch.nn.Module], new_tokens=None) -> None:
    """The end of a run (every process calls it; the main one writes): the prepared `models`' adapters as PEFT
    folders in --output_dir, in --save_precision, naming the base model; with pivotal tuning also `new_tokens`'
    embeddings (`<output folder name>_emb.safetensors`)."""
    unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    if not accelerator.is_main_process and not takes_every_process(unwrapped):
        return  # nothing to gather: the main process reads its own copy
    save_adapters(
        args.output_dir,
        unwrapped,
        base_model=args.pretrained_model_name_or_path,
        dtype=SAVE_DTYPES[args.save_precision],
        token_embeddings=new_tokens.embeddings() if new_tokens else None,
        tokens=new_tokens.tokens if new_tokens else (),
        write=accelerator.is_main_process,
    )


def create_hub_repo(repo_id: str, token: str | None) -> str:
    """Create (or find) the model repo; its full id, with the namespace the Hub gave it (`name` -> `user/name`)."""
    from huggingface_hub import create_repo

    return create_repo(repo_id, exist_ok=True, token=token).repo_id


def push_output_to_hub(output_dir: str, repo_id: str, token: str | None) -> None:
    """Upload the output folder without checkpoints, logs or unfinished writes."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="SaRA adapter",
        ignore_patterns=["checkpoint-*", "logs/*", "*.tmp", "*.unfinished/*", "*.deleting/*", LOCK_NAME],
        token=token,
    )


LORA_EXPORT_DIR = "lora"


def export_run_as_lora(output_dir: str, rank: int | float) -> None:
    """--export_lora_rank: the adapters just saved, as a LoRA in output_dir/lora/ for `pipe.load_lora_weights`."""
    from ..export import export_lora

    # the run's own subfolder, replaced by each final save of the run
    result = export_lora(output_dir, Path(output_dir) / LORA_EXPORT_DIR, rank=rank, overwrite=True)
    get_logger(__name__).info("%s", result)


def finish_output(
    accelerator,
    args,
    validation,
    step: int,
    instance_prompt: str | None = None,
    new_tokens: dict[str, list[str]] | None = None,
    embedding_keys: Sequence[str] = ("clip_l",),
    family: str = "sd",
    vae_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """After the adapters are saved: their LoRA export if asked for, final images from a fresh pipeline loaded with
    them, model card, Hub upload. `family`, `vae_path` and `dtype` say how the base pipeline loads
    (`models.load_pipeline`)."""
    from .validation import final_validation

    if args.export_lora_rank is not None:
        export_run_as_lora(args.output_dir, args.export_lora_rank)
    images = final_validation(
        accelerator,
        args.pretrained_model_name_or_path,
        args.revision,
        args.variant,
        args.output_dir,
        validation,
        step,
        family,
        vae_path,
        dtype,
    )
    repo_id = None
    if args.push_to_hub:  # the card names the repo the Hub created, namespace included
        repo_id = create_hub_repo(args.hub_model_id or Path(args.output_dir).resolve().name, args.hub_token)
    write_model_card(
        args.output_dir,
        repo_id,
        args.pretrained_model_name_or_path,
        images,
        args.train_text_encoder,
        instance_prompt=instance_prompt,
        validation_prompt=validation.prompt,
        new_tokens=new_tokens,
        embeddings_file=embeddings_file_name(args.output_dir),
        embedding_keys=embedding_keys,
        family=family,
        vae_path=vae_path,
    )
    if repo_id is not None:
        push_output_to_hub(args.output_dir, repo_id, args.hub_token)
