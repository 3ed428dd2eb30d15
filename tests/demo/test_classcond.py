"""latentlm_mcore/demo/classcond.py: the digits folders, the per-class accuracy, the grid, bad sample folders."""
import json

import pytest
from PIL import Image

from latentlm_mcore.demo import classcond
from latentlm_mcore.demo.quality import DigitClassifier


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, classcond.write_digit_folders(str(out), image_size=16)


def test_digit_folders_split_every_tenth_digit_by_class(digits):
    out, summary = digits
    assert summary["images"] == {"train": 1617, "heldout": 180}  # 1,797 digits, indices 0, 10, ... held out
    rows = classcond.labelled_images(str(out / "heldout"))
    assert len(rows) == 180 and {d for _, d in rows} == set(range(10))
    assert all(int(p.split("/")[-1][:4]) % 10 == 0 for p, _ in rows)
    with Image.open(rows[0][0]) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    assert json.loads((out / classcond.DONE).read_text())["image_size"] == 16


def test_real_subset_takes_the_first_n_of_each_class_and_refuses_a_short_class(digits, tmp_path):
    out, _ = digits
    n = classcond.real_subset(str(out / "train"), 3, str(tmp_path / "sub"))
    rows = classcond.labelled_images(str(tmp_path / "sub"))
    assert n == len(rows) == 30
    want = {d: sorted(p.split("/")[-1] for p, c in classcond.labelled_images(str(out / "train")) if c == d)[:3]
            for d in range(10)}
    assert {d: sorted(p.split("/")[-1] for p, c in rows if c == d) for d in range(10)} == want
    assert (tmp_path / "sub" / "0" / want[0][0]).read_bytes() == (out / "train" / "0" / want[0][0]).read_bytes()
    with pytest.raises(ValueError, match=r"fewer than 1000 images in class"):
        classcond.real_subset(str(out / "train"), 1000, str(tmp_path / "big"))


def test_class_accuracy_per_class_reads_real_digits_and_catches_wrong_labels(digits):
    out, _ = digits
    classifier = DigitClassifier(16)
    paths, wanted = zip(*classcond.labelled_images(str(out / "heldout")))
    right = classcond.class_accuracy(classifier, list(paths), list(wanted))
    assert right["accuracy"] == pytest.approx(classifier.heldout_accuracy) and right["accuracy"] > 0.9
    assert sorted(right["per_class"]) == [str(c) for c in range(10)]
    shifted = classcond.class_accuracy(classifier, list(paths), [(w + 1) % 10 for w in wanted])
    assert shifted["accuracy"] < 0.1


def _sample_folder(tmp_path, digits_out, prompts):
    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    rows = classcond.labelled_images(str(digits_out / "heldout"))
    for i, prompt in enumerate(prompts):
        Image.open(rows[i][0]).save(folder / "images" / f"{i:03d}.png")
    (folder / "samples.json").write_text(json.dumps([{"prompt": p} for p in prompts]))
    return folder


def test_grid_has_a_row_per_requested_class(digits, tmp_path):
    folder = _sample_folder(tmp_path, digits[0], ["class 3", "class 3", "class 7"])
    assert classcond.sample_labels(str(folder))[1] == [3, 3, 7]
    classcond.write_grid(str(folder), str(tmp_path / "grid.png"), per_row=2, scale=2, gap=1)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 33 + 1, 2 * 33 + 1)  # 2 classes x 2 columns of 16px drawn at 2x + gaps


def test_a_sample_folder_with_a_foreign_prompt_or_a_missing_image_is_named(digits, tmp_path):
    folder = _sample_folder(tmp_path, digits[0], ["class 1", "a cat"])
    with pytest.raises(ValueError, match="entry 1: prompt 'a cat'"):
        classcond.sample_labels(str(folder))
    (folder / "samples.json").write_text(json.dumps([{"prompt": "class 1"}] * 3))
    with pytest.raises(FileNotFoundError, match="generated image 2 missing"):
        classcond.sample_labels(str(folder))
    (folder / "samples.json").write_text(json.dumps([{"prompt": "class 1", "num_images": 1},
                                                     {"prompt": "class 1", "num_images": 0}]))
    with pytest.raises(ValueError, match="entry 1: 0 images, not 1"):
        classcond.sample_labels(str(folder))
