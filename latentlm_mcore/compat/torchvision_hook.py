"""Import hook that runs `torchvision_ops.make_torchvision_importable` just before torchvision is imported.

`scripts/setup_env.sh` installs it into a venv whose torchvision cannot load its compiled ops (the CPU
torch of .venv beside PyPI's CUDA torchvision; no CPU torchvision for torch 2.13 is on PyPI, and
mosaicml-streaming imports torchvision at `import streaming`): a one-line `.pth` file imports this file,
copied as `_latentlm_torchvision_hook.py`, at interpreter start. It only adds a finder; torch and the
repair load when something first imports torchvision, so plain `from streaming import StreamingDataset`
works in a fresh interpreter. The repair is loaded from its file, without importing latentlm_mcore.
"""
import importlib.abc
import importlib.util
import os
import sys


class _RepairTorchvisionFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        package = importlib.util.find_spec("latentlm_mcore")
        if package is not None and package.origin:
            ops = os.path.join(os.path.dirname(package.origin), "compat", "torchvision_ops.py")
            spec = importlib.util.spec_from_file_location("_latentlm_torchvision_ops", ops)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # keeps its op schemas alive (they go when the module is collected)
            spec.loader.exec_module(module)
            module.make_torchvision_importable()
        return None  # the regular finders import torchvision itself


if not any(isinstance(f, _RepairTorchvisionFirst) for f in sys.meta_path):
    sys.meta_path.insert(0, _RepairTorchvisionFirst())
