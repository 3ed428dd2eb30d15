"""Process-level runtime helpers that import no Megatron: import the submodules explicitly."""
