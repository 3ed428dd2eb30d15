"""Save-and-exit on preemption: SIGTERM and SIGUSR1 (Slurm's time limit / preemption notice, e.g.
`#SBATCH --signal=USR1@120`) only set a flag; the training loop agrees on it over all ranks after a step,
saves a checkpoint at that step boundary and returns. Every trainer uses this one flag."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs the stop-signal handlers; `received` names the first signal seen (None until then).
    `restore()` (or leaving the `with` block) puts back the handlers that were there before."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def any_rank(self, device=None) -> bool:
        """True when some rank has received a stop signal (collective when a process group is up)."""
        return any_rank(self.received is not None, device=device)[0]

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def any_rank(*flags: bool, device=None) -> list[bool]:
    """Each flag OR-ed over all ranks in one all-reduce, so every rank stops or fails at the same step instead
    of hanging in the next collective. Without a process group: the flags as given."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
