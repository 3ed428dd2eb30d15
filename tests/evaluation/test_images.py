"""FID / IS / precision-recall equal the established implementations (pytorch-fid, torch-fidelity, a numpy
eigen path); ADM's reference-batch format; the sharded (2-process gloo) result equals the single-process one."""
import json

import numpy as np
import pytest
import torch

from latentlm_mcore.evaluation.images import (ImageSource, Reference, evaluate_images,
                                              frechet_distance, gaussian_statistics, inception_score,
                                              load_reference, precision_recall, save_reference)
from latentlm_mcore.evaluation.inception import InceptionV3
from tests.conftest import REPO, run_torchrun

from .conftest import write_folder


def _fid_by_eigen(mu1, s1, mu2, s2):
    """Independent path: tr sqrt(S1 S2) = tr sqrt(A S2 A) with A = S1^(1/2), both PSD square roots by eigh."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    w2 = np.linalg.eigvalsh(a @ s2 @ a)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w2, 0, None)).sum())


def test_fid_math_equals_pytorch_fid_and_eigen_path():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    y = rng.normal(0.3, 1.2, size=(400, 64)) @ rng.normal(size=(64, 64))
    (m1, s1), (m2, s2) = gaussian_statistics(x), gaussian_statistics(y)
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(calculate_frechet_distance(m1, s1, m2, s2), rel=1e-6)
    assert ours == pytest.approx(_fid_by_eigen(m1, s1, m2, s2), rel=1e-6)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_inception_score_and_precision_recall_math_equal_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(200, 1008))
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    ours = inception_score(logits)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-5)
    ref, gen = rng.normal(size=(300, 32)), rng.normal(0.5, 1.0, size=(250, 32))
    precision, recall = precision_recall(ref, gen)
    # torch-fidelity's order: (generated, real)
    expected = calculate_precision_recall_full(torch.from_numpy(gen), torch.from_numpy(ref), neighborhood=3)
    assert 0 < precision < 1 and 0 < recall < 1
    assert (precision, recall) == pytest.approx(tuple(float(v) for v in expected), abs=1e-6)


@pytest.mark.slow
def test_folder_metrics_equal_torch_fidelity_end_to_end(image_sets, weights_with_classifier):
    """torch-fidelity's own pipeline (its folder reader, network call, FID / IS / PRC) on the same folders
    and the same local weights file."""
    import torch_fidelity

    ref_dir, gen_dir = image_sets[0], image_sets[1]
    net = InceptionV3(str(weights_with_classifier))
    ours = evaluate_images(str(gen_dir), load_reference(str(ref_dir), net, batch_size=4), net, batch_size=4)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(gen_dir), input2=str(ref_dir), cuda=False, fid=True, isc=True, prc=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_layer_fid="2048", feature_layer_isc="logits_unbiased",
        feature_layer_prc="2048", feature_extractor_weights_path=str(weights_with_classifier),
        samples_shuffle=False, batch_size=4, save_cpu_ram=True)
    assert ours["fid"] > 1.0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)


@pytest.mark.slow
def test_adm_reference_batch_and_saved_reference(tmp_path, image_sets, inception, features):
    ref_images = image_sets[2]
    ref_features, gen_features = features
    from_folder = Reference.from_activations(ref_features)
    # ADM's reference batch: images in arr_0, mu / sigma precomputed, no activations
    adm = tmp_path / "VIRTUAL_like.npz"
    np.savez(adm, arr_0=ref_images, mu=from_folder.mu, sigma=from_folder.sigma)
    from_adm = load_reference(str(adm), inception)
    np.testing.assert_allclose(from_adm.activations, ref_features, rtol=0, atol=1e-5)
    saved = tmp_path / "ref.npz"
    save_reference(str(saved), from_folder)
    from_saved = load_reference(str(saved), inception)
    np.testing.assert_allclose(from_saved.activations, ref_features, rtol=0, atol=1e-5)
    mu, sigma = gaussian_statistics(gen_features)
    fids = [frechet_distance(mu, sigma, r.mu, r.sigma) for r in (from_folder, from_adm, from_saved)]
    assert fids[0] > 1.0 and fids == pytest.approx([fids[0]] * 3, rel=1e-6)


def test_bad_inputs_are_named(tmp_path, inception):
    mixed = write_folder(tmp_path / "mixed", [np.zeros((8, 8, 3), np.uint8)])
    from PIL import Image
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(mixed / "001.png")
    with pytest.raises(ValueError, match="001.png is 8x9.*must share a size"):
        ImageSource(str(mixed)).read(0, 2)
    np.savez(tmp_path / "no_images.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no_images.npz: no `arr_0`"):
        ImageSource(str(tmp_path / "no_images.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        ImageSource(str(tmp_path / "empty"))
    np.savez(tmp_path / "bad_stats.npz", mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="bad_stats.npz: mu .* not pool3 statistics"):
        load_reference(str(tmp_path / "bad_stats.npz"), inception)
    with pytest.raises(ValueError, match="no 1008-way classifier"):
        inception_score(np.full((4, 1008), np.nan))


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, image_sets, features):
    """The tool on 2 gloo processes (each extracts its half, one all-gather) against the library in-process."""
    ref_dir, gen_dir = image_sets[0], image_sets[1]
    out = tmp_path / "eval.json"
    run_torchrun(REPO / "tools" / "evaluate_images.py", 2,
                 ["--images", gen_dir, "--reference", ref_dir, "--batch-size", "3", "--output", out,
                  "--save-reference", tmp_path / "ref.npz"], tmp_path)
    sharded = json.loads(out.read_text())
    ref_features, gen_features = features
    mu, sigma = gaussian_statistics(gen_features)
    reference = Reference.from_activations(ref_features)
    assert sharded["num_images"] == 10 and sharded["num_reference"] == 10
    assert sharded["fid"] == pytest.approx(frechet_distance(mu, sigma, reference.mu, reference.sigma), rel=1e-6)
    assert (sharded["precision"], sharded["recall"]) == precision_recall(ref_features, gen_features)
    np.testing.assert_allclose(np.load(tmp_path / "ref.npz")["activations"], ref_features, rtol=0, atol=1e-5)
