"""Weight-sync time and bytes for a Qwen2.5-0.5B-shaped model through the HTTP + bucket path (CPU).

The trainer side is this process: an `SGLangEngine` (weight_sync="nccl" over a gloo group, device cpu)
pushing a stream of HF-named bf16 tensors built like the live export does it: each tensor is held as
two TP halves and concatenated when the stream reaches it (the TP gather's copy). The engine side is
a stand-in SGLang server in another process (`fipo_megatron.testing.standin_sglang --no-keep`): the
same HTTP routes, and a worker that really receives every broadcast (gloo over loopback, in place of
NCCL) into fresh tensors, one request at a time.

Measured in one run (median of --reps), each a full update (pause, group probe, session, buckets,
end, flush, continue):
- stream only: building the tensors, nothing sent (what overlap can hide);
- unbuffered: bucket k is sent, then bucket k+1 built (`overlap=False`);
- double-buffered: bucket k sent on a background thread while bucket k+1 is built (default);
- flattened + double-buffered: one broadcast per bucket (`flatten=True`, load_format flattened_bucket);
- protocol overhead: the same update with every tensor shrunk to 1 element (the same requests, names
  and bucket count; no tensor bytes), i.e. the HTTP calls and per-tensor handshakes alone, unflattened
  and flattened; and one bare HTTP round trip (GET /health).

    python benchmarks/weight_sync.py [--layers 24] [--bucket-mb 512] [--reps 3]

Model: hidden 896, 24 layers, 14 heads / 2 KV heads (head dim 64), intermediate 4864, vocab 151936,
tied embeddings (no lm_head), random bf16 weights made here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 896, 14, 2, 4864, 151936


def hf_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of Qwen2.5-0.5B with `layers` layers, in HF order."""
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.q_proj.bias", (HIDDEN,)),
                (p + "self_attn.k_proj.weight", (kv, HIDDEN)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, HIDDEN)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
                (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    out.append(("model.norm.weight", (HIDDEN,)))
    return out


def make_halves(layers: int, tiny: bool = False):
    """{name: (half 0, half 1)}: each tensor split in two on dim 0 (as two TP ranks hold it)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in hf_shapes(layers):
        if tiny:
            shape = (1,)
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        a = t.shape[0] // 2 if t.shape[0] > 1 else 1
        out[name] = (t[:a].clone(), t[a:].clone())
    return out


def stream(halves):
    import torch

    for name, (a, b) in halves.items():
        yield name, torch.cat([a, b])  # the TP gather's copy


def start_server(tmp: str) -> tuple[subprocess.Popen, str]:
    port_file = os.path.join(tmp, "url")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "fipo_megatron.testing.standin_sglang", "--port-file", port_file,
                             "--no-keep"], env=env)
    t0 = time.time()
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.time() - t0 > 60:
            raise RuntimeError("stand-in server did not start")
        time.sleep(0.1)
    return proc, open(port_file).read().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import requests
    import torch

    from fipo_megatron.rollout.sglang_engine import SGLangEngine
    from fipo_megatron.rollout.weight_sync import NcclSyncConfig, bucketize, init_custom_process_group
    from fipo_megatron.testing.distributed import free_port

    torch.set_num_threads(1)
    bucket_bytes = args.bucket_mb * 2**20
    halves = make_halves(args.layers)
    tiny = make_halves(args.layers, tiny=True)
    nbytes = sum(a.numel() * 2 + b.numel() * 2 for a, b in halves.values())
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_server(tmp)
        try:
            engines = {}
            for tag, kw in (("plain", {}), ("flat", {"flatten": True})):
                nccl = NcclSyncConfig("127.0.0.1", free_port(), [1], group_name=f"bench_{tag}", backend="gloo",
                                      device="cpu")
                engines[tag] = SGLangEngine(url, weight_sync="nccl", nccl=nccl, bucket_bytes=bucket_bytes,
                                            group_factory=lambda a, p, r, w, n, b: init_custom_process_group(
                                                a, p, r, w, n, backend=b, timeout_s=600), **kw)
            version = [0]

            # the full model's bucket boundaries (meta tensors: sizes only), reused for the 1-element run
            layout = [[n for n, _ in b] for b in bucketize(
                ((n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in hf_shapes(args.layers)),
                bucket_bytes)]

            def buckets_of(source):
                if source is halves:
                    yield from bucketize(stream(source), bucket_bytes)
                    return
                full = dict(stream(source))
                for names in layout:
                    yield [(n, full[n]) for n in names]

            def push(eng, overlap, source):
                eng.overlap = overlap
                version[0] += 1
                count = {"buckets": 0}

                def counted():
                    for b in buckets_of(source):
                        count["buckets"] += 1
                        yield b

                t0 = time.perf_counter()
                eng.update_weights_buckets(counted(), version[0])
                return time.perf_counter() - t0, count["buckets"]

            def drain():
                t0 = time.perf_counter()
                for _ in bucketize(stream(halves), bucket_bytes):
                    pass
                return time.perf_counter() - t0

            push(engines["plain"], True, tiny)  # create the groups (not timed)
            push(engines["flat"], True, tiny)
            runs: dict[str, list[float]] = {k: [] for k in ("stream", "unbuffered", "overlap", "flat", "protocol",
                                                            "protocol_flat")}
            buckets = 0
            before = requests.get(url + "/standin/stats", timeout=30).json()
            for _ in range(args.reps):  # interleaved, so that drift hits every variant alike
                runs["stream"].append(drain())
                t, buckets = push(engines["plain"], False, halves)
                runs["unbuffered"].append(t)
                runs["overlap"].append(push(engines["plain"], True, halves)[0])
                runs["flat"].append(push(engines["flat"], True, halves)[0])
                runs["protocol"].append(push(engines["plain"], False, tiny)[0])
                runs["protocol_flat"].append(push(engines["flat"], False, tiny)[0])
            after = requests.get(url + "/standin/stats", timeout=30).json()
            client = engines["plain"].client
            t0 = time.perf_counter()
            for _ in range(20):
                client.get("/health", url=url)
            rtt = (time.perf_counter() - t0) / 20
        finally:
            server.kill()
            server.wait()
    med = {k: statistics.median(v) for k, v in runs.items()}
    received = (after["bytes"] - before["bytes"]) / args.reps
    per_layer = len(hf_shapes(1)) - 2
    print(f"model: Qwen2.5-0.5B shape, {args.layers} layers, {len(halves)} tensors, {nbytes / 2**20:.1f} MiB bf16; "
          f"bucket {args.bucket_mb} MiB -> {buckets} buckets; {args.reps} rep(s), median")
    print(f"server received per rep: {received / 2**20:.1f} MiB over 5 pushes (2 of them with 1-element tensors)")
    print(f"stream only (TP-gather copies, nothing sent): {med['stream']:.2f} s")
    for k, label in (("unbuffered", "unbuffered"), ("overlap", "double-buffered"),
                     ("flat", "flattened + double-buffered")):
        print(f"{label:>29}: {med[k]:.2f} s  ({nbytes / med[k] / 2**20:.0f} MiB/s)")
    print(f"double-buffered / unbuffered: {med['overlap'] / med['unbuffered']:.3f}; "
          f"flattened / unbuffered: {med['flat'] / med['unbuffered']:.3f}")
    print(f"protocol overhead (same requests, 1-element tensors): {med['protocol']:.3f} s per step "
          f"({buckets} bucket request(s) + 6 control requests, {len(halves)} per-tensor broadcasts, {per_layer} per "
          f"layer); flattened (one broadcast per bucket): {med['protocol_flat']:.3f} s; one HTTP round trip: "
          f"{rtt * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
