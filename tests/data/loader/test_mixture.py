"""Loader over real MDS shards written by preprocessing: round trip, resume, DP resharding, mixture."""

import json
import os

import numpy as np
import pytest
import torch

from latentlm_mcore.data.loader.packed import DocumentReader, LoaderConfig, PackedLoader
from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture
from latentlm_mcore.data.loader.packing import BATCH_FIELDS
from latentlm_mcore.data.prep.preprocess import document_tokens, load_image
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


@pytest.mark.slow  # over ~10 s (fast-tier measurement, 2026-12-04)
def test_round_trip_raw_to_packed(dataset, raw_documents, image_root, vae_checkpoint, cache_dir):
    from latentlm_mcore.vae import load_sigma_vae

    _, raw = raw_documents
    raw_by_id = {d["id"]: d for d in raw}
    manifest = read_manifest(dataset)
    assert manifest["documents_written"] == NATURAL and manifest["documents_rejected"] == {}
    assert manifest["latent_stats"]["from"] == "computed_over_dataset"
    mix = mixture(dataset, cache_dir, "rt", proportions=dict(NATURAL), unit="documents")
    assert mix.epoch_size == 120
    loader = PackedLoader(mix, LoaderConfig(seq_length=256, micro_batch_size=1, condition_dropout=0.0,
                                            image_first_share=0.0, sample_latents=False))
    pieces = {}
    for block in loader.blocks():
        seq = block.own[0]
        at = 0
        for g, a, b in seq.pieces:
            sl = slice(at, at + b - a)
            pieces.setdefault(g, []).append((a, b, seq.fields["tokens"][sl],
                                             seq.fields["latents"][sl][seq.fields["latent_mask"][sl]]))
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


def sequences_of(batch):
    return [{name: batch[name][i] for name in BATCH_FIELDS if name != "noise_seed"} | {"noise_seed": batch["noise_seed"][i]}
            for i in range(len(batch["tokens"]))]


