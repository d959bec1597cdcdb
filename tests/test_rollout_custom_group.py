"""init_custom_process_group + default_broadcast on 2 gloo processes (kept light: the spawned
children import this module, so it imports only torch)."""
import torch


def _custom_group_broadcast(rank, world_size, port):
    """Each rank already has its default group (like the trainer under torchrun and the server's
    workers); both build a SEPARATE group with init_custom_process_group and broadcast over it."""
    from fipo_megatron.rollout.weight_sync import default_broadcast, init_custom_process_group

    group = init_custom_process_group("127.0.0.1", port, rank, world_size, "fipo_test_sync", backend="gloo",
                                      timeout_s=60)
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) if rank == 0 else torch.zeros(2, 3)
    default_broadcast(t, group)
    return t.tolist()


def test_init_custom_process_group_and_broadcast_gloo():
    from fipo_megatron.testing.distributed import free_port, run_distributed

    out = run_distributed(_custom_group_broadcast, 2, free_port())
    assert out[0] == out[1] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def _sglang_like_side(port, world_size, group_name):
    """Independent model of SGLang's server side (sglang.srt.utils.init_custom_process_group): its
    store is wrapped in PrefixStore(group_name, store) before the group is built."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(f"tcp://127.0.0.1:{port}", 1, world_size,
                                                   timeout=timedelta(seconds=60)))
    store = c10d.PrefixStore(group_name, store)
    helper_args = c10d._new_process_group_helper.__code__.co_varnames
    opt = "backend_options" if "backend_options" in helper_args else "pg_options"
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], "gloo", store, group_name=group_name,
                                           **{opt: None}, timeout=timedelta(seconds=60))
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _trainer_vs_sglang_side(rank, world_size, port):
    from fipo_megatron.rollout.weight_sync import default_broadcast, init_custom_process_group

    if rank == 0:
        group = init_custom_process_group("127.0.0.1", port, 0, world_size, "fipo_prefix", backend="gloo", timeout_s=60)
    else:
        group = _sglang_like_side(port, world_size, "fipo_prefix")
    t = torch.full((3,), 7.0) if rank == 0 else torch.zeros(3)
    default_broadcast(t, group)
    return t.tolist()


def test_fallback_group_meets_a_prefixstore_peer():
    """Without sglang installed the trainer's fallback must key its store like SGLang's server does."""
    from fipo_megatron.testing.distributed import free_port, run_distributed

    out = run_distributed(_trainer_vs_sglang_side, 2, free_port())
    assert out[0] == out[1] == [7.0, 7.0, 7.0]
