"""Runs under torchrun: trains the tiny LatentLM for 3 optimizer steps in one or more parallel
layouts and dumps losses, canonical (unsharded) gradients and parameters for comparison.

  --phase layouts   (2 processes) TP=2, TP=2+SP, PP=2 (1F1B, 4 micro-batches), DP=2 + distributed
                    optimizer, and DP=2 + distributed optimizer with overlapped grad reduce and param
                    gather; the first layout writes the shared initial checkpoint, the TP=2 run
                    also saves its trained model and evaluates it; PP=2 loads and evaluates it.
  --phase reference (1 process) the same 3 steps from the same initial checkpoint, and the TP=2
                    trained checkpoint loaded and evaluated at TP=1.
"""
import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from latentlm_mcore.config import LatentLMConfig, ModelConfig, ParallelConfig, TrainConfig
from latentlm_mcore.model import build_model, local_block_spec, transformer_config
from latentlm_mcore.training.checkpoint import load_model, save_model
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.training.step import evaluate, forward_backward, params_synced
from latentlm_mcore.data.loader.synthetic import random_packed_batch
from latentlm_mcore.training.trainer import Trainer

MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=256,
                    seq_length=32, latent_dim=8, head_layers=2, batch_mul=4)
# adam_eps: Adam maps a gradient g with |g| << eps to an update of ~lr*g/eps. With eps=1e-8 the fp32
# summation-order noise (~1e-10 absolute) of near-zero gradients becomes 1e-5 parameter differences
# between layouts after one step; 1e-4 keeps the comparison about parallelism, not Adam's conditioning.
# warmup_steps=0 and min_lr = lr: the Trainer's schedule holds the learning rate at lr from the first step.
TRAIN = TrainConfig(lr=2e-3, min_lr=2e-3, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-4, warmup_steps=0)
MBS, NUM_MICROBATCHES, STEPS = 2, 4, 3
IMAGES_PER_MICROBATCH = (1, 2, 0, 1)  # micro-batch 2 has no latent: the head is touched zero-weighted


def global_micro_batches(step: int) -> list[dict]:
    return [random_packed_batch(MBS, MODEL.seq_length, MODEL.vocab_size, MODEL.latent_dim, num_latents=6,
                                images_per_sequence=IMAGES_PER_MICROBATCH[i], seed=1000 * step + i)
            for i in range(NUM_MICROBATCHES)]


def my_micro_batches(batches: list[dict]) -> list[dict]:
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = len(batches) // dp
    return batches[rank * n:(rank + 1) * n]


def speech_micro_batches(step: int) -> list[dict]:
    """Micro-batches of speech documents packed by the real packer (`<BOD> prompt <EOD> text <BOD> target <EOD>
    <END_OF_DOCUMENT>`, runs of varying length): CE also at the latent positions (the stop targets)."""
    import numpy as np

    from latentlm_mcore.data.loader.packing import PackableDocument, SpecialIds, build_sequence, collate

    ids = SpecialIds(bod=250, eod=251, latent=252, end_of_document=253, pad=254)
    rng = np.random.default_rng(step)
    out = []
    for i in range(NUM_MICROBATCHES):
        seqs = []
        for b in range(MBS):
            k, t, n = (int(x) for x in rng.integers((2, 1, 3), (6, 4, 12)))
            tokens = np.asarray([ids.bod] + [ids.latent] * k + [ids.eod] + list(rng.integers(0, 250, t)) + [ids.bod]
                                + [ids.latent] * n + [ids.eod, ids.end_of_document], np.int32)
            doc = PackableDocument(index=i * MBS + b, source="speech", tokens=tokens,
                                   latents=rng.normal(size=(k + n, MODEL.latent_dim)).astype(np.float32))
            doc.mark_runs(ids)
            seqs.append(build_sequence([(doc.index, 0, len(tokens))], {doc.index: doc}, MODEL.seq_length,
                                       MODEL.latent_dim, ids, seed=1000 * step + i))
        out.append(collate(seqs))
    return out


def eval_batches() -> list[dict]:
    return my_micro_batches(global_micro_batches(step=99))


def gather_grad_buffers_over_dp(ddp) -> None:
    """After a distributed-optimizer reduce-scatter each DP rank holds only its shard of every
    bucket: all-gather them so each param's main_grad is the full reduced gradient again."""
    dp = ps.get_data_parallel_world_size()
    if dp == 1 or not ddp.ddp_config.use_distributed_optimizer:
        return
    for buffer in ddp.buffers:
        for bucket in buffer.buckets:
            shards = list(bucket.grad_data.chunk(dp))
            local = shards[ps.get_data_parallel_rank()].clone()
            dist.all_gather(shards, local, group=ps.get_data_parallel_group())


