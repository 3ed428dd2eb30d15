"""Speech preprocessing (prep/speech.py): the document layout, batched encoding equal to one at a time (causal
right-padding), hostile audio rejected by reason with the rest kept, provenance of the audio σ-VAE."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from latentlm_mcore.data import schema
from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
from latentlm_mcore.data.prep.speech import SpeechEncoding
from latentlm_mcore.data.schema import decode_latents, read_manifest
from latentlm_mcore.data.streaming_compat import import_streaming
from latentlm_mcore.data.tokenizer import load_tokenizer, sha256_file
from latentlm_mcore.vae.audio_model import load_audio_vae


def _docs(path):
    return [json.loads(line) for line in open(path)]


def _samples(mds):
    ds = import_streaming().StreamingDataset(local=str(mds / "speech"), shuffle=False, batch_size=1)
    return {ds[i]["doc_id"]: ds[i] for i in range(len(ds))}


@pytest.mark.slow  # the session speech_dataset fixture (espeak-ng corpus, audio σ-VAE, preprocessing): over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_speech_documents_are_prompt_text_target(speech_dataset):
    m = read_manifest(speech_dataset.mds)
    docs = {d["id"]: d for d in _docs(speech_dataset.raw)}
    assert m["documents_written"] == {"speech": len(docs)} and m["documents_rejected"] == {}
    assert m["vae"]["kind"] == "audio" and m["vae"]["sha256"] == sha256_file(speech_dataset.audio_vae)
    assert m["tokens_per_image"] is None and m["latent_dim"] == 16 and m["latent_stats"]["from"] == "vae_checkpoint"
    tok = load_tokenizer("cl100k_base:8192")
    vae = load_audio_vae(speech_dataset.audio_vae)
    hop, rate = vae.config.hop_length, vae.config.sample_rate
    for doc_id, sample in _samples(speech_dataset.mds).items():
        doc = docs[doc_id]
        voice, text, audio = doc["segments"]
        target = sf.read(speech_dataset.corpus / audio["audio"], dtype="float32")[0]
        prompt = sf.read(speech_dataset.corpus / voice["voice"], dtype="float32")[0][:int(voice["end"] * rate)]
        n, k = math.ceil(len(target) / hop), math.ceil(len(prompt) / hop)
        # the ids computed here, independently of preprocessing
        want = ([tok.bod_id] + [tok.latent_id] * k + [tok.eod_id] + tok.encode(text["text"]) + [tok.bod_id]
                + [tok.latent_id] * n + [tok.eod_id, tok.end_of_document_id])
        assert sample["tokens"].tolist() == want, doc_id
        lat = decode_latents(sample["latents"], 16)
        with torch.no_grad():  # each alone, padded to the hop: the batched rows must equal these
            mu_t = vae.encode(torch.nn.functional.pad(torch.from_numpy(target)[None], (0, -len(target) % hop)))[0]
            mu_p = vae.encode(torch.nn.functional.pad(torch.from_numpy(prompt)[None], (0, -len(prompt) % hop)))[0]
        expected = torch.cat([mu_p, mu_t]).numpy().astype(np.float16).astype(np.float32)
        assert lat.shape == (k + n, 16)
        assert np.allclose(lat.astype(np.float32), expected, atol=2e-3), doc_id


@pytest.mark.slow  # the session speech_dataset fixture (espeak-ng corpus, audio σ-VAE, preprocessing): over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_right_padding_keeps_the_latents_of_a_causal_encoder(speech_dataset):
    """Encoding utterances of different lengths in one zero-padded batch gives each one's latents alone."""
    enc = SpeechEncoding(str(speech_dataset.audio_vae), str(speech_dataset.corpus), "cpu", 60.0, batch_items=4)
    rng = np.random.default_rng(0)
    wavs = [torch.from_numpy(rng.normal(0, 0.1, n).astype(np.float32)) for n in (1234, 4000, 8800, 401, 16000)]
    batched = enc.encode(wavs)
    alone = SpeechEncoding(str(speech_dataset.audio_vae), str(speech_dataset.corpus), "cpu", 60.0, 1).encode(wavs)
    for w, a, b in zip(wavs, batched, alone):
        assert a.shape == (math.ceil(len(w) / enc.hop), 16)
        assert np.allclose(a, b, atol=1e-5), np.abs(a - b).max()
    # and padding does change latents past the end: the comparison is not vacuous
    long = enc.vae.encode(torch.nn.functional.pad(wavs[3][None], (0, 4 * enc.hop - 401)))[0].detach().numpy()
    assert not np.allclose(long[1:2], 0) and long.shape[0] == 4


