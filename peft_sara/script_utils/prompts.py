"""The prompts of a diffusion-transformer run (Flux, SD3), encoded once before training: T5's hidden states unless
T5 trains new tokens (--enable_t5_ti), so that T5 can leave the run afterwards, and the CLIP encoders' part where
they do not train either."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .data import tokenize

# The CLIP encoders' part of a pipeline's prompt encoding, from their token ids: a tuple of tensors.
ClipEncoding = Callable[[Sequence[torch.nn.Module], Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]


def t5_hidden_states(tokenizer, text_encoder, prompt: str | list[str], max_sequence_length: int) -> torch.Tensor:
    """T5's last hidden states of `prompt` (or a batch of them), padded or truncated to `max_sequence_length` tokens,
    as the pipelines compute them."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device), output_hidden_states=False)[0]


class EncodedPrompts:
    """Each kind of the run's prompts (`prompts`: instance, class, validation, ...; None entries skipped) encoded
    once: T5's hidden states unless `t5_trains`, and `encode_clip`'s output of the CLIP encoders unless
    `clip_trains`. What trains is encoded at each use by the encoders passed then (the prepared models)."""

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
        t5_trains: bool = False,
    ) -> None:
        self.prompts, self.clip_tokenizers, self.encode_clip = prompts, list(clip_tokenizers), encode_clip
        self.t5_tokenizer, self.max_sequence_length = t5_tokenizer, max_sequence_length
        self.t5, self.clip = {}, {}
        with torch.no_grad():
            for kind, prompt in prompts.items():
                if prompt is None:
                    continue
                if not t5_trains:
                    self.t5[kind] = t5_hidden_states(t5_tokenizer, t5, prompt, max_sequence_length)
                if not clip_trains:
                    self.clip[kind] = encode_clip(clip_encoders, self.clip_ids(prompt))

    def clip_ids(self, prompt: str) -> list[torch.Tensor]:
        """The prompt's token ids for each CLIP encoder, a batch of one."""
        return [tokenize(tokenizer, prompt).unsqueeze(0) for tokenizer in self.clip_tokenizers]

    def batch(
        self,
        kinds: list[str],
        clip_encoders: Sequence[torch.nn.Module],
        clip_ids: Sequence[torch.Tensor | None],
        t5: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """T5's hidden states and the CLIP part of a batch whose samples have the prompts of `kinds`; what trains is
        computed by the prepared models: CLIP's part by `clip_encoders` from the batch's `clip_ids`, T5's by `t5`."""
        return self._t5_states(kinds, t5), self._clip_part(kinds, clip_encoders, clip_ids)

    def of(
        self, kind: str, clip_encoders: Sequence[torch.nn.Module], t5: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """T5's hidden states and the CLIP part of one kind's prompt, what trains from the encoders as they are
        (validation)."""
        with torch.no_grad():
            return self._t5_states([kind], t5), self._clip_part(
                [kind], clip_encoders, self.clip_ids(self.prompts[kind])
            )

    def _t5_states(self, kinds: list[str], t5: torch.nn.Module | None) -> torch.Tensor:
        if self.t5:
            return torch.cat([self.t5[kind] for kind in kinds])
        if t5 is None:
            raise ValueError("T5 trains in this run: pass it to encode the prompts.")
        return t5_hidden_states(
            self.t5_tokenizer, t5, [self.prompts[kind] for kind in kinds], self.max_sequence_length
        )

    def _clip_part(self, kinds: list[str], clip_encoders, clip_ids) -> tuple[torch.Tensor, ...]:
        if self.clip:
            return tuple(torch.cat(parts) for parts in zip(*(self.clip[kind] for kind in kinds)))
        return self.encode_clip(clip_encoders, clip_ids)
