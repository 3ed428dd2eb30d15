"""Hugging Face export: configuration + modeling code written into converted folders, and the converter."""
import importlib.util


def _hide_unloadable_torchvision() -> None:
    """transformers imports torchvision whenever it is installed. PyPI's torchvision (pulled in by
    mosaicml-streaming) is a CUDA build; beside torch+cpu its import raises `operator torchvision::nms
    does not exist`, and then no transformers model imports at all. We need nothing from torchvision:
    when it cannot import, tell transformers it is absent. (Same root cause as
    latentlm_mcore/data/streaming_compat.py; a no-op where torchvision imports.)"""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        import transformers.utils.import_utils as import_utils

        import_utils._torchvision_available = False


_hide_unloadable_torchvision()
