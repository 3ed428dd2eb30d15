"""Import mosaicml-streaming beside a CPU build of torch.

`import streaming` imports `streaming.vision`, which imports torchvision. PyPI's torchvision 0.28 is a
CUDA build; beside torch+cpu its compiled ops (`_C.so`) fail to load, yet its `_meta_registrations`
still registers fake kernels for `torchvision::nms` and `torchvision::qnms` at import, which raises
`RuntimeError: operator torchvision::nms does not exist`. Defining the two op schemas first (no kernels)
lets the pure-python parts of torchvision import; we never call those ops. On a machine where
torchvision's compiled ops load (matching CUDA/CPU builds) this does nothing.

Every module of ours that needs streaming imports it through `import_streaming()`.
"""

import glob
import importlib.util
import os

import torch

_torchvision_schemas = None  # keeps the torch.library.Library alive (dropping it removes the schemas)


def _torchvision_ops_load() -> bool:
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


def import_streaming():
    """Return the `streaming` module, defining torchvision's missing op schemas first if needed."""
    global _torchvision_schemas
    if _torchvision_schemas is None and not _torchvision_ops_load():
        _torchvision_schemas = torch.library.Library("torchvision", "DEF")
        _torchvision_schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_schemas.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold, Tensor rscale) -> Tensor")
    import streaming

    return streaming
