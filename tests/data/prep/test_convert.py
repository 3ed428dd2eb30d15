"""Converters: each public format -> raw JSONL that preprocessing accepts whole."""

import io
import json
import os
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.convert import main as convert_cli
from latentlm_mcore.data.prep import convert
from latentlm_mcore.data.prep.preprocess import PreprocessConfig, load_image, merge_parts, preprocess_part
from latentlm_mcore.data.schema import parse_raw_line


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def sources(tmp_path, image_root):
    src_root, names = image_root
    jpg = (src_root / "photo0.jpg").read_bytes()
    png = (src_root / "crop1.png").read_bytes()
    root = tmp_path / "images"
    (root / "downloaded").mkdir(parents=True)
    (root / "downloaded" / "d0.png").write_bytes((src_root / "digits" / "0.png").read_bytes())
    (root / "mmc4_0.jpg").write_bytes(jpg)

    (tmp_path / "book.txt").write_text("Once upon a time.\nThe end.")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "web.jsonl").write_text(
        json.dumps({"id": "w1", "text": "web page one"}) + "\n" + json.dumps({"text": "page two"}) + "\n"
        + json.dumps({"title": "no text"}) + "\n" + "{not json\n")

    with tarfile.open(tmp_path / "pairs-000.tar", "w") as tar:
        add(tar, "s0.jpg", jpg)
        add(tar, "s0.txt", b"a photo of a temple")
        add(tar, "s1.png", png)
        add(tar, "s1.json", json.dumps({"caption": "a flower"}).encode())
        add(tar, "s2.txt", b"caption without image")
        add(tar, "s3.jpg", jpg)  # image without caption
        add(tar, "../../evil.jpg", jpg)  # hostile member name: must stay under the image root
        add(tar, "../../evil.txt", b"escaping caption")

    url_map = tmp_path / "urls.jsonl"
    url_map.write_text(json.dumps({"url": "http://x/d0.png", "path": "downloaded/d0.png"}) + "\n")
    # OBELICS proper: images are URLs (downloaded beforehand); variants carry {bytes, path} structs.
    pq.write_table(pa.table({
        "texts": [["intro", None, "middle", None, "end"], ["only text", None]],
        "images": [[None, "http://x/d0.png", None, "http://x/unknown.jpg", None], [None, "http://x/unknown.jpg"]],
    }), tmp_path / "obelics-urls.parquet")
    pq.write_table(pa.table({
        "texts": [["a flower:", None, "nice"]],
        "images": [[None, {"bytes": png, "path": "p.png"}, None]],
    }), tmp_path / "obelics-bytes.parquet")

    (tmp_path / "mmc4.jsonl").write_text(json.dumps({
        "url": "http://page/1", "text_list": ["First sentence.", "Second one.", "Third."],
        "image_info": [{"image_name": "mmc4_0.jpg", "matched_text_index": 1},
                       {"image_name": "missing.jpg", "raw_url": "http://nope", "matched_text_index": 0}]}) + "\n"
        + "garbage line\n")
    return tmp_path, root, url_map


def test_each_converter(sources, image_root):
    d, root, url_map = sources
    src_root = image_root[0]
    skipped = Counter()
    text = list(convert.convert_text([str(d / "book.txt"), str(d / "blank.txt"), str(d / "web.jsonl")], skipped))
    assert [t["id"] for t in text] == ["book.txt", "w1", "web.jsonl:2"]
    assert text[0]["segments"] == [{"text": "Once upon a time.\nThe end."}]
    assert skipped == {"text_empty": 1, "text_line_unusable": 2}

    skipped = Counter()
    pairs = list(convert.convert_webdataset([str(d / "pairs-000.tar")], str(root), skipped))
    assert {p["segments"][0]["text"] for p in pairs} == {"a photo of a temple", "a flower", "escaping caption"}
    assert skipped == {"pair_without_image": 1, "pair_without_caption": 1}
    for p in pairs:
        full = os.path.realpath(root / p["segments"][1]["image"])
        assert full.startswith(os.path.realpath(root) + os.sep)
    first = next(p for p in pairs if p["segments"][0]["text"] == "a photo of a temple")
    assert (root / first["segments"][1]["image"]).read_bytes() == (src_root / "photo0.jpg").read_bytes()

    skipped = Counter()
    obelics = list(convert.convert_obelics([str(d / "obelics-bytes.parquet"), str(d / "obelics-urls.parquet")],
                                           str(root), skipped, convert.load_url_map(str(url_map))))
    assert len(obelics) == 2
    assert [next(iter(s)) for s in obelics[0]["segments"]] == ["text", "image", "text"]
    assert (root / obelics[0]["segments"][1]["image"]).read_bytes() == (src_root / "crop1.png").read_bytes()
    assert obelics[1]["segments"] == [{"text": "intro"}, {"image": "downloaded/d0.png"}, {"text": "middle"},
                                      {"text": "end"}]
    assert skipped == {"image_not_available_locally": 2, "interleaved_without_text_or_image": 1}

    skipped = Counter()
    mmc4 = list(convert.convert_mmc4([str(d / "mmc4.jsonl")], str(root), skipped))
    assert mmc4 == [{"id": "http://page/1", "source": "interleaved",
                     "segments": [{"text": "First sentence."}, {"image": "mmc4_0.jpg"}, {"text": " Second one."},
                                  {"text": " Third."}]}]
    assert skipped == {"image_not_available_locally": 1, "mmc4_line_unusable": 1}


def test_cli_outputs_preprocess_whole(sources, vae_checkpoint, capsys):
    d, root, url_map = sources
    raw = d / "raw"
    raw.mkdir()
    convert_cli(["text", "--input", str(d / "*.txt"), str(d / "web.jsonl"), "--output", str(raw / "text.jsonl")])
    convert_cli(["webdataset", "--input", str(d / "*.tar"), "--image-root", str(root), "--output", str(raw / "pairs.jsonl")])
    convert_cli(["obelics", "--input", str(d / "*.parquet"), "--image-root", str(root), "--url-map", str(url_map),
                 "--output", str(raw / "obelics.jsonl")])
    convert_cli(["mmc4", "--input", str(d / "mmc4.jsonl"), "--image-root", str(root), "--output", str(raw / "mmc4.jsonl")])
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["documents"] for r in reports] == [3, 3, 2, 1]

    n = 0
    for f in sorted(raw.glob("*.jsonl")):
        for line in open(f):
            doc = parse_raw_line(line)
            for p in doc.image_paths:
                assert load_image(p, str(root), 32, 10 ** 8).shape == (3, 32, 32)
            n += 1
    assert n == 9
    out = d / "out"
    preprocess_part(PreprocessConfig(inputs=[str(raw / "*.jsonl")], output=str(out), image_root=str(root),
                                     vae_checkpoint=vae_checkpoint, progress=False))
    manifest = merge_parts(str(out), 1)
    assert manifest["documents_written"] == {"text": 3, "pair": 3, "interleaved": 3}
    assert manifest["documents_rejected"] == {}
    assert manifest["images_written"] == 3 + 2 + 1
