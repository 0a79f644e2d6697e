"""load_sara_weights: SaRA adapters into a diffusers pipeline in one call, from a folder or a Hub repo id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fake_hub_repo, generate, tiny_flux_pipeline, tiny_pipeline
from peft import LoraConfig, get_peft_model

from peft_sara import SaRAConfig, SaRALayer, load_sara_weights


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory):
    """A training script's output folder (unet/ and text_encoder/ adapters) and the adapted pipeline's images."""
    output_dir = tmp_path_factory.mktemp("sara-output")
    pipeline = tiny_pipeline()
    torch.manual_seed(0)
    unet = get_peft_model(pipeline.unet, SaRAConfig(threshold=0.02, init_weights=False))
    text_encoder = get_peft_model(pipeline.text_encoder, SaRAConfig(target_fraction=0.05, init_weights=False))
    unet.save_pretrained(output_dir / "unet")
    text_encoder.save_pretrained(output_dir / "text_encoder")
    pipeline.unet, pipeline.text_encoder = unet.base_model.model, text_encoder.base_model.model
    return output_dir, generate(pipeline)


def test_loads_unet_and_text_encoder_from_an_output_folder(trained_output):
    output_dir, expected = trained_output
    pipeline = tiny_pipeline()
    base_images = generate(pipeline)
    assert load_sara_weights(pipeline, str(output_dir)) == ["unet", "text_encoder"]
    assert any(isinstance(m, SaRALayer) for m in pipeline.text_encoder.modules())
    assert not any(p.requires_grad for p in pipeline.unet.parameters())
    np.testing.assert_array_equal(generate(pipeline), expected)
    pipeline.disable_lora()  # diffusers' switch for every adapter of the pipeline, SaRA's included
    np.testing.assert_array_equal(generate(pipeline), base_images)


def test_a_single_adapter_folder_goes_to_the_denoiser(trained_output):
    output_dir, _ = trained_output
    pipeline = tiny_pipeline()
    assert load_sara_weights(pipeline, str(output_dir / "unet"), adapter_name="style") == ["unet"]
    assert "style" in pipeline.unet.peft_config
    with pytest.raises(ValueError, match="already has an adapter named 'style'"):
        load_sara_weights(pipeline, str(output_dir / "unet"), adapter_name="style")


def test_loads_from_a_hub_repo_id(trained_output, tmp_path, monkeypatch):
    output_dir, expected = trained_output
    fake_hub_repo(monkeypatch, tmp_path / "hub", "someone/sks-dog-sara", output_dir)
    pipeline = tiny_pipeline()
    assert load_sara_weights(pipeline, "someone/sks-dog-sara") == ["unet", "text_encoder"]
    np.testing.assert_array_equal(generate(pipeline), expected)


def test_bad_sources_get_one_clear_error(trained_output, tmp_path):
    output_dir, _ = trained_output
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match="No adapter folder at"):
        load_sara_weights(pipeline, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Found no adapter"):
        load_sara_weights(pipeline, str(tmp_path))
    lora = get_peft_model(tiny_pipeline().unet, LoraConfig(target_modules=["to_q"], r=2))
    lora.save_pretrained(tmp_path / "lora" / "unet")
    with pytest.raises(ValueError, match="is a LORA adapter, not SaRA.*load_lora_weights"):
        load_sara_weights(pipeline, str(tmp_path / "lora"))
    damaged = tmp_path / "damaged"
    (damaged / "unet").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (damaged / "unet" / name).write_bytes((output_dir / "unet" / name).read_bytes())
    (damaged / "unet" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="Could not read the adapter weights for unet"):
        load_sara_weights(pipeline, str(damaged))
    assert not any(isinstance(m, SaRALayer) for m in pipeline.unet.modules())


def test_an_adapter_for_another_base_is_refused_and_leaves_the_pipeline_as_it_was(trained_output):
    from conftest import tiny_unet

    output_dir, _ = trained_output
    pipeline = tiny_pipeline()
    pipeline.unet = tiny_unet(sdxl_style=True)  # same module names in places, other shapes
    pipeline.text_encoder = None
    with pytest.raises(ValueError, match="does not fit"):
        load_sara_weights(pipeline, str(output_dir))
    assert "default" not in (getattr(pipeline.unet, "peft_config", None) or {})
    assert not any(p.requires_grad is False and "sara_" in n for n, p in pipeline.unet.named_parameters())


def component_state(pipeline) -> dict:
    """What a refused load must leave as it was: each component's outputs, state-dict keys, module objects, flags."""
    from conftest import unet_inputs

    tokens = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        outputs = {
            "unet": pipeline.unet(**unet_inputs(pipeline.unet)).sample,
            "text_encoder": pipeline.text_encoder(tokens).last_hidden_state,
        }
    state = {}
    for name in ("unet", "text_encoder"):
        component = getattr(pipeline, name)
        state[name] = {
            "keys": list(component.state_dict()),
            "modules": [(module_name, id(module)) for module_name, module in component.named_modules()],
            "requires_grad": [(id(param), param.requires_grad) for param in component.parameters()],
            "adapters": list(getattr(component, "peft_config", None) or []),
            "active": [list(m.active_adapters) for m in component.modules() if isinstance(m, SaRALayer)],
            "has_peft_config": "peft_config" in vars(component),
            "loaded_flag": vars(component).get("_hf_peft_config_loaded"),
        }
    return outputs, state


