"""Support code of the training scripts in `scripts/`, one concern per module.

The package core (tuner, `attach`, loading, export) never imports from here; the scripts import what they use from
the modules themselves: `cli` (user errors, logging), `arguments` (flags and their checks), `data`, `models`, `loss`,
`checkpoints`, `validation`, `output` (adapters, model card, Hub) and `loop` (the optimization loop).
"""
