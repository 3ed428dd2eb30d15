"""Readable output: library warnings we know to be benign are shown once, or not at all.

A CPU or GPU run prints, from every rank, warnings about things the user cannot change and we have
checked: megatron-core calls torch.distributed functions that torch has deprecated, megatron's layer-spec
and optimizer modules announce at import that apex / Transformer Engine are absent, and TransformerConfig
repeats its deprecation notes. Python also echoes the source line of each warning (`warnings.warn(`
fragments). `install_warning_filters()` hides the first group, shows the rest once per process, and prints
each warning as one line. Warnings from our own code and from anything not listed keep Python's defaults;
errors are untouched. LATENTLM_VERBOSE=1 turns all of this off.

Entry points (pretrain/, tools/) call it first; torchrun's ranks run the entry point, so they get it too.
"""
from __future__ import annotations

import os
import warnings

# (action, message regex matched at the start, category, module regex of the code that warns)
BENIGN_WARNINGS = (
    # megatron-core 0.16-0.19 use these; torch 2.13 deprecates them in favour of *_single
    ("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     FutureWarning, ""),
    ("ignore", r"`torch\.distributed\._(reduce_scatter|all_gather)_base` is a private function", FutureWarning, ""),
    # at import of megatron's layer specs and optimizers; the fallbacks they name are what runs without
    # apex / Transformer Engine, and our local spec uses its own norm (compat.SPRMSNorm)
    ("ignore", r"Apex is not installed", UserWarning, r"megatron\.core"),
    ("ignore", r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core"),
    # megatron-core 0.19 imports its MIMO configs whether or not a MIMO model is built
    ("ignore", r"MimoModelConfig is experimental", UserWarning, r"megatron\.core"),
    # megatron reads `.grad` of non-leaf tensors; torch warns on each access (through the CPU switch's
    # torch-function mode, hence the module); the gradients megatron wants are there, tests/training checks
    ("ignore", r"The \.grad attribute of a Tensor that is not a leaf Tensor", UserWarning, r""),
    # TransformerConfig maps the legacy "full" CUDA-graph scope to the whole layer, which is what we ask for
    ("ignore", r"full scope is deprecated", UserWarning, r"megatron\.core"),
    # a speed hint for GPU comm/compute overlap; CPU runs have no streams and GPU launches set the variable
    ("ignore", r"When using (sequence parallelism|async grad allreduce) it is recommended to set the "
     r"environment variable CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, r"megatron\.core"),
    # megatron's dist-checkpointing loads through these torch.distributed.checkpoint APIs; the checkpoint
    # format they read is what torch 2.13 still writes
    ("ignore", r"`load_state_dict` is deprecated and will be removed", FutureWarning, ""),
    ("ignore", r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, ""),
    # the rest of megatron's notes (TransformerConfig.__post_init__ runs once per model chunk and per
    # evaluation model): once per process
    ("once", r"", UserWarning, r"megatron\.core"),
)


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def install_warning_filters() -> bool:
    """Apply the filters above (idempotent). Returns False when LATENTLM_VERBOSE=1 asked for everything."""
    if os.environ.get("LATENTLM_VERBOSE", "0") == "1":
        return False
    warnings.formatwarning = _one_line
    # every rank warns alike: rank 0 shows the "once" notes, the other ranks none of them
    other_rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0
    # filterwarnings inserts at the front: add the general entries first so that the specific ones win
    for action, message, category, module in reversed(BENIGN_WARNINGS):
        action = "ignore" if other_rank and action == "once" else action
        warnings.filterwarnings(action, message=message, category=category, module=module)
    return True
