"""SaRA's training-time behaviour: the nuclear-norm regulariser and the progressive re-selection of the trainable set.

Both act inside `optimizer.step()` through the optimizer's step hooks, so a training loop needs one extra line,
`peft_sara.attach(model, optimizer)`, and steps that do not happen (gradient accumulation, a gradient-scaler step
skipped for inf/NaN gradients, also inside a fused optimizer) do nothing. Decisions depend only on the step count,
the seed and the (identical) parameters, so every process of a distributed run takes the same ones, and a resumed run
takes them again. Under DeepSpeed ZeRO the hooks sit on the torch optimizer that ZeRO steps on its fp32 partitions,
once per parameter group, and act on those partitions (`zero.ZeroPartitions`); under FSDP1 they act on each
process's part of its flat parameters (`fsdp1.Fsdp1Shards`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import SaRAConfig
from .fsdp1 import Fsdp1Shards, fsdp1_units, wrapped_layer_problem
from .layer import SaRALayer
from .sharding import full_tensor, is_sharded, like, local, local_positions, unsupported_engine
from .zero import ZeroPartitions, zero_optimizer


def paper_learning_rate(threshold: float) -> float:
    """The paper's learning rate for a threshold: 1e-3 · exp(-350 · θ) (θ = 2e-3 gives 4.97e-4)."""
    return 1e-3 * math.exp(-350 * threshold)


POLAR_METHODS = ("auto", "svd", "gram", "newton_schulz")
# Muon's quintic Newton–Schulz step: it pulls every singular value of a Frobenius-normalised matrix into [0.7, 1.2]
# in a few products; the cubic step then converges them to 1, so the result is U Vᵀ, not Muon's approximation of it.
_QUINTIC = (3.4445, -4.7750, 2.0315)
_QUINTIC_STEPS, _CUBIC_STEPS = 10, 6