def damage_text_encoder(output_dir, folder, damage: str):
    """A copy of a training output whose unet/ adapter is good and whose text_encoder/ adapter is not."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(output_dir, folder)
    weights_file = folder / "text_encoder" / "adapter_model.safetensors"
    if damage == "truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:200])
        return
    saved = load_file(weights_file)
    last = sorted({key.rsplit(".", 1)[0] for key in saved})[-1]  # a late layer: earlier ones fit
    if damage == "wrong-shape":
        saved[f"{last}.sara_values"] = saved[f"{last}.sara_values"][:-1]
    elif damage == "positions-do-not-fit":
        saved[f"{last}.sara_mask"] = saved[f"{last}.sara_mask"][:-4]
    elif damage == "layer-missing":  # only found while injecting, after the UNet's adapter is in
        del saved[f"{last}.sara_values"], saved[f"{last}.sara_mask"], saved[f"{last}.sara_shape"]
    save_file(saved, weights_file)


@pytest.mark.parametrize("damage", ["truncated", "wrong-shape", "positions-do-not-fit", "layer-missing"])
def test_a_refused_load_leaves_every_component_as_it_was_and_a_retry_works(trained_output, tmp_path, damage):
    output_dir, _ = trained_output
    damage_text_encoder(output_dir, tmp_path / "damaged", damage)
    pipeline = tiny_pipeline()
    outputs, state = component_state(pipeline)
    with pytest.raises(ValueError, match="text_encoder|encoder.layers"):
        load_sara_weights(pipeline, str(tmp_path / "damaged"))
    after_outputs, after_state = component_state(pipeline)
    assert after_state == state
    for name, output in outputs.items():
        assert torch.equal(after_outputs[name], output), name
    assert not any(isinstance(m, SaRALayer) for m in pipeline.unet.modules())
    assert load_sara_weights(pipeline, str(output_dir)) == ["unet", "text_encoder"]  # the retry, repaired


def test_a_refused_load_keeps_the_component_s_other_adapters(trained_output, tmp_path):
    output_dir, _ = trained_output
    damage_text_encoder(output_dir, tmp_path / "damaged", "layer-missing")
    pipeline = tiny_pipeline()
    load_sara_weights(pipeline, str(output_dir / "unet"), adapter_name="style")
    load_sara_weights(pipeline, str(output_dir / "unet"), adapter_name="subject")
    pipeline.unet.set_adapter("subject")
    outputs, state = component_state(pipeline)
    with pytest.raises(ValueError, match="no saved update"):
        load_sara_weights(pipeline, str(tmp_path / "damaged"), adapter_name="other")
    after_outputs, after_state = component_state(pipeline)
    assert after_state == state and state["unet"]["adapters"] == ["style", "subject"]
    assert state["unet"]["active"][0] == ["subject"]
    for name, output in outputs.items():
        assert torch.equal(after_outputs[name], output), name
    assert all("other" not in layer.sara_values for layer in pipeline.unet.modules() if isinstance(layer, SaRALayer))


def test_a_folder_without_its_weights_file_says_so(trained_output, tmp_path):
    output_dir, _ = trained_output
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "adapter_config.json").write_bytes((output_dir / "unet" / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match=r"unet.*has adapter_config.json but no adapter_model.safetensors"):
        load_sara_weights(tiny_pipeline(), str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("peft_type", 5, "peft_type=5.*expected a PEFT method name such as 'SARA'"),
        ("peft_type", "NOPE", "peft_type='NOPE'.*expected a PEFT method name such as 'SARA'"),
        ("lambda_rank", "x", "lambda_rank must be a number >= 0.*got 'x'"),
        ("lambda_rank", [1], r"lambda_rank must be a number >= 0.*got \[1\]"),
    ],
)
def test_a_config_field_of_the_wrong_kind_gets_one_clear_error(trained_output, tmp_path, field, value, message):
    import json
    import shutil

    output_dir, _ = trained_output
    shutil.copytree(output_dir / "unet", tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "unet" / "adapter_config.json").write_text(json.dumps(config))
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match=message):
        load_sara_weights(pipeline, str(tmp_path))
    assert not any(isinstance(m, SaRALayer) for m in pipeline.unet.modules())


def test_an_output_folder_mixing_two_saves_is_refused(tmp_path):
    import shutil

    from peft_sara.script_utils.models import add_sara_adapter
    from peft_sara.script_utils.output import save_adapters

    trained = tiny_pipeline()
    for component in (trained.unet, trained.text_encoder):
        add_sara_adapter(component, SaRAConfig(threshold=0.02, init_weights=False), "component")
    components = {"unet": trained.unet, "text_encoder": trained.text_encoder}
    save_adapters(str(tmp_path / "first"), components)
    save_adapters(str(tmp_path / "second"), components)
    shutil.copytree(tmp_path / "first", tmp_path / "mixed")  # as if a save had been killed after replacing unet/
    shutil.rmtree(tmp_path / "mixed" / "unet")
    shutil.copytree(tmp_path / "second" / "unet", tmp_path / "mixed" / "unet")
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match="not one whole save \\(its components come from different saves\\)"):
        load_sara_weights(pipeline, str(tmp_path / "mixed"))
    shutil.rmtree(tmp_path / "first" / "text_encoder")  # killed after removing the old text_encoder/
    with pytest.raises(ValueError, match="not one whole save \\(text_encoder missing\\)"):
        load_sara_weights(pipeline, str(tmp_path / "first"))
    assert not any(isinstance(module, SaRALayer) for module in pipeline.unet.modules())
    assert load_sara_weights(pipeline, str(tmp_path / "first"), components=["unet"]) == ["unet"]
    assert load_sara_weights(tiny_pipeline(), str(tmp_path / "second")) == ["unet", "text_encoder"]


def pivotal_output(folder, keys=("clip_l",), hidden=(32,), seed=0):
    """A pivotal-tuning output as the scripts save it: a UNet adapter and two new tokens' embeddings."""
    from peft_sara.script_utils.output import save_adapters

    trained = tiny_pipeline()
    trained.unet.add_adapter(SaRAConfig(threshold=0.02, init_weights=False))
    generator = torch.Generator().manual_seed(seed)
    embeddings = {key: torch.randn(2, size, generator=generator) for key, size in zip(keys, hidden)}
    save_adapters(str(folder), {"unet": trained.unet}, token_embeddings=embeddings, tokens=["<s0>", "<s1>"])
    return embeddings


