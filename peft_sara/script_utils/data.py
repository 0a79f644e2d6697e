"""Training data: image folders checked once, the image transform, tokenization, the data loader, cached latents."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .cli import UserInputError, get_logger

logger = get_logger(__name__)


def open_image_problem(path: Path) -> str | None:
    """Why an image file cannot be trained on, or None. It is decoded whole: a truncated file passes `verify()` and
    fails only when its pixels are read; a decompression bomb would otherwise stop the run with a raw error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"too large to decode safely ({error})"
    return None


def readable_images(folder: Path) -> tuple[list[Path], list[str]]:
    """The images of a folder that decode, sorted, and the names of the files that do not (hidden files ignored)."""
    images, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if open_image_problem(path):
            skipped.append(path.name)
        else:
            images.append(path)
    return images, skipped


def list_images(folder: str, flag: str) -> list[Path]:
    """The readable images of a folder, sorted; unreadable files are skipped with a warning while others remain."""
    path = Path(folder)
    if not path.is_dir():
        raise UserInputError(f"{flag} {folder}: no such folder.")
    images, skipped = readable_images(path)
    if skipped:
        logger.warning("Skipping %d file(s) in %s that are not readable images: %s", len(skipped), folder, skipped[:5])
    if not images:
        raise UserInputError(f"{flag} {folder} has no readable image (found {len(skipped)} other file(s)).")
    return images


class ImageTransform:
    """Resize the short side to `resolution`, crop a square (centre or random), optionally flip; to [-1, 1] CHW."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool, interpolation: str = "bilinear") -> None:
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.resample = Image.Resampling[interpolation.upper()]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.with_coordinates(image)[0]

    def with_coordinates(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The transformed image, the original (height, width) and the crop's top-left (y, x) in the image as it is
        returned (a flipped crop's x counted from the flipped side): SDXL's size and crop conditioning."""
        image = ImageOps.exif_transpose(image).convert("RGB")
        original_size = (image.height, image.width)
        scale = self.resolution / min(image.size)
        width, height = (
            max(self.resolution, round(image.width * scale)),
            max(self.resolution, round(image.height * scale)),
        )
        image = image.resize((width, height), self.resample)
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = random.randint(0, width - self.resolution), random.randint(0, height - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and random.random() < 0.5:
            image = ImageOps.mirror(image)
            left = width - left - self.resolution  # the same pixels as flipping first and cropping there
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original_size, (top, left)


def data_generator(seed: int | None) -> torch.Generator:
    """The data loader's own generator. Without one, starting an epoch draws from the global RNG, so a run resumed
    mid-epoch (which starts its epoch after restoring the RNG) would see other noise than the uninterrupted run."""
    return torch.Generator().manual_seed(seed if seed is not None else torch.initial_seed())


def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids[0]


def make_dataloader(
    dataset, batch_size: int, collate_fn: Callable, num_workers: int, seed: int | None
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=data_generator(seed),
    )


class CachedLatents(torch.utils.data.Dataset):
    """A dataset whose image tensors are replaced by the VAE's latent distribution (mean and std, stacked on a new
    first axis), computed once: `--cache_latents`. Training samples the latents from it at every step."""

    def __init__(self, dataset, vae, image_keys: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> None:
        self.examples = []
        with torch.no_grad():
            for index in range(len(dataset)):
                example = dict(dataset[index])
                for key in image_keys:
                    if key in example:
                        pixels = example[key].unsqueeze(0).to(device, dtype)
                        distribution = vae.encode(pixels).latent_dist
                        example[key] = torch.stack([distribution.mean[0], distribution.std[0]]).float().cpu()
                self.examples.append(example)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]


def sample_cached_latents(cached: torch.Tensor) -> torch.Tensor:
    """Latents drawn from a batch of `CachedLatents` distributions ([batch, 2, C, h, w])."""
    mean, std = cached[:, 0], cached[:, 1]
    return mean + std * torch.randn_like(mean)
