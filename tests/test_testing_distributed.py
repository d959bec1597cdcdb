import pytest
import torch
import torch.distributed as dist

from fipo_megatron.testing.distributed import run_distributed


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_run_distributed_allreduce():
    assert run_distributed(_allreduce_rank, 2) == [3.0, 3.0]


def test_run_distributed_reports_failure():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_fail_on_rank1, 2)
