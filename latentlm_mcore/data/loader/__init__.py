"""The runtime loader: the weighted document mixture over MDS shards (`mixture`), packing documents into
fixed-length sequences (`packing`) and the one global stream of packed sequences that data-parallel ranks take
by index (`packed`). Reads what `data/prep` wrote; never writes datasets.
"""
