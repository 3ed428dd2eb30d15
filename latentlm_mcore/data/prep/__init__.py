"""Offline preparation: raw corpora -> raw JSONL (`convert`), raw JSONL -> MDS shards of token ids and σ-VAE
latents (`preprocess`). Runs before training, on a job array; nothing here is imported by the training loop.
"""
