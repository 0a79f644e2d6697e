"""Parameters that train for the first part of a run only (`--train_text_encoder_frac`): after a given number of
optimizer steps they keep their values, bit-exact, whatever the optimizer or SaRA's regulariser would do to them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pivotal import NewTokenEmbeddings


class TrainsFor:
    """`params` train during the first `steps` real steps of `optimizer` (a torch one, or one wrapped by accelerate);
    from then on every later step puts them back. `trains` tells the loop whether their model still needs gradients.

    The steps counted are the optimizer's own (an accumulation micro-step or a step the gradient scaler skips does
    not count), as SaRA's progressive step counts them. `name` names the state file in checkpoints.
    """

    def __init__(self, name: str, params: list[torch.nn.Parameter], steps: int, optimizer) -> None:
        self.name, self.params, self.steps = name, list(params), steps
        self.step = 0
        self.trains = True
        self._kept: list[torch.Tensor] = []
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        optimizer.register_step_post_hook(self._after_step)
        if steps <= 0:
            self._stop()

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        for param, kept in zip(self.params, self._kept):
            param.copy_(kept)
        if self.trains and self.step >= self.steps:
            self._stop()

    def _stop(self) -> None:
        self._kept = [param.detach().clone() for param in self.params]
        self.trains = False

    @property
    def _state_file(self) -> str:
        return f"sara_{self.name}_schedule.json"

    def save_state(self, folder: Path) -> None:
        """Write the step count and whether the parameters still train into a checkpoint folder."""
        state = {"step": self.step, "trains": self.trains}
        (Path(folder) / self._state_file).write_text(json.dumps(state), encoding="utf-8")

    def load_state(self, folder: Path) -> None:
        """Restore `save_state`'s state; the parameters must hold the checkpoint's values already."""
        state = json.loads((Path(folder) / self._state_file).read_text(encoding="utf-8"))
        self.step, self.trains, self._kept = int(state["step"]), True, []
        if not state["trains"] or self.step >= self.steps:
            self._stop()


def text_encoder_schedules(
    optimizer,
    new_tokens: NewTokenEmbeddings | None,
    new_token_steps: int | None,
    adapter_params: Sequence[torch.nn.Parameter],
    adapter_steps: int | None,
) -> list[NewTokenEmbeddings | TrainsFor]:
    """What trains in the text encoders for the first part of a run only, attached to `optimizer`: pivotal tuning's
    `new_tokens` for `new_token_steps` (--train_text_encoder_ti_frac), or the text encoders' adapter parameters for
    `adapter_steps` (--train_text_encoder_frac; None: no adapter). Checkpoints hold their states; once none
    `trains`, the text encoders run without gradients."""
    states: list[NewTokenEmbeddings | TrainsFor] = []
    if new_tokens is not None:
        new_tokens.attach(optimizer, new_token_steps)
        states.append(new_tokens)
    if adapter_steps is not None:
        states.append(TrainsFor("text_encoder", list(adapter_params), adapter_steps, optimizer))
    return states
