"""The audio σ-VAE trainer (vae/audio_trainer.py) on the shared loop: it learns, the GAN switches on at
gan_start_step, a preempted run resumed equals the uninterrupted one, the exported file loads and decodes
causally, and the entry point and Slurm launcher run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentlm_mcore.vae.audio_config import AudioVAEConfig
from latentlm_mcore.vae.audio_model import StreamCache, load_audio_vae
from latentlm_mcore.vae.audio_trainer import AudioSigmaVAETrainer, AudioTrainConfig

REPO = Path(__file__).resolve().parents[2]
# 8 kHz, 40 samples per latent (200 Hz), narrow: a few steps take a second on CPU
SMALL = AudioVAEConfig(sample_rate=8000, strides=(2, 4, 5), channels=8, max_channels=32, blocks_per_stage=1,
                       latent_dim=8)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Six espeak-ng utterances (16 kHz WAV) in two voices and a speech JSONL for each split."""
    from latentlm_mcore.demo.speech_corpus import speak
    root = tmp_path_factory.mktemp("speech")
    docs = []
    for i, (voice, text) in enumerate([("en-us", "one two"), ("en-gb", "three four five"), ("en-us", "six"),
                                       ("en-gb", "seven eight"), ("en-us", "nine zero"), ("en-gb", "two")]):
        rel = f"{i}.wav"
        seconds = speak(text, voice, 175, str(root / rel))
        docs.append({"id": str(i), "source": "speech", "speaker": voice,
                     "segments": [{"text": text}, {"audio": rel, "start": 0.0, "end": round(seconds, 4)}]})
    for name, part in (("train", docs[:4]), ("heldout", docs[4:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    return root


def config(speech, out, **kw) -> AudioTrainConfig:
    base = dict(train_data=str(speech / "train.jsonl"), eval_data="", out_dir=str(out), train_steps=4,
                batch_size=2, crop_seconds=0.3, lr=2e-3, warmup_steps=0, disc_channels=4, log_interval=1,
                eval_interval=1000, save_interval=1000, stats_batches=1, tensorboard=False, eval_utterances=2,
                png_utterances=1)
    base.update(kw)
    return AudioTrainConfig(**base)


def train_records(out) -> dict:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["iteration"]: r for r in records if r["split"] == "train"}


def test_a_few_steps_lower_the_reconstruction_loss(speech, tmp_path):
    trainer = AudioSigmaVAETrainer(SMALL, config(speech, tmp_path))
    batch = next(trainer.train_batches())

    def mel_now():
        with torch.no_grad():
            return float(trainer.mel_loss(trainer.vae.decode(trainer.vae.encode(batch)), batch))

    before = mel_now()
    for _ in range(15):
        trainer.train_step(batch)
        trainer.step += 1
    assert mel_now() < 0.8 * before


def test_mel_floor_ignores_how_quiet_a_pause_is(speech, tmp_path):
    """--mel-clamp: with the floor above a faint hiss, a reconstruction that only adds hiss in the digital
    silence costs nothing in the training loss; DAC's 1e-5 floor (the default) and the eval mel distance see it."""
    from latentlm_mcore.vae.audio_metrics import mel_distance
    floored = AudioSigmaVAETrainer(SMALL, config(speech, tmp_path / "floored", mel_clamp=1e-2))
    default = AudioSigmaVAETrainer(SMALL, config(speech, tmp_path / "default"))
    wav = torch.zeros(1, 4000)
    wav[0, 1000:3000] = 0.3 * torch.sin(torch.arange(2000) * 0.2)  # a tone between two silent stretches
    hiss = wav.clone()
    hiss[0, :1000] = 1e-5 * torch.randn(1000, generator=torch.Generator().manual_seed(0))  # the first pause only
    assert float(default.mel_loss(hiss, wav)) > 0.05
    assert float(floored.mel_loss(hiss, wav)) < 0.01 * float(default.mel_loss(hiss, wav))  # windows at the tone's edge
    assert mel_distance(hiss[0], wav[0], SMALL.sample_rate) == pytest.approx(float(default.mel_loss(hiss, wav)))


def test_gan_switches_on_at_gan_start_step(speech, tmp_path):
    trainer = AudioSigmaVAETrainer(SMALL, config(speech, tmp_path, gan_start_step=2))
    disc_before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    trainer.train()
    records = train_records(tmp_path)
    for step in (1, 2):  # steps 0 and 1: reconstruction only
        assert "d_loss" not in records[step] and "g_adv" not in records[step]
    for step in (3, 4):
        assert records[step]["d_loss"] > 0 and "g_adv" in records[step] and records[step]["feature_matching"] > 0
        gan_terms = records[step]["g_adv"] + 2.0 * records[step]["feature_matching"]
        assert records[step]["loss"] == pytest.approx(
            15.0 * records[step]["mel"] + records[step]["l1"] + SMALL.beta * records[step]["prior"] + gan_terms,
            rel=1e-5)
    assert any(not torch.equal(v, disc_before[k]) for k, v in trainer.disc.state_dict().items())


def test_preempted_and_resumed_run_equals_the_uninterrupted_one(speech, tmp_path):
    full = tmp_path / "full"
    AudioSigmaVAETrainer(SMALL, config(speech, full, train_steps=5, gan_start_step=1)).train()

    parted = tmp_path / "parted"
    first = AudioSigmaVAETrainer(SMALL, config(speech, parted, train_steps=5, gan_start_step=1))
    real_step = first.train_step

    def preempted_at_step_2(batch):
        if first.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm sends before the time limit
        return real_step(batch)

    first.train_step = preempted_at_step_2
    first.train()
    assert first.step == 3 and torch.load(parted / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = AudioSigmaVAETrainer(SMALL, config(speech, parted, train_steps=5, gan_start_step=1))
    assert resumed.step == 3
    resumed.train()
    a, b = train_records(full), train_records(parted)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert "d_loss" not in a[1] and "d_loss" in a[2]
    for step in a:
        for key in ("loss", "mel", "grad_norm", "d_loss", "g_adv", "feature_matching"):
            assert a[step].get(key) == b[step].get(key), (step, key)
    with pytest.raises(ValueError, match="different model config"):
        AudioSigmaVAETrainer(SMALL.replace(latent_dim=4), config(speech, parted, train_steps=6))


def test_exported_file_loads_and_decodes_causally(speech, tmp_path):
    AudioSigmaVAETrainer(SMALL, config(speech, tmp_path, train_steps=2)).train()
    vae = load_audio_vae(tmp_path / "audio_vae.pt")
    assert vae.config == SMALL and vae.latent_stats is not None and not vae.training
    payload = torch.load(tmp_path / "audio_vae.pt", weights_only=True)
    assert payload["kind"] == "audio" and payload["sample_rate"] == 8000 and payload["hop_length"] == 40
    wav = torch.randn(1, 10 * 40 + 7) * 0.1
    z = vae.encode_scaled(wav)
    assert z.shape == (1, 11, 8)  # padded up to whole latents
    torch.testing.assert_close(vae.latent_stats.unscale(z), vae.encode(torch.nn.functional.pad(wav, (0, 33))))
    full = vae.decode_scaled(z)
    prefix = vae.decode_scaled(z[:, :4])
    torch.testing.assert_close(prefix, full[:, :4 * 40], rtol=0, atol=1e-5)
    cache = StreamCache()
    streamed = torch.cat([vae.decode_scaled(z[:, i:i + 1], cache) for i in range(z.shape[1])], dim=1)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not an exported audio σ-VAE"):
        load_audio_vae(tmp_path / "checkpoint.pt")


def test_missing_audio_is_named(speech, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "source": "speech", "segments": [{"audio": "nowhere.wav"}]}) + "\n")
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        AudioSigmaVAETrainer(SMALL, config(speech, tmp_path / "out", train_data=str(bad)))


@pytest.mark.slow  # runs the training entry point in a fresh interpreter
def test_entry_point_trains_evaluates_and_exports(speech, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "pretrain" / "train_audio_vae.py"), "--preset", "tiny",
           "--train-data", str(speech / "train.jsonl"), "--eval-data", str(speech / "heldout.jsonl"),
           "--out-dir", str(out), "--train-steps", "3", "--eval-interval", "3", "--batch-size", "2",
           "--crop-seconds", "0.25", "--gan-start-step", "2", "--disc-channels", "4", "--stats-batches", "1",
           "--tensorboard", "false", "--model.channels", "8", "--log-interval", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["utterances"] == 2
    assert evals[0]["mel_distance"] > 0 and 1.0 <= evals[0]["pesq_wb"] <= 4.65 and 0 <= evals[0]["stoi"] <= 1
    assert os.path.getsize(out / "samples" / "step_0000003.png") > 0
    vae = load_audio_vae(out / "audio_vae.pt")
    assert vae.config.sample_rate == 16000 and vae.config.channels == 8
    assert "Warning" not in proc.stderr  # no library warnings on the console


def test_slurm_launcher_passes_its_defaults(tmp_path):
    """The sbatch script with stand-ins for srun and scontrol (recording their arguments)."""
    from pretrain.train_audio_vae import parse_args
    bin_dir, record = tmp_path / "bin", tmp_path / "srun_args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-a\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a", SLURM_JOB_ID="7",
               SLURM_NNODES="1", SLURM_NTASKS="8", SLURM_CPUS_PER_TASK="12", REPO_DIR=str(REPO),
               OUT_DIR=str(tmp_path / "out"))
    for name in ("PRESET", "BATCH_PER_GPU", "TRAIN_DATA", "TRAIN_STEPS", "GAN_START", "CROP_SECONDS"):
        env.pop(name, None)
    assert subprocess.run(["bash", "-n", "slurm/train_audio_vae.sh"], cwd=REPO).returncode == 0
    proc = subprocess.run(["bash", "slurm/train_audio_vae.sh", "--log-interval", "50"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    script = args.index(str(REPO / "pretrain" / "train_audio_vae.py"))
    model, train = parse_args(args[script + 1:])
    assert model.frame_rate == 15.0 and model.latent_dim == 32
    assert train.batch_size == 9 and train.train_steps == 400_000 and train.gan_start_step == 10_000
    assert train.log_interval == 50 and train.out_dir == str(tmp_path / "out")
