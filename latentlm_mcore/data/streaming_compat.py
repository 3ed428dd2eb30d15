"""Import mosaicml-streaming beside a CPU build of torch (see latentlm_mcore/compat/torchvision_ops.py).

Every module of ours that needs streaming imports it through `import_streaming()`.
"""
from latentlm_mcore.compat.torchvision_ops import make_torchvision_importable


def import_streaming():
    """Return the `streaming` module, after making its torchvision import work."""
    make_torchvision_importable()
    import streaming

    return streaming
