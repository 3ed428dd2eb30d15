"""Converters from public data formats to the raw JSONL of `data/schema.py`.

Each converter yields raw documents (dicts) and counts what it could not use in a `Counter`. Images
end as local files under one image root: images that come inside the input (webdataset tars, parquet
image bytes) are written there; images referenced by URL must already have been downloaded (e.g. by
img2dataset) and are found through a URL -> file map or by file name. Nothing is fetched from the network.

- text:        plain `.txt` files (one document each) or JSONL with a `text` field    -> source "text"
- webdataset:  tar shards of `<key>.{jpg,png,webp,...}` + `<key>.txt` or `<key>.json`   -> source "pair"
- obelics:     OBELICS-style parquet: aligned lists `texts` / `images`                  -> "interleaved"
- mmc4:        MMC4-style JSONL: `text_list` + `image_info` (matched_text_index)        -> "interleaved"
- imagefolder: ImageNet-style tree `<root>/<class folder>/<image>` (+ optional class index) -> "class"

Speech corpora (LibriSpeech / LibriTTS, Libriheavy) -> source "speech": `convert_speech.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from typing import Iterator

from latentlm_mcore.runtime.files import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _safe_name(name: str) -> str:
    """A file name that cannot leave its folder (tar member names and keys are untrusted)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe[:120] or hashlib.sha1(name.encode()).hexdigest()


def _store_image(data: bytes, image_root: str, subdir: str, name: str) -> str:
    """Write image bytes under image_root/subdir; return the path relative to image_root."""
    rel = os.path.join(_safe_name(subdir), _safe_name(name))
    full = os.path.join(image_root, rel)
    with atomic_write(full, "wb") as f:
        f.write(data)
    return rel


def write_jsonl(documents, path: str) -> int:
    """Write documents atomically (a crash leaves no half file); return how many."""
    n = 0
    with atomic_write(path) as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------------- text

def _json_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def convert_text(paths: list[str], skipped: Counter, text_field: str = "text") -> Iterator[dict]:
    """`.txt` files (one document per file) and `.jsonl` files (one per line, text in `text_field`)."""
    for path in paths:
        stem = os.path.basename(path)
        if path.endswith((".jsonl", ".json")):
            for lineno, line in _json_lines(path):
                try:
                    obj = json.loads(line)
                    text = obj[text_field]
                except (ValueError, KeyError, TypeError):
                    skipped["text_line_unusable"] += 1
                    continue
                if not isinstance(text, str) or not text.strip():
                    skipped["text_empty"] += 1
                    continue
                doc_id = obj.get("id") if isinstance(obj.get("id"), str) else f"{stem}:{lineno}"
                yield {"id": doc_id, "source": "text", "segments": [{"text": text}]}
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if not text.strip():
                skipped["text_empty"] += 1
                continue
            yield {"id": stem, "source": "text", "segments": [{"text": text}]}


# --------------------------------------------------------------------------------------- webdataset

def _caption(files: dict[str, bytes]) -> str | None:
    if ".txt" in files:
        return files[".txt"].decode("utf-8", errors="replace").strip()
    if ".json" in files:
        try:
            meta = json.loads(files[".json"])
        except ValueError:
            return None
        for key in ("caption", "text", "txt"):
            if isinstance(meta.get(key), str):
                return meta[key].strip()
    return None


def convert_webdataset(tar_paths: list[str], image_root: str, skipped: Counter) -> Iterator[dict]:
    """Image-caption pairs from webdataset tar shards; images are extracted under image_root/<shard>/."""
    for tar_path in tar_paths:
        shard = os.path.basename(tar_path).split(".")[0]
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    key, dot, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(member.name), key)
                    samples.setdefault(key, {})["." + ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError):
            skipped["tar_unreadable"] += 1  # keep what was read before the damage
        for key, files in samples.items():
            image_ext = next((e for e in files if e in IMAGE_EXTENSIONS), None)
            caption = _caption(files)
            if image_ext is None:
                skipped["pair_without_image"] += 1
                continue
            if not caption:
                skipped["pair_without_caption"] += 1
                continue
            rel = _store_image(files[image_ext], image_root, shard, key.replace("/", "_") + image_ext)
            # Caption first: the pair teaches text-to-image generation (and CFG drops the caption).
            yield {"id": f"{shard}/{key}", "source": "pair", "segments": [{"text": caption}, {"image": rel}]}


# ---------------------------------------------------------------------------- interleaved documents

def load_url_map(path: str | None) -> dict[str, str]:
    """URL -> image path (relative to the image root), from JSONL lines {"url": ..., "path": ...}."""
    if path is None:
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                out[obj["url"]] = obj["path"]
    return out


def _local_image(ref, image_root: str, url_map: dict[str, str], subdir: str, name: str) -> str | None:
    """An image reference (bytes struct, URL or path) -> a path under image_root, or None if unavailable."""
    if isinstance(ref, dict) and ref.get("bytes"):
        return _store_image(ref["bytes"], image_root, subdir, name)
    if isinstance(ref, dict):
        ref = ref.get("path") or ref.get("url")
    if not isinstance(ref, str) or not ref:
        return None
    if ref in url_map:
        return url_map[ref]
    if "://" not in ref and os.path.isfile(os.path.join(image_root, ref)):
        return ref
    return None


def _interleaved(doc_id: str, items: list[tuple[str, str]], skipped: Counter) -> dict | None:
    segments = [{kind: value} for kind, value in items if value]
    if not any("image" in s for s in segments) or not any("text" in s for s in segments):
        skipped["interleaved_without_text_or_image"] += 1
        return None
    return {"id": doc_id, "source": "interleaved", "segments": segments}


