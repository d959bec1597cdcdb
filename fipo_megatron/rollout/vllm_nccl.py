"""The trainer side of vLLM's NCCL weight transfer (imported lazily: vLLM is needed only when used).

`NCCL_TRANSPORTS[api] = (group_factory(cfg) -> group, send(bucket, group, device))` for the transfer API
of the servers' version (`versions.vllm_nccl_trainer_api`): "legacy" (0.17 - 0.27) and "engine" (>= 0.28),
unpacked (one broadcast per tensor); `_legacy_trainer_send_packed` / `_engine_trainer_send_packed` are
the packed senders (`VLLMServerEngine(packed=True)`).
"""
from __future__ import annotations

from typing import Any, Callable

from .buckets import Bucket, packed_chunks
from .weight_sync import NcclSyncConfig


def _legacy_trainer_init(cfg: NcclSyncConfig) -> Any:
    """vLLM 0.17 - 0.27: the trainer's group from `NCCLWeightTransferEngine.trainer_init`."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine  # type: ignore

    return NCCLWeightTransferEngine.trainer_init(
        dict(master_address=cfg.master_address, master_port=int(cfg.master_port), world_size=cfg.world_size))


def _legacy_trainer_send(bucket: Bucket, group: Any, device: str) -> None:
    """vLLM 0.17 - 0.27: `trainer_send_weights` with `NCCLTrainerSendWeightsArgs(packed=False)`."""
    from vllm.distributed.weight_transfer.nccl_engine import (  # type: ignore
        NCCLTrainerSendWeightsArgs,
        NCCLWeightTransferEngine,
    )

    NCCLWeightTransferEngine.trainer_send_weights(
        iterator=((n, t.detach().to(device).contiguous()) for n, t in bucket),
        trainer_args=NCCLTrainerSendWeightsArgs(group=group, packed=False),
    )


def _engine_trainer_init(cfg: NcclSyncConfig) -> Any:
    """vLLM >= 0.28: the rank-0 communicator that `NCCLTrainerWeightTransferEngine.trainer_init`
    opens (`vllm.distributed.weight_transfer.nccl_common.trainer_init`); the HTTP side is ours."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init  # type: ignore

    return trainer_init(dict(master_address=cfg.master_address, master_port=int(cfg.master_port),
                             world_size=cfg.world_size))


def _engine_trainer_send(bucket: Bucket, group: Any, device: str) -> None:
    """vLLM >= 0.28, unpacked: one broadcast from rank 0 per tensor, in the announced order."""
    import torch

    stream = torch.cuda.current_stream()
    for _, tensor in bucket:
        group.broadcast(tensor.detach().to(device).contiguous(), src=0, stream=stream)


def _legacy_trainer_send_packed(bucket: Bucket, group: Any, device: str) -> None:
    """vLLM 0.17 - 0.27, packed: vLLM's own producer (`packed=True`), whose buffer size the server's
    consumer shares (the same vLLM constant on both sides)."""
    from vllm.distributed.weight_transfer.nccl_engine import (  # type: ignore
        NCCLTrainerSendWeightsArgs,
        NCCLWeightTransferEngine,
    )

    NCCLWeightTransferEngine.trainer_send_weights(
        iterator=((n, t.detach().to(device).contiguous()) for n, t in bucket),
        trainer_args=NCCLTrainerSendWeightsArgs(group=group, packed=True),
    )


def _engine_trainer_send_packed(bucket: Bucket, group: Any, device: str, *, buffer_bytes: int) -> None:
    """vLLM >= 0.28, packed: the bucket as raw-byte chunks cut like the server's
    `packed_nccl_broadcast_consumer` (`buckets.packed_chunks`), one broadcast per chunk."""
    import torch

    stream = torch.cuda.current_stream()
    for _, chunk in packed_chunks(bucket, buffer_bytes, device):
        group.broadcast(chunk, src=0, stream=stream)


NCCL_TRANSPORTS: dict[str, tuple[Callable[[NcclSyncConfig], Any], Callable[[Bucket, Any, str], None]]] = {
    "legacy": (_legacy_trainer_init, _legacy_trainer_send),
    "engine": (_engine_trainer_init, _engine_trainer_send),
}
