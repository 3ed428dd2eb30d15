"""Losses for σ-VAE training: the paper's objective (eq. 6), an LPIPS-style perceptual term and a patch-GAN
hinge term with LDM's adaptive weight (paper §3.1.3 trains with both, following LDM/VQGAN)."""

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def sigma_vae_loss(recon: torch.Tensor, images: torch.Tensor, mu: torch.Tensor, beta: float):
    """‖x̂ − x‖² + β‖μ‖², both as per-element means. Returns (loss, mse, prior)."""
    mse = F.mse_loss(recon.float(), images.float())
    prior = mu.float().pow(2).mean()
    return mse + beta * prior, mse, prior


# torchvision's VGG16 `features` layout; keeping the indices identical lets its state_dict load unchanged.
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def _vgg16_features() -> nn.Sequential:
    layers, in_ch = [], 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = item
    return nn.Sequential(*layers)


class VGG16PerceptualLoss(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 activations at five depths, squared difference,
    averaged over channels, space and depths (uniform weights; LPIPS's learned linear heads are not used).

    Weights come only from a local file: a torchvision VGG16 state_dict (`vgg16-397923af.pth`, keys
    `features.N.*`; the classifier is ignored) or just its `features` part. Nothing is ever downloaded.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"perceptual loss needs VGG16 weights in a local file, and none is at {weights_path!r}. "
                "Nothing is downloaded: place a torchvision VGG16 state_dict (e.g. vgg16-397923af.pth) on "
                "disk and pass its path, or disable the perceptual loss.")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"perceptual-loss weights {weights_path} are not a readable torch file: {e}") from e
        features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        self.features = _vgg16_features()
        missing, unexpected = self.features.load_state_dict(features, strict=False)
        if missing or unexpected:
            raise ValueError(f"perceptual-loss weights {weights_path} are not a VGG16 state_dict: "
                             f"missing {missing[:4]}..., unexpected {unexpected[:4]}...")
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen feature extractor, never in training mode

    def _taps(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation VGG was trained with
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
            if i == _LPIPS_TAPS[-1]:
                break
        return out

    def forward(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        recon, images = recon.to(self.mean.dtype), images.to(self.mean.dtype)
        dists = [(a - b).pow(2).sum(1).mean() for a, b in zip(self._taps(recon), self._taps(images))]
        return torch.stack(dists).mean()


class PatchDiscriminator(nn.Module):
    """pix2pix/VQGAN-style patch discriminator: one real/fake logit per overlapping image patch.
    GroupNorm rather than BatchNorm so real and fake batches can share one forward under DDP."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(ch, out, 4, stride, 1), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images):
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, factor: float,
                        max_weight: float = 1e4) -> torch.Tensor:
    """LDM / taming-transformers' adaptive GAN weight: ‖∇_w L_rec‖ / (‖∇_w L_G‖ + 1e-4) at the decoder's last
    layer w, clamped to [0, max_weight], detached, times `factor` — the GAN term then pulls on the decoder about
    as hard as the reconstruction does, whatever their raw scales.

    Under torch.distributed the two gradients are first averaged over ranks (as the update will average them),
    so every rank uses the same weight, the one a single process would compute on the whole batch."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    grads = torch.stack([rec_grad.float(), g_grad.float()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grads)
        grads /= dist.get_world_size()
    ratio = grads[0].norm() / (grads[1].norm() + 1e-4)
    return ratio.clamp(0.0, max_weight).detach() * factor
