"""SafeWork-JAX: safety-oriented RL post-training of vision-language models (SafeLadder) in JAX."""

__version__ = "0.1.0"
