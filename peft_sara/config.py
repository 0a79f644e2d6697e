"""Configuration of SaRA adapters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from .peft_type import SARA

SELECTIONS = ("smallest", "largest", "random")


@dataclass
class SaRAConfig(PeftConfig):
    """Configuration of a SaRA adapter (Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive
    Sparse Low-Rank Adaptation", ICLR 2025).

    SaRA trains only the entries of each targeted weight whose pre-trained magnitude is below `threshold`. The adapter
    stores the flat positions of those entries and a trainable additive update for them, initialised to zero, so an
    untrained adapter is an exact no-op. The low-rank regulariser (`lambda_rank`) and the progressive re-selection
    (`progressive_step`) act during training once `peft_sara.attach(model, optimizer)` has been called.

    Paper defaults: `threshold=2e-3` selects about 5.8% (50M) of Stable Diffusion 1.5's UNet, `lambda_rank=5e-3`,
    `progressive_step` at half of the training steps (2500 of 5000), learning rate `paper_learning_rate(threshold)`.
    """

    threshold: float = field(
        default=2e-3,
        metadata={
            "help": (
                "Absolute magnitude threshold θ: an entry w of a targeted weight is trainable when |w| < θ, computed "
                "in fp32 from the pre-trained weight. 2e-3 selects about 5.8% (50M) of SD 1.5's UNet, 8e-4 about 20M "
                "and 2e-4 about 5M (paper). Ignored when `target_fraction` is set."
            )
        },
    )
    target_fraction: float | None = field(
        default=None,
        metadata={
            "help": (
                "Pick θ so that this fraction (0 < f < 1) of all targeted weight entries is trainable, for models "
                "whose weight scales differ from SD 1.5 (SDXL, SD3, text encoders). When the adapter is created the "
                "resolved θ is written to `threshold` and this field is cleared, so a saved config records the θ "
                "actually used."
            )
        },
    )
    selection: str = field(
        default="smallest",
        metadata={
            "help": (
                "Which entries of each targeted weight are trained. 'smallest' (SaRA): those with |w| < θ. 'largest' "
                "and 'random' train as many entries per weight as 'smallest' would, but the largest-magnitude ones or "
                "uniformly random ones (drawn from torch's global RNG): the paper's ablations (Table 2). They cannot "
                "be combined with `progressive_step`, whose re-selection is defined by θ."
            )
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (suffix match) or a regex (full match) of the modules to adapt. None adapts every nn.Linear "
                "and nn.Conv2d of the model, as the paper does for the UNet."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names (suffix match) or a regex (full match) of modules to leave untouched."},
    )
    include_bias: bool = field(
        default=False,
        metadata={
            "help": (
                "Also train the entries of each targeted layer's bias with |b| < θ, as the reference code does. "
                "Off by default: biases are few and rarely below θ."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the SaRA layers to train fully and save with the adapter."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True (default): the update starts at zero, so the adapted model equals the base model. False: a "
                "small random non-zero update (normal, std θ), useful in tests only."
            )
        },
    )
    lambda_rank: float = field(
        default=5e-3,
        metadata={
            "help": (
                "Weight λ of the nuclear-norm regulariser λ‖P_M‖_* on the masked weight, applied by "
                "`peft_sara.attach` as a subgradient step on one layer per optimizer step. The paper's search picks "
                "5e-3 (the reference script uses 5e-4); 0 disables it."
            )
        },
    )
    rank_min_dim: int = field(
        default=64,
        metadata={
            "help": (
                "Only 2-D (Linear) weights whose smaller side is larger than this are regularised, as in the "
                "reference code: the SVD of small matrices costs more than it constrains."
            )
        },
    )
    rank_seed: int = field(
        default=0,
        metadata={
            "help": (
                "Seed of the per-step choice of the regularised layer. The choice depends only on this seed and the "
                "step, so every process of a distributed run, and a resumed run, picks the same layer."
            )
        },
    )
    progressive_step: int | None = field(
        default=None,
        metadata={
            "help": (
                "Optimizer step after which the trainable set is re-selected: entries whose trained value has "
                "reached |w| ≥ θ are frozen for good and only the rest keep training. The paper uses half of the "
                "training steps (2500 of 5000). None disables the progressive step."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SARA
        self._check_kinds()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not math.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(
                f"threshold must be a positive finite number (the paper uses 2e-3), got {self.threshold}."
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}.")
        if self.selection != "smallest" and self.progressive_step is not None:
            raise ValueError(
                f"selection={self.selection!r} cannot be combined with progressive_step: the progressive step keeps "
                "the entries still below θ, which only means something for selection='smallest'. Set "
                "progressive_step=None."
            )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Read a saved adapter's config. A SaRA config read this way is marked as awaiting its saved weights: the
        adapter `PeftModel.from_pretrained` or `load_adapter` makes from it exists only to receive them, so if they do
        not fit the model, loading removes that adapter again instead of leaving its layers in the model."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, SaRAConfig):
            config._awaits_saved_weights = True
        return config

    def _check_kinds(self) -> None:
        """One ValueError naming the field, the value and what it should be, for configs read from hand-edited or
        damaged JSON files: a value of the wrong kind would otherwise fail a range check with a bare TypeError."""
        expected = {
            "threshold": (_is_number(self.threshold), "a positive number"),
            "target_fraction": (
                self.target_fraction is None or (_is_number(self.target_fraction) and 0 < self.target_fraction < 1),
                "a number strictly between 0 and 1 (e.g. 0.058 for the paper's 5.8%) or None",
            ),
            "target_modules": (_is_module_names(self.target_modules), _MODULE_NAMES),
            "exclude_modules": (_is_module_names(self.exclude_modules), _MODULE_NAMES),
            "include_bias": (isinstance(self.include_bias, bool), "true or false"),
            "init_weights": (isinstance(self.init_weights, bool), "true or false"),
            "lambda_rank": (
                _is_number(self.lambda_rank) and math.isfinite(self.lambda_rank) and self.lambda_rank >= 0,
                "a number >= 0 (the paper uses 5e-3; 0 disables it)",
            ),
            "rank_min_dim": (_is_integer(self.rank_min_dim) and self.rank_min_dim >= 0, "an integer >= 0"),
            "rank_seed": (_is_integer(self.rank_seed), "an integer"),
            "progressive_step": (
                self.progressive_step is None or (_is_integer(self.progressive_step) and self.progressive_step >= 0),
                "a non-negative number of optimizer steps or None to disable it",
            ),
        }
        for name, (valid, kind) in expected.items():
            if not valid:
                raise ValueError(f"{name} must be {kind}, got {getattr(self, name)!r}.")


_MODULE_NAMES = "a module name, a list of names or a regex (or None)"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_module_names(value: object) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, (list, set)) and all(isinstance(name, str) for name in value))
    )
