"""Class-labelled images: the imagefolder converter, class tokens, flips and the reject reasons of class data."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.convert import main as convert_cli
from latentlm_mcore.data import schema
from latentlm_mcore.data.prep import convert
from latentlm_mcore.data.prep.preprocess import PreprocessConfig, load_image, merge_parts, preprocess_part
from latentlm_mcore.data.tokenizer import load_tokenizer

from tests.data.prep.test_preprocess import read_shards


@pytest.fixture
def tree(tmp_path, image_root):
    """An ImageNet-style train/<wnid>/*.JPEG tree with the usual debris."""
    src, _ = image_root
    train = tmp_path / "train"
    for wnid, files in {"n02085620": ["photo0.jpg", "crop1.png"], "n01440764": ["photo1.jpg"],
                        "n09999999": []}.items():
        (train / wnid).mkdir(parents=True)
        for i, name in enumerate(files):
            (train / wnid / f"{wnid}_{i}.JPEG").write_bytes((src / name).read_bytes())
    (train / "n01440764" / "README.txt").write_text("not an image")
    (train / "n01440764" / ".DS_Store").write_bytes(b"\0")
    (train / "stray.JPEG").write_bytes((src / "photo0.jpg").read_bytes())  # a file beside the class folders
    return train


def test_imagefolder_labels_sorted_folders_and_counts_what_it_skips(tree, tmp_path):
    skipped = Counter()
    docs = list(convert.convert_imagefolder(str(tree), skipped))
    assert [(d["id"], d["label"]) for d in docs] == [("n01440764/n01440764_0.JPEG", 0),
                                                     ("n02085620/n02085620_0.JPEG", 1),
                                                     ("n02085620/n02085620_1.JPEG", 1)]
    assert docs[0] == {"id": "n01440764/n01440764_0.JPEG", "source": "class", "label": 0,
                       "segments": [{"image": "n01440764/n01440764_0.JPEG"}]}
    assert skipped == {"not_an_image_file": 1, "class_folder_without_images": 1}
    for d in docs:  # every line is valid raw JSONL
        assert schema.parse_raw_line(json.dumps(d)).label == d["label"]


def test_imagefolder_class_index_both_layouts_and_bad_indices(tree, tmp_path):
    imagenet_style = tmp_path / "imagenet_class_index.json"
    imagenet_style.write_text(json.dumps({"0": ["n01440764", "tench"], "151": ["n02085620", "Chihuahua"],
                                          "7": ["n01514859", "hen"]}))
    skipped = Counter()
    docs = list(convert.convert_imagefolder(str(tree), skipped, convert.load_class_index(str(imagenet_style))))
    assert sorted({(d["id"].split("/")[0], d["label"]) for d in docs}) == [("n01440764", 0), ("n02085620", 151)]
    assert skipped["class_without_folder"] == 1 and skipped["folder_not_in_class_index"] == 1  # hen / n09999999

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"n01440764": 3, "n02085620": 4, "n09999999": 5}))
    assert convert.load_class_index(str(plain)) == {"n01440764": 3, "n02085620": 4, "n09999999": 5}
    for bad, says in [({"n1": -1}, "'n1'"), ({"n1": True}, "'n1'"), ({"x": ["n1"]}, "'x'"), ([1, 2], "object"),
                      ({"n1": 0, "n2": 0}, "label 0"), ({"0": ["n1"], "n1": 5}, "two labels")]:
        plain.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=says):
            convert.load_class_index(str(plain))


def test_imagefolder_cli_writes_jsonl_relative_to_the_image_root(tree, tmp_path, capsys):
    out = tmp_path / "classes.jsonl"
    convert_cli(["imagefolder", "--input", str(tree), "--image-root", str(tree.parent), "--output", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["segments"][0]["image"] for d in lines][0] == "train/n01440764/n01440764_0.JPEG"
    assert json.loads(capsys.readouterr().out)["documents"] == 3
    with pytest.raises(ValueError, match="not inside the image root"):
        list(convert.convert_imagefolder(str(tree), Counter(), image_root=str(tmp_path / "elsewhere")))


def test_class_documents_schema_rejects_bad_labels():
    ok = {"id": "a", "source": "class", "label": 3, "segments": [{"image": "x.png"}]}
    assert schema.parse_raw_line(json.dumps(ok)).label == 3
    cases = [({"label": "3"}, schema.INVALID_SCHEMA, "integer 'label'"),
             ({"label": True}, schema.INVALID_SCHEMA, "integer 'label'"),
             ({"label": 2.0}, schema.INVALID_SCHEMA, "integer 'label'"),
             ({"label": None}, schema.INVALID_SCHEMA, "integer 'label'"),
             ({"label": -1}, schema.LABEL_OUT_OF_RANGE, "negative"),
             ({"segments": [{"image": "x.png"}, {"image": "y.png"}]}, schema.INVALID_SCHEMA, "exactly one image"),
             ({"segments": [{"text": "a dog"}, {"image": "y.png"}]}, schema.INVALID_SCHEMA, "exactly one image"),
             ({"segments": [{"text": "a dog"}]}, schema.INVALID_SCHEMA, "exactly one image")]
    for change, reason, says in cases:
        with pytest.raises(schema.RejectedDocument, match=says) as e:
            schema.parse_raw_line(json.dumps({**ok, **change}))
        assert e.value.reason == reason and e.value.doc_id == "a"
    with pytest.raises(schema.RejectedDocument, match="belongs to source 'class'"):
        schema.parse_raw_line(json.dumps({"id": "b", "source": "pair", "label": 1,
                                          "segments": [{"text": "t"}, {"image": "x.png"}]}))


def test_class_vocabulary_ids():
    tok = load_tokenizer("classes:1000")
    assert tok.vocab_size == 1024  # the ImageNet presets' vocabulary
    assert (tok.null_class_id, tok.bod_id, tok.eod_id, tok.latent_id, tok.end_of_document_id, tok.pad_id) == \
        (1000, 1001, 1002, 1003, 1004, 1005)
    assert tok.describe()["special_ids"]["<NULL_CLASS>"] == 1000 and tok.spec == "classes:1000"
    assert load_tokenizer("classes:10").vocab_size == 64
    with pytest.raises(ValueError, match="no ids for text"):
        tok.encode("a dog")
    with pytest.raises(ValueError, match="classes:N"):
        load_tokenizer("classes:many")


def _class_docs(tree, tmp_path, extra=()):
    docs = list(convert.convert_imagefolder(str(tree), Counter()))
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in [*docs, *extra]))
    return docs, path


def test_preprocess_writes_class_token_first_and_flips_as_a_second_latent_set(tree, tmp_path, vae_checkpoint,
                                                                               cache_dir):
    from latentlm_mcore.vae import load_sigma_vae

    (tmp_path / "outside.JPEG").write_bytes((tree / "n01440764" / "n01440764_0.JPEG").read_bytes())
    os.symlink(tmp_path / "outside.JPEG", tree / "n01440764" / "escape.JPEG")  # a link leaving the image root
    hostile = [{"id": "big", "source": "class", "label": 1000, "segments": [{"image": "n01440764/n01440764_0.JPEG"}]},
               {"id": "neg", "source": "class", "label": -2, "segments": [{"image": "n01440764/n01440764_0.JPEG"}]},
               {"id": "word", "source": "class", "label": "dog", "segments": [{"image": "n01440764/n01440764_0.JPEG"}]},
               {"id": "gone", "source": "class", "label": 2, "segments": [{"image": "n01440764/missing.JPEG"}]}]
    docs, raw = _class_docs(tree, tmp_path, hostile)
    assert "n01440764/escape.JPEG" in [d["id"] for d in docs]
    out = tmp_path / "data"
    for hflip, folder in ((False, out / "plain"), (True, out / "flip")):
        preprocess_part(PreprocessConfig(inputs=[str(raw)], output=str(folder), image_root=str(tree),
                                         vae_checkpoint=vae_checkpoint, tokenizer="classes:1000", hflip=hflip,
                                         progress=False))
        manifest = merge_parts(str(folder), 1)
        assert manifest["documents_written"] == {"class": 3} and manifest["hflip"] is hflip
        assert manifest["documents_rejected"] == {schema.LABEL_OUT_OF_RANGE: 2, schema.INVALID_SCHEMA: 1,
                                                  schema.IMAGE_MISSING: 1, schema.IMAGE_OUTSIDE_ROOT: 1}
        assert manifest["images_written"] == 3
    rejects = [json.loads(line) for line in open(out / "flip" / "parts" / f"{schema.part_name(0, 1)}.rejects.jsonl")]
    assert {r["id"]: r["reason"] for r in rejects}["big"] == schema.LABEL_OUT_OF_RANGE
    assert "1000 classes" in {r["id"]: r["detail"] for r in rejects}["big"]

    vae = load_sigma_vae(vae_checkpoint).eval()
    n, d = vae.config.num_latents, vae.config.latent_dim
    plain = read_shards(str(out / "plain" / "class"), cache_dir + "/p")
    flip = read_shards(str(out / "flip" / "class"), cache_dir + "/f")
    labels = {"n01440764/n01440764_0.JPEG": 0, "n02085620/n02085620_0.JPEG": 1, "n02085620/n02085620_1.JPEG": 1}
    for p, f in zip(plain, flip):
        assert p["doc_id"] == f["doc_id"] and p["source"] == "class"
        assert list(p["tokens"]) == [labels[p["doc_id"]], 1001, *[1003] * n, 1002, 1004]
        assert (p["tokens"] == f["tokens"]).all()
        z, zf = schema.decode_latents(p["latents"], d), schema.decode_latents(f["latents"], d)
        assert z.shape == (n, d) and zf.shape == (2 * n, d)
        np.testing.assert_array_equal(zf[:n], z)  # the image first, then its mirror
        image = load_image(p["doc_id"], str(tree), vae.config.image_size, 1 << 26)
        with torch.no_grad():
            mirror = vae.encode(torch.from_numpy(image[None, :, :, ::-1].copy())).float().numpy()[0]
        np.testing.assert_allclose(zf[n:].astype(np.float32), mirror, atol=2e-3, rtol=2e-3)  # float16 storage


def test_class_data_with_a_text_tokenizer_fails_naming_the_fix(tree, tmp_path, vae_checkpoint):
    _, raw = _class_docs(tree, tmp_path)
    with pytest.raises(ValueError, match="--tokenizer classes:N"):
        preprocess_part(PreprocessConfig(inputs=[str(raw)], output=str(tmp_path / "out"), image_root=str(tree),
                                         vae_checkpoint=vae_checkpoint, tokenizer="cl100k_base:1000", progress=False))
