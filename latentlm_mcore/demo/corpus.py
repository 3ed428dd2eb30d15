"""The bundled demo corpus: real data that ships inside installed packages, written as the raw JSONL of
`data/schema.py`. Nothing is downloaded; the same environment always gives the same bytes.

- Images: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels; `sklearn.datasets.load_digits`),
  upscaled to `image_size` pixels, dark ink on white, saved as PNG. Every tenth digit is held out.
- Text: English prose from the docstrings of Python's own standard library, read from the source files
  with `ast` (no module is imported). Paragraphs that look like code, doctests or tables are dropped; one
  document per module (long modules give several). Modules are held out by a hash of their path.
- Pairs: each digit twice, caption -> image (text-to-image) and image -> caption (image-to-text), with
  captions in words: "a handwritten digit seven".
- Interleaved: a prose paragraph, then several captioned digits (caption before or after the image).

Layout under `out`:
    images/digits/NNNN.png                    the digits (paths in the JSONL are relative to images/)
    images/{train,heldout}.jsonl              the digit images of each split, for σ-VAE training
    train/{text,pair,interleaved}.jsonl       training documents
    heldout/{text,pair,interleaved}.jsonl     held-out documents (other digits, other modules)
    corpus.json                               counts and settings; written last: its presence = complete
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from latentlm_mcore.data.prep.convert import write_jsonl
from latentlm_mcore.runtime.files import atomic_write, write_json_atomic

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "heldout")
COMPLETE_MARKER = "corpus.json"
DIGITS_DIR = "digits"  # under images/


def digit_caption(label: int) -> str:
    """The caption of a digit image; the quickstart's prompts and the quality check use it too."""
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def caption_label(text: str) -> int | None:
    """The digit a generated caption names (the first digit word in it), or None."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    return None


@dataclass
class DemoCorpusConfig:
    out: str
    image_size: int = 32  # digits are upscaled from 8x8 to this (the σ-VAE's input size)
    heldout_every: int = 10  # digit i is held out when i % heldout_every == 0
    heldout_text_percent: int = 10  # share of stdlib modules held out
    max_document_chars: int = 2000  # longer modules are split into several text documents
    interleaved_documents: int = 600  # training interleaved documents (held out: a tenth of it)
    digits_per_interleaved: tuple[int, int] = (2, 5)  # inclusive range
    seed: int = 0


# ------------------------------------------------------------------------------------------------ images

def load_digit_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 [n, size, size] (dark ink on white) and int labels [n]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0  # 0 (paper) .. 1 (ink)
    out = np.empty((len(ink), image_size, image_size), np.uint8)
    for i, img in enumerate(ink):
        small = Image.fromarray(np.round(255 * (1 - img)).astype(np.uint8), mode="L")
        out[i] = np.asarray(small.resize((image_size, image_size), Image.BICUBIC))
    return out, digits.target.astype(np.int64)


def write_digit_images(images: np.ndarray, folder: str) -> list[str]:
    """PNG per digit (RGB, as every image the pipeline reads); file names relative to `folder`'s parent."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:04d}.png"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            with atomic_write(path, "wb") as f:
                Image.fromarray(img, mode="L").convert("RGB").save(f, format="PNG")
        names.append(f"{os.path.basename(folder)}/{name}")
    return names


def is_heldout_digit(index: int, cfg: DemoCorpusConfig) -> bool:
    return index % cfg.heldout_every == 0


# -------------------------------------------------------------------------------------------------- text

_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'()\-]")


def is_prose(paragraph: str) -> bool:
    """A paragraph of English sentences, not code, a doctest, a table, a signature or a list of options."""
    words = paragraph.split()
    if len(words) < 8 or ">>>" in paragraph or "::" in paragraph or "--" in paragraph:
        return False
    if not paragraph.rstrip().endswith((".", ":")) or not paragraph[0].isupper():
        return False
    if sum(bool(_PROSE_CHARS.match(c)) for c in paragraph) < 0.95 * len(paragraph):
        return False
    return sum(w.isalpha() and w.islower() for w in words) >= 0.6 * len(words)


def docstring_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of every docstring in one module's source (module, classes, functions; in
    `ast.walk` order), each joined into one line."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    paragraphs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        for block in re.split(r"\n\s*\n", doc):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):  # indented: code or a table
                continue
            paragraph = " ".join(line.strip() for line in lines).strip()
            if is_prose(paragraph) and paragraph not in paragraphs:
                paragraphs.append(paragraph)
    return paragraphs


