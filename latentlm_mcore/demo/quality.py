"""Quality checks of a model trained on the demo corpus (scripts/quickstart.sh).

- Text -> image: a digit classifier (an RBF SVM, scikit-learn's `SVC`) trained on the real training digits
  at the σ-VAE's resolution names the digit in each generated image; the score is the share that matches
  the digit the caption asked for. The classifier's own accuracy on the held-out real digits is reported
  beside it, as the ceiling.
- Image -> text: the share of generated captions of held-out real digits that name the right digit.
- Text: cross-entropy of the exported model on the held-out stdlib documents, against the same
  architecture at initialisation.

The inputs are what the tools write: the corpus folder of `data_prep/demo_corpus.py`, the output folders of
`tools/generate.py` (`samples.json` + `images/NNN.png`) and the folder of `tools/convert_ckpt_to_hf.py`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image

from latentlm_mcore.demo.corpus import (COMPLETE_MARKER, DemoCorpusConfig, caption_label, is_heldout_digit,
                                             load_digit_images)


def _corpus_config(corpus: str) -> DemoCorpusConfig:
    with open(os.path.join(corpus, COMPLETE_MARKER)) as f:
        settings = json.load(f)["config"]
    settings["digits_per_interleaved"] = tuple(settings["digits_per_interleaved"])
    return DemoCorpusConfig(out=corpus, **settings)


def _features(gray_uint8: np.ndarray) -> np.ndarray:
    """[n, S, S] grey levels (white paper) -> [n, S*S] ink in [0, 1]."""
    return 1.0 - gray_uint8.reshape(len(gray_uint8), -1).astype(np.float64) / 255.0


class DigitClassifier:
    """An SVM on the real training digits (those `is_heldout_digit` leaves in), at `image_size` pixels."""

    def __init__(self, image_size: int, heldout_every: int = DemoCorpusConfig.heldout_every):
        from sklearn.svm import SVC

        cfg = DemoCorpusConfig(out="", image_size=image_size, heldout_every=heldout_every)
        self.image_size = image_size
        images, labels = load_digit_images(image_size)
        held = np.array([is_heldout_digit(i, cfg) for i in range(len(labels))])
        self.svm = SVC().fit(_features(images[~held]), labels[~held])
        self.heldout_accuracy = float((self.svm.predict(_features(images[held])) == labels[held]).mean())
        self.heldout_count = int(held.sum())

    def predict(self, paths: list[str]) -> np.ndarray:
        images = []
        for path in paths:
            with Image.open(path) as img:
                img = img.convert("L")
                if img.size != (self.image_size, self.image_size):
                    img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
                images.append(np.asarray(img))
        return self.svm.predict(_features(np.stack(images)))

    @classmethod
    def for_corpus(cls, corpus: str) -> "DigitClassifier":
        """The classifier at the resolution and split of a `data_prep/demo_corpus.py` folder."""
        cfg = _corpus_config(corpus)
        return cls(cfg.image_size, cfg.heldout_every)


def _read_samples(folder: str) -> list[dict]:
    with open(os.path.join(folder, "samples.json")) as f:
        return json.load(f)


def text_to_image_accuracy(classifier: DigitClassifier, folder: str) -> dict:
    """Share of generated images (tools/generate.py --task text-to-image output) that the classifier reads
    as the digit their caption names; plus a confusion count per requested digit."""
    samples = _read_samples(folder)
    wanted = [caption_label(s["prompt"]) for s in samples]
    if any(w is None for w in wanted):
        raise ValueError(f"{folder}: a prompt names no digit: {[s['prompt'] for s in samples]}")
    paths = [os.path.join(folder, "images", f"{i:03d}.png") for i in range(len(samples))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} generated image(s) missing, e.g. {missing[0]}")
    predicted = classifier.predict(paths)
    correct = predicted == np.asarray(wanted)
    return {"accuracy": float(correct.mean()), "images": len(paths),
            "per_digit": {str(d): float(correct[np.asarray(wanted) == d].mean())
                          for d in sorted(set(wanted))},
            "predicted": predicted.tolist(), "requested": wanted}


def image_to_text_accuracy(corpus: str, folder: str) -> dict:
    """Share of generated captions (tools/generate.py --task image-to-text output) that name the digit the
    corpus's caption of that image names."""
    truth = heldout_image_labels(corpus)
    samples = _read_samples(folder)
    rows = []
    for s in samples:
        key = os.path.realpath(s["prompt"])
        if key not in truth:
            raise ValueError(f"{s['prompt']} is not a held-out digit of {corpus}")
        rows.append((truth[key], caption_label(s["text"]), s["text"]))
    correct = [want == got for want, got, _ in rows]
    return {"accuracy": float(np.mean(correct)), "captions": len(rows),
            "examples": [{"digit": want, "text": text} for want, _, text in rows]}


def heldout_image_labels(corpus: str) -> dict[str, int]:
    """{real path of a held-out digit image: its digit}, from the corpus's held-out caption -> image pairs."""
    labels = {}
    with open(os.path.join(corpus, "heldout", "pair.jsonl")) as f:
        for line in f:
            doc = json.loads(line)
            text = next(s["text"] for s in doc["segments"] if "text" in s)
            image = next(s["image"] for s in doc["segments"] if "image" in s)
            labels[os.path.realpath(os.path.join(corpus, "images", image))] = caption_label(text)
    return labels


def heldout_examples(corpus: str) -> list[str]:
    """One held-out digit image per class (the first of each), as paths: the quickstart's image -> text inputs."""
    first: dict[int, str] = {}
    for path, digit in heldout_image_labels(corpus).items():
        first.setdefault(digit, path)
    return [first[d] for d in sorted(first)]


def heldout_text_loss(hf_folder: str, corpus: str, max_tokens: int = 20_000) -> dict:
    """Mean next-token cross-entropy (nats) on the held-out text documents, each laid out as in training
    (`<END_OF_DOCUMENT>` before, text ids, `<END_OF_DOCUMENT>` after) and cut to the model's context; for the
    exported model and for the same architecture at initialisation. Stops after `max_tokens` targets."""
    import torch

    import latentlm_mcore.hf  # noqa: F401  (transformers beside a broken torchvision)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)  # the one exported with the model
    end_of_document = tokenizer.convert_tokens_to_ids("<END_OF_DOCUMENT>")
    trained = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True).eval()
    config = AutoConfig.from_pretrained(hf_folder, trust_remote_code=True)
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()
    context = int(getattr(config, "max_position_embeddings", 256))

    sequences, total = [], 0
    with open(os.path.join(corpus, "heldout", "text.jsonl")) as f:
        for line in f:
            text = json.loads(line)["segments"][0]["text"]
            ids = [end_of_document, *tokenizer.encode(text, add_special_tokens=False), end_of_document][:context]
            sequences.append(ids)
            total += len(ids) - 1
            if total >= max_tokens:
                break

    def loss(model) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for ids in sequences:
                x = torch.tensor([ids])
                logits = model(input_ids=x).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                count += len(ids) - 1
        return nll / count

    end, start = loss(trained), loss(initial)
    return {"start": start, "end": end, "tokens": total, "documents": len(sequences),
            "start_ppl": math.exp(start), "end_ppl": math.exp(end)}
