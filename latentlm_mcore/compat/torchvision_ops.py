"""Let PyPI's torchvision import beside a CPU build of torch.

mosaicml-streaming (imported for data) pulls in torchvision, and transformers imports it whenever it is
installed. PyPI's torchvision 0.28 is a CUDA build; beside torch+cpu its compiled ops (`_C.so`) fail to
load, yet its `_meta_registrations` still registers fake kernels for `torchvision::nms` and
`torchvision::qnms` at import, which raises `RuntimeError: operator torchvision::nms does not exist`.
Defining the two op schemas first (no kernels) lets the pure-python parts of torchvision import; we never
call those ops. Where torchvision's compiled ops load (matching builds, GPU machines) this does nothing.
"""
import glob
import importlib.util
import os

import torch

_schemas = None  # keeps the torch.library.Library alive (dropping it removes the schemas)


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to repair
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
        return True
    except (OSError, ImportError, RuntimeError):
        return False


def _nms_defined() -> bool:
    """Already there: torchvision's ops loaded, or a repair ran (the .venv import hook, torchvision_hook.py)."""
    # the schema registry, not `torch.ops.torchvision.nms`: that lookup imports torchvision when the op is missing
    return bool(torch._C._jit_get_schemas_for_operator("torchvision::nms"))


def make_torchvision_importable() -> None:
    """Call before anything imports torchvision (streaming, transformers). Idempotent."""
    global _schemas
    # _compiled_ops_load first: its find_spec("torchvision") may run the .venv import hook, which repairs
    if _schemas is None and not _compiled_ops_load() and not _nms_defined():
        _schemas = torch.library.Library("torchvision", "DEF")
        _schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold, Tensor rscale) -> Tensor")
