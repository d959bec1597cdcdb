"""Packing of RL samples into model inputs and context-parallel (CP) sharding, Future-KL and loss.

Modules: `packing` (micro-batching, BSHD / THD layouts, label alignment, unpack), `cp_shard` (the
only CP offset arithmetic: zigzag split, gather back), `cp_future_kl` (distributed reverse prefix
sum), `cp_loss` (policy loss under CP with exact cross-rank normalisation). Import the submodules
directly; this package imports nothing heavy.
"""
