"""All multi-process CP tests, in ONE gloo launch per world size (process start-up is the cost).

world 2: cp_future_kl at CP=2; policy loss at CP2xDP1 and CP1xDP2.
world 4: cp_future_kl at CP=4 and at CP=2 on two CP groups (CP2xDP2); loss at CP2xDP2 and CP4xDP1.
"""
from __future__ import annotations

import pytest

from fipo_megatron.testing.distributed import run_distributed
from test_parallel_cp_future_kl import check_fkl, check_prompt_only_ranks, fkl_part
from test_parallel_cp_loss import check_loss, loss_part

SEED = {2: 11, 4: 12}


def _worker(rank, world):
    if world == 2:
        fkl = {2: fkl_part(rank, world, 2)}
        loss = loss_part(rank, world, [(1, 2), (2, 1)], SEED[2])
    else:
        fkl = {4: fkl_part(rank, world, 4), 2: fkl_part(rank, world, 2)}
        loss = loss_part(rank, world, [(2, 2), (4, 1)], SEED[4])
    return fkl, loss


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_worker, 2)


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_worker, 4)


def test_cp_future_kl_cp2(world2):
    check_fkl([r[0][2] for r in world2], 2)


def test_cp_future_kl_cp4(world4):
    check_fkl([r[0][4] for r in world4], 4)


def test_cp_future_kl_cp2_on_two_dp_groups(world4):
    check_fkl([r[0][2] for r in world4], 2)


def test_prompt_only_ranks_do_not_hang_and_contribute_nothing(world4):
    check_prompt_only_ranks([r[0][4] for r in world4])


def test_loss_cp2_and_dp2(world2):
    check_loss([r[1] for r in world2], SEED[2])


def test_loss_cp4_and_cp2xdp2(world4):
    check_loss([r[1] for r in world4], SEED[4])
