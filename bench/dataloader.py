"""Packed tokens/s the data loader delivers, against the tokens/s one training step consumes.

    python bench/dataloader.py [--dataset ROOT] [--preset tiny] [--batches 200]

It preprocesses two small synthetic corpora (text : pairs : interleaved = 2 : 1 : 1, real photos,
randomly initialised σ-VAEs) into a temporary folder:
- with the tiny σ-VAE (16 latents x 16 channels per image), timed at the preset's sequence shape next
  to the preset's training step on this machine's CPU: ratio = loader tokens/s / step tokens/s
  (> 1: the loader keeps up);
- with the paper's latent geometry (256 latents x 32 channels per 256px image; a narrow encoder,
  since the loader's cost depends only on the latent shape), timed at seq 4096: tokens/s per reader
  worker, the figure to size GPU nodes with (workers per GPU >= GPU tokens/s / tokens/s per worker).
Loader timings use 0 (reading and packing in the trainer's process), 1 and 2 reader workers, for DP rank 0
of 1 and of `--dp` ranks (every rank lays out the whole global stream of packed sequences and builds its
own share: the figure is the tokens/s that one rank delivers to its own GPU).
Printed and written to bench/results/dataloader.json.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from latentlm_mcore.data.loader.packed import LoaderConfig, PackedLoader
from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dataloader.json")
WORDS = ("the of and to in is was for on that with as by at from his her an which be this are have "
         "were or had not but their one all new first after also two who its been more when other").split()


def training_step_tokens_per_second(preset: str, seq_length: int, micro_batch_size: int, steps: int = 6) -> float:
    """Tokens/s one training step of `preset` consumes on this machine: one process, megatron DDP +
    optimizer + schedule exactly as in pretraining, on packed batches of [micro_batch_size, seq_length]
    (two warm-up steps, then the median of `steps`)."""
    import dataclasses
    import socket
    import statistics

    from latentlm_mcore.config import ParallelConfig, RunConfig, get_preset
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
    from latentlm_mcore.training.step import device_batch
    from latentlm_mcore.data.loader.synthetic import random_packed_batch
    from latentlm_mcore.training.trainer import Trainer

    cfg = get_preset(preset)
    cfg.parallel = parallel = ParallelConfig(distributed_optimizer=False)
    cfg.train = dataclasses.replace(cfg.train, micro_batch_size=micro_batch_size, global_batch_size=micro_batch_size)
    m = cfg.model
    m.seq_length = seq_length
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
    init_distributed(parallel, seed=0)
    trainer = Trainer(cfg, RunConfig(precision="fp32"))
    latents = min(16, seq_length // 4)
    batches = (device_batch(random_packed_batch(micro_batch_size, seq_length, m.vocab_size, m.latent_dim, latents,
                                                1, seed=i)) for i in range(10**9))
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        trainer.step(batches)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    shutdown_distributed()
    return micro_batch_size * seq_length / statistics.median(times)


# 1.3B MLLM on one H100 at ~40% MFU: 0.4 * 989e12 FLOP/s / (6 * 1.4e9 FLOP/token) ~ 47k tokens/s.
# An assumption for the sizing line only; replace with the measured figure from the GPU run.
ASSUMED_H100_TOKENS_PER_S_1P3B = 47_000


def build_dataset(root: str, num_docs: int, vae_config) -> str:
    """Preprocess a synthetic corpus of text, pairs and interleaved documents (2:1:1) under root."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
    from latentlm_mcore.vae import SigmaVAE, save_sigma_vae

    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    for i, img in enumerate(load_sample_images().images):
        Image.fromarray(img).save(os.path.join(images, f"photo{i}.jpg"))
    torch.manual_seed(0)
    save_sigma_vae(os.path.join(root, "vae.pt"), SigmaVAE(vae_config))
    rng = np.random.default_rng(0)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    with open(os.path.join(root, "raw.jsonl"), "w") as f:
        for i in range(num_docs):
            kind = ("text", "text", "pair", "interleaved")[i % 4]
            if kind == "text":
                segs = [{"text": text(100, 1500)}]
            elif kind == "pair":
                segs = [{"text": text(5, 30)}, {"image": f"photo{i % 2}.jpg"}]
            else:
                segs = [s for _ in range(3) for s in ({"text": text(20, 200)}, {"image": f"photo{i % 2}.jpg"})]
            f.write(json.dumps({"id": f"doc{i}", "source": kind, "segments": segs}) + "\n")
    out = os.path.join(root, "dataset")
    preprocess_part(PreprocessConfig(inputs=[os.path.join(root, "raw.jsonl")], output=out, image_root=images,
                                     vae_checkpoint=os.path.join(root, "vae.pt"), progress=False))
    merge_parts(out, 1)
    return out


