"""The data tests' fixtures (a tiny σ-VAE, a private TMPDIR) for the demo corpus tests."""
from tests.data.conftest import _private_tempdir, vae_checkpoint  # noqa: F401