def convert_obelics(parquet_paths: list[str], image_root: str, skipped: Counter,
                    url_map: dict[str, str] | None = None) -> Iterator[dict]:
    """OBELICS-style parquet rows: `texts[i]` and `images[i]` alternate (exactly one is set per i).
    An image is a URL (looked up in url_map), a path under image_root, or a {"bytes", "path"} struct."""
    import pyarrow.parquet as pq

    url_map = url_map or {}
    for path in parquet_paths:
        stem = os.path.basename(path).rsplit(".", 1)[0]
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(columns=["texts", "images"]):
            for texts, images in zip(batch.column("texts").to_pylist(), batch.column("images").to_pylist()):
                doc_id = f"{stem}/{row}"
                row += 1
                items = []
                for i, (text, image) in enumerate(zip(texts or [], images or [])):
                    if image is not None:
                        local = _local_image(image, image_root, url_map, stem, f"{row - 1}_{i}.img")
                        if local is None:
                            skipped["image_not_available_locally"] += 1
                        items.append(("image", local))
                    elif text:
                        items.append(("text", text))
                doc = _interleaved(doc_id, items, skipped)
                if doc:
                    yield doc


def convert_mmc4(jsonl_paths: list[str], image_root: str, skipped: Counter,
                 url_map: dict[str, str] | None = None) -> Iterator[dict]:
    """MMC4-style JSONL: `text_list` sentences and `image_info` entries, each image placed before the
    sentence of its `matched_text_index`. Images are found by `image_name` under image_root, else by
    `raw_url` in url_map."""
    url_map = url_map or {}
    for path in jsonl_paths:
        stem = os.path.basename(path).rsplit(".", 1)[0]
        for lineno, line in _json_lines(path):
            try:
                obj = json.loads(line)
                texts = list(obj["text_list"])
                infos = list(obj.get("image_info") or [])
            except (ValueError, KeyError, TypeError):
                skipped["mmc4_line_unusable"] += 1
                continue
            before: dict[int, list[str]] = {}
            for info in infos:
                ref = info.get("image_name") if isinstance(info, dict) else None
                local = _local_image(ref, image_root, url_map, stem, "x") if ref else None
                if local is None and isinstance(info, dict):
                    local = _local_image(info.get("raw_url"), image_root, url_map, stem, "x")
                idx = info.get("matched_text_index") if isinstance(info, dict) else None
                if local is None or not isinstance(idx, int) or not 0 <= idx < len(texts):
                    skipped["image_not_available_locally"] += 1
                    continue
                before.setdefault(idx, []).append(local)
            items = []
            for i, text in enumerate(texts):
                items += [("image", p) for p in before.get(i, [])]
                items.append(("text", text if i == 0 else " " + text))
            doc_id = obj.get("url") if isinstance(obj.get("url"), str) else f"{stem}:{lineno}"
            doc = _interleaved(doc_id, items, skipped)
            if doc:
                yield doc


# ------------------------------------------------------------------------------ class-labelled images

def load_class_index(path: str) -> dict[str, int]:
    """Class folder name -> label from a JSON file: ImageNet's `imagenet_class_index.json`
    ({"0": ["n01440764", "tench"], ...}) or a plain {"n01440764": 0, ...}. Raises ValueError naming the
    entry that is neither, and on two folders with one label or one label twice."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: a class index is a non-empty JSON object")
    out: dict[str, int] = {}
    for key, value in obj.items():
        if isinstance(value, list) and value and isinstance(value[0], str) and key.isdigit():
            name, label = value[0], int(key)  # imagenet_class_index.json
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            name, label = key, value
        else:
            raise ValueError(f"{path}: entry {key!r}: {value!r} is neither [folder, ...] under a numeric key nor a "
                             f"label >= 0 under a folder name")
        if name in out:
            raise ValueError(f"{path}: folder {name!r} has two labels ({out[name]} and {label})")
        out[name] = label
    labels = sorted(out.values())
    twice = [a for a, b in zip(labels, labels[1:]) if a == b]
    if twice:
        raise ValueError(f"{path}: label {twice[0]} is given to more than one folder")
    return out


def convert_imagefolder(root: str, skipped: Counter, class_index: dict[str, int] | None = None,
                        image_root: str | None = None) -> Iterator[dict]:
    """One class document per image file of `root/<class folder>/`, labelled by the class index (default:
    the sorted folder names -> 0..N-1). Paths are relative to `image_root` (default `root`), which must hold
    `root`. Folders the index lacks, index classes without a folder, non-image and hidden files are counted
    in `skipped`; symlinks are followed here, and preprocessing refuses any that leave the image root."""
    root = os.path.abspath(root)
    image_root = os.path.abspath(image_root or root)
    if os.path.commonpath([image_root, root]) != image_root:
        raise ValueError(f"imagefolder: {root} is not inside the image root {image_root}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"imagefolder: {root} is not a folder")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if class_index is None:
        class_index = {name: label for label, name in enumerate(folders)}
    for name in class_index:
        if name not in folders:
            skipped["class_without_folder"] += 1
    for name in folders:
        if name not in class_index:
            skipped["folder_not_in_class_index"] += 1
            continue
        label, found = class_index[name], 0
        for entry in sorted(os.scandir(os.path.join(root, name)), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                skipped["not_an_image_file"] += not entry.name.startswith(".")
                continue
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                skipped["not_an_image_file"] += 1
                continue
            found += 1
            rel = os.path.relpath(os.path.join(root, name, entry.name), image_root)
            yield {"id": f"{name}/{entry.name}", "source": "class", "label": label, "segments": [{"image": rel}]}
        if not found:
            skipped["class_folder_without_images"] += 1
