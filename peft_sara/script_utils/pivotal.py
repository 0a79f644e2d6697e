"""Pivotal tuning (diffusers' advanced DreamBooth scripts' `--train_text_encoder_ti`): each token abstraction of the
prompts (`TOK`) becomes new tokens `<s0><s1>...` in every tokenizer of the run, whose embedding rows train with the
SaRA adapters for the first part of the run, while every other row of the embedding matrices stays bit-exact.

The scripts pass their (tokenizer, text encoder) pairs by the key their rows are saved under in
`<output folder name>_emb.safetensors`: `clip_l` (SD, and every script's first CLIP), `clip_g` (SDXL's and SD3's
second CLIP), `t5` (Flux's and SD3's T5 with --enable_t5_ti).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..tokens import EMBEDDINGS_FILE_SUFFIX, TOKEN_EMBEDDING_KEYS, TOKENS_KEY, add_new_tokens, token_ids
from .cli import UserInputError

CHECKPOINT_NAME = "sara_token_embeddings.safetensors"


def new_tokens_by_abstraction(token_abstraction: str, num_new_tokens_per_abstraction: int) -> dict[str, list[str]]:
    """`--token_abstraction "TOK,CAT"` with 2 tokens each -> {"TOK": ["<s0>", "<s1>"], "CAT": ["<s2>", "<s3>"]}, the
    names and numbering of diffusers' advanced scripts (whitespace in the flag is ignored)."""
    count = num_new_tokens_per_abstraction
    if count < 1:
        raise UserInputError(f"--num_new_tokens_per_abstraction must be at least 1, got {count}.")
    abstractions = "".join(token_abstraction.split()).split(",")
    if not all(abstractions) or len(set(abstractions)) != len(abstractions):
        raise UserInputError(
            f"--token_abstraction {token_abstraction!r} must be distinct, non-empty identifiers separated by commas, "
            'e.g. "TOK" or "TOK,STYLE".'
        )
    return {
        abstraction: [f"<s{index * count + offset}>" for offset in range(count)]
        for index, abstraction in enumerate(abstractions)
    }


