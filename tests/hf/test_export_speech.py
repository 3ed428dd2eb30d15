"""Text -> speech on both backends: a tiny LatentLM saved at TP=2 whose provenance names an audio σ-VAE (the `tiny`
preset: 16 kHz, 40 Hz latents of dim 16), `tools/generate.py --task text-to-speech` on the Megatron checkpoint
(megatron's static KV cache) against the HF export (transformers' DynamicCache) of the same checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import latentlm_mcore.hf  # noqa: F401  (transformers beside an unloadable torchvision)
from latentlm_mcore.data.tokenizer import write_tiktoken_file
from latentlm_mcore.inference.generation import SamplingConfig
from latentlm_mcore.inference.tasks import Generator, read_voice
from latentlm_mcore.vae.audio_config import AUDIO_VAE_PRESETS
from latentlm_mcore.vae.audio_model import AudioSigmaVAE, save_audio_vae
from latentlm_mcore.vae.stats import LatentStats
from tests.conftest import run_torchrun
from tests.data.test_tokenizer import small_bpe_ranks
from tests.hf.test_export import WORKER, load_hf, run_tool

pytestmark = pytest.mark.slow  # two launches and an export: over 15 s

TEXTS = ["seven two one", "the nine", "four four four eight", "zero"]
SEED = 3
VOICES = ["voice_22k.wav", "voice_16k.wav"] * 2


def write_voice(path: Path, rate: int, seconds: float, seed: int) -> None:
    g = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    wav = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, (wav + 0.02 * g.standard_normal(len(t))).astype(np.float32), rate)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("speech")
    (out / "tmp").mkdir()
    write_tiktoken_file(small_bpe_ranks("zero one two three four five six seven eight nine the " * 10, 40),
                        out / "small.tiktoken")
    torch.manual_seed(0)
    vae = AudioSigmaVAE(AUDIO_VAE_PRESETS["tiny"])
    save_audio_vae(out / "audio_vae.pt", vae, LatentStats(torch.rand(16) - 0.5, torch.rand(16) + 0.5))
    write_voice(out / "voice_22k.wav", 22050, 4.0, seed=1)  # longer than 3 s, not at the σ-VAE's 16 kHz
    write_voice(out / "voice_16k.wav", 16000, 1.3, seed=2)
    run_torchrun(WORKER, 2, ["--phase", "save", "--out", str(out), "--tokenizer", str(out / "small.tiktoken"),
                             "--sigma-vae", str(out / "audio_vae.pt"), "--speech"], out)
    run_tool("convert_ckpt_to_hf.py", ["--checkpoint", str(out / "ckpt_tp2"), "--output", str(out / "hf")], out / "tmp")
    # the untrained model's own run lengths (the draws do not depend on the limit): a limit at the longest makes
    # the batch hold both kinds of stop, the shorter rows by <EOD> and the longest by the limit
    free = Generator.from_hf_folder(str(out / "hf")).text_to_speech(
        TEXTS, [str(out / v) for v in VOICES], SamplingConfig(cfg_scale=4.0, diffusion_steps=5, seed=SEED))
    lengths = [s.latents.shape[0] for s in free]
    assert len(set(lengths)) > 1 and all(s.stopped_by == "eod" for s in free), lengths
    max_seconds = (max(lengths) + 0.5) / 40  # 40 Hz latents
    (out / "max_seconds.json").write_text(json.dumps(max_seconds))
    run_tool("generate.py", ["--checkpoint", str(out / "ckpt_tp2"), "--task", "text-to-speech",
                             *[a for t in TEXTS for a in ("--prompt", t)],
                             *[a for v in VOICES for a in ("--voice", str(out / v))],
                             "--max-seconds", str(max_seconds), "--seed", str(SEED), "--output", str(out / "gen")],
             out / "tmp")
    return out


def test_text_to_speech_hf_equals_megatron_latents_and_stop_decisions(out):
    from safetensors.torch import load_file

    records = json.loads((out / "gen" / "speech.json").read_text())
    megatron_latents = load_file(out / "gen" / "latents.safetensors")
    voices = [str(out / v) for v in VOICES]
    max_seconds = json.loads((out / "max_seconds.json").read_text())
    generator = Generator.from_hf_folder(str(out / "hf"))
    speeches = generator.text_to_speech(TEXTS, voices, SamplingConfig(cfg_scale=4.0, diffusion_steps=5, seed=SEED),
                                        max_seconds=max_seconds)
    worst = 0.0
    for i, (s, r) in enumerate(zip(speeches, records)):
        assert (r["text"], r["voice"]) == (TEXTS[i], voices[i])
        assert s.tokens == r["tokens"] and s.stopped_by == r["stopped_by"]
        assert s.latents.shape[0] == r["num_latents"] == megatron_latents[str(i)].shape[0]
        worst = max(worst, (s.latents - megatron_latents[str(i)]).abs().max().item())
        wav, rate = sf.read(out / "gen" / f"{i}.wav", dtype="float32")
        assert rate == 16000 and len(wav) == r["num_latents"] * 400 == len(s.audio)  # latents x hop
        assert r["seconds"] == pytest.approx(r["num_latents"] / 40)
        assert np.abs(wav - s.audio.clamp(-1, 1).numpy()).max() < 1e-4
    print(f"\nPARITY text-to-speech HF vs Megatron TP=2: max latent diff {worst:.2e}, "
          f"stops {[r['stopped_by'] for r in records]}, lengths {[r['num_latents'] for r in records]}")
    assert worst < 1e-4
    ends = {r["stopped_by"] for r in records}
    assert ends == {"eod", "max"}, ends  # both kinds of stop occur in this batch, and agree
    assert max(r["num_latents"] for r in records) == int(max_seconds * 40)  # the limit is respected
    # the exported folder alone: generate_speech gives the Generator's latents
    model = load_hf(out / "hf")
    vae = model.load_audio_vae()
    tok = [generator.tokenizer.encode(t) for t in TEXTS]
    prompts = [vae.encode_scaled(read_voice(v, vae.config.sample_rate)[None])[0] for v in voices]
    samples = model.generate_speech(tok, prompts, max_seconds=max_seconds, seed=SEED, progress=False)
    for s, sample in zip(speeches, samples):
        assert sample.run_ends == [s.stopped_by] and torch.allclose(sample.images[0], s.latents, atol=1e-5)


def test_guidance_stream_is_in_the_batch(out):
    generator = Generator.from_hf_folder(str(out / "hf"))
    voices = [str(out / "voice_16k.wav")]
    guided, unguided = (generator.text_to_speech(TEXTS[:1], voices, SamplingConfig(cfg_scale=c, diffusion_steps=5,
                                                                                  max_run_latents=3, seed=1))[0]
                        for c in (4.0, 1.0))
    # the first latent of a run is always generated, from the same noise: guidance alone makes it differ
    assert not torch.allclose(guided.latents[0], unguided.latents[0])


def test_the_voice_prompt_is_read_as_preprocessing_reads_audio(out):
    """A 22.05 kHz voice file: mono at the σ-VAE's 16 kHz through data/prep/audio.py's resample, first 3 s."""
    from latentlm_mcore.data.prep.audio import resample

    data, rate = sf.read(out / "voice_22k.wav", dtype="float32")
    assert rate == 22050
    expected = resample(torch.from_numpy(data), 22050, 16000)[:48000]
    got = read_voice(str(out / "voice_22k.wav"), 16000)
    assert got.shape == (48000,) and torch.equal(got, expected)
    short = read_voice(str(out / "voice_16k.wav"), 16000)
    assert short.shape == (int(1.3 * 16000),)  # shorter than 3 s: all of it
    with pytest.raises(ValueError, match="voice prompt .*nowhere.wav: audio_missing"):
        read_voice(str(out / "nowhere.wav"), 16000)


def test_speech_export_ships_the_audio_vae_without_pickle(out):
    from latentlm_mcore.vae.audio_model import load_audio_vae

    folder = out / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["audio_frame_rate"] == 40.0 and config["latents_per_image"] is None
    assert (folder / "audio_vae.safetensors").is_file() and not (folder / "sigma_vae.json").exists()
    assert json.loads((folder / "audio_vae.json").read_text())["config"]["sample_rate"] == 16000
    assert "model.generate_speech(" in (folder / "README.md").read_text()  # the model card shows the speech path
    for code in folder.glob("*.py"):
        assert "import latentlm_mcore" not in code.read_text() and "from latentlm_mcore" not in code.read_text(), code
    exported, original = load_hf(folder).load_audio_vae(), load_audio_vae(out / "audio_vae.pt")
    z = torch.randn(1, 5, 16)
    assert torch.equal(exported.decode_scaled(z), original.decode_scaled(z))


def test_text_to_speech_refuses_bad_requests(out):
    generator = Generator.from_hf_folder(str(out / "hf"))
    with pytest.raises(ValueError, match="2 texts and 3 voices"):
        generator.text_to_speech(TEXTS[:2], [str(out / "voice_16k.wav")] * 3, SamplingConfig())
    with pytest.raises(AssertionError, match="one --voice, or one per --prompt"):
        run_tool("generate.py", ["--hf", str(out / "hf"), "--task", "text-to-speech", "--prompt", "a", "--prompt", "b",
                                 "--prompt", "c", "--voice", "x.wav", "--voice", "y.wav", "--output",
                                 str(out / "bad")], out / "tmp")