def test_loads_the_new_tokens_of_pivotal_tuning_and_they_change_the_images(tmp_path, monkeypatch):
    embeddings = pivotal_output(tmp_path / "sks-dog")
    assert (tmp_path / "sks-dog" / "sks-dog_emb.safetensors").is_file()
    pipeline = tiny_pipeline()
    assert load_sara_weights(pipeline, str(tmp_path / "sks-dog")) == ["unet"]
    ids = pipeline.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight[ids], embeddings["clip_l"])
    without_tokens = tiny_pipeline()
    assert load_sara_weights(without_tokens, str(tmp_path / "sks-dog"), components=["unet"]) == ["unet"]
    assert "<s0>" not in without_tokens.tokenizer.get_vocab(), "the tokens go with the text encoders"
    prompt = "a photo of <s0><s1>"
    assert not np.array_equal(generate(pipeline, prompt), generate(without_tokens, prompt))
    fake_hub_repo(monkeypatch, tmp_path / "hub", "someone/sks-dog", tmp_path / "sks-dog")
    from_hub = tiny_pipeline()
    load_sara_weights(from_hub, "someone/sks-dog")
    np.testing.assert_array_equal(generate(from_hub, prompt), generate(pipeline, prompt))


def sdxl_like_pipeline():
    """What load_sara_weights reads of an SDXL pipeline: a UNet, two tokenizers and text encoders (other widths)."""
    import copy
    from types import SimpleNamespace

    from test_pivotal import second_text_encoder

    base = tiny_pipeline()
    return SimpleNamespace(
        unet=base.unet,
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        tokenizer_2=copy.deepcopy(base.tokenizer),
        text_encoder_2=second_text_encoder(),
    )


