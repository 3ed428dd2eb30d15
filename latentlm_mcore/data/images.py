"""The one centre-crop of the project: what σ-VAE evaluation (vae/data.py) and offline encoding
(data/prep/preprocess.py) both see, so the σ-VAE is trained and used on the same pixels."""
from __future__ import annotations

from PIL import Image


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The largest centred square (offsets rounded down: an odd margin leaves its extra pixel on the
    right / bottom), resized to size x size with bicubic filtering in one resampling step."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + s, top + s))
