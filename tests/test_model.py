"""The SaRA tuner through peft's and diffusers' generic API: injection, selection, saving, loading, adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MLPConv, round_layers_to, tiny_clip_text_model, tiny_sd3_transformer, tiny_unet, unet_inputs
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_sara
from peft_sara import SaRAConfig, SaRALayer
from peft_sara.model import threshold_for_fraction

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def supported_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def sara_layers(model: nn.Module) -> list[SaRALayer]:
    return [m for m in model.modules() if isinstance(m, SaRALayer)]


@pytest.mark.parametrize(
    "build",
    [tiny_unet, lambda: tiny_unet(sdxl_style=True), tiny_sd3_transformer, tiny_clip_text_model],
    ids=["unet-sd", "unet-sdxl", "sd3-transformer", "clip-text"],
)
def test_default_targets_every_linear_and_conv_with_exact_count(build):
    model = build()
    targets = supported_modules(model)
    expected = sum(int((m.weight.float().abs() < 0.02).sum()) for m in targets.values())
    peft_model = get_peft_model(model, SaRAConfig(threshold=0.02))
    assert len(sara_layers(peft_model)) == len(targets)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected
    assert all(name.endswith("sara_values.default") for name, p in peft_model.named_parameters() if p.requires_grad)
    assert peft_model.get_nb_trainable_parameters()[0] == expected


def test_init_is_a_no_op_on_a_unet(unet):
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(**inputs).sample
        adapted = get_peft_model(unet, SaRAConfig(threshold=0.02))(**inputs).sample
    assert torch.equal(adapted, expected)


def test_training_changes_only_masked_entries(unet):
    original = {name: p.detach().clone() for name, p in unet.named_parameters()}
    model = get_peft_model(unet, SaRAConfig(threshold=0.02))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    inputs = unet_inputs(unet)
    for _ in range(3):
        model(**inputs).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = model.merge_and_unload()
    changed_anywhere = False
    for name, param in merged.named_parameters():
        moved = param.detach() != original[name]
        if name.endswith(".weight") and moved.any():
            changed_anywhere = True
        assert not (moved & (original[name].abs() >= 0.02)).any(), name
        if not name.endswith(".weight"):
            assert not moved.any(), name  # biases and norms untouched without include_bias
    assert changed_anywhere


def test_target_modules_and_exclude_modules(mlp):
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, target_modules=["lin0", "conv"], exclude_modules=["conv"]))
    assert [type(m).__name__ for m in (model.base_model.model.lin0, model.base_model.model.conv)] == [
        "Linear",
        "Conv2d",
    ]
    assert isinstance(model.base_model.model.lin0, SaRALayer)
    assert not isinstance(model.base_model.model.conv, SaRALayer)
    assert not isinstance(model.base_model.model.lin1, SaRALayer)


def test_target_fraction_picks_the_smallest_threshold_reaching_it(unet):
    weights = [m.weight for m in supported_modules(unet).values()]
    total = sum(w.numel() for w in weights)
    threshold = threshold_for_fraction(weights, 0.05)
    count = sum(int((w.abs() < threshold).sum()) for w in weights)
    below = torch.nextafter(torch.tensor(threshold), torch.tensor(0.0)).item()
    assert count >= round(0.05 * total) > sum(int((w.abs() < below).sum()) for w in weights)
    config = SaRAConfig(target_fraction=0.05)
    model = get_peft_model(unet, config)
    assert config.threshold == threshold and config.target_fraction is None
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(threshold=0.05, target_modules=["embed", "lin0"]), "supports nn.Linear and nn.Conv2d.*embed"),
        (dict(threshold=1e-12), "selects no weight entry"),
        (dict(threshold=0.05, target_modules=["nothing_like_this"]), "not found"),
    ],
    ids=["unsupported-type", "selects-nothing", "matches-nothing"],
)
def test_bad_configuration_is_refused_before_the_model_changes(mlp, config, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(mlp, SaRAConfig(**config))
    assert not sara_layers(mlp)
    assert all(p.requires_grad for p in mlp.parameters())


def test_save_and_load_in_a_fresh_process(tmp_path, unet):
    model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False, progressive_step=10))
    model.save_pretrained(tmp_path / "adapter")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = model(**inputs).sample
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "check.pt")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SARA" and config["threshold"] == 0.02 and config["progressive_step"] == 10
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(REPO_ROOT, "tests")!r})
        import peft_sara
        from peft import PeftConfig, PeftModel
        from conftest import tiny_unet
        config = PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})
        assert isinstance(config, peft_sara.SaRAConfig), type(config)
        model = PeftModel.from_pretrained(tiny_unet(), {str(tmp_path / "adapter")!r})
        check = torch.load({str(tmp_path / "check.pt")!r})
        with torch.no_grad():
            output = model(**check["inputs"]).sample
        assert torch.equal(output, check["expected"]), (output - check["expected"]).abs().max()
        assert not any(p.requires_grad for p in model.parameters())
        print("loaded-identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert "loaded-identical" in result.stdout, result.stderr[-2000:]


def test_adapter_trained_on_fp32_loads_onto_fp16_base_at_the_same_positions(tmp_path, unet):
    model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False))
    model.save_pretrained(tmp_path)
    trained = {name: module for name, module in model.named_modules() if isinstance(module, SaRALayer)}
    half_base = tiny_unet().half()
    half_selection = sum(int((m.weight.float().abs() < 0.02).sum()) for m in supported_modules(half_base).values())
    assert half_selection != sum(p.numel() for p in model.parameters() if p.requires_grad)  # ties at θ moved
    loaded = PeftModel.from_pretrained(half_base, tmp_path, is_trainable=True)
    loaded_layers = {name: module for name, module in loaded.named_modules() if isinstance(module, SaRALayer)}
    assert loaded_layers.keys() == trained.keys()
    for name, module in loaded_layers.items():
        assert torch.equal(module.sara_indices["default"], trained[name].sara_indices["default"]), name
        assert module.sara_values["default"].dtype == torch.float32
        assert torch.equal(module.sara_values["default"], trained[name].sara_values["default"])
        assert module.sara_values["default"].requires_grad


@pytest.mark.parametrize("selection", ["largest", "random"])
def test_ablation_selections_match_the_smallest_count_per_layer_and_reload(tmp_path, selection):
    smallest = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02))
    ablated = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02, selection=selection, init_weights=False))
    counts = {
        name: layer.sara_indices["default"].numel()
        for name, layer in smallest.named_modules()
        if isinstance(layer, SaRALayer)
    }
    layers = {name: layer for name, layer in ablated.named_modules() if isinstance(layer, SaRALayer)}
    assert {name: layer.sara_indices["default"].numel() for name, layer in layers.items()} == counts
    for layer in layers.values():
        magnitudes = layer.get_base_layer().weight.detach().abs().reshape(-1)
        chosen = magnitudes[layer.sara_indices["default"].long()]
        assert selection == "random" or chosen.min() >= magnitudes.kthvalue(magnitudes.numel() - chosen.numel() + 1)[0]
    ablated.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path)  # the saved positions, not a new draw
    for name, layer in loaded.named_modules():
        if isinstance(layer, SaRALayer):
            assert torch.equal(layer.sara_indices["default"], layers[name].sara_indices["default"])


def test_adapter_size_on_disk(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    model = get_peft_model(base, SaRAConfig(threshold=0.01))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "fp32")
    fp32_bytes = os.path.getsize(tmp_path / "fp32" / "adapter_model.safetensors")
    assert fp32_bytes / count <= 8.0
    model.to(torch.bfloat16)  # values saved in half precision: 6 bytes per value
    model.save_pretrained(tmp_path / "bf16")
    bf16_bytes = os.path.getsize(tmp_path / "bf16" / "adapter_model.safetensors")
    assert bf16_bytes / count <= 6.1
    reloaded = PeftModel.from_pretrained(
        nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)), tmp_path / "bf16"
    )
    assert reloaded.base_model.model[0].sara_values["default"].dtype == torch.float32


def test_mismatched_base_and_damaged_files_are_refused(tmp_path, mlp):
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, target_modules=["lin0", "lin1"], init_weights=False))
    model.save_pretrained(tmp_path)
    weights_file = tmp_path / "adapter_model.safetensors"
    saved = load_file(weights_file)

    class Wider(MLPConv):
        def __init__(self):
            super().__init__()
            self.lin1 = nn.Linear(32, 2)

    with pytest.raises(ValueError, match=r"updates lin1.weight of shape \(4, 32\), which has shape \(2, 32\) here"):
        PeftModel.from_pretrained(Wider(), tmp_path)
    save_file({key: value for key, value in saved.items() if "_shape" not in key}, weights_file)  # a 0.1.0 file
    with pytest.raises(ValueError, match="does not fit lin1.weight: its position mask covers 128 entries, not 64"):
        PeftModel.from_pretrained(Wider(), tmp_path)

    class Missing(MLPConv):
        def __init__(self):
            super().__init__()
            del self.lin1

    with pytest.raises(ValueError, match="not in this model"):
        PeftModel.from_pretrained(Missing(), tmp_path)

    del saved["base_model.model.lin1.sara_values"]
    save_file(saved, weights_file)
    with pytest.raises(ValueError, match="no saved update for 1 targeted module"):
        PeftModel.from_pretrained(MLPConv(), tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved.pop("base_model.model.lin1.sara_mask", None)
    saved["base_model.model.lin1.sara_values"] = torch.zeros(3)
    saved["base_model.model.lin1.sara_indices"] = torch.tensor([5, 3, 9], dtype=torch.int32)
    save_file(saved, weights_file)
    with pytest.raises(ValueError, match="not strictly increasing"):
        PeftModel.from_pretrained(MLPConv(), tmp_path)

    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(Exception, match="(?i)deserializ|header|incomplete"):
        PeftModel.from_pretrained(MLPConv(), tmp_path)


def test_multiple_adapters_switch_weight_and_delete_cleanly(mlp, mlp_input):
    base_output = mlp(mlp_input)
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, init_weights=False), adapter_name="first")
    torch.manual_seed(5)
    model.add_adapter("second", SaRAConfig(threshold=0.1, init_weights=False))
    first_output = model(mlp_input)
    assert not all(p.requires_grad for n, p in model.named_parameters() if "second" in n)
    model.set_adapter("second")
    second_output = model(mlp_input)
    assert not torch.allclose(first_output, second_output)
    assert all(p.requires_grad == ("second" in n) for n, p in model.named_parameters() if "sara_" in n)
    with model.disable_adapter():
        torch.testing.assert_close(model(mlp_input), base_output)
    model.set_adapter("first")
    model.delete_adapter("second")
    torch.testing.assert_close(model(mlp_input), first_output)
    assert not any("second" in key for key in model.state_dict())
    for layer in sara_layers(model):
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            assert "second" not in getattr(layer, attribute)
    assert list(model.peft_config) == ["first"]


def test_merge_and_unload_and_unload(mlp, mlp_input):
    base_output = mlp(mlp_input)
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, init_weights=False))
    adapted = model(mlp_input)
    merged = model.merge_and_unload(safe_merge=True)
    assert not sara_layers(merged) and type(merged.lin0) is nn.Linear
    torch.testing.assert_close(merged(mlp_input), adapted)
    torch.manual_seed(0)
    fresh = MLPConv()
    unloaded = get_peft_model(fresh, SaRAConfig(threshold=0.05, init_weights=False)).unload()
    assert not sara_layers(unloaded)
    torch.testing.assert_close(unloaded(mlp_input), base_output)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unmerge_returns_the_base_bit_for_bit(mlp, dtype):
    """Subtracting a merged update drifts in fp16/bf16 (w + d - d != w); unmerge copies the entries back."""
    mlp = mlp.to(dtype)
    original = {name: p.detach().clone() for name, p in mlp.named_parameters()}
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, init_weights=False, include_bias=True))
    torch.manual_seed(3)
    model.add_adapter("second", SaRAConfig(threshold=0.08, init_weights=False, include_bias=True))
    for cycle in range(5):
        model.base_model.set_adapter(["default", "second"])
        for layer in sara_layers(model):
            layer.set_scale("second", 0.3 + 0.2 * cycle)
        model.merge_adapter()
        assert all(layer.merged for layer in sara_layers(model))
        model.unmerge_adapter()
    unmerged = {name.replace("base_layer.", ""): p for name, p in model.base_model.model.named_parameters()}
    assert all(torch.equal(unmerged[name], tensor) for name, tensor in original.items())
    model.merge_adapter()
    model.float()  # a merged model cast to another dtype unmerges to the cast base
    model.unmerge_adapter()
    unmerged = {name.replace("base_layer.", ""): p for name, p in model.base_model.model.named_parameters()}
    assert all(torch.equal(unmerged[name], tensor.float()) for name, tensor in original.items())


def test_diffusers_adapter_api(unet):
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base_output = unet(**inputs).sample
    originals = {n: p.detach().clone() for n, p in unet.named_parameters()}
    unet.add_adapter(SaRAConfig(threshold=0.02, init_weights=False), adapter_name="style")
    torch.manual_seed(9)
    unet.add_adapter(SaRAConfig(threshold=0.02, init_weights=False), adapter_name="subject")
    unet.set_adapter("style")
    with torch.no_grad():
        style_output = unet(**inputs).sample
        unet.disable_adapters()
        torch.testing.assert_close(unet(**inputs).sample, base_output)
        unet.enable_adapters()
        torch.testing.assert_close(unet(**inputs).sample, style_output)

        # the paper merges two SaRA updates with weights 0.6 each
        unet.set_adapters(["style", "subject"], weights=[0.6, 0.6])
        combined = unet(**inputs).sample
        layer = next(m for m in unet.modules() if isinstance(m, SaRALayer))
        expected_delta = layer.get_delta_weight("style") + layer.get_delta_weight("subject")  # scales included
        weight_name = next(n for n, m in unet.named_modules() if m is layer) + ".base_layer.weight"
        unet.fuse_lora(lora_scale=0.5)
        torch.testing.assert_close(
            layer.get_base_layer().weight, originals[weight_name.replace(".base_layer", "")] + 0.5 * expected_delta
        )
        fused = unet(**inputs).sample
        unet.unfuse_lora()
        for name, param in unet.named_parameters():
            if "base_layer" in name:
                torch.testing.assert_close(param, originals[name.replace(".base_layer", "")])
        unet.set_adapters(["style", "subject"], weights=[0.6, 0.6])
        torch.testing.assert_close(unet(**inputs).sample, combined)
        assert not torch.allclose(fused, combined)
        unet.delete_adapters(["subject"])
        unet.unload_lora()
        torch.testing.assert_close(unet(**inputs).sample, base_output)


def test_loads_from_a_hub_repo_id_through_the_cache(tmp_path, monkeypatch, unet):
    from conftest import fake_hub_repo

    model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = model(**inputs).sample
    fake_hub_repo(monkeypatch, tmp_path / "hub", "someone/sara-unet", tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_unet(), "someone/sara-unet")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, expected)


def test_push_to_hub_uploads_a_loadable_adapter(tmp_path, monkeypatch, unet):
    """push_to_hub with the Hub API intercepted: the committed files, laid out as a repo, load back by repo id."""
    from types import SimpleNamespace

    from conftest import fake_hub_repo
    from huggingface_hub import HfApi

    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = uploaded / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(open(operation.path_or_fileobj, "rb").read())

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False))
    model.push_to_hub("someone/pushed-sara")
    assert {path.name for path in uploaded.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    fake_hub_repo(monkeypatch, tmp_path / "hub", "someone/pushed-sara", uploaded)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = model(**inputs).sample
        assert torch.equal(PeftModel.from_pretrained(tiny_unet(), "someone/pushed-sara")(**inputs).sample, expected)


def test_loading_into_a_model_in_training_keeps_the_optimizer_s_parameters(tmp_path, unet):
    """Resuming loads saved values into live parameters: an optimizer that holds them must go on training them."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False))
    saved = {key: value.clone() for key, value in get_peft_model_state_dict(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    with torch.no_grad():
        for param in trainable:
            param.zero_()
    set_peft_model_state_dict(model, saved)
    assert [id(p) for p in model.parameters() if p.requires_grad] == [id(p) for p in trainable]  # same objects
    assert all(p.abs().sum() > 0 for p in trainable)
    model(**unet_inputs(unet)).sample.mean().backward()
    before = [p.detach().clone() for p in trainable]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


def damage_last_layer(folder, damage: str = "wrong-shape") -> None:
    """Make the saved update of the model's last layer unfit; every earlier layer stays loadable."""
    weights_file = folder / "adapter_model.safetensors"
    saved = load_file(weights_file)
    module_order = ["base_model.model." + name for name, _ in tiny_unet().named_modules()]
    last = max({key.rsplit(".", 1)[0] for key in saved}, key=module_order.index)
    if damage == "wrong-shape":
        saved[f"{last}.sara_values"] = saved[f"{last}.sara_values"][:-1]
    else:
        saved[f"{last}.sara_values"] = saved[f"{last}.sara_values"].to(getattr(torch, damage))
    save_file(saved, weights_file)


@pytest.fixture
def saved_unet_adapter(tmp_path):
    model = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02, init_weights=False))
    model.save_pretrained(tmp_path / "good")
    model.save_pretrained(tmp_path / "damaged")
    damage_last_layer(tmp_path / "damaged")
    return tmp_path / "good", tmp_path / "damaged"