def stdlib_modules() -> list[tuple[str, str]]:
    """(relative path, absolute path) of the standard library's .py files, sorted; tests, IDLE, the
    package installers and site-packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip",
            "__pycache__", "turtledemo", "pydoc_data"}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, root), path))
    return sorted(found)


def text_documents(cfg: DemoCorpusConfig) -> dict[str, list[dict]]:
    """{split: raw text documents} from the stdlib docstrings."""
    out = {split: [] for split in SPLITS}
    for rel, path in stdlib_modules():
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = docstring_paragraphs(f.read())
        if not paragraphs:
            continue
        split = "heldout" if _stable_percent(rel) < cfg.heldout_text_percent else "train"
        module = rel[:-3].replace(os.sep, ".")
        for part, text in enumerate(_chunk_paragraphs(paragraphs, cfg.max_document_chars)):
            out[split].append({"id": f"stdlib/{module}/{part}", "source": "text", "segments": [{"text": text}]})
    return out


def _chunk_paragraphs(paragraphs: list[str], max_chars: int) -> list[str]:
    chunks, current = [], []
    for p in paragraphs:
        if current and sum(len(c) + 2 for c in current) + len(p) > max_chars:
            chunks.append("\n\n".join(current))
            current = []
        current.append(p)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _stable_percent(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100


# ------------------------------------------------------------------------------------- pairs, interleaved

def pair_documents(paths: list[str], labels: np.ndarray, indices: list[int]) -> list[dict]:
    """Each digit as caption -> image and as image -> caption."""
    docs = []
    for i in indices:
        caption, image = {"text": digit_caption(int(labels[i]))}, {"image": paths[i]}
        docs.append({"id": f"digits/{i:04d}/caption-image", "source": "pair", "segments": [caption, image]})
        docs.append({"id": f"digits/{i:04d}/image-caption", "source": "pair", "segments": [image, caption]})
    return docs


def interleaved_documents(paths: list[str], labels: np.ndarray, indices: list[int], paragraphs: list[str],
                          count: int, cfg: DemoCorpusConfig, split: str) -> list[dict]:
    """`count` documents: a prose paragraph, then k digits each introduced or followed by its caption."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    lo, hi = cfg.digits_per_interleaved
    docs = []
    for n in range(count):
        k = int(rng.integers(lo, hi + 1))
        segments = [{"text": paragraphs[int(rng.integers(len(paragraphs)))]},
                    {"text": f"Here are {DIGIT_WORDS[k]} handwritten digits."}]
        for i in rng.choice(indices, size=k, replace=False):
            word = DIGIT_WORDS[int(labels[i])]
            if rng.random() < 0.5:
                segments += [{"text": f"The next one is {digit_caption(int(labels[i]))}."}, {"image": paths[i]}]
            else:
                segments += [{"image": paths[i]}, {"text": f"That was a {word}."}]
        docs.append({"id": f"interleaved/{split}/{n:05d}", "source": "interleaved",
                     "segments": _merge_adjacent_texts(segments)})
    return docs


def _merge_adjacent_texts(segments: list[dict]) -> list[dict]:
    """Consecutive text segments joined by a space (their token ids are concatenated as they are)."""
    merged = []
    for seg in segments:
        if "text" in seg and merged and "text" in merged[-1]:
            merged[-1] = {"text": merged[-1]["text"] + " " + seg["text"]}
        else:
            merged.append(seg)
    return merged


# ------------------------------------------------------------------------------------------------- build

def is_complete(out: str) -> bool:
    return os.path.isfile(os.path.join(out, COMPLETE_MARKER))


def build_demo_corpus(cfg: DemoCorpusConfig) -> dict:
    """Write the corpus under `cfg.out` (see the module docstring) and return its summary (also in
    corpus.json). Re-running over a complete corpus with the same settings returns the summary as is."""
    marker = os.path.join(cfg.out, COMPLETE_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            summary = json.load(f)
        if summary["config"] == _config_dict(cfg):
            return summary
        os.remove(marker)  # other settings: rebuild

    images, labels = load_digit_images(cfg.image_size)
    paths = write_digit_images(images, os.path.join(cfg.out, "images", DIGITS_DIR))
    digit_split = {s: [i for i in range(len(labels)) if is_heldout_digit(i, cfg) == (s == "heldout")]
                   for s in SPLITS}
    text = text_documents(cfg)
    documents = {}
    for split in SPLITS:
        paragraphs = [p for d in text[split] for p in d["segments"][0]["text"].split("\n\n")]
        count = cfg.interleaved_documents if split == "train" else max(1, cfg.interleaved_documents // 10)
        documents[split] = {
            "text": text[split],
            "pair": pair_documents(paths, labels, digit_split[split]),
            "interleaved": interleaved_documents(paths, labels, digit_split[split], paragraphs, count, cfg, split),
        }
    for split, indices in digit_split.items():
        write_jsonl([{"image": paths[i]} for i in indices], os.path.join(cfg.out, "images", f"{split}.jsonl"))
    counts = {}
    for split, by_source in documents.items():
        os.makedirs(os.path.join(cfg.out, split), exist_ok=True)
        for source, docs in by_source.items():
            write_jsonl(docs, os.path.join(cfg.out, split, f"{source}.jsonl"))
            counts[f"{split}/{source}"] = len(docs)
    summary = {
        "config": _config_dict(cfg),
        "documents": counts,
        "digits": {split: len(ix) for split, ix in digit_split.items()},
        "text_characters": {split: sum(len(d["segments"][0]["text"]) for d in text[split]) for split in SPLITS},
        "image_root": "images",
    }
    write_json_atomic(marker, summary, indent=2)
    return summary


def _config_dict(cfg: DemoCorpusConfig) -> dict:
    d = asdict(cfg)
    d.pop("out")
    d["digits_per_interleaved"] = list(d["digits_per_interleaved"])
    return d