def test_sdxl_tokens_go_to_both_tokenizers_and_text_encoders(tmp_path):
    embeddings = pivotal_output(tmp_path / "out", keys=("clip_l", "clip_g"), hidden=(32, 48))
    pipeline = sdxl_like_pipeline()
    load_sara_weights(pipeline, str(tmp_path / "out"))
    for key, tokenizer, text_encoder in (
        ("clip_l", pipeline.tokenizer, pipeline.text_encoder),
        ("clip_g", pipeline.tokenizer_2, pipeline.text_encoder_2),
    ):
        ids = tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
        assert torch.equal(text_encoder.get_input_embeddings().weight[ids], embeddings[key])
    with pytest.raises(ValueError, match="no clip_g embeddings for the pipeline's text_encoder_2"):
        pivotal_output(tmp_path / "sd", keys=("clip_l",))
        load_sara_weights(sdxl_like_pipeline(), str(tmp_path / "sd"))
    with pytest.raises(ValueError, match="clip_g embeddings for a second CLIP encoder the pipeline lacks"):
        load_sara_weights(tiny_pipeline(), str(tmp_path / "out"))


def token_state(pipeline) -> dict:
    embedding = pipeline.text_encoder.get_input_embeddings()
    return {
        "vocab": pipeline.tokenizer.get_vocab(),
        "length": len(pipeline.tokenizer),
        "ids": pipeline.tokenizer("a photo of <s0><s1>").input_ids,
        "weight": embedding.weight.detach().clone(),
        "rows": (embedding.num_embeddings, pipeline.text_encoder.config.vocab_size),
    }


@pytest.mark.parametrize("damage", ["truncated", "wrong-width", "tokens-present", "late-failure"])
def test_a_refused_token_load_leaves_the_pipeline_as_it_was(tmp_path, monkeypatch, damage):
    import peft_sara.loading

    if damage == "late-failure":  # SDXL's second text encoder fails after the adapters and the first one's tokens
        pivotal_output(tmp_path / "out", keys=("clip_l", "clip_g"), hidden=(32, 48))
        pipeline = sdxl_like_pipeline()
    else:
        pivotal_output(tmp_path / "out", hidden=(16,) if damage == "wrong-width" else (32,))  # 16: another base's
        pipeline = tiny_pipeline()
    emb_file = tmp_path / "out" / "out_emb.safetensors"
    message = {"truncated": "Could not read the token embeddings", "wrong-width": "hidden size 32 need embeddings"}
    if damage == "truncated":
        emb_file.write_bytes(emb_file.read_bytes()[:100])
    elif damage == "tokens-present":
        pipeline.tokenizer.add_tokens(["<s1>"])
        message["tokens-present"] = r"has the tokens \['<s1>'\] already"
    else:
        calls = []

        def fail_the_second_time(*args):
            calls.append(args)
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return peft_sara.tokens.add_new_tokens(*args)

        monkeypatch.setattr(peft_sara.loading, "add_new_tokens", fail_the_second_time)
        message["late-failure"] = "out of memory"
    outputs, state = component_state(pipeline)
    tokens = token_state(pipeline)
    with pytest.raises((ValueError, RuntimeError), match=message[damage]):
        load_sara_weights(pipeline, str(tmp_path / "out"))
    after_outputs, after_state = component_state(pipeline)
    assert after_state == state and all(torch.equal(after_outputs[k], outputs[k]) for k in outputs)
    after_tokens = token_state(pipeline)
    assert torch.equal(after_tokens.pop("weight"), tokens.pop("weight")) and after_tokens == tokens


def test_token_embeddings_of_another_save_or_missing_are_refused(tmp_path):
    pivotal_output(tmp_path / "out", seed=0)
    pivotal_output(tmp_path / "other", seed=1)
    (tmp_path / "other" / "other_emb.safetensors").replace(tmp_path / "out" / "out_emb.safetensors")
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match="out_emb.safetensors and the adapters .* are not one whole save"):
        load_sara_weights(pipeline, str(tmp_path / "out"))
    (tmp_path / "out" / "out_emb.safetensors").unlink()
    with pytest.raises(ValueError, match="saved with the token embeddings out_emb.safetensors, which is missing"):
        load_sara_weights(pipeline, str(tmp_path / "out"))
    assert not any(isinstance(module, SaRALayer) for module in pipeline.unet.modules())
    assert "<s0>" not in pipeline.tokenizer.get_vocab()


