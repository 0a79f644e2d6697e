"""Support code of the training scripts in `scripts/`, one concern per module.

The package core (tuner, `attach`, loading, export) never imports from here; the scripts import what they use from
the modules themselves: `cli` (user errors, logging), `arguments` (flags, `--config`), `checks` (flag checks before
any model loads), `data`, `dreambooth` (the DreamBooth scripts' data, class images and prior loss), `models`, `loss`,
`setup` (Accelerator, optimizer, schedule), `checkpoints`, `loop` (the optimization loop), `validation`, `output`
(adapters, model card, Hub, output lock), `pivotal` (pivotal tuning's new tokens) and `stopping` (parameters that
train for the first part of a run).
"""
