"""Class documents in the loader: label dropout (DiT's 10%) and the pre-encoded flip, drawn per (seed, g)."""

import json
import os

import numpy as np
import pytest

from latentlm_mcore.data import schema
from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture
from latentlm_mcore.data.loader.packed import DocumentReader, LoaderConfig, PackedLoader
from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part


@pytest.mark.slow  # over ~10 s (fast-tier measurement, 2026-12-04)
def test_label_dropout_and_flip_are_drawn_per_document(tmp_path, image_root, vae_checkpoint, cache_dir):
    root, names = image_root
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"c{i}", "source": "class", "label": i % 10,
                                       "segments": [{"image": names[i % len(names)]}]}) + "\n" for i in range(20)))
    out = tmp_path / "data"
    preprocess_part(PreprocessConfig(inputs=[str(raw)], output=str(out), image_root=str(root), hflip=True,
                                     vae_checkpoint=vae_checkpoint, tokenizer="classes:10", progress=False))
    merge_parts(str(out), 1)
    mix = StreamMixture(MixtureConfig(dataset_root=str(out), cache_dir=os.path.join(cache_dir, "m"),
                                      proportions={"class": 1.0}))
    ids, n = mix.ids, mix.tokens_per_image
    assert ids.null_class == 10
    reader, keep = DocumentReader(mix, 0.1), DocumentReader(mix, 0.0)
    dropped, flipped = 0, set()
    for g in range(400):  # 20 epochs of 20 documents
        a, b = reader[g], keep[g]
        stored = schema.decode_latents(mix.document(g)["latents"], mix.latent_dim)
        assert len(stored) == 2 * n and len(a.latents) == n
        assert np.array_equal(a.tokens[1:], b.tokens[1:]) and np.array_equal(a.latents, b.latents)
        if a.tokens[0] != b.tokens[0]:
            dropped += 1
            assert a.tokens[0] == ids.null_class
        else:
            assert 0 <= a.tokens[0] < 10
        flipped.add(np.array_equal(a.latents, stored[n:]))
        assert np.array_equal(a.latents, stored[n:]) or np.array_equal(a.latents, stored[:n])
        assert np.array_equal(a.tokens, reader[g].tokens) and np.array_equal(a.latents, reader[g].latents)
    assert 20 <= dropped <= 65 and flipped == {True, False}  # 10% of 400 = 40; both sides of the flip

    # through the packed loader: seq = document length, so every sequence is one image, class token first
    loader = PackedLoader(mix, LoaderConfig(seq_length=n + 4, micro_batch_size=4, condition_dropout=0.1))
    batch = next(iter(loader))
    assert (batch["tokens"][:, 1] == ids.bod).all() and (batch["tokens"][:, -1] == ids.end_of_document).all()
    assert ((batch["tokens"][:, 0] < 10) | (batch["tokens"][:, 0] == ids.null_class)).all()
    assert int(batch["diffusion_mask"].sum()) == 4 * n
