"""Generation of mixed text / latent sequences: the shared loop, the Megatron backend, the tasks."""
from latentlm_mcore.inference.generation import (Decoder, RecomputeDecoder, Sample, SamplingConfig, SpecialTokens,
                                                 generate, sample_tokens, unconditional_prompt)

__all__ = ["Decoder", "RecomputeDecoder", "Sample", "SamplingConfig", "SpecialTokens", "generate", "sample_tokens",
           "unconditional_prompt"]
