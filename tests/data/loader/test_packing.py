import numpy as np

from latentlm_mcore.data.loader.packing import (BATCH_FIELDS, IMAGE_RUN_TOO_LONG, PackableDocument, SpecialIds, collate,
                                         pack_documents)

IDS = SpecialIds(bod=1000, eod=1001, latent=1002, end_of_document=1003, pad=1004)
D = 3


def make_doc(index, rng, num_latents):
    tokens, latents = [], []
    for _ in range(int(rng.integers(0, 4))):
        tokens += list(rng.integers(0, 1000, int(rng.integers(0, 15))))
        tokens += [IDS.bod] + [IDS.latent] * num_latents + [IDS.eod]
        latents.append(rng.normal(size=(num_latents, D)))
    tokens += list(rng.integers(0, 1000, int(rng.integers(1, 20)))) + [IDS.end_of_document]
    doc = PackableDocument(index=index, source="interleaved", tokens=np.asarray(tokens, np.int32),
                           latents=np.concatenate(latents).astype(np.float32) if latents else np.zeros((0, D), np.float32))
    doc.mark_runs(IDS)
    return doc


def pack(docs, s, n, position=(0, 0, None)):
    out = []
    for _ in range(n):
        seq, position = pack_documents(lambda pos: docs[pos], s, D, IDS, seed=7, position=position)
        out.append(seq)
    return out, position


def test_packing_keeps_every_token_and_never_splits_an_image_run():
    rng = np.random.default_rng(0)
    docs = [make_doc(i, rng, num_latents=int(rng.choice([4, 9]))) for i in range(300)]
    docs[5] = make_doc(5, np.random.default_rng(1), num_latents=30)  # its run (32) > s
    while docs[5].longest_run() == 0:
        docs[5] = make_doc(5, np.random.default_rng(int(rng.integers(1 << 30))), num_latents=30)
    s = 24
    seqs, _ = pack(docs, s, 150)
    assert any(seq.skipped == [(5, IMAGE_RUN_TOO_LONG)] for seq in seqs)

    rebuilt = {}
    for seq in seqs:
        f = seq.fields
        tok = f["tokens"]
        # Image runs are whole inside each sequence.
        depth = np.cumsum(tok == IDS.bod) - np.cumsum(tok == IDS.eod)
        assert depth.min() == 0 and depth[-1] == 0
        assert np.all(depth[tok == IDS.latent] == 1)
        at = 0
        for g, a, b in seq.pieces:
            piece = slice(at, at + b - a)
            assert np.array_equal(tok[piece], docs[g].tokens[a:b])
            rebuilt.setdefault(g, []).append((a, b, f["latents"][piece][tok[piece] == IDS.latent]))
            at += b - a
        assert np.all(tok[at:] == IDS.pad)
    last = max(rebuilt)
    for g in range(last):  # every document before the last one reached arrives whole, in order
        if g == 5:
            assert g not in rebuilt
            continue
        spans = rebuilt[g]
        assert spans[0][0] == 0 and spans[-1][1] == len(docs[g].tokens)
        assert all(p[1] == q[0] for p, q in zip(spans, spans[1:]))
        assert np.allclose(np.concatenate([lat for *_, lat in spans]), docs[g].latents)


def test_batch_contract_fields():
    rng = np.random.default_rng(3)
    docs = [make_doc(i, rng, 4) for i in range(50)]
    seqs, _ = pack(docs, 32, 6)
    for seq in seqs:
        f = seq.fields
        tok = f["tokens"]
        assert set(f) == set(BATCH_FIELDS)
        assert np.array_equal(f["labels"][:-1], tok[1:])
        nxt = tok[1:]
        assert np.array_equal(f["loss_mask"][:-1], ((nxt != IDS.latent) & (nxt != IDS.pad)).astype(np.float32))
        assert f["loss_mask"][-1] == 0
        assert np.array_equal(f["latent_mask"], tok == IDS.latent)
        assert np.array_equal(f["diffusion_mask"][:-1], (nxt == IDS.latent).astype(np.float32))
        assert np.array_equal(f["diffusion_targets"][:-1], f["latents"][1:])
        assert np.all(f["latents"][~f["latent_mask"]] == 0)
        # <BOD> precedes the first latent: it predicts it by diffusion; <EOD> is an ordinary target.
        assert np.all(f["diffusion_mask"][tok == IDS.bod] == 1)
        assert np.all(f["loss_mask"][np.flatnonzero(tok == IDS.eod) - 1] == 1)
        assert np.array_equal(f["position_ids"], np.arange(32))
    batch = collate(seqs[:4])
    assert batch["tokens"].shape == (4, 32) and batch["latents"].shape == (4, 32, D)
    assert batch["noise_seed"].shape == (4,)
    assert len(set(batch["noise_seed"].tolist())) == 4


def test_resuming_from_a_position_reproduces_the_sequences():
    rng = np.random.default_rng(5)
    docs = [make_doc(i, rng, 4) for i in range(80)]
    straight, _ = pack(docs, 20, 12)
    first, position = pack(docs, 20, 5)
    rest, _ = pack(docs, 20, 7, position=(position[0], position[1], None))  # document re-read from its index
    for a, b in zip(straight, first + rest):
        for name in BATCH_FIELDS:
            assert np.array_equal(a.fields[name], b.fields[name]), name
