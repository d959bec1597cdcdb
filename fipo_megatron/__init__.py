"""fipo_megatron: FIPO RL post-training on Megatron-Core."""

__version__ = "0.1.0"
