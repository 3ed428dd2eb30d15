"""Preprocessing: hostile input, the job-array split + merge through the CLI, crash and re-run."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from latentlm_mcore.data import schema
from latentlm_mcore.data.prep import preprocess
from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
from latentlm_mcore.data.streaming_compat import import_streaming

from tests.conftest import REPO as _REPO
from tests.data.conftest import make_documents

REPO = str(_REPO)


def read_shards(folder, cache):
    """Every sample of one merged source folder, read back through streaming."""
    ds = import_streaming().StreamingDataset(remote=folder, local=cache, shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


@pytest.fixture
def hostile(tmp_path, image_root):
    """Good documents mixed with one document for each way input can be bad."""
    src_root, names = image_root
    root = tmp_path / "images"
    shutil.copytree(src_root, root)
    photo = (root / "photo0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (root / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "empty.png").write_bytes(b"")
    Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400 Mpixel, a few kB on disk
    (tmp_path / "outside.jpg").write_bytes(photo)
    os.symlink(tmp_path / "outside.jpg", root / "link_out.jpg")

    rng = np.random.default_rng(1)
    good = make_documents(rng, names, n_text=4, n_pair=3, n_interleaved=3, prefix="good-")

    def doc(i, *segments, source="interleaved"):
        return json.dumps({"id": f"bad-{i}", "source": source, "segments": list(segments)})

    text = {"text": "a caption"}
    bad = {  # line -> expected reason
        '{"id": "broken", "source": "text", "segments": [': schema.INVALID_JSON,
        "\udcff not json at all": schema.INVALID_JSON,
        "[1, 2, 3]": schema.INVALID_SCHEMA,
        json.dumps({"id": 7, "source": "text", "segments": [text]}): schema.INVALID_SCHEMA,
        json.dumps({"id": "bad-src", "source": "video", "segments": [text]}): schema.INVALID_SCHEMA,
        doc("seg", text, {"audio": "x.wav"}): schema.INVALID_SCHEMA,
        '{"id": "bad-surrogate", "source": "text", "segments": [{"text": "a \\ud800 b"}]}': schema.INVALID_SCHEMA,
        doc("empty", source="text"): schema.EMPTY_DOCUMENT,
        doc("empty-text", {"text": ""}, source="text"): schema.EMPTY_DOCUMENT,
        doc("missing", text, {"image": "no/such.jpg"}): schema.IMAGE_MISSING,
        doc("dotdot", text, {"image": "../outside.jpg"}): schema.IMAGE_OUTSIDE_ROOT,
        doc("abs", text, {"image": "/etc/hostname"}): schema.IMAGE_OUTSIDE_ROOT,
        doc("symlink", text, {"image": "link_out.jpg"}): schema.IMAGE_OUTSIDE_ROOT,
        doc("garbage", text, {"image": "garbage.jpg"}): schema.IMAGE_UNREADABLE,
        doc("zero-bytes", text, {"image": "empty.png"}): schema.IMAGE_UNREADABLE,
        doc("truncated", text, {"image": "truncated.jpg"}): schema.IMAGE_TRUNCATED,
        doc("bomb", {"image": "bomb.png"}, text, source="pair"): schema.IMAGE_TOO_LARGE,
        # The bad image is the second one: nothing of the document may be written.
        doc("late-bad", text, {"image": names[0]}, {"image": "truncated.jpg"}): schema.IMAGE_TRUNCATED,
    }
    lines = [json.dumps(d) for d in good] + list(bad)
    order = rng.permutation(len(lines))
    raw = tmp_path / "raw"
    raw.mkdir()
    with open(raw / "hostile.jsonl", "w", encoding="utf-8", errors="surrogateescape") as f:
        for i in order:
            f.write(lines[i] + "\n")
        f.write("\n")  # blank lines are not documents
    return raw, root, good, bad


@pytest.mark.slow  # over ~10 s (fast-tier measurement, 2026-12-04)
def test_hostile_input_through_the_cli_job_array(hostile, vae_checkpoint, tmp_path):
    raw, root, good, bad = hostile
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=REPO)
    cli = [sys.executable, os.path.join(REPO, "tools", "preprocess_interleaved.py"), "--output", str(out),
           "--num-shards", "2"]
    procs = [subprocess.Popen(cli + ["--input", str(raw / "*.jsonl"), "--image-root", str(root), "--vae",
                                     vae_checkpoint, "--shard-index", str(k), "--batch-images", "4", "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, 9)
    assert all(p.returncode == 0 for p in procs), logs
    merged = subprocess.run(cli + ["--merge"], env=env, capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr

    manifest = schema.read_manifest(str(out))
    expected = Counter(bad.values())
    assert manifest["documents_rejected"] == dict(expected)
    assert manifest["documents_written"] == dict(Counter(d["source"] for d in good))
    rejects = [json.loads(line) for f in sorted((out / "parts").glob("*.rejects.jsonl")) for line in open(f)]
    assert Counter(r["reason"] for r in rejects) == expected
    assert {r["id"] for r in rejects if r["id"].startswith("bad-")} == \
        {json.loads(line)["id"] for line in bad if line.startswith('{"id": "bad-')}
    assert all(r["detail"] for r in rejects)

    by_id = {d["id"]: d for d in good}
    arrived = []
    for source in manifest["sources"]:
        for sample in read_shards(str(out / source), str(tmp_path / "cache" / source)):
            arrived.append(sample["doc_id"])
            n_images = len([s for s in by_id[sample["doc_id"]]["segments"] if "image" in s])
            latents = schema.decode_latents(sample["latents"], manifest["latent_dim"])
            assert latents.shape[0] == n_images * manifest["tokens_per_image"]
            assert np.all(np.isfinite(latents))
    assert sorted(arrived) == sorted(by_id)


@pytest.mark.slow  # over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_crashed_part_leaves_nothing_visible_and_rerun_finishes(raw_documents, image_root, vae_checkpoint, tmp_path,
                                                                monkeypatch):
    raw, docs = raw_documents
    out = tmp_path / "out"

    def cfg(k):
        return PreprocessConfig(inputs=[str(raw / "a.jsonl")], output=str(out), image_root=str(image_root[0]),
                                vae_checkpoint=vae_checkpoint, num_shards=2, shard_index=k, batch_images=4,
                                shard_size_limit=1 << 14, progress=False)

    done0 = preprocess_part(cfg(0))
    mtime0 = os.path.getmtime(out / "parts" / "part-00000-of-00002.json")

    calls = {"n": 0}
    real_tokens = preprocess.document_tokens

    def dying(*a, **kw):  # the task is killed after 20 documents
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real_tokens(*a, **kw)

    monkeypatch.setattr(preprocess, "document_tokens", dying)
    with pytest.raises(KeyboardInterrupt):
        preprocess_part(cfg(1))
    monkeypatch.setattr(preprocess, "document_tokens", real_tokens)
    assert not (out / "parts" / "part-00001-of-00002.json").exists()
    assert not any(p.name == "part-00001-of-00002" for p in out.glob("*/*")), "no partial part may be visible"
    with pytest.raises(FileNotFoundError, match="part-00001-of-00002"):
        merge_parts(str(out), 2)

    assert preprocess_part(cfg(0)) == done0  # finished part: skipped
    assert os.path.getmtime(out / "parts" / "part-00000-of-00002.json") == mtime0
    preprocess_part(cfg(1))
    manifest = merge_parts(str(out), 2)
    assert sum(manifest["documents_written"].values()) == 70
    ids = [s["doc_id"] for src in manifest["sources"]
           for s in read_shards(str(out / src), str(tmp_path / "cache" / src))]
    assert sorted(ids) == sorted(d["id"] for d in docs[:70])


def test_a_second_task_on_a_part_being_written_is_refused(raw_documents, image_root, vae_checkpoint, tmp_path):
    from latentlm_mcore.runtime.lease import LeaseHeld
    from tests.runtime.test_lease import start_holder

    raw, _ = raw_documents
    out = tmp_path / "out"
    cfg = PreprocessConfig(inputs=[str(raw / "a.jsonl")], output=str(out), image_root=str(image_root[0]),
                           vae_checkpoint=vae_checkpoint, num_shards=4, shard_index=1, progress=False)
    holder = start_holder(out / "parts", "plain", "part-00001-of-00004.lease")  # a live task on part 1
    try:
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            preprocess_part(cfg)
        assert sorted(p.name for p in out.rglob("*")) == ["part-00001-of-00004.lease", "parts"]
    finally:
        holder.communicate("\n", timeout=30)
    assert preprocess_part(cfg)["part"] == "part-00001-of-00004"
