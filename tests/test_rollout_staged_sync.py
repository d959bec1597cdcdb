"""`staged_sync` on 2 gloo processes with stand-in engines (no Megatron, no server): the order of the
phases on each rank, and that a failure on any rank (leader or other sender, before or during the
send) raises WeightSyncError on EVERY rank while the streams' collectives still complete (no hang).
Kept light: the spawned children import this module, so it imports only torch at module level."""
import torch


class PhaseEngine:
    """Records the phases; `fail` = the phase that raises."""

    name = "stand-in"

    def __init__(self, stage, fail=None, stages=True):
        self.stage, self.fail, self.calls = stage, fail, []
        self.supports_stage_senders = stages

    def _do(self, what, *a):
        self.calls.append(what)
        if self.fail == what:
            raise RuntimeError(f"{what} refused on stage {self.stage}")

    def begin_update(self, version):
        self._do("begin")
        return version

    def prepare_send(self, version):
        self._do("prepare")

    def open_update(self, version):
        self._do("open")

    def send_buckets(self, buckets, version):
        names = []
        for i, b in enumerate(buckets):
            if self.fail == "send" and i == 1:
                raise RuntimeError(f"send refused on stage {self.stage}")
            names += [n for n, _ in b]
        self.calls.append("send")
        return {"stage": self.stage, "names": names}

    def end_update(self, version, results):
        self._do("end")
        self.results = results

    def abort_update(self, version):
        self.calls.append("abort")

    def failure(self, version, exc):
        return RuntimeError(f"stand-in left paused: {exc}")


def stream(rank, n=6):
    """A stream whose every tensor costs a collective (like the TP gathers / PP broadcasts)."""
    import torch.distributed as dist

    for i in range(n):
        t = torch.full((4,), float(i))
        dist.all_reduce(t)
        yield f"s{rank}.t{i}", t


def _staged(rank, world, fail_rank, fail_phase):
    from fipo_megatron.rollout.staged_sync import WeightSyncError, sync_by_stage

    eng = PhaseEngine(rank, fail=fail_phase if rank == fail_rank else None)
    try:
        stats = sync_by_stage(eng, stream(rank), 3, bucket_bytes=32, leader=rank == 0)
        return {"calls": eng.calls, "stats": (stats.num_tensors, stats.num_buckets),
                "results": getattr(eng, "results", None)}
    except WeightSyncError as exc:
        return {"calls": eng.calls, "error": str(exc)}


def _staged_cases(rank, world, cases):
    """Every case in one launch: after a failure every rank is past the same exchange, so the next works."""
    return [_staged(rank, world, fail_rank, phase) for fail_rank, phase in cases]


def _funnel(rank, world, fail):
    from fipo_megatron.rollout.staged_sync import WeightSyncError, sync_through_leader

    class Recorder:
        got = []

        def update_weights_buckets(self, buckets, version):
            for i, b in enumerate(buckets):
                if fail and i == 1:
                    raise RuntimeError("engine refused bucket 1")
                self.got += [n for n, _ in b]

    eng = Recorder() if rank == 0 else None
    try:
        stats = sync_through_leader(eng, stream(0), 1, bucket_bytes=32, leader=rank == 0)
        return {"tensors": stats.num_tensors, "got": list(Recorder.got)}
    except WeightSyncError as exc:
        return {"error": str(exc)}


def _one_sender_engine(rank, world):
    from fipo_megatron.rollout.staged_sync import WeightSyncError, sync_by_stage

    try:
        sync_by_stage(PhaseEngine(rank, stages=False), stream(rank), 1, bucket_bytes=32, leader=rank == 0)
    except WeightSyncError as exc:
        return str(exc)
    return None


def test_phases_in_order_and_results_by_stage():
    from fipo_megatron.testing.distributed import run_distributed

    out = run_distributed(_staged, 2, -1, None)
    assert out[0]["calls"] == ["begin", "prepare", "open", "send", "end"]
    assert out[1]["calls"] == ["prepare", "send"]
    assert [r["stage"] for r in out[0]["results"]] == [0, 1]
    assert out[0]["results"][1]["names"] == [f"s1.t{i}" for i in range(6)]
    assert out[0]["stats"] == out[1]["stats"] == (12, 6)  # totals over both senders (2 tensors per bucket)


def test_a_failure_anywhere_raises_on_every_rank():
    from fipo_megatron.testing.distributed import run_distributed

    cases = [(1, "send", "send", True), (0, "send", "send", True), (1, "prepare", "begin/prepare", True),
             (0, "begin", "begin/prepare", False), (0, "open", "open", True), (0, "end", "end", False)]
    outs = run_distributed(_staged_cases, 2, [c[:2] for c in cases])
    for i, (fail_rank, phase, where, aborted) in enumerate(cases):
        out = [outs[0][i], outs[1][i]]
        for r in (0, 1):
            err = out[r].get("error")
            assert err and f"failed at {where}" in err and f"stage {fail_rank} (rank {fail_rank})" in err, (phase, err)
            assert f"{phase} refused on stage {fail_rank}" in err
        assert ("abort" in out[0]["calls"]) == aborted, (phase, out[0]["calls"])
        if aborted:
            assert "stand-in left paused" in out[1]["error"]  # the leader's word on the servers' state
        if phase in ("begin", "prepare", "open"):
            assert "send" not in out[0]["calls"] + out[1]["calls"]


def test_leader_push_failure_reaches_every_rank_and_streams_complete():
    from fipo_megatron.testing.distributed import run_distributed

    ok = run_distributed(_funnel, 2, False)
    assert ok[0]["got"] == [f"s0.t{i}" for i in range(6)] and ok[0]["tensors"] == 6
    bad = run_distributed(_funnel, 2, True)
    assert all("rank 0: RuntimeError: engine refused bucket 1" in b["error"] for b in bad)


def test_engine_with_one_sender_is_refused_clearly_on_every_rank():
    from fipo_megatron.testing.distributed import run_distributed

    out = run_distributed(_one_sender_engine, 2)
    assert all(o and "one sender only (use sync_through_leader)" in o for o in out)
