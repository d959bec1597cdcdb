"""Megatron-Core backbone for fipo_megatron (see docs/DESIGN.md).

Modules (import them directly; this package imports nothing heavy on its own):
  cpu_compat  the only place that neutralises Megatron's CUDA assumptions (CPU / tests only)
  parallel    initialize_parallel / destroy_parallel and TP/PP/CP/DP accessors
  qwen        Qwen2.5 presets, HF config -> TransformerConfig, build_model, forward_logits
  logprobs    token log-probs (+ entropy) from vocab-parallel logits, chunked over tokens
  schedule    forward_backward over micro-batches (get_forward_backward_func)
  optim       Megatron DDP + (distributed) optimizer + scheduler, train_step
  checkpoint  atomic training checkpoints (model, optimizer, scheduler, RNG, trainer state)
"""
