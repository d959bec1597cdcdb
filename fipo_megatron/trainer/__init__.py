"""The RL trainer: config dataclasses + Megatron-style arguments, rollout step, Megatron actor, driver loop.

Public names: ``TrainConfig`` (and one dataclass per concern), ``parse_args``, ``train``.
"""
from fipo_megatron.trainer.args import parse_args
from fipo_megatron.trainer.config import TrainConfig


def train(cfg: TrainConfig):
    """Run training (see :func:`fipo_megatron.trainer.loop.train`)."""
    from fipo_megatron.trainer.loop import train as _train

    return _train(cfg)


__all__ = ["TrainConfig", "parse_args", "train"]
