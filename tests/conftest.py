"""Tiny models built from configs, so that every test runs offline in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import peft_sara  # noqa: E402, F401  (registers SaRA)

torch.set_num_threads(min(2, torch.get_num_threads()))


class MLPConv(nn.Module):
    """A small model with every supported layer kind and an unsupported one (the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin0 = nn.Linear(8 * 4 * 4, 32)
        self.lin1 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv(x)).flatten(1)
        return self.lin1(torch.relu(self.lin0(hidden)))


@pytest.fixture
def mlp() -> MLPConv:
    torch.manual_seed(0)
    return MLPConv()


@pytest.fixture
def mlp_input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 3, 4, 4)


def round_layers_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every Linear/Conv2d weight and bias to what `dtype` holds, keeping their dtype: such a model computes what
    it computes with those layers stored in `dtype` (diffusers' layerwise casting)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for tensor in (module.weight, module.bias):
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype).to(tensor.dtype)


def tiny_unet(sdxl_style: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = {}
    if sdxl_style:  # SDXL: linear projections, added text/time conditioning, several transformer layers per block
        extra = {
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "transformer_layers_per_block": (1, 2),
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")
        if not sdxl_style
        else ("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if not sdxl_style else ("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        layers_per_block=1,
        norm_num_groups=8,
        **extra,
    )


def unet_inputs(unet, batch: int = 2, seed: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500][:batch] + [1] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=generator),
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        }
    return inputs


@pytest.fixture
def unet():
    return tiny_unet()


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    )


def tiny_clip_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=94,
        eos_token_id=95,
        pad_token_id=95,
    )
    return CLIPTextModel(config)


def tiny_pipeline():
    """A complete, tiny StableDiffusionPipeline (tokenizer, CLIP text encoder, VAE, UNet, scheduler)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab = {token: index for index, token in enumerate([chr(c) for c in range(33, 127)])}
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    vae = tiny_vae()
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_clip_text_model(),
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def fake_hub_repo(monkeypatch, cache_dir, repo_id: str, folder) -> None:
    """Lay `folder` out as a cached Hub model repo and point huggingface_hub at that cache, offline.

    This runs the real repo-id code paths (hf_hub_download resolving from the cache) without any network access.
    """
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def plain_sharding_run(tmp_path_factory):
    """tests/helpers/fsdp2_train.py's run in this process, not sharded: what the engines' two-process runs of the same
    model, steps and batches are compared with. At one thread, as each of those processes runs (two_process_env), so
    that the kernels sum alike. Returns its output folder and report."""
    from helpers.fsdp2_train import train

    folder = tmp_path_factory.mktemp("plain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = train(str(folder), sharded=False)
    finally:
        torch.set_num_threads(threads)
    return folder, report


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved by diffusers: what --pretrained_model_name_or_path loads."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline().save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline():
    """A complete, tiny StableDiffusionXLPipeline: two CLIP text encoders (the second wider, as OpenCLIP bigG is than
    CLIP L, and with a projection, whose pooled output the UNet takes), a `text_time` UNet attending to both encoders'
    hidden states side by side, VAE and scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    base = tiny_pipeline()
    torch.manual_seed(0)
    config_2 = base.text_encoder.config.to_dict() | {"hidden_size": 48, "intermediate_size": 96}
    text_encoder_2 = CLIPTextModelWithProjection(type(base.text_encoder.config)(**config_2))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=80,  # both encoders' hidden sizes (32 + 48)
        attention_head_dim=4,
        layers_per_block=1,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (projection_dim) + six time ids
        transformer_layers_per_block=(1, 2),
    )
    scheduler = EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A tiny SDXL pipeline saved by diffusers: what --pretrained_model_name_or_path loads."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


