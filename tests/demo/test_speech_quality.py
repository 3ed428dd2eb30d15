import pytest
import soundfile as sf
import torch

from latentlm_mcore.demo.speech_corpus import speak
from latentlm_mcore.demo.speech_quality import DigitRecognizer, _edit_distance, recognizer_accuracy


def test_edit_distance():
    assert _edit_distance("one two three".split(), "one three".split()) == 1
    assert _edit_distance([], "one".split()) == 1 and _edit_distance("a b".split(), "a b".split()) == 0


@pytest.mark.slow
def test_recognizer_hears_espeak_digits_and_not_noise(tmp_path):
    rec = DigitRecognizer()
    pairs = []
    for text in ("three nine", "one five two", "eight four"):
        speak(text, "en-us", 175, str(tmp_path / "x.wav"))
        wav, rate = sf.read(tmp_path / "x.wav", dtype="float32")
        assert rate == 16000
        pairs.append((torch.from_numpy(wav), text))
    acc = recognizer_accuracy(pairs, rec)
    assert acc["utterances"] == 3 and acc["word_accuracy"] >= 2 / 3
    # white noise is not a digit sequence: the grammar-bound decoder cannot reproduce the reference
    noise = recognizer_accuracy([(0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(0)), "three nine")], rec)
    assert noise["utterance_accuracy"] == 0.0


@pytest.mark.slow
def test_speaker_similarity_same_voice_above_different_voice(tmp_path):
    from latentlm_mcore.demo.speech_quality import SpeakerSimilarity
    sim = SpeakerSimilarity()

    def say(text, voice):
        speak(text, voice, 175, str(tmp_path / "s.wav"))
        return torch.from_numpy(sf.read(tmp_path / "s.wav", dtype="float32")[0])

    a, b = say("three nine one five", "en-us"), say("eight two seven six", "en-us")
    c = say("eight two seven six", "en-us+f3")
    assert abs(sim(a, a) - 1.0) < 1e-5
    assert sim(a, b) > sim(a, c)


def test_speaker_embeddings_are_cached_per_waveform_object():
    """A report compares one prompt with many utterances: the same tensor is embedded once, another one (even
    with equal samples) again; numpy arrays, which may change in place, are never cached."""
    import numpy as np
    from latentlm_mcore.demo.speech_quality import SpeakerSimilarity

    class CountingEncoder:
        calls = 0

        def embed_utterance(self, wav):
            CountingEncoder.calls += 1
            return np.ones(4) / 2.0

    sim = SpeakerSimilarity.__new__(SpeakerSimilarity)  # no Resemblyzer weights: a stand-in encoder
    sim.encoder, sim._cache = CountingEncoder(), {}
    wav = 0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    assert sim(wav, wav) == pytest.approx(1.0) and CountingEncoder.calls == 1
    sim(wav, wav.clone())
    assert CountingEncoder.calls == 2
    sim.embed(wav.numpy())
    sim.embed(wav.numpy())
    assert CountingEncoder.calls == 4