def _saved_lora(folder) -> str:
    """A diffusers LoRA file for the tiny UNet, attention and resnet convolutions included."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = tiny_pipeline().unet
    torch.manual_seed(5)
    config = LoraConfig(r=4, target_modules=["to_q", "to_v", "conv1", "conv2"], init_lora_weights=False)
    unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return str(folder)


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-sara", "sara-then-lora"])
def test_sara_and_a_lora_stack_in_a_pipeline(trained_output, tmp_path, lora_first):
    """Both adapters active compute what both fused compute, whichever was loaded first."""
    output_dir, _ = trained_output
    lora = _saved_lora(tmp_path / "lora")
    pipeline = tiny_pipeline()
    base_images = generate(pipeline)
    loads = [
        lambda: pipeline.load_lora_weights(lora, adapter_name="lora"),
        lambda: load_sara_weights(pipeline, str(output_dir), adapter_name="sara"),
    ]
    for load in loads if lora_first else loads[::-1]:
        load()
    pipeline.set_adapters(["lora", "sara"])
    stacked = generate(pipeline)
    pipeline.set_adapters(["lora"])
    lora_only = generate(pipeline)
    pipeline.set_adapters(["sara"])
    sara_only = generate(pipeline)
    pipeline.set_adapters(["lora", "sara"])
    pipeline.fuse_lora(adapter_names=["lora", "sara"])
    pipeline.set_adapters(["lora", "sara"])
    np.testing.assert_allclose(stacked, generate(pipeline), atol=2e-5)
    assert np.abs(stacked - lora_only).max() > 1e-3 and np.abs(stacked - sara_only).max() > 1e-3
    pipeline.unfuse_lora()
    pipeline.disable_lora()
    np.testing.assert_allclose(generate(pipeline), base_images, atol=2e-5)


def test_a_flux_output_s_clip_tokens_go_to_clip_and_none_to_t5(tmp_path):
    """Flux's text_encoder_2 is T5, which takes no new tokens: clip_l goes to CLIP, and clip_g rows are refused."""
    from peft_sara.script_utils.output import save_adapters

    trained = tiny_flux_pipeline()
    trained.transformer.add_adapter(SaRAConfig(threshold=0.02, init_weights=False))
    rows = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}
    for keys, folder in ((["clip_l"], "flux"), (["clip_l", "clip_g"], "sdxl-tokens")):
        embeddings = {key: rows[key] for key in keys}
        save_adapters(str(tmp_path / folder), {"transformer": trained.transformer}, token_embeddings=embeddings,
                      tokens=["<s0>", "<s1>"])  # fmt: skip
    pipeline = tiny_flux_pipeline()
    assert load_sara_weights(pipeline, str(tmp_path / "flux")) == ["transformer"]
    ids = pipeline.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight[ids], rows["clip_l"])
    assert "<s0>" not in pipeline.tokenizer_2.get_vocab()
    with pytest.raises(ValueError, match="clip_g embeddings for a second CLIP encoder the pipeline lacks"):
        load_sara_weights(tiny_flux_pipeline(), str(tmp_path / "sdxl-tokens"))


def test_t5_rows_go_to_flux_s_t5_and_are_refused_by_a_pipeline_without_t5(tmp_path):
    """--enable_t5_ti outputs hold `t5` rows: they go to the T5 encoder (Flux's text_encoder_2) with its tokenizer;
    a pipeline without T5 refuses them before anything changes."""
    from peft_sara.script_utils.output import save_adapters

    trained = tiny_flux_pipeline()
    trained.transformer.add_adapter(SaRAConfig(threshold=0.02, init_weights=False))
    rows = {"clip_l": torch.randn(2, 32), "t5": torch.randn(2, 32)}
    save_adapters(str(tmp_path / "flux-t5"), {"transformer": trained.transformer}, token_embeddings=rows,
                  tokens=["<s0>", "<s1>"])  # fmt: skip
    pipeline = tiny_flux_pipeline()
    assert load_sara_weights(pipeline, str(tmp_path / "flux-t5")) == ["transformer"]
    for tokenizer, encoder, key in ((pipeline.tokenizer, pipeline.text_encoder, "clip_l"),
                                    (pipeline.tokenizer_2, pipeline.text_encoder_2, "t5")):  # fmt: skip
        weight = encoder.get_input_embeddings().weight
        assert torch.equal(weight[tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])], rows[key].to(weight.dtype))

    pivotal_output(tmp_path / "sd-t5", keys=("clip_l", "t5"), hidden=(32, 16))
    sd = tiny_pipeline()
    with pytest.raises(ValueError, match="t5 embeddings for a T5 encoder the pipeline lacks"):
        load_sara_weights(sd, str(tmp_path / "sd-t5"))
    assert "<s0>" not in sd.tokenizer.get_vocab() and not getattr(sd.unet, "peft_config", None)
