"""Weight sync: bucketing, streaming, push_weights routing, safetensors writer, custom group."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fipo_megatron.rollout import bucketize, push_weights
from fipo_megatron.rollout.hf_engine import HFEngine
from fipo_megatron.rollout.weight_sync import SafetensorsDirWriter, dtype_name, tensor_nbytes


def named(sizes):
    return [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(sizes)]


def test_bucketize_sizes_order_and_big_tensor_alone():
    items = named([10, 10, 10, 100, 5, 5, 30])  # float32: 40, 40, 40, 400, 20, 20, 120 bytes
    buckets = list(bucketize(items, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    for b in buckets:
        assert len(b) == 1 or sum(tensor_nbytes(t) for _, t in b) <= 100
    assert [n for b in buckets for n, _ in b] == [n for n, _ in items]
    assert list(bucketize([], 10)) == []
    with pytest.raises(ValueError):
        list(bucketize(items, 0))


def test_bucketize_is_streaming():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield f"t{i}", torch.zeros(25)  # 100 bytes each

    it = bucketize(gen(), bucket_bytes=300)
    first = next(it)
    assert len(first) == 3
    assert len(pulled) == 4  # only one tensor beyond the first bucket was read


class BucketRecorder:
    def __init__(self):
        self.calls = []

    def update_weights_buckets(self, buckets, version):
        self.calls.append((version, [[n for n, _ in b] for b in buckets]))


def test_push_weights_routes_buckets_and_drains_on_non_source():
    rec = BucketRecorder()
    stats = push_weights(rec, iter(named([25] * 7)), version=3, bucket_bytes=200)
    assert rec.calls == [(3, [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]])]
    assert (stats.num_tensors, stats.num_bytes, stats.num_buckets) == (7, 700, 4)

    consumed = []
    gen = ((consumed.append(n) or (n, t)) for n, t in named([1, 2, 3]))
    stats = push_weights(rec, gen, version=4, is_source=False)
    assert consumed == ["t0", "t1", "t2"] and len(rec.calls) == 1 and stats.num_tensors == 3
    assert push_weights(None, iter(named([4])), version=5).num_tensors == 1


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=3, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def test_push_weights_into_hf_engine():
    eng = HFEngine(model=tiny_model(0))
    target = tiny_model(1)
    stats = push_weights(eng, target.state_dict().items(), version=1, bucket_bytes=1024)
    assert eng.weight_version == 1 and stats.num_tensors == len(target.state_dict())
    for k, v in target.state_dict().items():
        assert torch.equal(eng.model.state_dict()[k], v), k


def test_safetensors_writer_is_loadable_and_prunes(tmp_path):
    src = tiny_model(2)
    tmpl = tmp_path / "tmpl"
    src.save_pretrained(tmpl)
    writer = SafetensorsDirWriter(str(tmp_path / "sync"), template_dir=str(tmpl), keep=2)
    for v in (1, 2, 3):
        path = writer(bucketize(src.state_dict().items(), 4096), v)
    assert path == str(tmp_path / "sync" / "v3")
    assert sorted(os.listdir(tmp_path / "sync")) == ["v2", "v3"]
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"



# ---- flattening, vLLM packing, overlapped sending -------------------------------------------------

def mixed_stream(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    return [(f"w{i}", torch.randn(3 + i % 4, 2 + i % 3, generator=g).to(dtypes[i % 3])) for i in range(n)]


def test_flatten_by_dtype_groups_in_first_seen_order_and_unflattens():
    from fipo_megatron.rollout.buckets import flatten_by_dtype, unflatten

    bucket = mixed_stream()
    parts = flatten_by_dtype(bucket)
    assert [items[0][1].dtype for items, _ in parts] == [torch.float32, torch.bfloat16, torch.float16]
    back = {}
    for items, flat in parts:
        assert flat.dim() == 1 and flat.dtype == items[0][1].dtype
        assert all(t.dtype == flat.dtype for _, t in items)
        naive = []  # independent: element by element, in bucket order
        for _, t in items:
            naive.extend(t.reshape(-1).tolist())
        assert flat.tolist() == naive
        for (name, _), view in zip(items, unflatten(flat, [list(t.shape) for _, t in items])):
            back[name] = view
    assert list(back) != [n for n, _ in bucket] and sorted(back) == sorted(n for n, _ in bucket)
    for name, t in bucket:
        assert torch.equal(back[name], t)
    with pytest.raises(ValueError, match="the shapes need"):
        unflatten(torch.zeros(5), [[2, 2]])


def vllm_consumer_cut(sizes, buffer_bytes):
    """The receiving side's rule written out (vLLM packed_nccl_broadcast_consumer): add sizes, close the
    chunk as soon as the total EXCEEDS buffer_bytes, the rest is the last chunk."""
    chunks, cur, total = [], [], 0
    for i, s in enumerate(sizes):
        cur.append(i)
        total += s
        if total > buffer_bytes:
            chunks.append(cur)
            cur, total = [], 0
    if cur:
        chunks.append(cur)
    return chunks


@pytest.mark.parametrize("buffer_bytes", [1, 40, 100, 10_000])
def test_packed_chunks_follow_vllm_consumer_rule_and_carry_raw_bytes(buffer_bytes):
    from fipo_megatron.rollout.buckets import packed_chunks

    bucket = mixed_stream(1)
    sizes = [tensor_nbytes(t) for _, t in bucket]
    chunks = packed_chunks(bucket, buffer_bytes)
    expected = vllm_consumer_cut(sizes, buffer_bytes)
    assert [names for names, _ in chunks] == [[bucket[i][0] for i in c] for c in expected]
    for (_, buf), idx in zip(chunks, expected):
        assert buf.dtype == torch.uint8 and buf.numel() == sum(sizes[i] for i in idx)
        raw = b"".join(bucket[i][1].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for i in idx)
        assert buf.numpy().tobytes() == raw


def test_packed_chunks_match_vllms_own_pack_tensors():
    """Runs where vLLM is installed (the project's vLLM venv): our chunks == vLLM's producer's chunks."""
    packed = pytest.importorskip("vllm.distributed.weight_transfer.packed_tensor")
    from fipo_megatron.rollout.buckets import packed_chunks

    bucket = mixed_stream(2, n=20)
    for buffer_bytes in (30, 64, 1000):
        theirs, it = [], iter(bucket)
        while (chunk := packed.pack_tensors(it, lambda item: item[1], buffer_bytes)) is not None:
            theirs.append((chunk.names, chunk.packed_tensor))
        ours = packed_chunks(bucket, buffer_bytes)
        assert [n for n, _ in ours] == [n for n, _ in theirs]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))


