"""The bundled demo corpus (latentlm_mcore/demo/corpus.py): real digits and stdlib prose, valid raw JSONL,
disjoint splits, captions that match the digits, deterministic bytes, and preprocessing that rejects nothing."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentlm_mcore.data import schema
from latentlm_mcore.demo.corpus import (DIGIT_WORDS, DemoCorpusConfig, build_demo_corpus, caption_label,
                                             digit_caption, docstring_paragraphs, is_prose)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    # through the command line, as the quickstart does
    subprocess.run([sys.executable, str(REPO / "data_prep" / "demo_corpus.py"), "--out", str(out)], check=True,
                   cwd=REPO, capture_output=True)
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_every_document_is_valid_raw_jsonl_of_its_source(corpus):
    summary = json.loads((corpus / "corpus.json").read_text())
    for split in ("train", "heldout"):
        for source in ("text", "pair", "interleaved"):
            lines = (corpus / split / f"{source}.jsonl").read_bytes().splitlines()
            assert len(lines) == summary["documents"][f"{split}/{source}"] > 0
            for line in lines:
                doc = schema.parse_raw_line(line)
                assert doc.source == source
                for path in doc.image_paths:
                    assert (corpus / "images" / path).is_file(), path


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_pairs_caption_the_digit_they_show(corpus):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    for doc in read_jsonl(corpus / "train" / "pair.jsonl")[:200]:
        text = next(s["text"] for s in doc["segments"] if "text" in s)
        image = next(s["image"] for s in doc["segments"] if "image" in s)
        index = int(Path(image).stem)
        assert text == digit_caption(labels[index])
        assert caption_label(text) == labels[index]
    orders = {tuple("text" if "text" in s else "image" for s in d["segments"])
              for d in read_jsonl(corpus / "train" / "pair.jsonl")}
    assert orders == {("text", "image"), ("image", "text")}  # text -> image and image -> text


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_images_are_upscaled_digits_with_ink_where_sklearn_has_it(corpus):
    from sklearn.datasets import load_digits

    digits = load_digits().images
    for index in (0, 7, 1234):
        img = Image.open(corpus / "images" / "digits" / f"{index:04d}.png")
        assert img.size == (32, 32) and img.mode == "RGB"
        ink = 255 - np.asarray(img.convert("L"), np.float64)
        small = ink.reshape(8, 4, 8, 4).mean(axis=(1, 3))  # back to 8x8
        assert np.corrcoef(small.ravel(), digits[index].ravel())[0, 1] > 0.9


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_splits_are_disjoint(corpus):
    def images(split):
        return {s["image"] for source in ("pair", "interleaved")
                for d in read_jsonl(corpus / split / f"{source}.jsonl") for s in d["segments"] if "image" in s}

    def modules(split):
        return {d["id"].rsplit("/", 1)[0] for d in read_jsonl(corpus / split / "text.jsonl")}

    assert images("train") and images("heldout") and not images("train") & images("heldout")
    assert modules("train") and modules("heldout") and not modules("train") & modules("heldout")
    listed = {split: {d["image"] for d in read_jsonl(corpus / "images" / f"{split}.jsonl")} for split in ("train", "heldout")}
    assert listed["train"] == images("train") and listed["heldout"] == images("heldout")


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_text_is_prose(corpus):
    docs = read_jsonl(corpus / "train" / "text.jsonl")
    text = "\n\n".join(d["segments"][0]["text"] for d in docs)
    assert len(text) > 300_000  # enough English for the LM loss to fall
    assert ">>>" not in text and "def " not in text
    words = text.split()
    assert sum(w.lower().strip(".,;:()") in {"the", "a", "of", "is", "to"} for w in words) > 0.1 * len(words)


def test_prose_filter():
    source = '''
def f():
    """Return the number of items in the container, counting nested ones once.

    >>> f([1, 2])
    2

    x = foo(bar) + baz[0] * 2 if qux else None, spam, eggs

    Short line.
    """
'''
    assert docstring_paragraphs(source) == ["Return the number of items in the container, counting nested ones once."]
    assert not is_prose("a lower-case start of a sentence that is long enough to count here.")


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_interleaved_documents_mix_digits_and_sentences(corpus):
    for doc in read_jsonl(corpus / "train" / "interleaved.jsonl")[:100]:
        kinds = ["text" if "text" in s else "image" for s in doc["segments"]]
        assert kinds.count("image") >= 2 and kinds[0] == "text"
        assert all(not (a == b == "text") for a, b in zip(kinds, kinds[1:]))  # adjacent texts are merged
        captions = [caption_label(s["text"]) for s in doc["segments"][1:] if "text" in s]
        assert all(c is not None for c in captions)


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_deterministic_and_complete_corpus_is_left_alone(corpus, tmp_path):
    def digest(folder):
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
        return h.hexdigest()

    again = tmp_path / "again"
    build_demo_corpus(DemoCorpusConfig(out=str(again)))
    assert digest(again) == digest(corpus)
    stamp = os.path.getmtime(again / "train" / "text.jsonl")
    build_demo_corpus(DemoCorpusConfig(out=str(again)))
    assert os.path.getmtime(again / "train" / "text.jsonl") == stamp


def test_caption_label():
    assert [caption_label(digit_caption(d)) for d in range(10)] == list(range(10))
    assert caption_label("That was a Seven.") == 7 and caption_label("no digit here") is None
    assert len(DIGIT_WORDS) == 10


@pytest.mark.slow  # the module corpus fixture builds the whole demo corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_preprocessing_accepts_every_held_out_document(corpus, vae_checkpoint, tmp_path):
    out = tmp_path / "mds"
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_interleaved.py"), "--input",
                    *(str(corpus / "heldout" / f"{s}.jsonl") for s in ("text", "pair", "interleaved")),
                    "--image-root", str(corpus / "images"), "--vae", vae_checkpoint, "--output", str(out),
                    "--no-progress"], check=True, cwd=REPO, capture_output=True,
                   env=dict(os.environ, TMPDIR=str(tmp_path)))
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((corpus / "corpus.json").read_text())
    assert manifest["documents_rejected"] == {}
    assert manifest["documents_written"] == {s: summary["documents"][f"heldout/{s}"]
                                             for s in ("text", "pair", "interleaved")}