def test_a_refused_from_pretrained_leaves_the_base_model_as_it_was(saved_unet_adapter):
    good, damaged = saved_unet_adapter
    base = tiny_unet().half()  # another dtype: the layers' selections differ from the saved ones and get resized
    modules = [(name, id(module)) for name, module in base.named_modules()]
    inputs = {key: value.half() if value.is_floating_point() else value for key, value in unet_inputs(base).items()}
    with torch.no_grad():
        expected = base(**inputs).sample
    with pytest.raises(ValueError, match=r"does not fit conv_out.weight: \(140,\) values for 141"):
        PeftModel.from_pretrained(base, damaged)
    assert not sara_layers(base) and not hasattr(base, "peft_config")
    assert [(name, id(module)) for name, module in base.named_modules()] == modules
    with torch.no_grad():
        assert torch.equal(base(**inputs).sample, expected)
    assert len(sara_layers(PeftModel.from_pretrained(base, good))) == len(supported_modules(tiny_unet()))


@pytest.mark.parametrize("made_by", ["get_peft_model", "from_pretrained"])
def test_a_refused_state_dict_resizes_no_layer_and_keeps_the_adapter(saved_unet_adapter, made_by):
    """As when a training run resumes from a damaged checkpoint: the adapter in training is kept as it was."""
    from peft import set_peft_model_state_dict

    good, damaged = saved_unet_adapter
    unet = tiny_unet()
    if made_by == "get_peft_model":  # other sizes than the saved ones: the layers would be resized
        model = get_peft_model(unet, SaRAConfig(threshold=0.03, init_weights=False))
    else:  # an adapter loaded once is not removed by a later refused load
        model = PeftModel.from_pretrained(unet, good, is_trainable=True)
    before = {
        name: (layer.sara_indices["default"].clone(), layer.sara_values["default"].detach().clone())
        for name, layer in model.named_modules()
        if isinstance(layer, SaRALayer)
    }
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = model(**inputs).sample
    with pytest.raises(ValueError, match="does not fit"):
        set_peft_model_state_dict(model, load_file(damaged / "adapter_model.safetensors"))
    after = {name: layer for name, layer in model.named_modules() if isinstance(layer, SaRALayer)}
    assert after.keys() == before.keys() and list(model.peft_config) == ["default"]
    for name, (indices, values) in before.items():
        assert torch.equal(after[name].sara_indices["default"], indices), name
        assert torch.equal(after[name].sara_values["default"], values), name
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)


