"""An exponential moving average of the weights (DiT's recipe, which the paper's ImageNet runs follow: decay
0.9999, updated after every optimizer step, sampled from instead of the raw weights).

The EMA is kept in fp32 where the optimizer keeps its fp32 main parameters: with the distributed optimizer
each data-parallel rank holds the EMA of its own shard of every parameter (the shard its main parameters and
Adam moments cover), so it costs 4 bytes per parameter / DP, and the update reads no other rank. In the
distributed checkpoint it is stored beside the model as `callbacks.ema.<the model's own keys>`, sharded like
the model's tensors (TP / PP offsets from megatron's own `sharded_state_dict`), so a checkpoint loads at any
TP / PP / DP: at save time the DP shards are gathered into this rank's TP / PP piece (as megatron's
"fully_reshardable" optimizer state is), at load time each rank keeps its shard of the loaded piece.

Inference and export read it through `load_ema_weights` (inference/megatron.py, `--use-ema`).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.utils import unwrap_model

from latentlm_mcore.training.trainer import TrainerCallback

PREFIX = "callbacks.ema."  # the EMA's tensors in the checkpoint: this prefix + the model's key


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_param_shards(optimizer) -> list[tuple[torch.nn.Parameter, torch.Tensor, int, int, bool]]:
    """(model parameter, its fp32 main tensor on this rank, flat start, flat end, sharded over DP) for every
    parameter the optimizer updates. Distributed optimizer: the main tensor is this DP rank's shard
    [start, end) of the flattened parameter; otherwise the whole fp32 main copy (or the fp32 parameter)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    out = []
    for opt in _optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer):
            groups = [(opt.model_fp32_groups, opt.shard_fp32_groups),
                      (opt.model_float16_groups, opt.shard_fp32_from_float16_groups)]
            for model_groups, main_groups in groups:
                for model_group, main_group in zip(model_groups, main_groups):
                    for param, main in zip(model_group, main_group):
                        if main is None:
                            raise ValueError("the EMA reads the optimizer's fp32 main parameters; the precision-"
                                             "aware optimizer keeps none")
                        r = opt._get_model_param_range_map(param)["param"]
                        out.append((param, main, r.start, r.end, True))
        elif hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params: full fp32 copies
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                out += [(p, m, 0, p.numel(), False) for p, m in zip(model_group, main_group)]
            out += [(p, p, 0, p.numel(), False) for group in opt.fp32_from_fp32_groups for p in group]
        else:  # FP32Optimizer: the parameters are the main parameters
            out += [(p, p, 0, p.numel(), False) for group in opt.param_groups for p in group["params"]]
    return out


@contextmanager
def weights_swapped(pairs):
    """Inside: each parameter's data is the given tensor (same shape); restored after."""
    saved = [(p, p.data) for p, _ in pairs]
    try:
        for p, t in pairs:
            p.data = t
        yield
    finally:
        for p, data in saved:
            p.data = data


def _detach_data(state: dict) -> dict:
    """megatron builds a parameter's ShardedTensor on the Parameter object itself: point it at the tensor the
    parameter holds now (the EMA), so that restoring the parameter leaves the sharded state dict alone."""
    for value in state.values():
        if isinstance(value, dict):
            _detach_data(value)
        elif isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            value.data = value.data.detach()
    return state


def ema_sharded_state_dict(chunks, full: dict) -> dict:
    """{chunk index: {model key: ShardedTensor}} of the tensors in `full` (parameter -> a tensor of its shape),
    laid out as megatron lays out the model's own parameters, under keys `PREFIX + model key`."""
    out = {}
    for i, chunk in enumerate(unwrap_model(chunks)):
        names = {name: p for name, p in chunk.named_parameters()}
        with weights_swapped([(p, full[p]) for p in names.values() if p in full]):
            state = chunk.sharded_state_dict(prefix=PREFIX)
            state = {k: v for k, v in state.items() if k[len(PREFIX):] in names and names[k[len(PREFIX):]] in full}
            out[f"chunk{i}"] = _detach_data(state)
    return out


def loaded_ema_tensors(chunks, loaded: dict) -> dict:
    """parameter -> its EMA tensor (this rank's TP / PP piece), from what `dist_checkpointing.load` returned
    for `ema_sharded_state_dict`."""
    out = {}
    for i, chunk in enumerate(unwrap_model(chunks)):
        names = dict(chunk.named_parameters())
        for key, tensor in loaded[f"chunk{i}"].items():
            out[names[key[len(PREFIX):]]] = tensor
    return out


def load_ema_weights(chunks, directory: str) -> None:
    """Replace the weights of `chunks` by the EMA stored in checkpoint `directory` (any layout). Raises
    naming the checkpoint when it holds no EMA (a run trained with train.ema_decay 0)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    if not any(key.startswith(PREFIX) for key in load_sharded_metadata(directory)):
        raise ValueError(f"{directory}: the checkpoint holds no EMA of the weights (trained with train.ema_decay 0)")
    params = [p for chunk in unwrap_model(chunks) for p in chunk.parameters()]
    targets = {p: torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in params}
    loaded = dist_checkpointing.load(ema_sharded_state_dict(chunks, targets), directory)
    with torch.no_grad():
        for p, tensor in loaded_ema_tensors(chunks, loaded).items():
            p.copy_(tensor)


class ExponentialMovingAverage(TrainerCallback):
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step, from the fp32 main parameters;
    starts as the weights the trainer starts from (DiT's `update_ema(ema, model, decay=0)`)."""

    name = "ema"

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) to keep an EMA (0 turns it off), got {decay}")
        self.decay = decay
        self.shards: list = []
        self.ema: list[torch.Tensor] = []

    def attach(self, trainer) -> None:
        self.shards = main_param_shards(trainer.optimizer)
        self.ema = [main.detach().float().clone() for _, main, _, _, _ in self.shards]

    @torch.no_grad()
    def on_step_end(self, trainer, result: dict) -> None:
        for (_, main, _, _, _), ema in zip(self.shards, self.ema):
            ema.mul_(self.decay).add_(main.detach().float(), alpha=1.0 - self.decay)

    def full_tensors(self) -> dict:
        """parameter -> its EMA as a whole tensor of this rank's TP / PP piece (DP shards gathered)."""
        sizes = [param.numel() for param, *_ in self.shards]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=self.ema[0].device if self.ema else None)
        full, offset = {}, 0
        for (param, _, start, end, _), ema, n in zip(self.shards, self.ema, sizes):
            flat[offset + start:offset + end] = ema
            full[param] = flat[offset:offset + n].view(param.shape)
            offset += n
        if any(s[4] for s in self.shards) and parallel_state.get_data_parallel_world_size() > 1:
            # each DP rank filled its own disjoint ranges: a sum is the gather, in one collective
            torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        return full

    def sharded_state_dict(self, trainer, is_loading: bool = False) -> dict:
        if is_loading:  # targets of this rank's TP / PP shape, filled by the load
            full = {p: torch.empty(p.shape, dtype=torch.float32, device=p.device) for p, *_ in self.shards}
        else:
            full = self.full_tensors()
        return ema_sharded_state_dict(trainer.chunks, full)

    def load_sharded_state_dict(self, trainer, loaded: dict) -> None:
        tensors = loaded_ema_tensors(trainer.chunks, loaded)
        self.ema = [tensors[param].reshape(-1)[start:end].to(ema.device).float().clone()
                    for (param, _, start, end, _), ema in zip(self.shards, self.ema)]

    def state_dict(self) -> dict:
        return {"decay": self.decay}
