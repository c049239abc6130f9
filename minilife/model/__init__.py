"""The transformer: layers (RMSNorm, RoPE, SwiGLU), attention (+ KV cache), GPT, training objectives."""
from minilife.model.attention import KVCache, attention_math, build_attention_mask, causal_mask, prefix_lm_mask
from minilife.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, TokenEmbedding, apply_rope, rope_cos_sin
from minilife.model.objectives import ObjectiveBatch, causal_lm_batch, masked_lm_batch, prefix_lm_batch
from minilife.model.transformer import GPT, Block, ModelConfig

__all__ = [
    "GPT", "Block", "ModelConfig", "KVCache", "attention_math", "build_attention_mask", "causal_mask",
    "prefix_lm_mask", "RMSNorm", "RotaryEmbedding", "SwiGLU", "TokenEmbedding", "apply_rope", "rope_cos_sin",
    "ObjectiveBatch", "causal_lm_batch", "masked_lm_batch", "prefix_lm_batch",
]
