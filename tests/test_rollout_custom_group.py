"""init_custom_process_group + default_broadcast on 2 gloo processes (kept light: the spawned
children import this module, so it imports only torch)."""
import torch


def _custom_group_broadcast(rank, world_size, port):
    """Each rank already has its default group (like the trainer under torchrun and the server's
    workers); both build a SEPARATE group with init_custom_process_group and broadcast over it."""
    from fipo_megatron.rollout.weight_sync import default_broadcast, init_custom_process_group

    group = init_custom_process_group("127.0.0.1", port, rank, world_size, "fipo_test_sync", backend="gloo", timeout_s=60)
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) if rank == 0 else torch.zeros(2, 3)
    default_broadcast(t, group)
    return t.tolist()


def test_init_custom_process_group_and_broadcast_gloo():
    from fipo_megatron.testing.distributed import free_port, run_distributed

    out = run_distributed(_custom_group_broadcast, 2, free_port())
    assert out[0] == out[1] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
