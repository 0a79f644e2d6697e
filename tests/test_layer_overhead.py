"""benchmarks/layer_overhead.py: each method trains what it says, and every one is timed and reported."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import layer_overhead
from peft_sara.layer import Linear


@pytest.mark.parametrize("method", layer_overhead.METHODS)
def test_each_method_trains_what_it_says(method):
    model, trainable = layer_overhead.build(method, layers=3, width=8)
    model(torch.randn(2, 8)).square().mean().backward()
    if method == "dense_grad":  # every weight gradient computed, and dropped at once
        assert trainable == [] and all(layer.weight.grad is None for layer in model.layers)
        return
    assert trainable and all(param.grad is not None for param in trainable)
    assert any(param.grad.abs().sum() > 0 for param in trainable)  # (LoRA's A gets none while B is zero)
    if method == "sara":
        assert len([module for module in model.modules() if isinstance(module, Linear)]) == 3


def test_every_method_is_timed_and_reported(tmp_path, capsys):
    output = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    report = layer_overhead.main(
        ["--layers", "4", "--width", "8", "--steps", "2", "--repeats", "2", "--optimizer", "--output", str(output)]
    )
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert set(report["step_seconds"]) == set(layer_overhead.METHODS)
    assert all(seconds > 0 for seconds in report["step_seconds"].values())
    assert torch.get_num_threads() == threads  # timed on one thread, then given back to the caller
    table = capsys.readouterr().out
    assert all(f"| {method} |" in table for method in layer_overhead.METHODS)


def test_an_unknown_method_is_refused():
    with pytest.raises(SystemExit, match="unknown method"):
        layer_overhead.main(["--methods", "sara,dora"])
