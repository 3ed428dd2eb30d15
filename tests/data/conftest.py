"""Shared fixtures: real images, a tiny randomly initialised σ-VAE, raw JSONL, a preprocessed dataset."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial bakers near the old mill by the river").split()


@pytest.fixture(autouse=True)
def _private_tempdir(tmp_path, monkeypatch):
    """Streaming leaves file locks in tempfile.gettempdir(): keep them in this test's own folder."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """Real photos (scikit-learn's sample images) and digits, saved as JPEG and PNG files."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("images")
    names = []
    for i, img in enumerate(load_sample_images().images):
        Image.fromarray(img).save(root / f"photo{i}.jpg", quality=90)
        names.append(f"photo{i}.jpg")
        # A crop with another aspect ratio exercises resize + center crop.
        Image.fromarray(img[:200, 100:500]).save(root / f"crop{i}.png")
        names.append(f"crop{i}.png")
    os.makedirs(root / "digits")
    for i, d in enumerate(load_digits().images[:6]):
        arr = (d * (255 / 16)).astype(np.uint8)
        Image.fromarray(np.stack([arr] * 3, -1)).resize((48, 48)).save(root / "digits" / f"{i}.png")
        names.append(f"digits/{i}.png")
    return root, names


@pytest.fixture(scope="session")
def vae_checkpoint(tmp_path_factory):
    from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE, save_sigma_vae

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny_sigma_vae.pt"
    save_sigma_vae(path, SigmaVAE(SIGMA_VAE_PRESETS["tiny"]))
    return str(path)


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS, n_words))


def make_documents(rng, images, n_text, n_pair, n_interleaved, prefix=""):
    docs = []
    for i in range(n_text):
        docs.append({"id": f"{prefix}text-{i}", "source": "text",
                     "segments": [{"text": make_text(rng, int(rng.integers(5, 120)))}]})
    for i in range(n_pair):
        docs.append({"id": f"{prefix}pair-{i}", "source": "pair",
                     "segments": [{"text": make_text(rng, int(rng.integers(3, 12)))},
                                  {"image": str(rng.choice(images))}]})
    for i in range(n_interleaved):
        segs = []
        for _ in range(int(rng.integers(1, 4))):
            segs.append({"text": make_text(rng, int(rng.integers(3, 40)))})
            segs.append({"image": str(rng.choice(images))})
        segs.append({"text": make_text(rng, 5)})
        docs.append({"id": f"{prefix}interleaved-{i}", "source": "interleaved", "segments": segs})
    return docs


def write_jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


@pytest.fixture(scope="session")
def raw_documents(tmp_path_factory, image_root):
    root, names = image_root
    rng = np.random.default_rng(0)
    docs = make_documents(rng, names, n_text=40, n_pair=50, n_interleaved=30)
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    raw = tmp_path_factory.mktemp("raw")
    write_jsonl(raw / "a.jsonl", docs[:70])
    write_jsonl(raw / "b.jsonl", docs[70:])
    return raw, docs


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, raw_documents, image_root, vae_checkpoint):
    """raw_documents preprocessed with the real cl100k tokenizer in two parts, merged."""
    raw, _ = raw_documents
    out = tmp_path_factory.mktemp("dataset")
    for k in range(2):
        preprocess_part(PreprocessConfig(inputs=[str(raw / "*.jsonl")], output=str(out), image_root=str(image_root[0]),
                                         vae_checkpoint=vae_checkpoint, num_shards=2, shard_index=k,
                                         batch_images=16, shard_size_limit=1 << 15, progress=False))
    merge_parts(str(out), 2)
    return str(out)


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)