def polar_factor(matrix: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """U Vᵀ of a matrix's thin SVD (the subgradient of its nuclear norm) and the nuclear norm Σσ.

    `method`:
    - "svd": the full SVD (2.3 s for SD's 1280×5120 weights on a 2-core CPU);
    - "gram": the eigen-decomposition of the smaller Gram matrix, in fp64 so that small singular values keep their
      accuracy (1e-6 from the SVD's U Vᵀ), 0.8 s for the same matrix. Directions of (numerically) zero singular
      values get no subgradient, one of the valid choices;
    - "newton_schulz": 16 Newton–Schulz iterations, matrix products only, which a GPU runs in milliseconds;
      singular values below about 1e-4 of the Frobenius norm get a damped subgradient;
    - "auto": Newton–Schulz on a GPU; on a CPU the Gram path for matrices at least twice as long as wide, the SVD
      for near-square ones (their Gram matrix saves nothing).
    The nuclear norm is ⟨U Vᵀ, M⟩ = Σσ, from the same quantities.
    """
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown polar factor method {method!r}: choose one of {POLAR_METHODS}")
    if method == "auto":
        method = auto_polar_method(matrix.shape, matrix.device.type)
    if method == "svd":
        u, singular_values, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u @ vh, singular_values.sum()
    polar = _gram_polar(matrix) if method == "gram" else _newton_schulz_polar(matrix)
    return polar, (polar * matrix).sum()


def auto_polar_method(shape: tuple[int, int], device_type: str) -> str:
    """The method `polar_factor(method="auto")` uses for a matrix of this shape on this kind of device."""
    if device_type != "cpu":
        return "newton_schulz"
    return "gram" if max(shape) >= 2 * min(shape) else "svd"


def _gram_polar(matrix: torch.Tensor) -> torch.Tensor:
    """U Vᵀ = M Q Λ^(-1/2) Qᵀ from the eigen-decomposition Q Λ Qᵀ of the smaller Gram matrix, in fp64."""
    wide = matrix.shape[0] < matrix.shape[1]
    exact = matrix.double()
    gram = exact @ exact.T if wide else exact.T @ exact
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    keep = eigenvalues > eigenvalues.max().clamp(min=0) * gram.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(keep, eigenvalues.clamp(min=0).rsqrt(), torch.zeros_like(eigenvalues))
    projector = ((eigenvectors * inverse) @ eigenvectors.T).to(matrix.dtype)
    return projector @ matrix if wide else matrix @ projector


def _newton_schulz_polar(matrix: torch.Tensor) -> torch.Tensor:
    """U Vᵀ by Newton–Schulz iterations on the Frobenius-normalised matrix, in fp32, on the smaller Gram side."""
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.float().T if tall else matrix.float()
    x = x / x.norm().clamp(min=torch.finfo(torch.float32).tiny)
    a, b, c = _QUINTIC
    for _ in range(_QUINTIC_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    for _ in range(_CUBIC_STEPS):
        x = 1.5 * x - 0.5 * (x @ x.T) @ x
    return (x.T if tall else x).to(matrix.dtype)


@dataclass
class _TrainedUpdate:
    """One adapter's trainable update in one layer."""

    key: str
    layer: SaRALayer
    adapter: str
    config: SaRAConfig
    weight_shape: torch.Size  # the base weight's whole shape, also where an engine shards it
    values_numel: int  # how many values the update has, also where an engine shards them

    @property
    def values(self) -> nn.Parameter:
        return self.layer.sara_values[self.adapter]

    @property
    def indices(self) -> torch.Tensor:
        return self.layer.sara_indices[self.adapter]

    def effective_values(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 value of the weight at the trainable positions: base + scale · update (whole, also where an engine
        shards the values; `values`: the update as an engine steps it, where that is not the model's)."""
        base = self.layer.base_entries(self.adapter).float()
        values = full_tensor(self.values.detach()) if values is None else values
        return base + self.layer.sara_scaling[self.adapter] * values


class SaRATraining:
    """Handle returned by `attach`: step count, last regulariser value, and state for checkpoints.

    Register it with `accelerator.register_for_checkpointing(...)` (or save `state_dict()` yourself) so that a resumed
    run keeps the progressive step's frozen set and the regulariser's schedule.
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], optimizer: Any) -> None:
        models = [model] if isinstance(model, nn.Module) else list(model)
        refusal = unsupported_engine(models, optimizer)
        if refusal is not None:
            raise ValueError(refusal)
        units = fsdp1_units(models)
        problem = wrapped_layer_problem(models, units, SaRALayer) if units else None
        if problem is not None:
            raise ValueError(problem)
        self.fsdp1 = Fsdp1Shards(units) if units else None  # FSDP1: each process holds part of each parameter
        zero = zero_optimizer(optimizer)
        self.zero = ZeroPartitions(zero) if zero is not None else None  # DeepSpeed ZeRO steps fp32 partitions
        self.optimizer = self.zero.optimizer if self.zero is not None else _unwrap_optimizer(optimizer)
        if getattr(self.optimizer, "_sara_training", None) is not None:
            raise ValueError("peft_sara.attach was already called for this optimizer; call it once per optimizer.")
        self.updates = [
            update
            for index, one_model in enumerate(models)
            for update in _trained_updates(one_model, key_prefix=f"{index}." if len(models) > 1 else "")
        ]
        if not self.updates:
            raise ValueError(
                "The model has no trainable SaRA adapter: create one with get_peft_model(model, SaRAConfig(...)) or "
                "model.add_adapter(SaRAConfig(...)), and do not load it in inference mode."
            )
        held = {id(param) for group in self.optimizer.param_groups for param in group["params"]}
        holds = self.zero.holds if self.zero is not None else (lambda values: id(values) in held)
        not_held = [update.key for update in self.updates if not holds(update.values)]
        if not_held:
            raise ValueError(
                f"The optimizer does not hold the SaRA parameters of {len(not_held)} layer(s), e.g. {not_held[:2]}. "
                "Create the optimizer from the model's parameters after get_peft_model/add_adapter."
            )
        self._updates_by_key = {update.key: update for update in self.updates}
        self._rank_candidates = _rank_candidates(self.updates)
        self.step = 0
        self._skipping_step = False
        self._grad_scale: torch.Tensor | None = None
        self._regularised: list[tuple[float, _TrainedUpdate]] = []  # this step's (λ, layer) per adapter config
        self.last_rank_loss: torch.Tensor | None = None
        self.last_rank_layers: list[str] = []
        # per frozen update: its positions, those this process holds (in its shard), their values, the gradient hook
        self._frozen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]] = {}
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]
        self.optimizer._sara_training = self

    @property
    def rank_loss(self) -> float:
        """λ‖P_M‖_* of the layer regularised at the last step (0.0 when none was)."""
        return 0.0 if self.last_rank_loss is None else float(self.last_rank_loss)

    @property
    def frozen_fraction(self) -> float:
        """Share of the original trainable entries frozen by the progressive step."""
        total = sum(update.values_numel for update in self.updates)
        frozen = sum(positions.numel() for positions, _, _, _ in self._frozen.values())
        return frozen / total if total else 0.0

    def _stepped_group(self) -> int | None:
        """Under ZeRO, the parameter group whose partition the optimizer is stepping now; None: all at once."""
        return self.zero.stepped_group() if self.zero is not None else None

    def _in_group(self, update: _TrainedUpdate, group: int | None) -> bool:
        return group is None or self.zero.group_of(update.values) == group

    def _effective_values(self, update: _TrainedUpdate) -> torch.Tensor:
        if self.fsdp1 is not None:  # FSDP1 holds the layer's weight and values whole inside its unit only
            with self.fsdp1.whole(update.values):
                return update.effective_values()
        values = self.zero.full_values(update.values) if self.zero is not None else None
        return update.effective_values(values)

    def _before_step(self, optimizer, args, kwargs) -> None:
        group = self._stepped_group()
        if group in (None, 0):  # a new step: choose the layers to regularise
            self.last_rank_loss, self.last_rank_layers = None, []
            self._grad_scale, self._skipping_step = _gradient_scaling(optimizer)
            self._regularised = []
            for config, candidates in self._rank_candidates:
                generator = torch.Generator().manual_seed(config.rank_seed * 1_000_003 + self.step)
                chosen = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
                self._regularised.append((config.lambda_rank, chosen))
        if self._skipping_step:
            return
        for weight, chosen in self._regularised:
            if self._in_group(chosen, group):
                loss = self._add_nuclear_norm_subgradient(chosen, weight, self._grad_scale)
                self.last_rank_layers.append(chosen.key)
                self.last_rank_loss = loss if self.last_rank_loss is None else self.last_rank_loss + loss

    def _add_nuclear_norm_subgradient(
        self, update: _TrainedUpdate, weight: float, grad_scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Add weight · ∂‖P_M‖_*/∂update = weight · scale · (U Vᵀ)[M] to the update's gradient, times `grad_scale`
        when the gradients are still multiplied by a gradient scaler's scale.

        Returns weight · ‖P_M‖_*, the regulariser's value.
        """
        masked = torch.zeros(update.weight_shape, dtype=torch.float32, device=update.values.device)
        masked.view(-1).index_add_(0, update.indices, self._effective_values(update))
        polar, nuclear_norm = polar_factor(masked)
        subgradient = polar.view(-1).index_select(0, update.indices)
        subgradient.mul_(weight * update.layer.sara_scaling[update.adapter])
        if grad_scale is not None:
            subgradient.mul_(grad_scale.to(subgradient.device))
        values = update.values
        shards = self.zero if self.zero is not None else self.fsdp1
        if shards is not None:  # into this process's part of the gradient
            shards.add_to_gradient(values, subgradient)
            return weight * nuclear_norm
        subgradient = like(subgradient.to(values.dtype), values)
        values.grad = subgradient if values.grad is None else values.grad.add_(subgradient)
        return weight * nuclear_norm

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._skipping_step:
            return
        group = self._stepped_group()
        for key, (positions, held, frozen_values, _) in self._frozen.items():
            update = self._updates_by_key[key]
            if not self._in_group(update, group):
                continue
            if self.zero is not None:
                self.zero.write(update.values, positions, frozen_values)
            else:
                local(update.values.data).index_copy_(0, held, frozen_values)
        if self.zero is not None and group != self.zero.last_group:
            return  # ZeRO steps the remaining groups next, in the same step
        self.step += 1
        for update in self.updates:
            if update.config.progressive_step == self.step and update.key not in self._frozen:
                still_small = self._effective_values(update).abs() < update.config.threshold
                self._freeze(update, (~still_small).nonzero().squeeze(1))

    def _freeze(self, update: _TrainedUpdate, positions: torch.Tensor) -> None:
        """Keep `positions` of the update at their current values for good, and give them no gradient."""
        values = update.values
        positions = positions.to(values.device)
        # the positions this process holds, where the values are sharded
        held = (self.fsdp1.local_positions if self.fsdp1 is not None else local_positions)(positions, values)
        if self.zero is not None:  # ZeRO steps fp32 copies: keep theirs, written back into them after each step
            frozen_values = self.zero.full_values(values).index_select(0, positions)
            handle = values.register_hook(lambda grad: grad.index_fill(0, positions, 0))
            self._frozen[update.key] = (positions, positions, frozen_values, handle)
            return
        if self.fsdp1 is not None:
            handle = update.layer.freeze_gradient(update.adapter, positions)  # hooks on FSDP1's views never run
        elif is_sharded(values):
            # FSDP2 reduce-scatters into the sharded values' .grad outside autograd's view of them: a tensor hook
            # never runs there, the hook after accumulation does (before clipping and the step)
            handle = values.register_post_accumulate_grad_hook(lambda param: local(param.grad).index_fill_(0, held, 0))
        else:
            handle = values.register_hook(lambda grad: grad.index_fill(0, held, 0))
        self._frozen[update.key] = (positions, held, local(values.detach()).index_select(0, held), handle)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "frozen_positions": {key: positions.cpu() for key, (positions, _, _, _) in self._frozen.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state; the model's SaRA values must be loaded already (accelerate does so)."""
        for *_, handle in self._frozen.values():
            handle.remove()
        self._frozen = {}
        self.step = int(state["step"])
        unknown = sorted(set(state["frozen_positions"]) - self._updates_by_key.keys())
        if unknown:
            raise ValueError(f"The SaRA training state names layers this model lacks, e.g. {unknown[:2]}.")
        for key, positions in state["frozen_positions"].items():
            self._freeze(self._updates_by_key[key], positions)

    def detach(self) -> None:
        """Remove the hooks: the optimizer steps like a plain one again."""
        for handle in self._handles:
            handle.remove()
        for *_, handle in self._frozen.values():
            handle.remove()
        self.optimizer._sara_training = None


def attach(model: nn.Module | Sequence[nn.Module], optimizer: Any) -> SaRATraining:
    """Make `optimizer.step()` apply SaRA's regulariser and progressive step to the model's trainable SaRA adapters.

    `model` may be a PeftModel, a diffusers model with an added adapter, or either wrapped by DDP/accelerate,
    sharded by FSDP2's `fully_shard` or by FSDP1 with `use_orig_params=True` (see `fsdp1`), or a DeepSpeed ZeRO
    engine (stage 1, 2 or 3), or a list of such models trained by the same optimizer (a UNet and its text encoder);
    `optimizer` a torch optimizer, one wrapped by accelerate, or the ZeRO optimizer `deepspeed.initialize` returns
    around a torch optimizer (see `zero`). DeepSpeed without ZeRO is refused (see `sharding.unsupported_engine`).
    """
    return SaRATraining(model, optimizer)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer subclasses torch's Optimizer but steps the optimizer it wraps
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"attach needs a torch optimizer (or one wrapped by accelerate), got {type(optimizer).__name__}."
        )
    return optimizer


def _gradient_scaling(optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor | None, bool]:
    """The scale still on the gradients at this step, and whether the optimizer will skip its update.

    A GradScaler unscales the gradients before it steps a plain optimizer, and does not step it at all after inf/NaN
    gradients. An optimizer that unscales by itself (fused AdamW: `_step_supports_amp_scaling`) is stepped with the
    gradients still scaled, unless `unscale_` ran for clipping; the scaler sets its `grad_scale` (None when already
    unscaled) and `found_inf`, and the optimizer leaves the parameters alone when inf/NaN were found.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    skipping = found_inf is not None and bool(found_inf)
    return getattr(optimizer, "grad_scale", None), skipping


def _peft_configs(model: nn.Module) -> dict[str, Any]:
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict):
            return configs
    return {}


def _trained_updates(model: nn.Module, key_prefix: str) -> list[_TrainedUpdate]:
    configs = _peft_configs(model)
    updates = []
    for name, module in model.named_modules():
        if not isinstance(module, SaRALayer):
            continue
        for adapter, values in module.sara_values.items():
            if values.requires_grad and isinstance(configs.get(adapter), SaRAConfig):
                key = f"{key_prefix}{_canonical_module_name(name)}:{adapter}"
                shape, count = module.whole_base_shape("weight"), module.sara_indices[adapter].numel()
                updates.append(_TrainedUpdate(key, module, adapter, configs[adapter], shape, count))
    return updates


def _rank_candidates(updates: list[_TrainedUpdate]) -> list[tuple[SaRAConfig, list[_TrainedUpdate]]]:
    """For each adapter config with λ > 0, the updates of the 2-D weights large enough to regularise."""
    by_config: dict[int, tuple[SaRAConfig, list[_TrainedUpdate]]] = {}
    for update in updates:
        config, shape = update.config, update.weight_shape
        if config.lambda_rank > 0 and len(shape) == 2 and min(shape) > config.rank_min_dim:
            by_config.setdefault(id(config), (config, []))[1].append(update)
    return list(by_config.values())


def _canonical_module_name(name: str) -> str:
    """Module name without the wrappers' prefixes, so that checkpoints match with or without DDP/compile/PeftModel."""
    name = name.replace("_fsdp_wrapped_module.", "")  # FSDP1 wraps units anywhere in the model
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        while name.startswith(prefix):
            name = name.removeprefix(prefix)
    return name
