"""The judge of the spoken-digits demo. Speaker similarity: Resemblyzer's GE2E speaker encoder (ships its
weights), cosine of utterance embeddings. Recognition: pocketsphinx (CMU's US-English acoustic model, shipped in the wheel)
restricted by a JSGF grammar to sequences of the ten digit words. No one here trained it, so its accuracy on
generated or reconstructed speech is an outside opinion; its accuracy on the real espeak-ng speech is the
ceiling those figures are read against."""

import os

import numpy as np
import torch

from latentlm_mcore.demo.speech_corpus import DIGITS, SAMPLE_RATE

DIGIT_GRAMMAR = ("#JSGF V1.0;\ngrammar digits;\npublic <digits> = <digit>+;\n<digit> = "
                 + " | ".join(DIGITS) + ";\n")


class DigitRecognizer:
    """16 kHz mono float waveform -> the digit words pocketsphinx hears, as a space-separated string."""

    def __init__(self):
        from pocketsphinx import Decoder, get_model_path
        model = os.path.join(get_model_path(), "en-us")
        self.decoder = Decoder(hmm=os.path.join(model, "en-us"), dict=os.path.join(model, "cmudict-en-us.dict"),
                               lm=None, loglevel="FATAL")
        self.decoder.add_jsgf_string("digits", DIGIT_GRAMMAR)
        self.decoder.activate_search("digits")

    def __call__(self, wav) -> str:
        wav = wav.detach().cpu().float().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav, np.float32)
        pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""


def recognizer_accuracy(pairs, recognizer: DigitRecognizer | None = None) -> dict:
    """pairs: (16 kHz waveform, reference text). Utterance accuracy (exact word sequence) and word accuracy
    (1 - word error rate, by edit distance)."""
    recognizer = recognizer or DigitRecognizer()
    exact, errors, words = 0, 0, 0
    for wav, text in pairs:
        hyp, ref = recognizer(wav).split(), text.split()
        exact += hyp == ref
        errors += _edit_distance(hyp, ref)
        words += len(ref)
    n = max(len(pairs), 1)
    return {"utterances": len(pairs), "utterance_accuracy": exact / n, "word_accuracy": 1 - errors / max(words, 1)}


def _edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


assert SAMPLE_RATE == 16000  # pocketsphinx's en-us model is a 16 kHz model


class SpeakerSimilarity:
    """Cosine similarity of Resemblyzer utterance embeddings (unit vectors) of two 16 kHz waveforms."""

    def __init__(self):
        from resemblyzer import VoiceEncoder
        self.encoder = VoiceEncoder(device="cpu", verbose=False)
        self._cache = {}  # id(waveform) -> (the waveform, its embedding): a report compares one prompt many times

    def embed(self, wav) -> np.ndarray:
        from resemblyzer import preprocess_wav
        hit = self._cache.get(id(wav))
        if hit is not None and hit[0] is wav:  # the same object (kept alive by the cache, so its id is not reused)
            return hit[1]
        x = wav.detach().cpu().float().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav, np.float32)
        emb = self.encoder.embed_utterance(preprocess_wav(x, source_sr=SAMPLE_RATE))
        if isinstance(wav, torch.Tensor):  # tensors are not changed in place here; arrays may be: not cached
            self._cache[id(wav)] = (wav, emb)
        return emb

    def __call__(self, a, b) -> float:
        return float(np.dot(self.embed(a), self.embed(b)))


def corpus_accuracy(corpus_dir: str, split: str, recognizer: DigitRecognizer | None = None) -> dict:
    """Recognizer accuracy on the real espeak-ng speech of one split of `build_speech_corpus` (the ceiling)."""
    import json
    from latentlm_mcore.data.prep.audio import load_audio
    pairs = []
    with open(os.path.join(corpus_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            text, audio = doc["segments"][-2]["text"], doc["segments"][-1]  # after the voice prompt, if any
            pairs.append((load_audio(os.path.join(corpus_dir, audio["audio"]), SAMPLE_RATE), text))
    return recognizer_accuracy(pairs, recognizer)
