"""Data: the document format both sides read (`schema`: MDS columns, special ids, reject reasons, manifests),
the tokenizer, offline preparation (`prep/`: converters, preprocessing into MDS shards) and the runtime loader
(`loader/`: the streaming mixture, the packer, the global stream of sequences).

Nothing here knows about Megatron: the loader takes (dp_rank, dp_world_size) and tensor/pipeline peers of a
data-parallel rank pass the same dp_rank, so they read identical samples without communicating.
"""