def tiny_t5_tokenizer():
    """A T5 tokenizer over printable ASCII characters, built offline from a Unigram vocabulary (pad, eos, unk first,
    as T5's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(code), -3.0) for code in range(33, 127)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )


def tiny_pooling_clip_tokenizer():
    """A character-level CLIP tokenizer with word-final pieces, for pipelines that read CLIP's pooled output (Flux,
    SD3), taken at the first end-of-text token: the SD pipelines' tokenizer has no word-final pieces, so every word's
    end would be unknown, i.e. end-of-text, and the pooled output would see the first word only."""
    from transformers import CLIPTokenizer

    characters = [chr(code) for code in range(33, 127)]
    vocab = {token: index for index, token in enumerate([*characters, "<|startoftext|>", "<|endoftext|>"])}
    vocab.update({f"{character}</w>": len(vocab) + index for index, character in enumerate(characters)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5(vocab_size: int, width: int):
    """A tiny T5 encoder in eval mode, as from_pretrained returns it (T5's dropout is on in training mode)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=8, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_vae(**overrides):
    """The tiny pipelines' 4-channel VAE (downsampling by 2); Flux's and SD3's without quant convs, with their shift
    and scaling factors in `overrides`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    return AutoencoderKL(**config, **overrides)


def flow_matching_vae(shift_factor: float, scaling_factor: float):
    """The VAE of the tiny Flux and SD3 pipelines: no quant convs, as theirs."""
    return tiny_vae(
        shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False
    )


def tiny_sd3_pipeline():
    """A complete, tiny StableDiffusion3Pipeline: two CLIP encoders with projections (pooled side by side: 64 wide),
    T5 as wide as their hidden states side by side, a VAE with SD3's shift and scaling factors, a two-layer
    transformer and the flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    config = tiny_clip_text_model().config
    torch.manual_seed(0)
    clip_l, clip_g = CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config)
    tokenizer, t5_tokenizer = tiny_pooling_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width: both CLIP encoders' hidden states side by side
        caption_projection_dim=16,
        pooled_projection_dim=64,  # both CLIP encoders' projections side by side
        out_channels=4,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=flow_matching_vae(0.0609, 1.5305),
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(len(t5_tokenizer), 64),
        tokenizer_3=t5_tokenizer,
    )


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_dir(tmp_path_factory):
    """A tiny SD3 pipeline saved by diffusers: what --pretrained_model_name_or_path loads."""
    folder = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def tiny_flux_pipeline(guidance_embeds: bool = True):
    """A complete, tiny FluxPipeline: CLIP (pooled) and T5 text encoders, a VAE with Flux's shift and scaling
    factors, one double-stream and one single-stream block (guidance-distilled as Flux.1 [dev] unless
    `guidance_embeds=False`, as [schnell]), and the flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    base = tiny_pipeline()
    tokenizer, tokenizer_2 = tiny_pooling_clip_tokenizer(), tiny_t5_tokenizer()
    t5 = tiny_t5(len(tokenizer_2), 32)
    vae = flow_matching_vae(0.1159, 0.3611)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's hidden size
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory):
    """A tiny Flux pipeline saved by diffusers: what --pretrained_model_name_or_path loads."""
    folder = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_pipeline().save_pretrained(folder)
    return folder


def generate(pipeline, prompt: str = "a photo of a dog", **pipeline_arguments):
    """The pipeline's images for `prompt` as a numpy array: 2 steps at 32×32 px from seed 0, to compare loads."""
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        prompt, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np", **pipeline_arguments
    ).images


def load_pipeline(pipeline_class, folder):
    """A saved pipeline, loaded as a user loads it, without progress bars."""
    pipeline = pipeline_class.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class MeanVAE(torch.nn.Module):
    """A VAE whose latents are their distributions' means: a loss test then knows the latents it trains on."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.config, self.dtype = vae, vae.config, torch.float32

    def encode(self, images):
        distribution = self.vae.encode(images).latent_dist
        distribution.sample = lambda generator=None: distribution.mean
        return type("Output", (), {"latent_dist": distribution})()


def write_images(folder, count: int, seed: int, size: int = 40) -> None:
    """Small PNGs of coloured blocks, distinct per seed."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    for index in range(count):
        blocks = generator.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)
        image.save(folder / f"image-{index}.png")


def load_script(name: str):
    """Import scripts/<name>.py as a module, with accelerate's process-wide state reset for a new run."""
    import importlib.util

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> str:
    """A free local port for a multi-process run (the default 29500 collides between concurrent runs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch_two_cpu_processes(script: str, script_args: list[str]) -> list[str]:
    """`accelerate launch` of a script on 2 CPU processes (gloo DDP) on a free port: see SPEC §6 for why each flag.

    Run it with the environment from `two_process_env()`.
    """
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        free_port(),
        script,
        *script_args,
    ]


def two_process_env() -> dict[str, str]:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_root}