def test_send_overlapped_matches_unbuffered_and_really_overlaps():
    import threading
    import time

    from fipo_megatron.rollout.buckets import send_overlapped

    def run(overlap):
        events, lock, sent = [], threading.Lock(), []

        def stream():
            for name, t in mixed_stream(3, n=16):
                with lock:
                    events.append(("pull", name))
                yield name, t

        def send(bucket):
            with lock:
                events.append(("start", bucket[0][0]))
            time.sleep(0.02)
            sent.append([(n, t.clone()) for n, t in bucket])
            with lock:
                events.append(("end", bucket[0][0]))

        n = send_overlapped(bucketize(stream(), 60), send, overlap=overlap)
        return n, sent, events

    n0, plain, ev0 = run(False)
    n1, over, ev1 = run(True)
    assert n0 == n1 == len(plain) > 3
    assert [[n for n, _ in b] for b in plain] == [[n for n, _ in b] for b in over]
    assert all(torch.equal(a, b) for pb, ob in zip(plain, over) for (_, a), (_, b) in zip(pb, ob))

    def pulls_during_sends(events):
        inside, count = False, 0
        for kind, _ in events:
            inside = {"start": True, "end": False}.get(kind, inside)
            count += kind == "pull" and inside
        return count

    assert pulls_during_sends(ev0) == 0 and pulls_during_sends(ev1) > 0


def test_send_overlapped_keeps_at_most_two_buckets_alive():
    """Counted independently: a weakref finaliser on every tensor the stream makes."""
    import threading
    import time
    import weakref

    from fipo_megatron.rollout.buckets import send_overlapped

    per_bucket, lock = 4, threading.Lock()

    def run(overlap):
        live = {"now": 0, "peak": 0}

        def dead():
            with lock:
                live["now"] -= 1

        def stream():
            for i in range(40):
                t = torch.zeros(25)  # 100 bytes: 4 per bucket of 400
                with lock:
                    live["now"] += 1
                    live["peak"] = max(live["peak"], live["now"])
                weakref.finalize(t, dead)
                yield f"t{i}", t
                del t

        send_overlapped(bucketize(stream(), 400), lambda b: time.sleep(0.01), overlap=overlap)
        return live["peak"]

    plain, over = run(False), run(True)
    # a bucket in hand + bucketize's one tensor of look-ahead; overlapped: plus the bucket being sent
    assert plain <= per_bucket + 1
    assert per_bucket + 1 < over <= 2 * per_bucket + 1


def test_send_overlapped_stops_at_the_first_send_error():
    from fipo_megatron.rollout.buckets import send_overlapped

    sent = []

    def send(bucket):
        if bucket[0][0] == "t2":
            raise RuntimeError("server refused t2")
        sent.append(bucket[0][0])

    with pytest.raises(RuntimeError, match="server refused t2"):
        send_overlapped(bucketize(iter(named([1] * 8)), 4), send)
    assert sent == ["t0", "t1"]


def test_sglang_flatten_is_refused_before_0_5_20_without_touching_the_server():
    from fipo_megatron.rollout import EngineError
    from fipo_megatron.rollout.sglang_engine import SGLangEngine
    from fipo_megatron.rollout.weight_sync import NcclSyncConfig

    from test_rollout_sglang import FakeSGLang

    srv = FakeSGLang("0.5.3")
    try:
        eng = SGLangEngine(srv.url, weight_sync="nccl", flatten=True, group_factory=lambda *a: "G",
                           nccl=NcclSyncConfig("h", 1, workers_per_server=[1], device="cpu"))
        srv.requests.clear()
        with pytest.raises(EngineError, match=r"flatten=True .* needs SGLang >= 0\.5\.20"):
            eng.update_weights([("a", torch.zeros(1))], version=1)
        assert srv.paths() == [] and eng.health()
    finally:
        srv.close()


def test_send_threads_run_on_the_callers_cuda_device(monkeypatch):
    """A new thread starts on CUDA device 0: the send threads must first set the caller's device (a rank
    on cuda:3 would otherwise stage its tensors on cuda:0 and use its NCCL group from the wrong GPU)."""
    import threading

    from fipo_megatron.rollout.buckets import send_overlapped

    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_calls.append((threading.get_ident(), d)))
    senders = []
    buckets = [[("a", torch.zeros(1))], [("b", torch.zeros(1))]]
    assert send_overlapped(buckets, lambda b: senders.append(threading.get_ident())) == 2
    assert len(senders) == 2 and threading.get_ident() not in senders
    assert all((ident, 3) in set_calls for ident in senders)
