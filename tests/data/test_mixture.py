"""Loader over real MDS shards written by preprocessing: round trip, resume, DP resharding, mixture."""

import json
import os

import numpy as np
import pytest
import torch

from latentlm_mcore.data.mixture import DocumentReader, LoaderConfig, MixtureConfig, PackedLoader, StreamMixture
from latentlm_mcore.data.packing import BATCH_FIELDS
from latentlm_mcore.data.preprocess import document_tokens, load_image
from latentlm_mcore.data.schema import RawDocument, read_manifest
from latentlm_mcore.data.tokenizer import load_tokenizer

NATURAL = {"text": 40, "pair": 50, "interleaved": 30}  # the fixture's sizes: every document once per epoch


def mixture(dataset, cache, name, **kw):
    return StreamMixture(MixtureConfig(dataset_root=dataset, cache_dir=os.path.join(cache, name), **kw))


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in BATCH_FIELDS:
            assert torch.equal(x[name], y[name]), name


def test_round_trip_raw_to_packed(dataset, raw_documents, image_root, vae_checkpoint, cache_dir):
    from latentlm_mcore.vae import load_sigma_vae

    _, raw = raw_documents
    raw_by_id = {d["id"]: d for d in raw}
    manifest = read_manifest(dataset)
    assert manifest["documents_written"] == NATURAL and manifest["documents_rejected"] == {}
    assert manifest["latent_stats"]["from"] == "computed_over_dataset"
    mix = mixture(dataset, cache_dir, "rt", proportions=dict(NATURAL))
    assert mix.epoch_size == 120
    loader = PackedLoader(mix, LoaderConfig(seq_length=256, micro_batch_size=1, condition_dropout=0.0))
    pieces = {}
    for seq, _ in loader.sequences():
        for g, a, b in seq.pieces:
            pieces.setdefault(g, [])
        at = 0
        for g, a, b in seq.pieces:
            sl = slice(at, at + b - a)
            pieces[g].append((a, b, seq.fields["tokens"][sl], seq.fields["latents"][sl][seq.fields["latent_mask"][sl]]))
            at += b - a
        if min(pieces) == 0 and max(pieces) >= mix.epoch_size:
            break

    tok = load_tokenizer("cl100k_base")
    vae = load_sigma_vae(vae_checkpoint)
    mean = np.asarray(manifest["latent_stats"]["mean"], np.float32)
    std = np.asarray(manifest["latent_stats"]["std"], np.float32)
    seen = []
    for g in range(mix.epoch_size):
        spans = pieces[g]
        assert spans[0][0] == 0 and all(p[1] == q[0] for p, q in zip(spans, spans[1:]))
        tokens = np.concatenate([t for _, _, t, _ in spans])
        latents = np.concatenate([lat for *_, lat in spans])
        doc_id = mix.document(g)["doc_id"]
        seen.append(doc_id)
        raw_doc = RawDocument(**raw_by_id[doc_id])
        assert np.array_equal(tokens, document_tokens(raw_doc, tok, vae.config.num_latents))
        texts = [s["text"] for s in raw_doc.segments if "text" in s]
        assert tok.decode(tokens) == "".join(texts)
        if raw_doc.image_paths:
            images = np.stack([load_image(p, str(image_root[0]), vae.config.image_size, 10 ** 8)
                               for p in raw_doc.image_paths])
            with torch.no_grad():
                mu = vae.encode(torch.from_numpy(images)).numpy().reshape(-1, vae.config.latent_dim)
            expected = (mu.astype(np.float16).astype(np.float32) - mean) / std
            assert np.allclose(latents, expected, atol=1e-4)
        else:
            assert len(latents) == 0
    assert sorted(seen) == sorted(raw_by_id), "one epoch delivers every document exactly once"


