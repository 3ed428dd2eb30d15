"""The merge step of preprocessing: finished parts (`prep/preprocess.py`) -> one streaming `index.json` per
source and the dataset manifest; and the layout index each part and the merged dataset carry beside their shards.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from latentlm_mcore.data import schema
from latentlm_mcore.runtime.files import atomic_write, write_json_atomic

# ------------------------------------------------------------------------------------ layout index

LAYOUT_FILES = ("layout_lengths.npy", "layout_run_counts.npy", "layout_runs.npy")


def write_layout(folder: str, lengths, run_counts, runs) -> None:
    """Each document's length and image runs, in sample order, beside its MDS shards: what laying out the
    global stream of sequences needs, readable without decoding a shard (Megatron's `.idx` sizes, in spirit)."""
    arrays = (np.asarray(lengths, np.int32), np.asarray(run_counts, np.int32),
              np.asarray(runs, np.int32).reshape(-1, 2))
    for fname, array in zip(LAYOUT_FILES, arrays):
        with atomic_write(os.path.join(folder, fname), "wb") as f:
            np.save(f, array)


def read_layout(folder: str, mmap: bool = True):
    """(lengths, run offsets [n + 1], runs [r, 2]) written by `write_layout`, or None if absent."""
    if not all(os.path.exists(os.path.join(folder, f)) for f in LAYOUT_FILES):
        return None
    lengths, counts, runs = (np.load(os.path.join(folder, f), mmap_mode="r" if mmap else None) for f in LAYOUT_FILES)
    return lengths, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), runs


# ---------------------------------------------------------------------------------------------- merge

def merge_parts(output: str, num_shards: int, normalisation: str = "global") -> dict:
    """Join finished parts: one streaming `index.json` per source and the dataset manifest.

    Latent statistics come from the σ-VAE file; a σ-VAE without them gets statistics of its samples
    over this dataset (`normalisation`: see vae/stats.py).

    Raises if a part is missing or parts disagree on tokenizer / σ-VAE (they would not mix)."""
    parts = []
    missing = []
    for i in range(num_shards):
        path = os.path.join(output, "parts", schema.part_name(i, num_shards) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(json.load(f))
        else:
            missing.append(schema.part_name(i, num_shards))
    if missing:
        raise FileNotFoundError(f"{len(missing)} parts unfinished in {output}: {', '.join(missing[:8])}")
    first = parts[0]
    for p in parts[1:]:
        for key in ("tokenizer", "vae", "hflip"):
            if p.get(key, False) != first.get(key, False):
                raise ValueError(f"{p['part']} has a different {key} than {first['part']}")

    sources = {}
    for source in schema.SOURCES:
        shards, layouts = [], []
        for p in parts:
            index_path = os.path.join(output, source, p["part"], "index.json")
            if not os.path.exists(index_path):
                continue
            layouts.append(read_layout(os.path.join(output, source, p["part"]), mmap=False))
            with open(index_path) as f:
                for shard in json.load(f)["shards"]:
                    for key in ("raw_data", "zip_data"):
                        if shard.get(key):
                            shard[key]["basename"] = f"{p['part']}/{shard[key]['basename']}"
                    shards.append(shard)
        if shards:
            write_json_atomic(os.path.join(output, source, "index.json"), {"version": 2, "shards": shards})
            if all(layout is not None for layout in layouts):  # parts written before the index have none
                write_layout(os.path.join(output, source), np.concatenate([lay[0] for lay in layouts]),
                             np.concatenate([np.diff(lay[1]) for lay in layouts]),
                             np.concatenate([lay[2] for lay in layouts]))
            sources[source] = sum(p["documents_written"].get(source, 0) for p in parts)

    count = sum(p["latent_moments"]["count"] for p in parts)
    if first["vae_latent_stats"] is not None:
        latent_stats = dict(first["vae_latent_stats"], **{"from": "vae_checkpoint"})
    elif count:
        from latentlm_mcore.vae import stats_from_moments

        s = np.sum([p["latent_moments"]["sum"] for p in parts], axis=0)
        ss = np.sum([p["latent_moments"]["sumsq"] for p in parts], axis=0)
        stats = stats_from_moments(count, s, ss, first["vae"]["c_sigma"], normalisation)
        latent_stats = dict(stats.to_dict(), **{"from": "computed_over_dataset"})
    else:
        latent_stats = None  # text only: nothing to scale

    def total(key):
        c = Counter()
        for p in parts:
            c.update(p[key])
        return dict(c)

    manifest = {
        "tokenizer": first["tokenizer"],
        "vae": first["vae"],
        "latent_dim": first["latent_dim"],
        "tokens_per_image": first["tokens_per_image"],
        "hflip": first.get("hflip", False),
        "latent_stats": latent_stats,
        "sources": sources,
        "documents_written": total("documents_written"),
        "tokens_written": total("tokens_written"),
        "latent_tokens_written": total("latent_tokens_written"),
        "images_written": sum(p["images_written"] for p in parts),
        "audio_seconds_written": round(sum(p.get("audio_seconds_written", 0.0) for p in parts), 3),
        "documents_rejected": total("documents_rejected"),
        "num_parts": num_shards,
    }
    write_json_atomic(os.path.join(output, schema.MANIFEST_NAME), manifest)
    return manifest
