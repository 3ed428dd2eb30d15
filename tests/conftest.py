import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, nproc: int, args: list[str], tmp_path: Path):
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *map(str, args)]
    return cmd, env


def spawn_torchrun(script: Path, nproc: int, args: list[str], tmp_path: Path, log: Path) -> subprocess.Popen:
    """Start `script` under torchrun, output to `log` (stop it with `kill_tree`). TMPDIR is private
    to the test."""
    cmd, env = _torchrun(script, nproc, args, tmp_path)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal `proc` and all its descendants (torchrun starts its workers in sessions of their own,
    so signalling the process group would miss them), then reap it."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        everyone = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        everyone = []
    for p in everyone:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=120)
    if sig == signal.SIGKILL:
        psutil.wait_procs(everyone, timeout=60)


def run_torchrun(script: Path, nproc: int, args: list[str], tmp_path: Path, timeout: int = 900) -> str:
    """Run `script` under torchrun with `nproc` CPU processes (gloo) to completion; the process group
    is killed on timeout. Returns the combined output; raises with its tail on failure."""
    log = tmp_path / f"torchrun-{time.time_ns()}.log"
    proc = spawn_torchrun(script, nproc, args, tmp_path, log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"{Path(script).name} timed out after {timeout}s:\n{log.read_text()[-5000:]}")
    out = log.read_text()
    if proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed with exit code {proc.returncode}:\n{out[-8000:]}")
    return out


# ---------------------------------------------------------------- a small real dataset
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more other into some "
         "digit seven image picture drawing written handwritten number small large bright dark photo flower "
         "temple sky garden water river model train data token latent diffusion next sequence").split()


