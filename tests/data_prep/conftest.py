# Real images, the tiny σ-VAE and the per-test temp folder are shared with the data tests.
from tests.data.conftest import _private_tempdir, image_root, vae_checkpoint  # noqa: F401
