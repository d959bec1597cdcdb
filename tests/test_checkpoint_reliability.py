"""Checkpoints that cannot be lost: shards fsynced before the pointer moves, a full disk is a clear error
that leaves the previous checkpoint in charge, --keep-last-checkpoints, a damaged (truncated .distcp)
latest checkpoint names the file and falls back to the previous complete one; the start-up check of
--save (writability, free space against the checkpoint size) with a mocked os.statvfs. One gloo process."""
import errno
import os
import warnings

import pytest

from fipo_megatron.testing.distributed import run_distributed

CFG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
           intermediate_size=64, vocab_size=64, rms_norm_eps=1e-6, rope_theta=1e6,
           tie_word_embeddings=False, max_position_embeddings=32)


class _FullDisk:
    f_bavail, f_frsize = 10, 4096  # 40 KiB free


def _scenario(rank, world, root):
    from unittest import mock

    from fipo_megatron.megatron import checkpoint as ck
    from fipo_megatron.megatron import parallel
    from fipo_megatron.megatron.qwen import build_model

    parallel.initialize_parallel(tp=1, pp=1, seed=3)
    chunks = build_model(CFG, wrap_ddp=False)
    out = {}

    # fsync: every shard file is fsynced before the directory rename and the pointer replace
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    with mock.patch.object(ck.os, "fsync", fsync), mock.patch.object(ck.os, "replace", replace):
        ck.save_checkpoint(root, 1, chunks, None, None, {"n": 1})
    first_replace = next(i for i, e in enumerate(events) if e[0] == "replace")
    out["fsynced_shards_before_rename"] = sorted(
        os.path.basename(p) for kind, p in events[:first_replace] if kind == "fsync" and p.endswith(".distcp"))
    out["shards"] = sorted(f for f in os.listdir(ck.checkpoint_dir(root, 1)) if f.endswith(".distcp"))
    ck.save_checkpoint(root, 2, chunks, None, None, {"n": 2})

    # a full disk during save: torch's zip writer error, the disk reports no space
    def torch_full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598")

    with mock.patch.object(ck.torch, "save", torch_full), mock.patch.object(ck.os, "statvfs", lambda p: _FullDisk):
        try:
            ck.save_checkpoint(root, 3, chunks, None, None, {"n": 3})
        except ck.CheckpointWriteError as exc:
            out["full_disk"] = str(exc)
    out["after_full_disk"] = (ck.read_latest_step(root), sorted(os.listdir(root)))

    # keep-last: 2, 3, 4 saved -> keep the newest 2
    ck.save_checkpoint(root, 3, chunks, None, None, {"n": 3})
    ck.save_checkpoint(root, 4, chunks, None, None, {"n": 4})
    out["pruned"] = [os.path.basename(p) for p in ck.prune_checkpoints(root, 2, 4)]
    out["kept"] = ck.checkpoint_steps(root)

    # a truncated shard of the latest checkpoint: loud fallback to the previous one
    shard = os.path.join(ck.checkpoint_dir(root, 4), out["shards"][0])
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["fallback"] = ck.load_checkpoint(root, chunks, None, None)
    out["fallback_warning"] = " ".join(str(w.message) for w in caught if "DAMAGED" in str(w.message))
    try:
        ck.load_checkpoint(root, chunks, None, None, step=4)
    except RuntimeError as exc:
        out["asked_damaged"] = str(exc)
    shard3 = os.path.join(ck.checkpoint_dir(root, 3), out["shards"][0])
    with open(shard3, "r+b") as fh:
        fh.truncate(10)
    try:
        ck.load_checkpoint(root, chunks, None, None)
    except RuntimeError as exc:
        out["no_fallback"] = str(exc)
    parallel.destroy_parallel()
    return out


def test_checkpoint_fsync_full_disk_keep_last_and_damaged_fallback(tmp_path):
    root = str(tmp_path / "ckpt")
    out = run_distributed(_scenario, 1, root)[0]
    assert out["shards"] and out["fsynced_shards_before_rename"] == out["shards"]
    assert out["full_disk"] == (f"no space left on device ({root}), checkpoint 3 not written, the previous "
                                f"checkpoint 2 is intact ({root}/iter_0000002)")
    assert out["after_full_disk"] == (2, ["iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt"])
    assert out["pruned"] == ["iter_0000001", "iter_0000002"] and out["kept"] == [3, 4]
    assert out["fallback"][0] == 3 and out["fallback"][1] == {"n": 3}
    shard4 = f"{root}/iter_0000004/{out['shards'][0]}"
    assert f"{shard4} is truncated" in out["fallback_warning"] and "FALLING BACK" in out["fallback_warning"]
    assert f"{shard4} is truncated" in out["asked_damaged"]
    assert f"{shard4} is truncated" in out["no_fallback"] and "no older complete checkpoint" in out["no_fallback"]


def test_save_dir_start_up_checks(tmp_path, monkeypatch):
    """Unwritable --save and too little free space for one checkpoint are found before training."""
    from fipo_megatron.trainer import reliability as rel

    rel.check_writable(str(tmp_path / "new" / "dir"))  # created and writable
    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(rel, "open", read_only, raising=False)  # the module's open(): a read-only mount
    with pytest.raises(OSError, match=r"--save .* is not writable: Read-only file system"):
        rel.check_writable(str(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(rel.os, "statvfs", lambda p: _FullDisk)
    with pytest.raises(OSError, match=r"0\.00 GiB free, but one checkpoint needs about 1\.00 GiB"):
        rel.check_free_space(str(tmp_path), 2**30)
    rel.check_free_space(str(tmp_path), 1000)
    # the estimate: parameters x bytes per parameter (+10 %), or the size of the checkpoint already there
    assert rel.checkpoint_size_estimate(None, 100, bytes_per_param=12, dp_size=2, world_numel=lambda n: 4 * n) \
        == int(200 * 12 * 1.1)