def tiny_raw_documents(image_root: Path, n_text=30, n_pair=30, n_interleaved=16, seed=0) -> list[dict]:
    """Text, image-caption pairs and interleaved documents over real images (scikit-learn's sample
    photos and handwritten digits, written as files under `image_root`)."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    image_root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(load_sample_images().images):
        Image.fromarray(img).save(image_root / f"photo{i}.jpg", quality=90)
        names.append(f"photo{i}.jpg")
    for i, d in enumerate(load_digits().images[:8]):
        arr = (d * (255 / 16)).astype(np.uint8)
        Image.fromarray(np.stack([arr] * 3, -1)).resize((32, 32)).save(image_root / f"digit{i}.png")
        names.append(f"digit{i}.png")
    rng = np.random.default_rng(seed)
    text = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    docs = [{"id": f"text-{i}", "source": "text", "segments": [{"text": text(int(rng.integers(20, 150)))}]}
            for i in range(n_text)]
    docs += [{"id": f"pair-{i}", "source": "pair",
              "segments": [{"text": text(int(rng.integers(3, 10)))}, {"image": str(rng.choice(names))}]}
             for i in range(n_pair)]
    for i in range(n_interleaved):
        segs = []
        for _ in range(int(rng.integers(1, 3))):
            segs += [{"text": text(int(rng.integers(5, 30)))}, {"image": str(rng.choice(names))}]
        docs.append({"id": f"interleaved-{i}", "source": "interleaved", "segments": segs + [{"text": text(5)}]})
    return docs


@pytest.fixture(scope="module")
def world():
    """megatron's parallel state over a gloo world of one process (this one), for a test module."""
    from latentlm_mcore.config import ParallelConfig
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(ParallelConfig(), seed=0)
    yield
    shutdown_distributed()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Real MDS shards made by the real preprocessing (cl100k tokenizer, a tiny random sigma-VAE with
    16 latents of dim 16 per image) from `tiny_raw_documents`. Returns the dataset folder."""
    import torch

    from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
    from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE, save_sigma_vae

    root = tmp_path_factory.mktemp("tiny_dataset")
    torch.manual_seed(0)
    save_sigma_vae(root / "vae.pt", SigmaVAE(SIGMA_VAE_PRESETS["tiny"]))
    docs = tiny_raw_documents(root / "images")
    with open(root / "raw.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    out = root / "mds"
    preprocess_part(PreprocessConfig(inputs=[str(root / "raw.jsonl")], output=str(out), image_root=str(root / "images"),
                                     vae_checkpoint=str(root / "vae.pt"), progress=False))
    merge_parts(str(out), 1)
    return out


def make_audio_vae(path, wavs=(), seed=0):
    """A randomly initialised `tiny` audio σ-VAE (16 kHz, 40 Hz latents of dim 16) with the latent statistics
    of `wavs` (1-D float arrays at 16 kHz; a fixed noise burst when none), saved with save_audio_vae."""
    import torch

    from latentlm_mcore.vae.audio_config import AUDIO_VAE_PRESETS
    from latentlm_mcore.vae.audio_model import AudioSigmaVAE, compute_audio_latent_stats, pad_to_hop, save_audio_vae

    torch.manual_seed(seed)
    vae = AudioSigmaVAE(AUDIO_VAE_PRESETS["tiny"]).eval()
    hop = vae.config.hop_length
    batches = [pad_to_hop(torch.as_tensor(w, dtype=torch.float32)[None], hop) for w in wavs] or \
        [0.1 * torch.randn(2, 40 * hop, generator=torch.Generator().manual_seed(seed))]
    save_audio_vae(path, vae, compute_audio_latent_stats(vae, batches))
    return path


@pytest.fixture(scope="session")
def speech_dataset(tmp_path_factory):
    """Tiny real speech shards: espeak-ng's spoken digits (demo/speech_corpus.py: 2 training voices + the held-out
    voice, one speed, the ten digits and 4 phrases, 16 kHz, voice prompts from the converter's rule) encoded by a
    random `tiny` audio σ-VAE (latent stats of the corpus) with cl100k_base:8192 through the real preprocessing.
    Returns a namespace: mds (dataset folder), corpus (audio root with train/heldout/heldout_voice.jsonl),
    audio_vae (its file), raw (the JSONL preprocessed: train.jsonl)."""
    import types

    import soundfile as sf

    from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
    from latentlm_mcore.demo.speech_corpus import TRAIN_VOICES, build_speech_corpus

    root = tmp_path_factory.mktemp("speech_dataset")
    corpus = root / "corpus"
    build_speech_corpus(str(corpus), phrases=4, voices=TRAIN_VOICES[:2], speeds=(175,))
    raw = corpus / "train.jsonl"
    docs = [json.loads(line) for line in raw.read_text().splitlines()]
    wavs = [sf.read(corpus / d["segments"][-1]["audio"], dtype="float32")[0] for d in docs[:8]]
    make_audio_vae(root / "audio_vae.pt", wavs)
    out = root / "mds"
    preprocess_part(PreprocessConfig(inputs=[str(raw)], output=str(out), audio_root=str(corpus),
                                     audio_vae_checkpoint=str(root / "audio_vae.pt"), tokenizer="cl100k_base:8192",
                                     batch_images=8, progress=False))
    merge_parts(str(out), 1)
    return types.SimpleNamespace(mds=out, corpus=corpus, audio_vae=root / "audio_vae.pt", raw=raw)


EMA_DECAY, EMA_STEPS = 0.8, 6  # far from 1: a few steps move the EMA visibly away from its start and the weights


def ema_run_args(dataset, save, *extra, tp=2) -> list:
    """pretrain/pretrain_latentlm.py arguments of a short tiny-preset run with an EMA of the weights."""
    return ["--preset", "tiny", "--data", str(dataset), "--save", str(save), "--train.train-steps", EMA_STEPS,
            "--train.warmup-steps", 2, "--train.global-batch-size", 4, "--train.micro-batch-size", 2,
            "--train.ema-decay", EMA_DECAY, "--parallel.tensor-parallel", tp, "--log-interval", 1,
            "--save-interval", 100, "--keep-last", 10, "--num-workers", 0, "--tensorboard", "false", *extra]


@pytest.fixture(scope="session")
def ema_run(tiny_dataset, tmp_path_factory):
    """The save directory of `ema_run_args` at TP=2 on 2 processes, uninterrupted (tests/training/test_ema.py,
    tests/hf/test_export_ema.py)."""
    tmp = tmp_path_factory.mktemp("ema_run")
    run_torchrun(REPO / "pretrain" / "pretrain_latentlm.py", 2, ema_run_args(tiny_dataset, tmp / "ckpt"), tmp)
    return tmp / "ckpt"


# ---------------------------------------------------------------- a real one-node Slurm
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm (munged, slurmctld, slurmd from Debian's packages) started for the session.
    Yields the environment to run Slurm commands with; stops the daemons by PID afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    # ports of our own, so that another cluster on this machine (another test run) does not collide
    env = dict(os.environ, STATE=str(state), CTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()))
    start = subprocess.run(["bash", str(REPO / "tests/slurm_cluster/start.sh")], env=env, capture_output=True,
                           text=True, timeout=180)
    if start.returncode != 0:
        pytest.fail("could not start the local Slurm (scripts/setup_system.sh installs slurmctld slurmd slurm-client munge):\n"
                    + start.stdout + start.stderr)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
    time.sleep(1)
    subprocess.run(["bash", str(REPO / "tests/slurm_cluster/stop.sh")], env=env, capture_output=True)
