"""FIPO algorithm core in pure PyTorch (no Megatron / vLLM / SGLang imports).

future_kl: discounted future log-prob shift (blockwise, O(B*L) memory); policy_loss: FIPO / DAPO /
GRPO losses behind one entry point; advantages: group-relative advantages; sampling: DAPO dynamic
sampling.
"""

from fipo_megatron.algo.advantages import (
    broadcast_to_tokens,
    group_advantages,
    length_weighted_mean_advantage,
)
from fipo_megatron.algo.future_kl import decay_gamma, discounted_suffix_sum, future_kl
from fipo_megatron.algo.losses import PolicyLossConfig, PolicyLossOutput, policy_loss
from fipo_megatron.algo.sampling import DynamicSampler, DynamicSamplingError

__all__ = [
    "future_kl",
    "decay_gamma",
    "discounted_suffix_sum",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "policy_loss",
    "group_advantages",
    "broadcast_to_tokens",
    "length_weighted_mean_advantage",
    "DynamicSampler",
    "DynamicSamplingError",
]
