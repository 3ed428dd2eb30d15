"""Images for σ-VAE training: a folder tree or a JSONL of paths, random-resized crops to the model size.

Bad input policy, deliberately: a malformed JSONL line stops the run at listing time (naming file and
line), because it means the list itself is wrong; an image that fails to decode at training time is
logged (path and reason) and replaced by the next one, because one corrupt file among millions of web
images should not kill a multi-day run. If no image at all decodes, that is an error.
"""

import json
import logging
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from latentlm_mcore.data.images import center_crop

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(source: str) -> list[str]:
    """Paths of the images under a folder (recursively, sorted) or listed in a JSONL file.

    JSONL lines are `{"image": path}` (the segment form of the raw document schema) or a bare JSON string;
    relative paths are relative to the JSONL file's folder.
    """
    if os.path.isdir(source):
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source, followlinks=True)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(source) and source.endswith(".jsonl"):
        paths, base = [], os.path.dirname(os.path.abspath(source))
        with open(source) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    path = item if isinstance(item, str) else item["image"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{source}:{lineno}: expected {{\"image\": path}} or a JSON string, "
                                     f"got {line.strip()[:80]!r} ({type(e).__name__})") from e
                paths.append(path if os.path.isabs(path) else os.path.join(base, path))
    else:
        raise FileNotFoundError(f"image source {source!r} is neither a folder nor a .jsonl file")
    if not paths:
        raise ValueError(f"no images found in {source!r} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def random_resized_crop(img: Image.Image, size: int, min_scale: float, generator=None) -> Image.Image:
    """A crop covering a random fraction [min_scale, 1] of the area, aspect ratio in [3/4, 4/3]
    (log-uniform), resized to size x size. Falls back to the largest centred square."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (min_scale + (1 - min_scale) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1))
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return center_crop(img, size)


class ImageDataset(Dataset):
    """Items are image tensors [3, size, size] in [-1, 1]: random-resized crops when `train`, else centre
    crops. Unreadable images are logged once and replaced by the next readable one (see module doc)."""

    def __init__(self, paths: list[str], image_size: int, train: bool, min_scale: float = 0.5):
        self.paths, self.image_size, self.train, self.min_scale = paths, image_size, train, min_scale
        self.bad: set[int] = set()

    def __len__(self):
        return len(self.paths)

    def load(self, index: int) -> tuple[int, Image.Image]:
        """The image at `index`, or the next readable one; returns (index actually used, image)."""
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            if i in self.bad:
                continue
            try:
                with Image.open(self.paths[i]) as img:
                    return i, img.convert("RGB")
            except Exception as e:  # PIL raises many types for corrupt files
                self.bad.add(i)
                log.warning("skipping unreadable image %s: %s: %s", self.paths[i], type(e).__name__, e)
        raise RuntimeError(f"none of the {len(self.paths)} images could be read (first: {self.paths[0]})")

    def crop(self, index: int, generator=None) -> torch.Tensor:
        _, img = self.load(index)
        if self.train:
            img = random_resized_crop(img, self.image_size, self.min_scale, generator)
        else:
            img = center_crop(img, self.image_size)
        return to_tensor(img)

    def __getitem__(self, index):
        return self.crop(index)


class InfiniteDistributedSampler(Sampler):
    """Endless indices for one rank: a fresh seeded permutation per epoch, rank r takes every
    world_size-th entry. Works for datasets smaller than a global batch, and `start` skips the samples
    a resumed run has already consumed so the data order continues where it stopped."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0):
        self.size, self.rank, self.world_size, self.seed, self.start = size, rank, world_size, seed, start

    def __iter__(self):
        # Rank r takes global stream positions r, r + W, r + 2W, ...; the stream is the concatenation of
        # per-epoch permutations, so the k-th sample of a rank is fully determined by (seed, k).
        k, epoch, order = self.start, -1, None
        while True:
            e, position = divmod(k * self.world_size + self.rank, self.size)
            if e != epoch:
                epoch = e
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield int(order[position])
            k += 1
