import json
import logging

import pytest
import torch
from PIL import Image

from latentlm_mcore.vae.data import ImageDataset, InfiniteDistributedSampler, list_images, random_resized_crop


def _write_images(folder, names, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (i * 40, 100, 200)).save(folder / name)


def test_list_images_from_folder_tree_and_jsonl(tmp_path):
    _write_images(tmp_path / "a", ["1.png", "2.jpg"])
    _write_images(tmp_path / "a" / "deeper", ["3.PNG"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert [p.split("/a/")[1] for p in list_images(str(tmp_path / "a"))] == ["1.png", "2.jpg", "deeper/3.PNG"]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"image": "a/1.png"}) + "\n\n" + json.dumps(str(tmp_path / "a/2.jpg")) + "\n")
    assert list_images(str(jsonl)) == [str(tmp_path / "a/1.png"), str(tmp_path / "a/2.jpg")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"image": "x.png"}) + "\n" + json.dumps({"text": "no image"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list_images(str(jsonl))
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(str(tmp_path / "missing_dir"))


def test_unreadable_image_is_logged_and_skipped(tmp_path, caplog):
    _write_images(tmp_path, ["good.png"])
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    paths = [str(tmp_path / "broken.png"), str(tmp_path / "good.png")]
    dataset = ImageDataset(paths, image_size=16, train=True)
    with caplog.at_level(logging.WARNING):
        item = dataset[0]
    assert item.shape == (3, 16, 16) and -1 <= item.min() and item.max() <= 1
    assert "broken.png" in caplog.text
    all_bad = ImageDataset([str(tmp_path / "broken.png")], image_size=16, train=False)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        all_bad[0]


def test_random_resized_crop_is_seeded_and_sized():
    img = Image.new("RGB", (97, 61))
    img.putdata([(x % 256, y % 256, (x * y) % 256) for y in range(61) for x in range(97)])
    a = random_resized_crop(img, 24, 0.2, torch.Generator().manual_seed(1))
    b = random_resized_crop(img, 24, 0.2, torch.Generator().manual_seed(1))
    c = random_resized_crop(img, 24, 0.2, torch.Generator().manual_seed(2))
    assert a.size == (24, 24) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_splits_ranks_and_resumes_where_it_stopped():
    size = 5  # smaller than a global batch, not divisible by the world size
    ranks = [_take(iter(InfiniteDistributedSampler(size, r, 2, seed=3)), 10) for r in range(2)]
    # 2 ranks x 10 draws = the first four epochs: every index exactly four times, no rank overlap per epoch.
    assert sorted(ranks[0] + ranks[1]) == sorted(list(range(size)) * 4)
    full = _take(iter(InfiniteDistributedSampler(size, 1, 2, seed=3)), 12)
    resumed = _take(iter(InfiniteDistributedSampler(size, 1, 2, seed=3, start=7)), 5)
    assert resumed == full[7:12]


@pytest.mark.parametrize("size", [(41, 27), (27, 40), (33, 33), (64, 17)])
def test_training_and_offline_encoding_see_the_same_pixels(tmp_path, size):
    """The σ-VAE's evaluation crop and the preprocessor's (what the LM's latents are encoded from) agree
    pixel for pixel, odd margins included; a crop offset by one pixel would not."""
    import numpy as np

    from latentlm_mcore.data.prep.preprocess import load_image

    rng = np.random.default_rng(sum(size))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    trained = ImageDataset([str(tmp_path / "noise.png")], image_size=16, train=False)[0]
    encoded = torch.from_numpy(load_image("noise.png", str(tmp_path), 16, 10 ** 8))
    assert trained.shape == encoded.shape == (3, 16, 16)
    assert torch.equal(trained, encoded)
    shifted = Image.open(tmp_path / "noise.png").convert("RGB")
    w, h = shifted.size
    s = min(w, h)
    left, top = (w - s + 1) // 2, (h - s + 1) // 2  # the other rounding of an odd margin
    if (w - s) % 2 or (h - s) % 2:
        other = shifted.resize((16, 16), Image.BICUBIC, box=(left, top, left + s, top + s))
        other = torch.from_numpy(np.asarray(other, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        assert not torch.equal(other, encoded)