def assert_same_sequences(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for name in BATCH_FIELDS:
            assert torch.equal(x[name], y[name]), f"sequence {i}: {name}"


def test_global_stream_is_one_sequence_order_under_any_dp_layout_and_resume(dataset, cache_dir):
    """Issue 15 item 4: the sequences of step t are [t·B, (t+1)·B) of one global stream, whatever the DP size
    and micro-batch; a run stopped at DP=2 and resumed at DP=1, then at DP=3, consumes exactly the
    uninterrupted stream (every document whole, exactly once)."""
    cfg = dict(seq_length=80, condition_dropout=0.5)
    reference = [s for b in batches(PackedLoader(mixture(dataset, cache_dir, "ref"),
                                                 LoaderConfig(micro_batch_size=1, **cfg)), 36) for s in sequences_of(b)]

    def rank_batches(tag, world, mbs, n, states=None):
        out, new_states = [], []
        for r in range(world):
            loader = PackedLoader(mixture(dataset, cache_dir, f"{tag}{r}"),
                                  LoaderConfig(micro_batch_size=mbs, dp_rank=r, dp_world_size=world, **cfg))
            if states is not None:
                loader.load_state_dict(states)
            out.append(batches(loader, n))
            new_states.append(json.loads(json.dumps(loader.state_dict())))  # as a checkpoint stores them
        # step k's global batch: rank 0's micro-batch k, then rank 1's, ... (Megatron's global sample order)
        return [s for k in range(n) for r in range(world) for s in sequences_of(out[r][k])], new_states

    got, states = rank_batches("dp2-", world=2, mbs=2, n=3)  # 12 sequences
    assert_same_sequences(got, reference[:12])
    assert states[0]["offset"] > 0 or states[0]["sequence"] == 12
    more, states = rank_batches("dp1-", world=1, mbs=3, n=4, states=states)  # 12 more
    assert_same_sequences(more, reference[12:24])
    rest, _ = rank_batches("dp3-", world=3, mbs=1, n=4, states=states)  # 12 more
    assert_same_sequences(rest, reference[24:36])
    with pytest.raises(ValueError, match="not a multiple of micro-batch 5"):
        PackedLoader(mixture(dataset, cache_dir, "odd"), LoaderConfig(micro_batch_size=5, **cfg)).load_state_dict(states)

    # sample-id accounting over the whole stream: every document up to the last one reached arrives whole, once
    loader = PackedLoader(mixture(dataset, cache_dir, "acct"), LoaderConfig(micro_batch_size=1, **cfg))
    blocks = loader.blocks()
    layouts = [next(blocks).layouts[0] for _ in range(36)]
    reader = DocumentReader(mixture(dataset, cache_dir, "reader"), cfg["condition_dropout"])
    cover = covered(layouts)
    last = max(g for pieces in layouts for g, _, _ in pieces)
    for g in range(last):
        spans = sorted(cover.get(g, []))
        assert spans, f"document {g} skipped"
        assert spans[0][0] == 0 and spans[-1][1] == len(reader[g].tokens), f"document {g} not whole: {spans}"
        assert all(p[1] == q[0] for p, q in zip(spans, spans[1:])), f"document {g} repeated or gapped: {spans}"
    assert any(len(spans) > 1 for spans in cover.values()), "some documents span two sequences"


def test_layout_index_gives_the_documents_shapes_without_reading_them(dataset, cache_dir):
    """Every rank lays out the whole global stream; it does so from preprocessing's layout index (lengths and
    image runs), which must agree with the documents as the reader delivers them (pair direction and caption
    dropout included), and give the same batches as laying out from the documents themselves."""
    from latentlm_mcore.data.loader.packing import image_runs

    mix = mixture(dataset, cache_dir, "shape")
    assert all(mix.layouts[s] is not None for s in mix.sources)
    reader = DocumentReader(mix, condition_dropout=0.5)
    for g in range(2 * mix.epoch_size):
        shape, doc = reader.shape(g), reader[g]
        assert (shape.source, shape.length) == (doc.source, doc.length), g
        assert np.array_equal(shape.runs, image_runs(doc.tokens, mix.ids)), g
    cfg = LoaderConfig(seq_length=64, micro_batch_size=2, dp_rank=1, dp_world_size=2, condition_dropout=0.5)
    indexed = batches(PackedLoader(mix, cfg), 8)
    no_index = mixture(dataset, cache_dir, "no-index")
    no_index.layouts = {s: None for s in no_index.sources}  # a dataset preprocessed before the index
    assert_same(indexed, batches(PackedLoader(no_index, cfg), 8))


def covered(pieces_by_seq):
    cover = {}
    for seq_pieces in pieces_by_seq:
        for g, a, b in seq_pieces:
            cover.setdefault(g, []).append((a, b))
    return cover


def test_mixture_ratio_is_a_token_share_by_default(dataset, cache_dir):
    """Issue 11 item 6: 2:1:1 of tokens by default (pairs are short: 2:1:1 of documents gives them far less
    than a quarter of the tokens); the loader logs the realised share; documents stay an option."""
    target = {"text": 0.5, "pair": 0.25, "interleaved": 0.25}
    by_docs = mixture(dataset, cache_dir, "docs", unit="documents")
    n = by_docs.epoch_size
    sources = np.array([by_docs.source_of(by_docs.sample_id(g)) for g in range(3 * n)])
    for e in range(3):
        epoch = sources[e * n:(e + 1) * n]
        counts = {s: int(np.sum(epoch == s)) for s in ("text", "pair", "interleaved")}
        assert counts == {"text": n // 2, "pair": n // 4, "interleaved": n // 4}, counts
    assert not np.array_equal(by_docs.epoch_order(0), by_docs.epoch_order(1)), "each epoch is reshuffled"

    shares = {}
    for unit in ("tokens", "documents"):
        loader = PackedLoader(mixture(dataset, cache_dir, f"share-{unit}", unit=unit),
                              LoaderConfig(seq_length=128, micro_batch_size=4, condition_dropout=0.0))
        batches(loader, 40)  # ~3 epochs of documents
        shares[unit] = loader.token_share()
        assert sum(shares[unit].values()) == pytest.approx(1.0)
    print(f"\nrealised token shares: {shares}")
    for s, p in target.items():
        assert abs(shares["tokens"][s] - p) < 0.05, (s, shares["tokens"])
    assert shares["documents"]["pair"] < 0.2, "counting documents starves the short pairs of tokens"
    tokens_mix = mixture(dataset, cache_dir, "w", unit="tokens")
    from latentlm_mcore.data.loader.mixture import expected_token_shares
    assert expected_token_shares(tokens_mix.weights, tokens_mix.statistics) == pytest.approx(target)


def test_condition_dropout_drops_only_caption_first_pair_captions(dataset, cache_dir):
    mix = mixture(dataset, cache_dir, "cfg", proportions=dict(NATURAL), unit="documents")
    reader, keep_all = DocumentReader(mix, 0.5, image_first_share=0.0), DocumentReader(mix, 0.0, image_first_share=0.0)
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


def test_pairs_are_emitted_both_ways(dataset, cache_dir):
    """Issue 11 item 7: half the pairs (configurable) come image -> caption, deterministically per document."""
    assert LoaderConfig(seq_length=8, micro_batch_size=1).image_first_share == 0.5
    mix = mixture(dataset, cache_dir, "dir", proportions=dict(NATURAL), unit="documents")
    ids = mix.ids
    caption_first = DocumentReader(mix, 0.0, image_first_share=0.0)
    both, again = DocumentReader(mix, 0.0), DocumentReader(mix, 0.0)
    image_first = 0
    for g in range(mix.epoch_size):
        a, b = both[g], caption_first[g]
        assert np.array_equal(a.tokens, again[g].tokens), "the direction is a function of the document"
        if a.source != "pair":
            assert np.array_equal(a.tokens, b.tokens)
            continue
        assert b.tokens[0] != ids.bod, "caption -> image starts with the caption"
        if a.tokens[0] == ids.bod:
            image_first += 1
            run = len(b.tokens) - 1 - int(np.flatnonzero(b.tokens == ids.bod)[0])
            caption = b.tokens[:-1 - run]
            assert np.array_equal(a.tokens, np.concatenate([b.tokens[len(caption):-1], caption, [ids.end_of_document]]))
        else:
            assert np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(a.latents, b.latents)
    assert 15 <= image_first <= 35, image_first  # 50 pairs, share 0.5
    assert all(DocumentReader(mix, 0.0, image_first_share=1.0)[g].tokens[0] == ids.bod
               for g in range(mix.epoch_size) if mix.source_of(mix.sample_id(g)) == "pair")
    # a pair stored image-first (like the demo corpus's image -> caption documents) is turned round too
    from latentlm_mcore.data.loader.packed import _orient_pair
    stored = np.array([ids.bod, ids.latent, ids.latent, ids.eod, 7, 8, ids.end_of_document], np.int32)
    assert _orient_pair(stored, ids, image_first=False).tolist() == [7, 8, ids.bod, ids.latent, ids.latent, ids.eod,
                                                                     ids.end_of_document]
    assert np.array_equal(_orient_pair(stored, ids, image_first=True), stored)


def test_the_lm_sees_sigma_vae_samples_drawn_per_document(dataset, vae_checkpoint, cache_dir):
    """Issue 11 item 2: z = μ + σ·ε per image, from the document's seed: the same z as input and as diffusion
    target, the same in every layout (test above) and on every read; C_σ comes from the σ-VAE file."""
    from latentlm_mcore.vae import load_sigma_vae

    c_sigma = load_sigma_vae(vae_checkpoint).config.c_sigma
    assert read_manifest(dataset)["vae"]["c_sigma"] == c_sigma > 0
    cfg = dict(seq_length=256, micro_batch_size=1, condition_dropout=0.0)
    mix = mixture(dataset, cache_dir, "z", proportions=dict(NATURAL), unit="documents")
    sampled = batches(PackedLoader(mix, LoaderConfig(**cfg)), 30)
    assert_same(sampled, batches(PackedLoader(mixture(dataset, cache_dir, "z2", proportions=dict(NATURAL),
                                                      unit="documents"), LoaderConfig(**cfg)), 30))
    means = batches(PackedLoader(mixture(dataset, cache_dir, "mu", proportions=dict(NATURAL), unit="documents"),
                                 LoaderConfig(sample_latents=False, **cfg)), 30)
    std = float(mix.latent_std[0])
    sigmas = []
    for z, mu in zip(sampled, means):
        assert torch.equal(z["latent_mask"], mu["latent_mask"]) and torch.equal(z["tokens"], mu["tokens"])
        mask = z["diffusion_mask"][0].bool()
        assert torch.equal(z["diffusion_targets"][0][mask], z["latents"][0][1:][mask[:-1]]), "target = input z"
        noise = (z["latents"][0] - mu["latents"][0])[z["latent_mask"][0]] * std  # σ·ε in μ units
        for image in noise.reshape(-1, mix.tokens_per_image, mix.latent_dim):
            sigmas.append(float(image.std()))
    assert len(sigmas) > 30
    # |σ| = |n|·C_σ/0.8 with n ~ N(0, 1): mean 0.9974·C_σ
    assert np.mean(sigmas) == pytest.approx(0.9974 * c_sigma, rel=0.25), np.mean(sigmas)
    assert np.std(sigmas) > 0.2 * c_sigma, "σ varies per image"


def test_worker_processes_give_the_same_batches(dataset, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cfg = dict(seq_length=64, micro_batch_size=2, dp_rank=1, dp_world_size=2)
    inline = batches(PackedLoader(mixture(dataset, cache_dir, "w0"), LoaderConfig(num_workers=0, **cfg)), 3)
    workers = batches(PackedLoader(mixture(dataset, cache_dir, "w2"), LoaderConfig(num_workers=2, **cfg)), 3)
    assert_same(inline, workers)


def test_text_and_image_data_from_separate_runs(tmp_path, image_root, vae_checkpoint, cache_dir):
    from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
    from latentlm_mcore.data.tokenizer import write_tiktoken_file

    from tests.data.conftest import make_documents, write_jsonl

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
