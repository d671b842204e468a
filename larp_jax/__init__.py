"""larp_jax: LARP video tokenizer and AR generator in JAX/Flax."""
