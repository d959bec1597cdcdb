"""One weight push driven from several trainer ranks, with errors that reach every rank.

`sync_by_stage(engine, stream, version, *, bucket_bytes, leader, group=None) -> PushStats` (COLLECTIVE
over `group`, default the whole world): one sender per pipeline stage, as slime does.
- the leader (global rank 0, also stage 0's sender) holds the full engine: it pauses, opens and
  ends the update (`ServerEngine` phases);
- a sender (the first rank of its stage: tp = cp = dp = 0) has `engine` (on other stages an engine
  that only sends) and `stream` (its stage's HF tensors, `convert.live.iter_stage_hf_tensors`);
- the other TP ranks of a sender's stage pass `stream` and no engine: they iterate it (its TP
  gathers) and drop the tensors; every other rank passes neither.
Steps, each followed by an exchange of small objects (`all_gather_object` over `group`), so a failure
anywhere is known everywhere before the next step starts:
  1. leader `begin_update` (pause), every sender `prepare_send` (its update group);
  2. leader `open_update` (the servers' update session);
  3. senders `send_buckets(bucketize(stream))`; a sender that fails keeps iterating its stream to the
     end without sending (its TP peers are inside the same gathers), so no rank hangs;
  4. leader `end_update(results of every stage, in stage order)`.
After a failed step the leader runs `abort_update` (the engine's failure rules: never serve half-loaded
weights) and every rank raises `WeightSyncError` naming the failing stage(s) and rank(s).

`sync_through_leader(engine, stream, version, *, bucket_bytes, leader, group=None) -> PushStats`:
the single-sender path (in-process engines, vLLM NCCL): every rank iterates the whole-model stream
(`convert.live.iter_hf_tensors_from_model`, PP broadcasts) and only the leader pushes it
(`push_weights`); a failed push keeps draining the stream, and the error reaches every rank the same way.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch.distributed as dist

from .types import EngineError
from .weight_sync import NamedTensors, PushStats, bucketize, push_weights, tensor_nbytes


class WeightSyncError(EngineError):
    """A weight push failed on some rank; raised on every rank with the same message."""


def _exchange(obj: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _drain(it: Any) -> None:
    for _ in it:
        pass


class _Counted:
    """Iterate a stream once, counting tensors and bytes (the stream itself stays resumable)."""

    def __init__(self, it: Any, stats: PushStats) -> None:
        self.it, self.stats = it, stats

    def __iter__(self):
        for name, t in self.it:
            self.stats.num_tensors += 1
            self.stats.num_bytes += tensor_nbytes(t)
            yield name, t


def sync_by_stage(engine: Any, stream: Optional[NamedTensors], version: int, *, bucket_bytes: int, leader: bool,
                  group: Any = None) -> PushStats:
    """See the module docstring. Returns the totals over every sender (the same on every rank)."""
    import time

    t0 = time.perf_counter()
    sender = engine is not None
    stage = getattr(engine, "stage", None) if sender else None
    state: dict[str, Any] = {"version": int(version)}

    def step(fn, who: bool) -> Any:
        err, value = None, None
        if who:
            try:
                value = fn()
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                err = _describe(exc)
        return err, value

    def check(errors: list[Any], what: str, abort: bool) -> None:
        failed = [(r, s, e) for r, (s, e) in enumerate(errors) if e is not None]
        if not failed:
            return
        msg = "; ".join(f"stage {s if s is not None else '?'} (rank {r}): {e}" for r, s, e in failed)
        note = None
        if leader and abort:
            engine.abort_update(state["version"])
            note = str(engine.failure(state["version"], RuntimeError(msg)))
        notes = _exchange(note, group)
        note = next((n for n in notes if n), None)
        raise WeightSyncError(f"weight sync to version {version} failed at {what}: {note or msg}")

    # 1. pause + every sender's group
    def begin_and_prepare() -> None:
        if not sender:
            raise ValueError("sync_by_stage: the leader must hold the engine")
        if not getattr(engine, "supports_stage_senders", False):
            raise ValueError(f"{getattr(engine, 'name', type(engine).__name__)}: this engine's weight sync takes "
                             f"one sender only (use sync_through_leader)")
        if leader:
            state["version"] = engine.begin_update(version)
            state["begun"] = True
        engine.prepare_send(state["version"])

    err, _ = step(begin_and_prepare, sender or leader)
    check(_exchange((stage, err), group), "begin/prepare", abort=bool(state.get("begun")))
    # 2. the update session
    err, _ = step(lambda: engine.open_update(state["version"]), leader)
    check(_exchange((stage, err), group), "open", abort=True)
    # 3. every stage's buckets
    stats = PushStats()
    result, err = None, None
    if stream is not None:
        it = iter(stream)
        try:
            if sender:
                buckets = bucketize(_Counted(it, stats), bucket_bytes)
                result = engine.send_buckets(_count_buckets(buckets, stats), state["version"])
        except Exception as exc:  # noqa: BLE001 - shared below
            err = _describe(exc)
        finally:
            _drain(it)  # a non-sender's whole stream; a failed sender's remaining part
    gathered = _exchange((stage, err, result, (stats.num_tensors, stats.num_bytes, stats.num_buckets)), group)
    check([(s, e) for s, e, _, _ in gathered], "send", abort=True)
    # 4. finish
    results = [r for s, _, r, _ in sorted((g for g in gathered if g[0] is not None), key=lambda g: g[0])]
    err, _ = step(lambda: engine.end_update(state["version"], results), leader)
    check(_exchange((stage, err), group), "end", abort=False)
    total = PushStats(seconds=time.perf_counter() - t0)
    for _, _, _, (n, b, k) in gathered:
        total.num_tensors += n
        total.num_bytes += b
        total.num_buckets += k
    return total


def _count_buckets(buckets: Iterable, stats: PushStats):
    for b in buckets:
        stats.num_buckets += 1
        yield b


def sync_through_leader(engine: Any, stream: NamedTensors, version: int, *, bucket_bytes: int, leader: bool,
                        group: Any = None) -> PushStats:
    """See the module docstring; every rank passes the whole-model stream, only the leader an engine."""
    it = iter(stream)
    err, stats = None, PushStats()
    try:
        stats = push_weights(engine, it, version, bucket_bytes=bucket_bytes, is_source=leader and engine is not None)
    except Exception as exc:  # noqa: BLE001 - shared below
        err = _describe(exc)
    finally:
        _drain(it)
    errors = _exchange(err, group)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise WeightSyncError(f"weight sync to version {version} failed: "
                              + "; ".join(f"rank {r}: {e}" for r, e in failed))
    return stats
