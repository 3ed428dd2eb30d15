"""torchrun worker: what each real rank of a TP x PP x DP layout allocates (parameters, FP32 gradient
buffer, FP32 main parameters + Adam moments after one real optimizer step), counted by storage, next to
what the planner (training/memory.py) says for the same rank kind, computed before the real process
group exists. Writes rank<r>.json."""
import argparse
import json
import os
from pathlib import Path

import torch


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from latentlm_mcore.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from latentlm_mcore.training.memory import Layout, rank_states

    world = int(os.environ["WORLD_SIZE"])
    dp = world // (args.tp * args.pp)
    model = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, vocab_size=512,
                        seq_length=32, latent_dim=8, head_layers=2)
    layout = Layout(args.tp, args.pp, dp)
    planned = {s.pipeline_rank: s for s in rank_states(model, layout)}

    from megatron.core import parallel_state

    from latentlm_mcore.config import LatentLMConfig
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
    from latentlm_mcore.data.loader.synthetic import random_packed_batch
    from latentlm_mcore.training.trainer import Trainer

    cfg = LatentLMConfig("memory-check", model, TrainConfig(global_batch_size=2 * dp, micro_batch_size=1),
                         ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    init_distributed(cfg.parallel)
    trainer = Trainer(cfg, RunConfig(precision="bf16"))
    ddp, optimizer = trainer.chunks, trainer.optimizer
    chunks = [c.module for c in ddp]
    batches = iter([random_packed_batch(1, model.seq_length, model.vocab_size, model.latent_dim, 4, 1, seed=i)
                    for i in range(2)])
    trainer.step(batches)  # Adam's moments exist after the first step
    params = [p for c in chunks for p in c.parameters()]
    grads = [p.main_grad for p in params]
    main, states = [], []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        main += [p for g in opt.shard_fp32_from_float16_groups for p in g] + [p for g in opt.shard_fp32_groups for p in g]
        states += [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    plan = planned[pp_rank]
    real = {"params": sum(p.numel() for p in params), "param_bytes": storage_bytes(params),
            "grad_bytes": storage_bytes(grads), "optimizer_bytes": storage_bytes(main) + storage_bytes(states)}
    rank = torch.distributed.get_rank()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "pp_rank": pp_rank, "real": real,
        "planned": {k: getattr(plan, k) for k in ("params", "param_bytes", "grad_bytes", "optimizer_bytes")}}))
    shutdown_distributed()


if __name__ == "__main__":
    main()
