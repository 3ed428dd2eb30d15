"""Speech documents through the loader: the stop targets (CE at a speech run's latent positions: <LATENT> or
<EOD>), text dropout for classifier-free guidance, one σ per latent run, and exact resume."""

import json
import os

import numpy as np
import pytest
import torch

from latentlm_mcore.data import schema
from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture
from latentlm_mcore.data.loader.packed import DocumentReader, LoaderConfig, PackedLoader, _seed
from latentlm_mcore.data.loader.packing import BATCH_FIELDS
from latentlm_mcore.vae.model import sample_sigma_latents

pytestmark = pytest.mark.slow  # ~100 s on the loaded 2-core machine (streaming readers per loader)


def mixture(speech_dataset, cache_dir, name):
    return StreamMixture(MixtureConfig(dataset_root=str(speech_dataset.mds), cache_dir=os.path.join(cache_dir, name),
                                       proportions={"speech": 1.0}))


def expected_document(mix, g, dropped):
    """Document g's ids from the stored sample, independently of the loader: text removed when dropped."""
    ids = mix.ids
    tokens = np.asarray(mix.document(g)["tokens"])
    if dropped:
        bods, eods = np.flatnonzero(tokens == ids.bod), np.flatnonzero(tokens == ids.eod)
        tokens = np.concatenate([tokens[:eods[0] + 1], tokens[bods[1]:]])
    return tokens


@pytest.mark.slow  # the session speech_dataset fixture: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_stop_targets_and_text_dropout_through_the_packed_loader(speech_dataset, cache_dir):
    mix = mixture(speech_dataset, cache_dir, "a")
    ids, n = mix.ids, mix.epoch_size
    loader = PackedLoader(mix, LoaderConfig(seq_length=160, micro_batch_size=1, condition_dropout=0.5))
    reader = DocumentReader(mix, 0.5)
    dropped = set()
    seen = {}
    for block in loader.blocks():
        seq = block.own[0].fields
        tokens, at = seq["tokens"], 0
        for g, a, b in block.own[0].pieces:
            seen.setdefault(g, []).append(tokens[at:at + b - a])
            at += b - a
        # loss mask written out: CE wherever the next id is real and not a latent, and at every latent whose
        # next is a latent or <EOD> (all documents here are speech)
        nxt = tokens[1:]
        want = ((nxt != ids.latent) & (nxt != ids.pad)) | ((tokens[:-1] == ids.latent) & (nxt != ids.pad))
        assert np.array_equal(seq["loss_mask"][:-1] > 0, want) and seq["loss_mask"][-1] == 0
        assert np.array_equal(seq["labels"][:-1], nxt)
        stop = (tokens[:-1] == ids.latent) & (nxt == ids.eod)
        assert np.all(seq["loss_mask"][:-1][stop] == 1) and np.all(seq["diffusion_mask"][:-1][stop] == 0)
        assert np.array_equal(seq["diffusion_mask"][:-1] > 0, nxt == ids.latent)  # unchanged rule
        if min(seen) == 0 and max(seen) >= 2 * n:
            break
    for g in range(2 * n):
        got = np.concatenate(seen[g])
        stored = expected_document(mix, g, False)
        is_dropped = len(got) < len(stored)
        if is_dropped:
            dropped.add(g)
        assert np.array_equal(got, expected_document(mix, g, is_dropped)), g
        shape = reader.shape(g)  # the layout index agrees with the document the reader builds
        assert shape.length == len(got) and np.array_equal(shape.runs, schema.image_runs(got, ids))
    assert 0.25 * 2 * n <= len(dropped) <= 0.75 * 2 * n  # 50%


@pytest.mark.slow  # the session speech_dataset fixture: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_one_sigma_per_latent_run(speech_dataset, cache_dir):
    mix = mixture(speech_dataset, cache_dir, "s")
    sampled, mu = PackedLoader(mix, LoaderConfig(seq_length=8, micro_batch_size=1)), None
    reader = DocumentReader(mix, 0.0)
    doc = reader[3]
    mu = torch.from_numpy(doc.latents.astype(np.float32))
    sampled.builder.prepare(doc)
    k = int(np.flatnonzero(doc.tokens == mix.ids.eod)[0]) - 1
    g = torch.Generator().manual_seed(_seed(mix.cfg.seed, 3, 3))
    z = torch.cat([sample_sigma_latents(mu[:k][None], mix.c_sigma, g)[0], sample_sigma_latents(mu[k:][None], mix.c_sigma, g)[0]])
    want = (z.numpy() - mix.latent_mean) / mix.latent_std
    assert np.allclose(doc.latents, want, atol=1e-6)
    noise = [(z - mu)[:k].std(), (z - mu)[k:].std()]
    assert abs(noise[0] - noise[1]) > 1e-3  # two runs, two σ


@pytest.mark.slow  # the session speech_dataset fixture: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_exact_resume_with_speech(speech_dataset, cache_dir):
    cfg = dict(seq_length=128, micro_batch_size=2, dp_world_size=2, condition_dropout=0.3)

    def loader(tag, r):
        return PackedLoader(mixture(speech_dataset, cache_dir, f"{tag}{r}"), LoaderConfig(dp_rank=r, **cfg))

    def take(ld, k):
        it = iter(ld)
        return [next(it) for _ in range(k)]

    full = {r: take(loader("full", r), 6) for r in range(2)}
    loaders = {r: loader("a", r) for r in range(2)}
    first = {r: take(loaders[r], 3) for r in range(2)}
    states = json.loads(json.dumps([loaders[r].state_dict() for r in range(2)]))  # as a checkpoint stores them
    for r in range(2):
        resumed = loader("b", r)
        resumed.load_state_dict(states)
        got = first[r] + take(resumed, 3)
        for x, y in zip(full[r], got):
            for name in BATCH_FIELDS:
                assert torch.equal(x[name], y[name]), name
    assert any(b["loss_mask"][b["latent_mask"]].sum() > 0 for b in full[0])