@pytest.mark.slow  # the session speech_dataset fixture (espeak-ng corpus, audio σ-VAE, preprocessing): over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_self_prompt_is_the_targets_prefix(tmp_path, speech_dataset):
    """Without a voice segment the prompt is the first min(3 s, half) of the target's latents (paper setting 2)."""
    doc = _docs(speech_dataset.raw)[0]
    doc = dict(doc, segments=doc["segments"][1:])
    (tmp_path / "raw.jsonl").write_text(json.dumps(doc) + "\n")
    preprocess_part(PreprocessConfig(inputs=[str(tmp_path / "raw.jsonl")], output=str(tmp_path / "out"),
                                     audio_root=str(speech_dataset.corpus), tokenizer="cl100k_base:8192",
                                     audio_vae_checkpoint=str(speech_dataset.audio_vae), progress=False))
    merge_parts(str(tmp_path / "out"), 1)
    sample = _samples(tmp_path / "out")[doc["id"]]
    tok = load_tokenizer("cl100k_base:8192")
    runs = schema.image_runs(sample["tokens"], schema.SpecialIds(tok.bod_id, tok.eod_id, tok.latent_id,
                                                                 tok.end_of_document_id, tok.pad_id))
    k, n = (runs[:, 1] - runs[:, 0] - 1).tolist()
    assert k == min(120, n // 2) and k > 0
    lat = decode_latents(sample["latents"], 16)
    assert np.array_equal(lat[:k], lat[k:2 * k])


def _tone(seconds, rate=16000, amp=0.3):
    return (amp * np.sin(np.arange(int(seconds * rate)) * 0.07)).astype(np.float32)


@pytest.mark.slow  # the session speech_dataset fixture (espeak-ng corpus, audio σ-VAE, preprocessing): over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_hostile_audio_is_rejected_by_reason_and_the_rest_kept(tmp_path, speech_dataset):
    root = tmp_path / "audio"
    root.mkdir()
    sf.write(root / "good.wav", _tone(0.8), 16000)
    sf.write(root / "good44.flac", _tone(0.5, 44100), 44100)  # another rate: resampled, kept
    (root / "text.wav").write_text("not audio at all\n" * 50)
    sf.write(root / "corrupt.wav", _tone(0.5), 16000)
    (root / "corrupt.wav").write_bytes((root / "corrupt.wav").read_bytes()[:40])
    sf.write(root / "silent.wav", np.zeros(8000, np.float32), 16000)
    sf.write(root / "clipped.wav", np.clip(_tone(0.5, amp=5.0), -1, 1), 16000)
    sf.write(root / "rate.wav", _tone(0.5, 4000), 4000)
    sf.write(root / "long.wav", _tone(3.0), 16000)
    sf.write(root / "short.wav", _tone(0.02), 16000)
    (tmp_path / "outside.wav").write_bytes((root / "good.wav").read_bytes())

    def doc(i, audio, **extra):
        return {"id": f"d{i}", "source": "speech", "speaker": "s",
                "segments": [{"text": "seven"}, {"audio": audio, **extra}]}

    cases = [(doc(0, "good.wav"), None), (doc(1, "good44.flac"), None),
             (doc(2, "missing.wav"), schema.AUDIO_MISSING), (doc(3, "text.wav"), schema.AUDIO_UNREADABLE),
             (doc(4, "corrupt.wav"), schema.AUDIO_UNREADABLE), (doc(5, "silent.wav"), schema.AUDIO_SILENT),
             (doc(6, "clipped.wav"), schema.AUDIO_CLIPPED), (doc(7, "rate.wav"), schema.AUDIO_WRONG_RATE),
             (doc(8, "long.wav"), schema.AUDIO_TOO_LONG), (doc(9, "short.wav"), schema.AUDIO_TOO_SHORT),
             (doc(10, "../outside.wav"), schema.AUDIO_OUTSIDE_ROOT),
             (doc(11, "good.wav", start=0.0, end=5.0), schema.AUDIO_UNREADABLE),  # past the file's end
             ({"id": "d12", "source": "speech", "segments": [{"audio": "good.wav"}]}, schema.INVALID_SCHEMA),
             (doc(13, "good.wav", start=0.5, end=0.2), schema.INVALID_SCHEMA),
             ({**doc(14, "good.wav"), "segments": [{"voice": "missing.wav"}, {"text": "one"}, {"audio": "good.wav"}]},
              schema.AUDIO_MISSING),
             ({**doc(15, "good.wav"), "segments": [{"text": " "}, {"audio": "good.wav"}]}, schema.EMPTY_DOCUMENT)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(d) + "\n" for d, _ in cases))
    out = tmp_path / "out"
    preprocess_part(PreprocessConfig(inputs=[str(raw)], output=str(out), audio_root=str(root), max_audio_seconds=2.0,
                                     audio_vae_checkpoint=str(speech_dataset.audio_vae), tokenizer="cl100k_base:8192",
                                     progress=False))
    m = merge_parts(str(out), 1)
    rejects = {r["id"]: r for r in map(json.loads, open(out / "parts" / "part-00000-of-00001.rejects.jsonl"))}
    for d, reason in cases:
        if reason is None:
            assert d["id"] not in rejects
        else:
            assert rejects[d["id"]]["reason"] == reason, (d["id"], rejects.get(d["id"]))
            assert rejects[d["id"]]["detail"]
    assert m["documents_written"] == {"speech": 2} and sorted(_samples(out)) == ["d0", "d1"]
    assert m["audio_seconds_written"] == pytest.approx(0.8 + 0.5, abs=1e-3)


@pytest.mark.slow  # the session speech_dataset fixture (espeak-ng corpus, audio σ-VAE, preprocessing): over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_one_sigma_vae_per_dataset(tmp_path, speech_dataset):
    with pytest.raises(ValueError, match="one σ-VAE per dataset"):
        preprocess_part(PreprocessConfig(inputs=[str(speech_dataset.raw)], output=str(tmp_path), vae_checkpoint="v.pt",
                                         image_root=".", audio_vae_checkpoint=str(speech_dataset.audio_vae),
                                         audio_root=str(speech_dataset.corpus), progress=False))