def canonical_tensors(model, which: str) -> dict:
    """name -> full unsharded tensor (grads or params) of the whole model, on global rank 0."""
    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    layer_numbers = {str(i): layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    mine = {}
    for name, p in model.named_parameters():
        t = (p.main_grad if which == "grad" else p.data).detach().clone().float()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            if "linear_fc1" in name:  # SwiGLU: each TP shard is [gate_r; up_r]
                halves = [x.chunk(2, dim=0) for x in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                t = torch.cat(parts, dim=p.partition_dim)
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(layer_numbers[parts[2]])
        mine[".".join(parts)] = t
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine if keep else None)
    merged = {}
    for d in everyone:
        merged.update(d or {})
    return merged


def head_is_replicated(model) -> bool:
    """On the last stage: the diffusion head is unsharded and bit-identical on every TP rank."""
    ok = torch.tensor([1.0])
    if model.post_process:
        for p in model.diffusion_head.parameters():
            copies = [torch.empty_like(p.data) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(copies, p.data.contiguous(), group=ps.get_tensor_model_parallel_group())
            if getattr(p, "tensor_model_parallel", False) or any(not torch.equal(c, copies[0]) for c in copies):
                ok[0] = 0.0
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def run_layout(name: str, parallel: ParallelConfig, out_dir: str, results: dict, save_trained=False, eval_trained=False,
               overlap=False, batches=global_micro_batches):
    init_distributed(parallel, seed=7)
    config = transformer_config(MODEL, parallel)
    model = build_model(MODEL, config, block_spec=local_block_spec(config))
    init_ckpt, trained_ckpt = os.path.join(out_dir, "init_ckpt"), os.path.join(out_dir, "tp2_trained_ckpt")
    if os.path.exists(os.path.join(init_ckpt, "metadata.json")):
        load_model([model], init_ckpt)
    else:
        save_model([model], init_ckpt)
    # the Trainer's DDP, optimizer and schedule; the steps are spelled out to read the gradients between
    trainer = Trainer(LatentLMConfig("parity", MODEL, TRAIN, parallel), chunks=[model], overlap=overlap)
    chunks, optimizer = trainer.chunks, trainer.optimizer
    record = {"steps": []}
    for step in range(STEPS):
        data = my_micro_batches(batches(step))
        optimizer.zero_grad()
        losses = forward_backward(chunks, iter(data), len(data), MODEL.seq_length, MBS)
        gather_grad_buffers_over_dp(chunks[0])
        grads = canonical_tensors(model, "grad")
        ok, grad_norm, _ = optimizer.step()
        with params_synced(chunks):  # the overlapped all-gather of the updated params is pending until then
            params = canonical_tensors(model, "param")
        record["steps"].append({**losses, "grad_norm": float(grad_norm), "update_ok": bool(ok),
                                "grads": grads, "params": params})
    if save_trained:
        save_model(chunks, trained_ckpt)
        record["eval_trained"] = evaluate(chunks, iter(eval_batches()), NUM_MICROBATCHES // ps.get_data_parallel_world_size(),
                                          MODEL.seq_length, MBS)
    if eval_trained:
        load_model(chunks, trained_ckpt)
        record["eval_trained"] = evaluate(chunks, iter(eval_batches()), NUM_MICROBATCHES // ps.get_data_parallel_world_size(),
                                          MODEL.seq_length, MBS)
    record["head_replicated"] = head_is_replicated(model)
    results[name] = record
    ps.destroy_model_parallel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["layouts", "reference"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    if args.phase == "layouts":
        run_layout("tp2", ParallelConfig(tensor_parallel=2, distributed_optimizer=True), args.out, results, save_trained=True)
        run_layout("tp2_sp", ParallelConfig(tensor_parallel=2, sequence_parallel=True), args.out, results)
        run_layout("pp2", ParallelConfig(pipeline_parallel=2), args.out, results, eval_trained=True)
        run_layout("dp2_distopt", ParallelConfig(distributed_optimizer=True), args.out, results)
        # overlapped grad reduce-scatter and param all-gather (on by default on GPUs)
        run_layout("dp2_distopt_overlap", ParallelConfig(distributed_optimizer=True), args.out, results, overlap=True)
        run_layout("tp2_speech", ParallelConfig(tensor_parallel=2), args.out, results, batches=speech_micro_batches)
    else:
        run_layout("reference", ParallelConfig(distributed_optimizer=False), args.out, results, eval_trained=True)
        run_layout("reference_speech", ParallelConfig(distributed_optimizer=False), args.out, results,
                   batches=speech_micro_batches)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(args.out, f"{args.phase}.pt"))
    shutdown_distributed()


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep the guard
    main()