def test_resume_same_layout_and_tp_peers(dataset, cache_dir):
    cfg = dict(seq_length=96, micro_batch_size=2, dp_world_size=2, condition_dropout=0.3)
    full = {r: batches(PackedLoader(mixture(dataset, cache_dir, f"full{r}"), LoaderConfig(dp_rank=r, **cfg)), 6)
            for r in range(2)}
    # A tensor-parallel peer of DP rank 0 reads by itself and gets identical batches.
    assert_same(full[0], batches(PackedLoader(mixture(dataset, cache_dir, "tp-peer"), LoaderConfig(dp_rank=0, **cfg)), 6))
    assert not torch.equal(full[0][0]["tokens"], full[1][0]["tokens"])

    loaders = {r: PackedLoader(mixture(dataset, cache_dir, f"a{r}"), LoaderConfig(dp_rank=r, **cfg)) for r in range(2)}
    first = {r: batches(loaders[r], 3) for r in range(2)}
    states = json.loads(json.dumps([loaders[r].state_dict() for r in range(2)]))  # as a checkpoint stores them
    for r in range(2):
        resumed = PackedLoader(mixture(dataset, cache_dir, f"b{r}"), LoaderConfig(dp_rank=r, **cfg))
        resumed.load_state_dict(states)
        assert_same(full[r], first[r] + batches(resumed, 3))


def test_resume_at_other_dp_sizes_repeats_and_skips_nothing(dataset, cache_dir):
    """DP=2 -> DP=1 (the issue's case), then DP=1 -> DP=3 -> DP=1, each rank stopping after its own number of
    sequences (ranks stop mid-document, unevenly). Every document up to the last one reached must arrive
    whole, exactly once."""
    cfg = dict(seq_length=80, micro_batch_size=1, condition_dropout=0.5)
    layouts = [(2, [4, 7]), (1, [5]), (3, [3, 6, 2]), (1, [12])]
    states, pieces, stopped_mid_document = None, [], False
    for step, (world, stops) in enumerate(layouts):
        new_states = []
        for r, n in enumerate(stops):
            loader = PackedLoader(mixture(dataset, cache_dir, f"l{step}r{r}"),
                                  LoaderConfig(dp_rank=r, dp_world_size=world, **cfg))
            if states is not None:
                loader.load_state_dict(states)
            sequences = loader.sequences()
            for _ in range(n):
                seq, (loader._consumed, loader._offset) = next(sequences)  # as __iter__ does per batch
                pieces.append(seq.pieces)
            new_states.append(json.loads(json.dumps(loader.state_dict())))  # as a checkpoint stores it
            stopped_mid_document |= new_states[-1]["offset"] > 0
        states = new_states
    assert stopped_mid_document

    reader = DocumentReader(mixture(dataset, cache_dir, "reader"), cfg["condition_dropout"])
    cover = covered(pieces)
    last = max(g for seq_pieces in pieces[-12:] for g, _, _ in seq_pieces)
    for g in range(last):
        spans = sorted(cover.get(g, []))
        assert spans, f"document {g} skipped"
        assert spans[0][0] == 0 and spans[-1][1] == len(reader[g].tokens), f"document {g} not whole: {spans}"
        assert all(p[1] == q[0] for p, q in zip(spans, spans[1:])), f"document {g} repeated or gapped: {spans}"
    assert all(g <= last for g in cover)


def covered(pieces_by_seq):
    cover = {}
    for seq_pieces in pieces_by_seq:
        for g, a, b in seq_pieces:
            cover.setdefault(g, []).append((a, b))
    return cover


