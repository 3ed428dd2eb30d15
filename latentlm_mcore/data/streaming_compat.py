"""Import mosaicml-streaming beside a CPU build of torch (see latentlm_mcore/compat/torchvision_ops.py).

Every module of ours that needs streaming imports it through `import_streaming()`, which also makes its
datasets choose their shared-memory prefix robustly (`latentlm_mcore.data.shared_memory`).
"""
from latentlm_mcore.compat.torchvision_ops import make_torchvision_importable


def import_streaming():
    """Return the `streaming` module, after making its torchvision import work."""
    make_torchvision_importable()
    import streaming

    from latentlm_mcore.data import shared_memory

    shared_memory.install()

    return streaming