def test_a_refused_second_adapter_is_removed_and_the_first_keeps_working(saved_unet_adapter):
    good, damaged = saved_unet_adapter
    unet = tiny_unet()
    model = PeftModel.from_pretrained(unet, good)
    layers = [(name, id(layer)) for name, layer in model.named_modules() if isinstance(layer, SaRALayer)]
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = model(**inputs).sample
    with pytest.raises(ValueError, match="does not fit"):
        model.load_adapter(damaged, adapter_name="second")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert [(name, id(layer)) for name, layer in model.named_modules() if isinstance(layer, SaRALayer)] == layers
    assert not any("second" in key for key in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_values_saved_in_a_wrong_dtype_are_named(tmp_path, dtype):
    model = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02, init_weights=False))
    model.save_pretrained(tmp_path)
    damage_last_layer(tmp_path, dtype)
    with pytest.raises(ValueError, match=f"values must be floating point, got torch.{dtype}"):
        PeftModel.from_pretrained(tiny_unet(), tmp_path)


def nan_in_last_layer(model: nn.Module) -> dict[str, torch.Tensor]:
    """Put a NaN into the last SaRA layer's update; return every base tensor as it is now."""
    sara_layers(model)[-1].sara_values["default"].data[0] = float("nan")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "sara_" not in name}


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter", "fuse_lora"])
def test_safe_merge_checks_every_layer_before_merging_any(merge):
    unet = tiny_unet()
    if merge == "fuse_lora":
        unet.add_adapter(SaRAConfig(threshold=0.02, init_weights=False))
        model = unet
    else:
        model = get_peft_model(unet, SaRAConfig(threshold=0.02, init_weights=False))
    before = nan_in_last_layer(model)
    count = len(sara_layers(model))
    with pytest.raises(ValueError, match="NaNs detected"):
        if merge == "fuse_lora":
            unet.fuse_lora(safe_fusing=True)
        elif merge == "merge_adapter":
            model.merge_adapter(safe_merge=True)
        else:
            model.merge_and_unload(safe_merge=True)
    assert len(sara_layers(model)) == count
    assert not any(layer.merged for layer in sara_layers(model))
    after = {name: tensor for name, tensor in model.state_dict().items() if "sara_" not in name}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_safe_merge_checks_the_peers_once_per_merge(monkeypatch):
    checks = []
    original = SaRALayer._check_merge_of_peers
    monkeypatch.setattr(SaRALayer, "_check_merge_of_peers", lambda self, names: checks.append(original(self, names)))
    model = get_peft_model(tiny_unet(), SaRAConfig(threshold=0.02, init_weights=False))
    model.merge_adapter(safe_merge=True)
    assert len(checks) == 1 and all(layer.merged for layer in sara_layers(model))
    model.unmerge_adapter()
    model.merge_adapter(safe_merge=True)
    assert len(checks) == 2


