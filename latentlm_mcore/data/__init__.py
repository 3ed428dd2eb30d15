"""Data: tokenizer, the MDS schema and preprocessing, converters, the streaming mixture and the packer.

Nothing here knows about Megatron: the loader takes (dp_rank, dp_world_size) and tensor/pipeline peers of a
data-parallel rank pass the same dp_rank, so they read identical samples without communicating.
"""