def _whole_words(abstractions) -> re.Pattern:
    """The abstractions as whole words: "TOK" in "a TOK dog" or "TOK's", not in "TOKYO" or "MY_TOK"."""
    alternatives = "|".join(re.escape(abstraction) for abstraction in sorted(abstractions, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def insert_new_tokens(prompt: str | None, new_tokens: dict[str, list[str]]) -> str | None:
    """The prompt with each abstraction, as a whole word, replaced by its tokens ("a TOK dog" -> "a <s0><s1> dog";
    "TOKYO" stays as it is)."""
    if prompt is None:
        return None
    return _whole_words(new_tokens).sub(lambda match: "".join(new_tokens[match.group(0)]), prompt)


def check_pivotal_prompts(
    new_tokens: dict[str, list[str]],
    instance_prompt: str,
    validation_prompt: str | None,
    class_prompt: str | None = None,
) -> None:
    """Refuse prompts that would train or show nothing of the new tokens: every abstraction must occur (as a whole
    word) in the instance prompt (a token that no training prompt holds never trains), and the validation prompt must
    hold one. The class prompt must hold none: prior preservation samples the class without the subject, and an
    abstraction there would train the new tokens on the class images."""
    missing = [abstraction for abstraction in new_tokens if not _whole_words([abstraction]).search(instance_prompt)]
    if missing:
        raise UserInputError(
            f"--instance_prompt {instance_prompt!r} does not contain the token abstraction {missing[0]!r}: with "
            f'--train_text_encoder_ti write it where the subject is named, e.g. "a photo of {missing[0]} dog" '
            "(or set --token_abstraction)."
        )
    if class_prompt is not None and (found := _whole_words(new_tokens).search(class_prompt)):
        raise UserInputError(
            f"--class_prompt {class_prompt!r} contains the token abstraction {found.group(0)!r}: prior preservation "
            'would train the new tokens on the class images; name the class alone there, e.g. "a photo of a dog" '
            "(or set --token_abstraction to a word the class prompt does not use)."
        )
    if validation_prompt is not None and not _whole_words(new_tokens).search(validation_prompt):
        raise UserInputError(
            f"--validation_prompt {validation_prompt!r} contains no token abstraction ({', '.join(new_tokens)}): "
            "its images would not show the trained subject; write it in, e.g. "
            f'"a photo of {next(iter(new_tokens))} dog in a bucket".'
        )


def embeddings_file_name(output_dir: str) -> str:
    """`<output folder name>_emb.safetensors`, as diffusers' advanced scripts name the file."""
    return f"{Path(output_dir).resolve().name}{EMBEDDINGS_FILE_SUFFIX}"


class _NewRows:
    """The new tokens' rows of one text encoder's input embeddings, and what restores every other row."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, tokens: list[str]) -> None:
        embedding = text_encoder.get_input_embeddings()
        existing = embedding.weight.detach().float()
        self.std = existing.std()  # the spread of the existing vocabulary, before the new rows exist
        initial = torch.randn(len(tokens), existing.shape[1]) * self.std.cpu()  # as diffusers initialises them
        add_new_tokens(tokenizer, text_encoder, tokens, initial)
        self.weight = embedding.weight
        dtype = self.weight.dtype
        self.weight.data = self.weight.data.float()  # trained in fp32 also when the text encoder runs in half
        self.weight.requires_grad_(True)
        if dtype != torch.float32:  # the text encoder goes on computing in its dtype, as with a frozen embedding
            embedding.register_forward_hook(lambda module, inputs, output: output.to(dtype))
        self.ids = torch.tensor(token_ids(tokenizer, tokens), device=self.weight.device)
        self.original = self.weight.detach().clone()
        self.std = self.std.to(self.weight.device)
        self.weight.register_hook(self._only_new_rows)

    def _only_new_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the new rows only: clipping and the optimizer's moments see nothing of the others."""
        masked = torch.zeros_like(grad)
        masked[self.ids] = grad[self.ids]
        return masked

    @torch.no_grad()
    def restore(self, trains: bool) -> None:
        """Put every other row back bit-exact (weight decay moves them); while training, keep the new rows, pulled
        a little towards the vocabulary's spread, as diffusers' scripts do after each step."""
        new = self.weight.index_select(0, self.ids)
        if trains:
            new.mul_((self.std / new.std()) ** 0.1)
        else:
            new = self.original.index_select(0, self.ids)
        self.weight.copy_(self.original)
        self.weight.index_copy_(0, self.ids, new)

    @torch.no_grad()
    def keep_new_rows(self) -> None:
        """From now on the new rows too stay as they are."""
        self.original.index_copy_(0, self.ids, self.weight.index_select(0, self.ids))

    def new_rows(self) -> torch.Tensor:
        return self.weight.detach().index_select(0, self.ids).float().cpu()

    @torch.no_grad()
    def load_new_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.weight)
        self.weight.index_copy_(0, self.ids, rows)
        self.original.index_copy_(0, self.ids, rows)


class NewTokenEmbeddings:
    """The new tokens of a pivotal-tuning run in every (tokenizer, text encoder) pair given, by file key.

    Creating it adds the tokens to each tokenizer and their rows to each text encoder's input embeddings, initialised
    as diffusers does (normal noise times the standard deviation of the existing rows); the embedding weight becomes
    a trainable fp32 parameter whose gradient is masked to the new rows. `attach(optimizer, train_steps)` makes the
    optimizer's real steps put every other row back bit-exact, and, after `train_steps` of them, the new rows too;
    `trains` tells the training loop whether the text encoders still need gradients.
    """

    def __init__(self, encoders: dict[str, tuple[Any, torch.nn.Module]], tokens: list[str]) -> None:
        unknown = sorted(set(encoders) - set(TOKEN_EMBEDDING_KEYS))
        if unknown or not encoders:
            raise ValueError(f"Text encoders go under the keys {TOKEN_EMBEDDING_KEYS}, got {list(encoders)}.")
        self.tokens = list(tokens)
        self.keys = list(encoders)
        self.rows = [_NewRows(tokenizer, text_encoder, self.tokens) for tokenizer, text_encoder in encoders.values()]
        self.train_steps: int | None = None
        self.step = 0
        self.trains = True

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The embedding weights the optimizer must hold."""
        return [rows.weight for rows in self.rows]

    def attach(self, optimizer, train_steps: int | None) -> None:
        """Act after each real step of `optimizer` (a torch one, or one wrapped by accelerate); the new rows train
        during the first `train_steps` of them (None: the whole run)."""
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # accelerate's wrapper steps the optimizer it wraps
        self.train_steps = train_steps
        if train_steps is not None and self.step >= train_steps:
            self._stop()
        optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        for rows in self.rows:
            rows.restore(self.trains)
        if self.trains and self.train_steps is not None and self.step >= self.train_steps:
            self._stop()

    def _stop(self) -> None:
        for rows in self.rows:
            rows.keep_new_rows()
        self.trains = False

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The new rows by file key (`clip_l`, `clip_g`, `t5`), fp32 on the CPU: what the embeddings file holds."""
        return {key: rows.new_rows() for key, rows in zip(self.keys, self.rows)}

    def save_state(self, folder: Path) -> None:
        """Write the new rows and whether they still train into a checkpoint folder."""
        from safetensors.torch import save_file

        metadata = {"step": str(self.step), "trains": json.dumps(self.trains), TOKENS_KEY: json.dumps(self.tokens)}
        save_file(self.embeddings(), str(Path(folder) / CHECKPOINT_NAME), metadata=metadata)

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote (the run must have added the same tokens)."""
        from safetensors import safe_open

        with safe_open(str(Path(folder) / CHECKPOINT_NAME), framework="pt") as handle:
            metadata = handle.metadata()
            saved = {key: handle.get_tensor(key) for key in handle.keys()}
        if json.loads(metadata[TOKENS_KEY]) != self.tokens or sorted(saved) != sorted(self.keys):
            raise UserInputError(
                f"The checkpoint {folder} trained the tokens {metadata[TOKENS_KEY]} in {sorted(saved)}; this run adds "
                f"{self.tokens} to {self.keys}: resume with the checkpoint's --token_abstraction and "
                "--num_new_tokens_per_abstraction."
            )
        for key, rows in zip(self.keys, self.rows):
            rows.load_new_rows(saved[key])
        self.step = int(metadata["step"])
        if not json.loads(metadata["trains"]) or (self.train_steps is not None and self.step >= self.train_steps):
            self._stop()
