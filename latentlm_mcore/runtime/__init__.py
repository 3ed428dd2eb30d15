"""Process-level runtime helpers that import no Megatron (import each submodule explicitly)."""
