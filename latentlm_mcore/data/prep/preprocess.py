"""Raw JSONL documents -> text ids + σ-VAE latents -> MDS shards (formats: `data/schema.py`).

The Transformer never runs the VAE: every image is encoded once here. Work is split over a Slurm job
array (by file, or by line when there are fewer files than tasks: see `iter_raw_lines`), each task
writes its own part, and `merge_parts` (`prep/merge.py`) joins finished parts into one streaming dataset per source.

Failure behaviour:
- A bad document (see schema.REJECT_REASONS) is skipped before anything of it is written, logged with
  its id and reason to the part's rejects file, and counted in the manifest. The run goes on.
- A part is written into `*.tmp` folders and renamed when complete; its manifest is written last and
  marks it done. A task that dies leaves no visible partial part; re-running redoes only unfinished parts.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from latentlm_mcore.data import schema
from latentlm_mcore.data.schema import SpecialIds, image_runs
from latentlm_mcore.data.images import center_crop
from latentlm_mcore.data.schema import RejectedDocument
from latentlm_mcore.data.streaming_compat import import_streaming
from latentlm_mcore.data.tokenizer import load_tokenizer, sha256_file
from latentlm_mcore.data.prep.merge import merge_parts, read_layout, write_layout  # noqa: F401 (tools import them here)
from latentlm_mcore.runtime.files import write_json_atomic


@dataclass
class PreprocessConfig:
    inputs: list[str]  # raw JSONL files or globs
    output: str
    image_root: str | None = None
    vae_checkpoint: str | None = None  # the image σ-VAE
    # Speech documents (prep/speech.py): the audio σ-VAE file (vae/audio_model.py) and the folder every audio
    # path is relative to. One σ-VAE per dataset: with it, the run encodes speech only.
    audio_vae_checkpoint: str | None = None
    audio_root: str | None = None
    max_audio_seconds: float = 60.0  # longer utterances are rejected (audio_too_long)
    tokenizer: str = "cl100k_base"  # class documents: "classes:N" (tokenizer.ClassVocabulary)
    # Class documents: encode each image and its horizontal mirror (DiT's random flip; the loader picks one).
    # Off where a flip changes the class (digits, text in images).
    hflip: bool = False
    num_shards: int = 1  # Slurm array size
    shard_index: int = 0  # this task's index
    batch_images: int = 64  # images (or utterances) per σ-VAE forward
    max_image_pixels: int = 64_000_000  # decompression-bomb limit (width x height)
    shard_size_limit: int = 1 << 26  # bytes of one MDS shard before compression
    device: str | None = None  # None: cuda if present
    threads: int = min(16, os.cpu_count() or 1)  # parse / decode / tokenize in parallel
    progress: bool = True


# ---------------------------------------------------------------------------------------------- images

def load_image(path: str, image_root: str, image_size: int, max_pixels: int) -> np.ndarray:
    """Read one image as float32 [3, S, S] in [-1, 1]: the largest centred square resized to S
    (`data.images.center_crop`, as the σ-VAE saw its evaluation images).

    Raises RejectedDocument for a path outside the root, a missing, unreadable or truncated file, or one
    with more than `max_pixels` pixels (checked from the header, before decoding)."""
    root = os.path.realpath(image_root)
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise RejectedDocument(schema.IMAGE_OUTSIDE_ROOT, f"{path!r} resolves outside the image root {root}")
    if not os.path.isfile(full):
        raise RejectedDocument(schema.IMAGE_MISSING, f"{path!r} does not exist")
    try:
        with Image.open(full) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise RejectedDocument(schema.IMAGE_TOO_LARGE, f"{path!r} is {w}x{h} > {max_pixels} pixels")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
            img = img.convert("RGB")
    except RejectedDocument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedDocument(schema.IMAGE_TOO_LARGE, f"{path!r}: {e}") from None
    except Image.UnidentifiedImageError as e:
        raise RejectedDocument(schema.IMAGE_UNREADABLE, f"{path!r}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = schema.IMAGE_TRUNCATED if "truncated" in str(e).lower() else schema.IMAGE_UNREADABLE
        raise RejectedDocument(reason, f"{path!r}: {e}") from None
    img = center_crop(img, image_size)  # the σ-VAE trainer's own (data/images.py)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return arr / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ documents

def document_tokens(doc: schema.RawDocument, tokenizer, num_latents: int) -> np.ndarray:
    """Token ids of one document: text ids, <BOD> <LATENT>*num_latents <EOD> per image, <END_OF_DOCUMENT>;
    a class document is `<class> <BOD> <LATENT>*num_latents <EOD> <END_OF_DOCUMENT>` (see schema)."""
    image_run = [tokenizer.bod_id] + [tokenizer.latent_id] * num_latents + [tokenizer.eod_id]
    if doc.source == "class":
        num_classes = getattr(tokenizer, "num_classes", None)
        if num_classes is None:
            raise ValueError(f"document {doc.id!r} is a class document, and tokenizer {tokenizer.name} has no class "
                             f"ids: preprocess class data with --tokenizer classes:N")
        if doc.label >= num_classes:
            raise RejectedDocument(schema.LABEL_OUT_OF_RANGE, f"label {doc.label} is not one of the "
                                                               f"{num_classes} classes of {tokenizer.name}")
        return np.asarray([doc.label, *image_run, tokenizer.end_of_document_id], dtype=np.int32)
    texts = [s["text"] for s in doc.segments if "text" in s]
    encoded = iter(tokenizer.encode_batch(texts))
    ids: list[int] = []
    for seg in doc.segments:
        ids.extend(next(encoded) if "text" in seg else image_run)
    ids.append(tokenizer.end_of_document_id)
    return np.asarray(ids, dtype=np.int32)


def iter_raw_lines(inputs: list[str], num_shards: int = 1, shard_index: int = 0):
    """(file, line number, raw bytes) of this task's documents, from the sorted expansion of the globs.

    With at least as many files as tasks, task k takes whole files k, k + N, ... (it reads nothing
    else); with fewer, it takes lines k, k + N, ... of their concatenation."""
    files = sorted({f for pattern in inputs for f in (glob.glob(pattern) or [pattern])})
    by_file = len(files) >= num_shards
    index = 0
    for i, path in enumerate(files):
        if by_file and i % num_shards != shard_index:
            continue
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if by_file or index % num_shards == shard_index:
                    yield path, lineno, line
                index += 1


class _LatentMoments:
    """Per-channel count / sum / sum of squares in float64, mergeable across parts."""

    def __init__(self, dim: int):
        self.count, self.sum, self.sumsq = 0, np.zeros(dim), np.zeros(dim)

    def add(self, latents: np.ndarray) -> None:
        x = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}


class ImageEncoding:
    """What `_write_part` needs of the image σ-VAE (speech: prep/speech.py `SpeechEncoding`, same interface)."""

    def __init__(self, cfg: PreprocessConfig, device):
        from latentlm_mcore.vae import load_sigma_vae

        if not cfg.vae_checkpoint or not cfg.image_root:
            raise ValueError("encoding images needs a σ-VAE file and an image root (--vae, --image-root)")
        self.cfg, self.device = cfg, device
        self.vae = load_sigma_vae(cfg.vae_checkpoint).to(device).eval()
        vcfg = self.vae.config
        self.latent_dim, self.tokens_per_image, self.latent_stats = vcfg.latent_dim, vcfg.num_latents, self.vae.latent_stats

    def manifest_vae(self) -> dict:
        vcfg = self.vae.config
        return {"path": os.path.abspath(self.cfg.vae_checkpoint), "sha256": sha256_file(self.cfg.vae_checkpoint),
                "image_size": vcfg.image_size, "latent_dim": vcfg.latent_dim, "num_latents": vcfg.num_latents,
                "c_sigma": vcfg.c_sigma}  # the loader draws z = μ + σ·ε with it

    def prepare(self, doc: schema.RawDocument, tokenizer):
        """(ids, images to encode, rows: None = all their latents in order)."""
        if doc.source == schema.SPEECH_SOURCE:
            raise RejectedDocument(schema.INVALID_SCHEMA, "a speech document in an image preprocessing run: "
                                   "preprocess speech with --audio-vae and --audio-root into another output")
        tokens = document_tokens(doc, tokenizer, self.tokens_per_image)  # first: a bad label costs no image read
        ims = [load_image(p, self.cfg.image_root, self.vae.config.image_size, self.cfg.max_image_pixels)
               for p in doc.image_paths]
        if self.cfg.hflip and doc.source == "class":
            ims.append(np.ascontiguousarray(ims[0][:, :, ::-1]))  # the mirror: second latent set (schema)
        return tokens, ims, None

    def encode(self, images: list) -> list[np.ndarray]:
        with torch.inference_mode():
            return list(self.vae.encode(torch.from_numpy(np.stack(images)).to(self.device)).float().cpu().numpy())


# ------------------------------------------------------------------------------------------- one part

def _part_paths(cfg: PreprocessConfig):
    name = schema.part_name(cfg.shard_index, cfg.num_shards)
    parts_dir = os.path.join(cfg.output, "parts")
    return name, os.path.join(parts_dir, f"{name}.json"), os.path.join(parts_dir, f"{name}.rejects.jsonl")


def preprocess_part(cfg: PreprocessConfig) -> dict:
    """Write this task's part (or return its manifest if already finished), holding the part's lease
    (`parts/<part>.lease`, runtime/lease.py): a second task on the same part refuses, naming the first."""
    from latentlm_mcore.runtime.lease import DirectoryLease

    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"shard_index {cfg.shard_index} not in [0, {cfg.num_shards})")
    name, manifest_path, _ = _part_paths(cfg)
    with DirectoryLease(os.path.dirname(manifest_path), name=f"{name}.lease"):
        return _write_part(cfg)


def _write_part(cfg: PreprocessConfig) -> dict:
    name, manifest_path, rejects_path = _part_paths(cfg)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)
    os.makedirs(os.path.dirname(manifest_path), exist_ok=True)
    for source in schema.SOURCES:  # leftovers of a task that died
        for suffix in ("", ".tmp"):
            shutil.rmtree(os.path.join(cfg.output, source, name + suffix), ignore_errors=True)

    MDSWriter = import_streaming().MDSWriter
    tokenizer = load_tokenizer(cfg.tokenizer)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.audio_vae_checkpoint and cfg.vae_checkpoint:
        raise ValueError("one σ-VAE per dataset (the model has one latent projection): preprocess speech "
                         "(--audio-vae) and images (--vae) into separate outputs")
    if cfg.audio_vae_checkpoint:
        from latentlm_mcore.data.prep.speech import SpeechEncoding

        encoding = SpeechEncoding(cfg.audio_vae_checkpoint, cfg.audio_root, device, cfg.max_audio_seconds,
                                  cfg.batch_images)
    else:
        encoding = ImageEncoding(cfg, device)
    tokenizer_ids = SpecialIds(bod=tokenizer.bod_id, eod=tokenizer.eod_id, latent=tokenizer.latent_id,
                               end_of_document=tokenizer.end_of_document_id, pad=-1)
    latent_dim = encoding.latent_dim
    moments = _LatentMoments(latent_dim)
    writers: dict[str, object] = {}
    shapes: dict[str, tuple[list, list]] = {}  # source -> (lengths, image runs) of its documents, in order
    written, tokens_written, latents_written, rejected = Counter(), Counter(), Counter(), Counter()
    images_written = images_read = 0
    audio_seconds = 0.0
    pending: list[tuple[schema.RawDocument, np.ndarray, list, list | None]] = []

    def writer_for(source: str):
        if source not in writers:
            writers[source] = MDSWriter(out=os.path.join(cfg.output, source, name + ".tmp"),
                                        columns=schema.MDS_COLUMNS, compression="zstd",
                                        size_limit=cfg.shard_size_limit, progress_bar=False)
        return writers[source]

    def flush():
        nonlocal images_written, audio_seconds
        items = [item for _, _, its, _ in pending for item in its]
        latents = encoding.encode(items) if items else []
        for item_latents in latents:
            moments.add(item_latents)
        at = 0
        for doc, tokens, its, rows in pending:
            mine = latents[at:at + len(its)]
            at += len(its)
            parts = mine if rows is None else [mine[i][a:b] for i, a, b in rows]
            doc_latents = (np.concatenate(parts) if parts else np.zeros((0, latent_dim))).astype(np.float16)
            writer_for(doc.source).write({"tokens": tokens, "latents": schema.encode_latents(doc_latents), "doc_id": doc.id,
                                          "source": doc.source})
            lengths, runs = shapes.setdefault(doc.source, ([], []))
            lengths.append(len(tokens))
            runs.append(image_runs(tokens, tokenizer_ids))
            written[doc.source] += 1
            images_written += len(doc.image_paths)  # a mirror is no image of its own
            if doc.source == schema.SPEECH_SOURCE:
                audio_seconds += sum(len(w) for w in its) / encoding.sample_rate
            tokens_written[doc.source] += len(tokens)
            latents_written[doc.source] += int(np.count_nonzero(tokens == tokenizer.latent_id))
        pending.clear()

    def prepare(item):
        """Parse, load images, tokenize: one document, in a thread (PIL and tiktoken release the GIL)."""
        path, lineno, line = item
        doc = None
        try:
            doc = schema.parse_raw_line(line)
            return item, (doc, *encoding.prepare(doc, tokenizer))
        except RejectedDocument as e:
            e.doc_id = e.doc_id or (doc.id if doc else None)
            return item, e

    from tqdm import tqdm

    bar = tqdm(desc=name, unit="doc", disable=not cfg.progress, dynamic_ncols=True)
    start = time.perf_counter()
    lines = iter_raw_lines(cfg.inputs, cfg.num_shards, cfg.shard_index)
    with open(rejects_path + ".tmp", "w") as rejects, ThreadPoolExecutor(cfg.threads) as pool:
        while chunk := list(itertools.islice(lines, 4 * cfg.batch_images)):
            for (path, lineno, _), result in pool.map(prepare, chunk):
                if isinstance(result, RejectedDocument):
                    rejected[result.reason] += 1
                    doc_id = result.doc_id or f"{os.path.basename(path)}:{lineno}"
                    rejects.write(json.dumps({"id": doc_id, "reason": result.reason, "detail": result.detail,
                                              "file": path, "line": lineno}) + "\n")
                else:
                    pending.append(result)
                    images_read += len(result[2])
                    if len(pending) >= 4 * cfg.batch_images or sum(len(p[2]) for p in pending) >= cfg.batch_images:
                        flush()
                bar.update(1)
            dt = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(docs_s=f"{bar.n / dt:.1f}", images_s=f"{images_read / dt:.1f}",
                            rejected=sum(rejected.values()))
        flush()
    bar.close()
    for source, writer in writers.items():
        writer.finish()
        lengths, runs = shapes[source]
        write_layout(os.path.join(cfg.output, source, name + ".tmp"), lengths, [len(r) for r in runs],
                     np.concatenate(runs) if runs else np.zeros((0, 2), np.int32))
        os.replace(os.path.join(cfg.output, source, name + ".tmp"), os.path.join(cfg.output, source, name))
    os.replace(rejects_path + ".tmp", rejects_path)

    stats = encoding.latent_stats
    manifest = {
        "part": name,
        "tokenizer": tokenizer.describe(),
        "vae": encoding.manifest_vae(),  # image or audio σ-VAE (kind "audio"): file, sha256, c_sigma, ...
        "latent_dim": latent_dim,
        "tokens_per_image": encoding.tokens_per_image,  # None for speech (runs of any length)
        "hflip": cfg.hflip,  # class documents hold their image's and its mirror's latents
        "vae_latent_stats": None if stats is None else stats.to_dict(),
        "latent_moments": moments.to_dict(),
        "documents_written": dict(written),
        "tokens_written": dict(tokens_written),
        "latent_tokens_written": dict(latents_written),
        "images_written": images_written,
        "audio_seconds_written": round(audio_seconds, 3),
        "documents_rejected": dict(rejected),
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(manifest_path, manifest)  # last: marks the part finished
    return manifest
