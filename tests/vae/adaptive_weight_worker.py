"""Run under torchrun (gloo): each rank takes its half of one batch and computes the adaptive GAN weight;
rank r writes it to OUT/weight_r.json (test_losses.py compares it with one process on the whole batch)."""

import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from latentlm_mcore.vae.losses import adaptive_gan_weight  # noqa: E402
from tests.vae.test_losses import _losses, _tiny_decoder_and_batch  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
decoder, disc, z, target = _tiny_decoder_and_batch()
half = len(z) // world
rec, g = _losses(decoder, disc, z[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half])
weight = adaptive_gan_weight(rec, g, decoder[2].weight, factor=0.5).item()
with open(os.path.join(sys.argv[1], f"weight_{rank}.json"), "w") as f:
    json.dump(weight, f)
dist.destroy_process_group()
