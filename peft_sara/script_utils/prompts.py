"""The prompts of a diffusion-transformer run (Flux, SD3), encoded once before training: T5's hidden states always
(T5 never trains, so it can leave the run afterwards), the CLIP encoders' part where they do not train either."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .data import tokenize

# The CLIP encoders' part of a pipeline's prompt encoding, from their token ids: a tuple of tensors.
ClipEncoding = Callable[[Sequence[torch.nn.Module], Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]


def t5_hidden_states(tokenizer, text_encoder, prompt: str, max_sequence_length: int) -> torch.Tensor:
    """T5's last hidden states of `prompt`, padded or truncated to `max_sequence_length` tokens, as the pipelines
    compute them."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device), output_hidden_states=False)[0]


class EncodedPrompts:
    """Each kind of the run's prompts (`prompts`: instance, class, validation, ...; None entries skipped) encoded
    once: T5's hidden states, and `encode_clip`'s output of the CLIP encoders unless `clip_trains`."""

    def __init__(
        self,
        prompts: dict[str, str | None],
        t5_tokenizer,
        t5: torch.nn.Module,
        max_sequence_length: int,
        clip_tokenizers: Sequence,
        clip_encoders: Sequence[torch.nn.Module],
        encode_clip: ClipEncoding,
        clip_trains: bool,
    ) -> None:
        self.prompts, self.clip_tokenizers, self.encode_clip = prompts, list(clip_tokenizers), encode_clip
        self.t5, self.clip = {}, {}
        with torch.no_grad():
            for kind, prompt in prompts.items():
                if prompt is None:
                    continue
                self.t5[kind] = t5_hidden_states(t5_tokenizer, t5, prompt, max_sequence_length)
                if not clip_trains:
                    self.clip[kind] = encode_clip(clip_encoders, self.clip_ids(prompt))

    def clip_ids(self, prompt: str) -> list[torch.Tensor]:
        """The prompt's token ids for each CLIP encoder, a batch of one."""
        return [tokenize(tokenizer, prompt).unsqueeze(0) for tokenizer in self.clip_tokenizers]

    def batch(
        self, kinds: list[str], clip_encoders: Sequence[torch.nn.Module], clip_ids: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """T5's hidden states and the CLIP part of a batch whose samples have the prompts of `kinds`; where CLIP
        trains, its part is computed by `clip_encoders` (the prepared models) from the batch's `clip_ids`."""
        t5 = torch.cat([self.t5[kind] for kind in kinds])
        if self.clip:
            return t5, tuple(torch.cat(parts) for parts in zip(*(self.clip[kind] for kind in kinds)))
        return t5, self.encode_clip(clip_encoders, clip_ids)

    def of(self, kind: str, clip_encoders: Sequence[torch.nn.Module]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """T5's hidden states and the CLIP part of one kind's prompt, the CLIP part from `clip_encoders` as they are
        where they train (validation)."""
        if kind in self.clip:
            return self.t5[kind], self.clip[kind]
        with torch.no_grad():
            return self.t5[kind], self.encode_clip(clip_encoders, self.clip_ids(self.prompts[kind]))
