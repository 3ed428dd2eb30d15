"""The python stages of scripts/classcond_demo.sh: class-conditional LatentLM on scikit-learn's digits.

    python -m latentlm_mcore.demo.classcond digits      --out DIR --image-size 16
    python -m latentlm_mcore.demo.classcond reconstruct --vae sigma_vae.pt --images DIR/heldout --out DIR/recon
    python -m latentlm_mcore.demo.classcond real-subset --images DIR/train --per-class 100 --out DIR/real_train
    python -m latentlm_mcore.demo.classcond report      --run DIR --output bench/results/classcond_demo.json \
                                                         --grid docs/classcond_digits.png

- `digits`: the 1,797 digits (8x8, upscaled by `corpus.load_digit_images`: bicubic, dark ink on white) as
  image folders `train/<digit>/NNNN.png` and `heldout/<digit>/NNNN.png` (every tenth digit held out, the
  quickstart's split), the layout `data_prep/convert.py imagefolder` reads.
- `reconstruct`: each held-out digit through the σ-VAE (encode to μ, decode), same folder layout: the FID
  floor, what the model could reach if it drew the σ-VAE's latents of real digits exactly.
- `real-subset`: the first N training digits of each class, as many images as each generated set: real data
  scored at the generated sets' sample count (FID is biased upwards the fewer images it gets, so the 180
  reconstructions' FID and a 1,000-image set's are not on one scale; this anchor is).
- `report`: the digit classifier's accuracy per requested class on every sample set (`tools/generate.py
  --task class-to-image` output: `samples.json` prompts "class N", `images/NNN.png`) and on the real and
  reconstructed held-out digits, beside the FIDs `tools/evaluate_images.py` wrote; one JSON without machine
  paths, and a grid of generated digits (a row per requested class).
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
from PIL import Image

from latentlm_mcore.demo.corpus import DemoCorpusConfig, is_heldout_digit, load_digit_images
from latentlm_mcore.demo.quality import DigitClassifier
from latentlm_mcore.runtime.files import write_text_atomic

DONE = "done.json"
SPLITS = ("train", "heldout")
# sample sets of the demo, in the report's order: (name, what it is)
SAMPLE_SETS = {
    "cfg3": "trained model (EMA weights), classifier-free guidance 3",
    "cfg1": "trained model (EMA weights), no guidance (CFG 1)",
    "init": "the same architecture at initialisation, CFG 3: the FID ceiling",
}
REFERENCE_SETS = {
    "real_heldout": "the held-out real digits (the FID reference)",
    "reconstruction": "σ-VAE reconstructions of the held-out digits: the FID floor",
    "real_train": "real training digits, as many per class as each generated set: the floor at their count",
}
# folder of each reference set inside the demo's run folder
REFERENCE_FOLDERS = {"real_heldout": os.path.join("digits", "heldout"), "reconstruction": "recon",
                     "real_train": "real_train"}


# ------------------------------------------------------------------------------------------------- folders

def write_digit_folders(out: str, image_size: int, heldout_every: int = DemoCorpusConfig.heldout_every) -> dict:
    """`out/{train,heldout}/<digit>/NNNN.png` (RGB) and `out/done.json` last, so a rerun skips a complete set."""
    images, labels = load_digit_images(image_size)
    cfg = DemoCorpusConfig(out=out, image_size=image_size, heldout_every=heldout_every)
    counts = {s: 0 for s in SPLITS}
    for i, (img, label) in enumerate(zip(images, labels)):
        split = "heldout" if is_heldout_digit(i, cfg) else "train"
        folder = os.path.join(out, split, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:04d}.png")
        if not os.path.exists(path):
            tmp = path + ".tmp.png"
            Image.fromarray(img, mode="L").convert("RGB").save(tmp)
            os.replace(tmp, path)
        counts[split] += 1
    summary = {"image_size": image_size, "heldout_every": heldout_every, "images": counts}
    write_text_atomic(os.path.join(out, DONE), json.dumps(summary, indent=2) + "\n")
    return summary


def labelled_images(folder: str) -> list[tuple[str, int]]:
    """(path, digit) of every `folder/<digit>/*.png`, sorted."""
    rows = []
    for digit in sorted(os.listdir(folder)):
        if not digit.isdigit():
            continue
        for name in sorted(os.listdir(os.path.join(folder, digit))):
            if name.endswith(".png"):
                rows.append((os.path.join(folder, digit, name), int(digit)))
    if not rows:
        raise ValueError(f"{folder}: no <digit>/*.png images")
    return rows


# ------------------------------------------------------------------------------------------ reconstruction

def reconstruct(vae_path: str, images: str, out: str, batch_size: int = 256) -> int:
    """Each `images/<digit>/X.png` encoded to μ and decoded by the σ-VAE, written to `out/<digit>/X.png`."""
    import torch

    from latentlm_mcore.vae.data import to_tensor
    from latentlm_mcore.vae.model import load_sigma_vae

    vae = load_sigma_vae(vae_path)
    rows = labelled_images(images)
    size = vae.config.image_size
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = []
        for path, _ in chunk:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    raise ValueError(f"{path} is {img.size[0]}x{img.size[1]}, the σ-VAE reads {size}x{size}")
                batch.append(to_tensor(img))
        with torch.no_grad():
            decoded = vae.decode(vae.encode(torch.stack(batch))).float()
        pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for (path, digit), array in zip(chunk, pixels):
            folder = os.path.join(out, str(digit))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(array).save(os.path.join(folder, os.path.basename(path)))
    write_text_atomic(os.path.join(out, DONE), json.dumps({"images": len(rows)}) + "\n")
    return len(rows)


def real_subset(images: str, per_class: int, out: str) -> int:
    """The first `per_class` images of each `images/<digit>/`, copied to `out/<digit>/`; `out/done.json` last."""
    import shutil

    rows = labelled_images(images)
    by_class: dict[int, list[str]] = {}
    for path, digit in rows:
        by_class.setdefault(digit, []).append(path)
    short = {d: len(paths) for d, paths in by_class.items() if len(paths) < per_class}
    if short:
        raise ValueError(f"{images}: fewer than {per_class} images in class(es) {short} (class: images)")
    for digit, paths in sorted(by_class.items()):
        folder = os.path.join(out, str(digit))
        os.makedirs(folder, exist_ok=True)
        for path in paths[:per_class]:
            shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    count = per_class * len(by_class)
    write_text_atomic(os.path.join(out, DONE), json.dumps({"images": count, "per_class": per_class}) + "\n")
    return count


# -------------------------------------------------------------------------------------------------- report

def sample_labels(folder: str) -> tuple[list[str], list[int]]:
    """Image paths and requested classes of a `tools/generate.py --task class-to-image` output folder."""
    with open(os.path.join(folder, "samples.json")) as f:
        samples = json.load(f)
    paths, wanted = [], []
    for i, s in enumerate(samples):
        match = re.fullmatch(r"class (\d+)", s["prompt"])
        if not match:
            raise ValueError(f"{folder}/samples.json entry {i}: prompt {s['prompt']!r} is not 'class N'")
        if s.get("num_images", 1) != 1:  # generate.py numbers images across samples: the rest would shift
            raise ValueError(f"{folder}/samples.json entry {i}: {s['num_images']} images, not 1 per class prompt; "
                             f"images/NNN.png would no longer line up with their prompts")
        path = os.path.join(folder, "images", f"{i:03d}.png")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: generated image {i} missing ({path})")
        paths.append(path)
        wanted.append(int(match.group(1)))
    return paths, wanted


def class_accuracy(classifier: DigitClassifier, paths: list[str], wanted: list[int]) -> dict:
    """Share of images the classifier reads as their class, overall and per class."""
    predicted = classifier.predict(paths)
    wanted = np.asarray(wanted)
    correct = predicted == wanted
    return {"accuracy": float(correct.mean()), "images": len(paths),
            "per_class": {str(c): float(correct[wanted == c].mean()) for c in sorted(set(wanted.tolist()))}}


def _fid(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    return {k: result[k] for k in ("fid", "num_images", "num_reference", "precision", "recall") if k in result}


def write_grid(folder: str, output: str, per_row: int = 10, scale: int = 4, gap: int = 2) -> None:
    """The first `per_row` generated images of each requested class, one row per class (0 at the top)."""
    paths, wanted = sample_labels(folder)
    rows: dict[int, list[str]] = {}
    for path, c in zip(paths, wanted):
        if len(rows.setdefault(c, [])) < per_row:
            rows[c].append(path)
    with Image.open(paths[0]) as first:
        w, h = first.size
    cell_w, cell_h = w * scale + gap, h * scale + gap
    grid = Image.new("RGB", (per_row * cell_w + gap, len(rows) * cell_h + gap), (170, 170, 170))
    for r, c in enumerate(sorted(rows)):
        for col, path in enumerate(rows[c]):
            with Image.open(path) as img:
                tile = img.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (gap + col * cell_w, gap + r * cell_h))
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    tmp = output + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, output)


def build_report(run: str, settings: dict) -> dict:
    """Classifier accuracy and FID of every set of `run` (the script's folder layout), no machine paths."""
    with open(os.path.join(run, "digits", DONE)) as f:
        digits = json.load(f)
    classifier = DigitClassifier(digits["image_size"], digits["heldout_every"])
    sets = {}
    for name, paths_wanted in [(n, None) for n in REFERENCE_SETS] + \
                              [(n, sample_labels(os.path.join(run, "samples", n))) for n in SAMPLE_SETS]:
        if paths_wanted is None:
            rows = labelled_images(os.path.join(run, REFERENCE_FOLDERS[name]))
            paths_wanted = ([p for p, _ in rows], [d for _, d in rows])
        entry = {"what": REFERENCE_SETS[name] if name in REFERENCE_SETS else SAMPLE_SETS[name]}
        fid_file = os.path.join(run, "fid", f"{name}.json")
        if os.path.isfile(fid_file):
            entry.update(_fid(fid_file))
        entry["class_accuracy"] = class_accuracy(classifier, *paths_wanted)
        sets[name] = entry
    return {"settings": settings, "digits": digits, "classifier_heldout_accuracy": classifier.heldout_accuracy,
            "sets": sets}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("digits", help="the digits as image folders train/<digit>/ and heldout/<digit>/")
    d.add_argument("--out", required=True)
    d.add_argument("--image-size", type=int, required=True, help="the σ-VAE's input size")
    r = sub.add_parser("reconstruct", help="σ-VAE reconstructions of an image folder")
    r.add_argument("--vae", required=True)
    r.add_argument("--images", required=True)
    r.add_argument("--out", required=True)
    sub_ = sub.add_parser("real-subset", help="the first N images of each class of an image folder")
    sub_.add_argument("--images", required=True)
    sub_.add_argument("--per-class", type=int, required=True)
    sub_.add_argument("--out", required=True)
    rep = sub.add_parser("report", help="classifier accuracy + FIDs -> JSON, and the grid PNG")
    rep.add_argument("--run", required=True, help="the demo's folder (CLASSCOND_DIR)")
    rep.add_argument("--output", required=True)
    rep.add_argument("--grid", required=True)
    rep.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                     help="a run setting recorded in the report (repeat)")
    args = p.parse_args(argv)
    if args.stage == "digits":
        print(json.dumps(write_digit_folders(args.out, args.image_size)))
    elif args.stage == "reconstruct":
        print(f"reconstructed {reconstruct(args.vae, args.images, args.out)} images -> {args.out}")
    elif args.stage == "real-subset":
        print(f"copied {real_subset(args.images, args.per_class, args.out)} real digits -> {args.out}")
    else:
        settings = {}
        for item in args.setting:
            key, sep, value = item.partition("=")
            if not sep:
                p.error(f"--setting {item!r}: expected KEY=VALUE")
            settings[key] = int(value) if value.isdigit() else value
        report = build_report(args.run, settings)
        write_text_atomic(args.output, json.dumps(report, indent=2) + "\n")
        write_grid(os.path.join(args.run, "samples", "cfg3"), args.grid)
        for name, entry in report["sets"].items():
            print(f"{name:15s} FID {entry.get('fid', float('nan')):7.1f}  "
                  f"class accuracy {100 * entry['class_accuracy']['accuracy']:5.1f}%")
        print(f"wrote {args.output} and {args.grid}")


if __name__ == "__main__":
    main()
