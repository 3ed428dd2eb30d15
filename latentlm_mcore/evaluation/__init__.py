"""Image-quality evaluation the field accepts (FID, Inception Score, precision/recall); no Megatron import."""
