"""Hugging Face export: configuration + modeling code written into converted folders, and the converter."""
from latentlm_mcore.compat.torchvision_ops import make_torchvision_importable

make_torchvision_importable()  # transformers imports torchvision whenever it is installed