def test_a_copied_model_checks_its_own_layers(mlp):
    import copy
    import pickle

    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, init_weights=False))
    copied = copy.deepcopy(model)
    before = nan_in_last_layer(copied)
    with pytest.raises(ValueError, match="NaNs detected"):
        copied.merge_adapter(safe_merge=True)
    assert all(torch.equal(copied.state_dict()[name], tensor) for name, tensor in before.items())
    model.merge_adapter(safe_merge=True)  # the original's layers are not the copy's
    assert all(layer.merged for layer in sara_layers(model))
    assert sara_layers(pickle.loads(pickle.dumps(model)))


def _unet_with_cross_attention_dim(dim: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    config = dict(tiny_unet().config)
    config["cross_attention_dim"] = dim
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config)


def test_an_adapter_never_loads_onto_a_base_of_other_shapes(tmp_path):
    """to_k/to_v of a cross_attention_dim=64 UNet are larger than a 32 one's: saved positions would fit them."""
    trained = get_peft_model(tiny_unet(), SaRAConfig(threshold=1e-3, init_weights=False))  # sparse: no bitmask
    trained.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(key.endswith(("to_k.sara_indices", "to_k.sara_deltas")) for key in saved), "positions, not a bitmask"
    other = _unet_with_cross_attention_dim(64)
    inputs = unet_inputs(other)
    inputs["encoder_hidden_states"] = torch.randn(2, 4, 64)
    before = other(**inputs).sample
    message = (
        r"trained on another base model: it updates .*attn2\.to_k\.weight of shape \(16, 32\), "
        r"which has shape \(16, 64\)"
    )
    for low_cpu_mem_usage in (False, True):
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(other, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
        assert not any(isinstance(module, SaRALayer) for module in other.modules())
    torch.testing.assert_close(other(**inputs).sample, before, rtol=0, atol=0)
    # adapters written before shapes were stored still load, with the other checks
    save_file({key: value for key, value in saved.items() if "_shape" not in key}, tmp_path / "adapter" / "old.st")
    (tmp_path / "adapter" / "old.st").replace(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path / "adapter")
    torch.testing.assert_close(
        loaded(**unet_inputs(loaded)).sample, trained(**unet_inputs(trained)).sample, rtol=0, atol=0
    )


def _unet_sized_layers() -> nn.Module:
    """Layers of SD 1.5's UNet shapes (conv_in, 3x3 resnet convs of each width, a 1x1 shortcut, attention and
    feed-forward projections, the time embedding) whose rows differ in scale, as trained weights do: under one θ some
    layers are dense and others nearly empty, and the small entries cluster in some rows, with long runs between."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "conv_in": nn.Conv2d(4, 320, 3, padding=1),
            "conv_320": nn.Conv2d(320, 320, 3, padding=1),
            "conv_1280": nn.Conv2d(1280, 1280, 3, padding=1),
            "shortcut": nn.Conv2d(640, 1280, 1),
            "to_k": nn.Linear(768, 640),
            "to_q": nn.Linear(1280, 1280),
            "proj": nn.Linear(320, 2560),
            "ff": nn.Linear(1280, 320),
            "time": nn.Linear(320, 1280),
        }
    )
    with torch.no_grad():
        for layer in model.values():
            rows = layer.weight.shape[0]
            layer.weight.mul_(torch.randn(rows).mul(1.5).exp().view(-1, *[1] * (layer.weight.dim() - 1)))
    return model


@pytest.mark.parametrize("fraction", [0.005, 0.0058, 0.02, 0.058, 0.1])
def test_adapter_files_are_compact_at_every_density(tmp_path, fraction):
    base = _unet_sized_layers()
    original = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    model = get_peft_model(base, SaRAConfig(target_fraction=fraction, init_weights=False))
    count = sum(param.numel() for name, param in model.named_parameters() if "sara_values" in name)
    model.save_pretrained(tmp_path / "fp32")
    assert os.path.getsize(tmp_path / "fp32" / "adapter_model.safetensors") / count <= 6.5
    model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert os.path.getsize(tmp_path / "bf16" / "adapter_model.safetensors") / count <= 4.5
    fresh = _unet_sized_layers()
    fresh.load_state_dict(original)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "fp32")
    for name, indices in model.named_buffers():
        if "sara_indices" in name:
            assert torch.equal(reloaded.get_buffer(name).long(), indices.long()), name


def test_a_clustered_selection_still_takes_two_bytes_a_position(tmp_path):
    """Small entries in a few rows only (dead channels of a trained layer): runs of a million entries between them."""
    from safetensors import safe_open

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1280, 1280))
    with torch.no_grad():
        base[0].weight[10:1270].mul_(1000)  # only the first and last ten rows keep entries below θ
    model = get_peft_model(base, SaRAConfig(threshold=1e-3, init_weights=False))
    count = model.base_model.model[0].sara_values["default"].numel()
    assert 0 < count < 0.01 * base[0].weight.numel()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as saved:
        positions = {
            key: saved.get_tensor(key) for key in saved.keys() if "sara_values" not in key and "shape" not in key
        }
    assert [key.rsplit(".", 1)[-1] for key in positions] == ["sara_deltas"]
    assert next(iter(positions.values())).nbytes < 2 * count + 64


def test_positions_saved_as_16_bit_steps_fit_gaps_of_any_length():
    from peft_sara.model import MAX_STEP, deltas_of, positions_of_deltas

    for positions in ([0, 3, 70_000, 70_001], [5, 9, 65_540], [65_535, 65_536, 3 * MAX_STEP + 7, 10**7], [0], []):
        positions = torch.tensor(positions, dtype=torch.int32)
        deltas = deltas_of(positions)
        assert deltas.dtype == torch.uint16
        assert torch.equal(positions_of_deltas(deltas, 2 * 10**7), positions)
    assert deltas_of(torch.tensor([5, 9, 65_540])).tolist() == [6, 4, 65_531]
    assert deltas_of(torch.tensor([0, 70_000])).tolist() == [1, 0, 4_465]  # 70,000 = 65,535 + 4,465


def test_adapters_saved_with_the_older_16_bit_gaps_still_load(tmp_path):
    """Before the steps could skip, positions were saved as uint16 gaps (`sara_gaps`) where every gap fitted."""
    from safetensors.torch import load_file, save_file

    from peft_sara.model import positions_of_deltas

    torch.manual_seed(0)
    model = get_peft_model(MLPConv(), SaRAConfig(threshold=0.002, init_weights=False))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    old = {}
    for key, tensor in saved.items():
        if ".sara_deltas" in key:
            positions = positions_of_deltas(tensor, 10**6).long()
            old[key.replace(".sara_deltas", ".sara_gaps")] = torch.diff(
                positions, prepend=torch.zeros(1, dtype=torch.long)
            ).to(torch.uint16)
        else:
            old[key] = tensor
    assert any(".sara_gaps" in key for key in old)
    save_file(old, tmp_path / "adapter_model.safetensors")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(MLPConv(), tmp_path)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_autocast_adapter_dtype_false_trains_and_reloads_in_the_base_dtype(tmp_path):
    def bf16_inputs(unet):
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in unet_inputs(unet).items()}

    config = SaRAConfig(threshold=0.02, lambda_rank=5e-3, rank_min_dim=8, progressive_step=1, init_weights=False)
    model = get_peft_model(tiny_unet().to(torch.bfloat16), config, autocast_adapter_dtype=False)
    values = [param for name, param in model.named_parameters() if "sara_values" in name]
    assert {param.dtype for param in values} == {torch.bfloat16}
    optimizer = torch.optim.AdamW(values, lr=1e-3)
    training = peft_sara.attach(model, optimizer)
    model(**bf16_inputs(model)).sample.float().pow(2).mean().backward()
    assert {param.grad.dtype for param in values if param.grad is not None} == {torch.bfloat16}
    optimizer.step()  # the regulariser and the progressive step act on bf16 values
    assert training.step == 1 and training.rank_loss > 0
    assert {param.dtype for param in values} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_unet().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in reloaded.named_parameters() if "sara_values" in n} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**bf16_inputs(reloaded)).sample, model(**bf16_inputs(model)).sample, rtol=0, atol=0
        )
    default = PeftModel.from_pretrained(tiny_unet().to(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in default.named_parameters() if "sara_values" in n} == {torch.float32}


def test_two_active_adapters_of_different_value_dtypes_compute_and_train_together():
    """An fp32-valued and a bf16-valued adapter (autocast_adapter_dtype=False) active at once on a bf16 base: the
    output is the base plus both updates, both get gradients in their own dtype, and the base stays bit for bit."""
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16),
        SaRAConfig(threshold=0.1, init_weights=False),
        adapter_name="first",
    )
    model.add_adapter("second", SaRAConfig(threshold=0.05, init_weights=False), autocast_adapter_dtype=False)
    model.base_model.set_adapter(["first", "second"])
    layers = [module for module in model.modules() if isinstance(module, SaRALayer)]
    assert all(layer.sara_values[name].requires_grad for layer in layers for name in ("first", "second"))
    assert {(layer.sara_values["first"].dtype, layer.sara_values["second"].dtype) for layer in layers} == {
        (torch.float32, torch.bfloat16)
    }
    bases = [layer.get_base_layer().weight.detach().clone() for layer in layers]

    def effective(layer, base):
        flat = base.reshape(-1).clone()
        for name in ("first", "second"):
            flat.index_add_(0, layer.sara_indices[name].long(), layer.sara_values[name].detach().to(flat.dtype))
        return flat.view_as(base)

    x = torch.randn(4, 16, dtype=torch.bfloat16)
    output = model(x)
    hidden = torch.relu(nn.functional.linear(x, effective(layers[0], bases[0]), layers[0].get_base_layer().bias))
    expected = nn.functional.linear(hidden, effective(layers[1], bases[1]), layers[1].get_base_layer().bias)
    assert torch.equal(output, expected)
    output.float().square().mean().backward()
    for layer, base in zip(layers, bases):
        assert layer.sara_values["first"].grad.dtype == torch.float32
        assert layer.sara_values["second"].grad.dtype == torch.bfloat16
        assert layer.sara_values["second"].grad.abs().sum() > 0
        assert torch.equal(layer.get_base_layer().weight, base)


def test_diffusers_layerwise_casting_keeps_sara_values_and_computes_in_the_compute_dtype():
    import copy

    unet = tiny_unet()
    unet.add_adapter(SaRAConfig(threshold=0.02, init_weights=False))
    reference = copy.deepcopy(unet)
    round_layers_to(reference, torch.float8_e4m3fn)  # the base layers as fp8 storage holds them, computed in fp32
    values = {name: param.detach().clone() for name, param in unet.named_parameters() if "sara_values" in name}
    indices = {name: buffer.clone() for name, buffer in unet.named_buffers() if "sara_indices" in name}
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert any(m.weight.dtype == torch.float8_e4m3fn for m in unet.modules() if isinstance(m, nn.Linear))
    for name, param in unet.named_parameters():
        if "sara_values" in name:
            assert param.dtype == torch.float32 and torch.equal(param, values[name]), name
    for name, buffer in unet.named_buffers():
        if "sara_indices" in name:
            assert torch.equal(buffer, indices[name]), name
    inputs = unet_inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, reference(**inputs).sample)


def test_peft_status_and_requires_grad_helpers_see_sara_layers(mlp):
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05))
    model.add_adapter("two", SaRAConfig(threshold=0.05))
    status = model.get_model_status()
    assert status.peft_types == {"default": "SARA", "two": "SARA"} and status.num_adapter_layers == 3
    assert status.requires_grad == {"default": True, "two": False}
    layer_status = {row.name: row for row in model.get_layer_status()}
    assert set(layer_status) == {"model.conv", "model.lin0", "model.lin1"}
    assert layer_status["model.lin0"].module_type == "sara.Linear"
    assert layer_status["model.lin0"].available_adapters == ["default", "two"]
    model.set_requires_grad("two", requires_grad=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {
        f"base_model.model.{m}.sara_values.{a}" for m in ("conv", "lin0", "lin1") for a in ("default", "two")
    }


def test_inject_adapter_in_model_and_modules_to_save(mlp, mlp_input):
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    injected = inject_adapter_in_model(SaRAConfig(threshold=0.05, init_weights=False), MLPConv())
    assert [type(m) for m in (injected.conv, injected.lin0, injected.lin1)] == [
        peft_sara.layer.Conv2d,
        peft_sara.layer.Linear,
        peft_sara.layer.Linear,
    ]
    assert not torch.equal(injected(mlp_input), mlp(mlp_input))  # the update is applied
    model = get_peft_model(mlp, SaRAConfig(threshold=0.05, target_modules=["lin0"], modules_to_save=["lin1"]))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {
        "base_model.model.lin0.sara_values.default",
        "base_model.model.lin1.modules_to_save.default.weight",
        "base_model.model.lin1.modules_to_save.default.bias",
    }


def test_torch_compile_trains_as_eager(mlp_input):
    """A compiled model (inductor) trains bit for bit as the eager one through optimizer steps and infers the same
    afterwards: the SaRA layers run eagerly (inductor mis-compiled the sparse op's in-place write and restore), the
    base weights stay untouched."""

    def outputs_and_values(compile_model: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = get_peft_model(MLPConv(), SaRAConfig(threshold=0.05, init_weights=False, lambda_rank=0.1))
        run = torch.compile(model) if compile_model else model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        peft_sara.attach(model, optimizer)
        outputs = []
        for _ in range(3):
            output = run(mlp_input)
            output.square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(output.detach())
        model.eval()
        with torch.no_grad():
            outputs.append(run(mlp_input))
        return outputs, {name: param.detach() for name, param in model.named_parameters()}

    eager_outputs, eager_values = outputs_and_values(False)
    compiled_outputs, compiled_values = outputs_and_values(True)
    assert all(torch.equal(compiled, eager) for compiled, eager in zip(compiled_outputs, eager_outputs))
    assert eager_values.keys() == compiled_values.keys()
    assert all(torch.equal(compiled_values[name], values) for name, values in eager_values.items())


def test_peft_model_loads_a_folder_saved_from_a_model_with_an_added_adapter(tmp_path):
    """Keys saved from `unet.add_adapter(...)` lack PeftModel's `base_model.model.` prefix; they load all the same."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = tiny_unet()
    unet.add_adapter(SaRAConfig(threshold=0.02, init_weights=False))
    state_dict = get_peft_model_state_dict(unet)
    assert not any(key.startswith("base_model.model.") for key in state_dict)
    save_file(state_dict, str(tmp_path / "adapter_model.safetensors"))
    unet.peft_config["default"].save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, unet(**inputs).sample)