def test_mixture_is_2_1_1(dataset, cache_dir):
    mix = mixture(dataset, cache_dir, "mix")  # default proportions; data is 40 : 50 : 30
    n = mix.epoch_size
    sources = np.array([mix.source_of(mix.sample_id(g)) for g in range(3 * n)])
    for e in range(3):
        epoch = sources[e * n:(e + 1) * n]
        counts = {s: int(np.sum(epoch == s)) for s in ("text", "pair", "interleaved")}
        assert counts == {"text": n // 2, "pair": n // 4, "interleaved": n // 4}, counts
    # Any window is a random draw from that epoch: within 4 sigma of the target share.
    window = sources[:48]
    for s, p in (("text", 0.5), ("pair", 0.25), ("interleaved", 0.25)):
        k = np.sum(window == s)
        assert abs(k - p * 48) <= 4 * np.sqrt(48 * p * (1 - p)), (s, k)
    assert not np.array_equal(mix.epoch_order(0), mix.epoch_order(1)), "each epoch is reshuffled"


def test_condition_dropout_drops_only_pair_captions(dataset, cache_dir):
    mix = mixture(dataset, cache_dir, "cfg", proportions=dict(NATURAL))
    reader, keep_all = DocumentReader(mix, 0.5), DocumentReader(mix, 0.0)
    ids = mix.ids
    dropped = pairs = 0
    for g in range(mix.epoch_size):
        a, b = reader[g], keep_all[g]
        if a.source != "pair":
            assert np.array_equal(a.tokens, b.tokens)
            continue
        pairs += 1
        if len(a.tokens) < len(b.tokens):
            dropped += 1
            assert np.all(np.isin(a.tokens, [ids.bod, ids.eod, ids.latent, ids.end_of_document]))
            assert np.array_equal(a.latents, b.latents)
        assert np.array_equal(a.tokens, reader[g].tokens), "dropout is a function of the document index"
    assert pairs == 50 and 10 <= dropped <= 40


def test_worker_processes_give_the_same_batches(dataset, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cfg = dict(seq_length=64, micro_batch_size=2, dp_rank=1, dp_world_size=2)
    inline = batches(PackedLoader(mixture(dataset, cache_dir, "w0"), LoaderConfig(num_workers=0, **cfg)), 3)
    workers = batches(PackedLoader(mixture(dataset, cache_dir, "w2"), LoaderConfig(num_workers=2, **cfg)), 3)
    assert_same(inline, workers)


def test_text_and_image_data_from_separate_runs(tmp_path, image_root, vae_checkpoint, cache_dir):
    from latentlm_mcore.data.preprocess import PreprocessConfig, merge_parts, preprocess_part
    from latentlm_mcore.data.tokenizer import write_tiktoken_file

    from .conftest import make_documents, write_jsonl

    rng = np.random.default_rng(4)
    bytes_only = tmp_path / "bytes.tiktoken"
    write_tiktoken_file({bytes([b]): b for b in range(256)}, bytes_only)
    roots = {}
    for name, docs, tokenizer in (("text", make_documents(rng, [], 12, 0, 0), "cl100k_base"),
                                  ("pairs", make_documents(rng, image_root[1], 0, 6, 0), "cl100k_base"),
                                  ("other-tok", make_documents(rng, [], 3, 0, 0), str(bytes_only))):
        write_jsonl(tmp_path / f"{name}.jsonl", docs)
        roots[name] = str(tmp_path / name)
        preprocess_part(PreprocessConfig(inputs=[str(tmp_path / f"{name}.jsonl")], output=roots[name],
                                         image_root=str(image_root[0]), vae_checkpoint=vae_checkpoint,
                                         tokenizer=tokenizer, progress=False))
        merge_parts(roots[name], 1)
    assert read_manifest(roots["text"])["latent_stats"] is None  # text only: nothing to scale

    mix = mixture([roots["text"], roots["pairs"]], cache_dir, "two", proportions={"text": 2, "pair": 1})
    assert mix.manifest["latent_stats"] == read_manifest(roots["pairs"])["latent_stats"]
    loader = PackedLoader(mix, LoaderConfig(seq_length=64, micro_batch_size=4, condition_dropout=0.0))
    batch = next(iter(loader))
    assert batch["latent_mask"].any() and (batch["loss_mask"] > 0).any()
    with pytest.raises(ValueError, match="tokenized with"):
        mixture([roots["pairs"], roots["other-tok"]], cache_dir, "bad", proportions={"text": 2, "pair": 1})
    with pytest.raises(ValueError, match="source 'text' is in both"):
        mixture([roots["text"], roots["other-tok"]], cache_dir, "dup", proportions={"text": 1})