def loader_tokens_per_second(dataset: str, cache: str, seq_length: int, micro_batch_size: int, workers: int,
                             batches: int, repeats: int = 3, dp_world_size: int = 1) -> float:
    """Median over `repeats` timed stretches of `batches` micro-batches (the machine is shared): the tokens
    per second that DP rank 0 of `dp_world_size` delivers to its own GPU."""
    mixture = StreamMixture(MixtureConfig(dataset_root=dataset, cache_dir=cache))
    loader = PackedLoader(mixture, LoaderConfig(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                                num_workers=workers, dp_world_size=dp_world_size))
    it = iter(loader)
    for _ in range(max(5, batches // 10)):  # warm-up: shard copies into the cache, worker start
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * micro_batch_size * seq_length / (time.perf_counter() - start))
    return float(np.median(rates))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--docs", type=int, default=400, help="documents of the synthetic dataset")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--dp", type=int, default=8, help="also time DP rank 0 of this many data-parallel ranks")
    args = p.parse_args(argv)

    from latentlm_mcore.config import get_preset
    from latentlm_mcore.vae import SIGMA_VAE_PRESETS

    cfg = get_preset(args.preset)
    seq, mbs = cfg.model.seq_length, cfg.train.micro_batch_size
    paper_geometry = SIGMA_VAE_PRESETS["paper"].replace(hidden=32, heads=2, enc_layers=1, dec_layers=0)
    results = {"preset": args.preset, "cpu_count": os.cpu_count(), "documents": args.docs}
    with tempfile.TemporaryDirectory() as tmp:
        tempfile.tempdir = tmp  # streaming's file locks go to the temp folder: keep them in ours
        for name, vae_config, shape in (("tiny_vae", SIGMA_VAE_PRESETS["tiny"], (seq, mbs)),
                                        ("paper_latents", paper_geometry, (4096, 1))):
            dataset = build_dataset(os.path.join(tmp, name), args.docs, vae_config)
            rows = []
            for dp, workers in ((1, 0), (1, 1), (1, 2), (args.dp, 1), (args.dp, 2)):
                n = args.batches if shape[0] < 1024 else max(20, args.batches // 10)
                tps = loader_tokens_per_second(dataset, os.path.join(tmp, name, f"cache{dp}-{workers}"), *shape,
                                               workers, n, dp_world_size=dp)
                rows.append({"dp_world_size": dp, "workers": workers, "tokens_per_s": round(tps),
                             "tokens_per_s_per_worker": round(tps / max(workers, 1))})
                print(f"loader {name:13s} seq {shape[0]:>4} x {shape[1]}  DP rank 0 of {dp}, workers {workers}: "
                      f"{tps:>10,.0f} tokens/s ({rows[-1]['tokens_per_s_per_worker']:,} per worker)", flush=True)
            results[name] = {"seq_length": shape[0], "micro_batch_size": shape[1],
                             "latents_per_image": vae_config.num_latents, "latent_dim": vae_config.latent_dim,
                             "loader": rows}

    step = training_step_tokens_per_second(args.preset, seq, mbs)
    best = max(r["tokens_per_s"] for r in results["tiny_vae"]["loader"])
    results["training_step_tokens_per_s"] = step
    results["ratio_loader_over_step"] = best / step
    print(f"training step ({args.preset}, this CPU): {step:,.0f} tokens/s -> loader / step = {best / step:.1f}x")
    per_worker = min(r["tokens_per_s"] for r in results["paper_latents"]["loader"] if r["workers"] == 1)
    results["sizing"] = {"assumed_gpu_tokens_per_s_1p3b_h100": ASSUMED_H100_TOKENS_PER_S_1P3B,
                         "tokens_per_s_per_worker_seq4096": per_worker,
                         "workers_per_gpu": ASSUMED_H100_TOKENS_PER_S_1P3B / per_worker}
    print(f"sizing: one reader worker packs {per_worker:,} tokens/s at seq 4096 with paper-size latents; "
          f"an H100 training the 1.3B model at ~{ASSUMED_H100_TOKENS_PER_S_1P3B:,} tokens/s (assumed) needs "
          f"{ASSUMED_H100_TOKENS_PER_S_1P3B / per_worker:.2f} workers")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
