"""fipo-convert against transformers' Qwen2ForCausalLM and a live Megatron-Core GPTModel.

One subprocess runs the CLI for every conversion (hf-to-mcore at TP=2, reshard to TP=1/PP=2,
mcore-to-hf), then ONE 2-process gloo launch checks, at (TP, PP) in {(1,1), (2,1), (1,2)}, tied
and untied, GQA with 2 groups of 2 heads:
- the installed megatron-core's GPTModel.sharded_state_dict() keys / global shapes equal
  mapping.expected_mcore_shapes (the mapping facts), fc1 is a swiglu factory;
- the converted checkpoint loads strictly and the logits equal the HF logits (<= 1e-4, fp32);
- iter_hf_tensors_from_model yields exactly (bit for bit) the original HF tensors, on every rank;
- a checkpoint written by Megatron itself at TP=2 (save_model_weights) exports to the original HF
  tensors (the stored fc1 = [all gate; all up] and whole-group qkv chunks, read region by region).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 120  # padded to 256 at TP=2 and to 128 at TP=1: reshard must re-pad


def make_hf_model(path: str, tie: bool, seed: int, vocab: int = VOCAB, layers: int = 4) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                      rope_theta=1e6, max_position_embeddings=128, torch_dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # stands in for tokenizer files
        json.dump({"model_max_length": 128}, f)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def run_cli(calls: list[list[str]]) -> subprocess.CompletedProcess:
    """Run several `fipo-convert` invocations in ONE python process; print each exit code."""
    code = ("import sys, json; from fipo_megatron.tools_cli import main\n"
            f"calls = json.loads({json.dumps(json.dumps(calls))})\n"
            "if __name__ == '__main__':\n"
            "    for c in calls: print('RC', main(c), flush=True)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    out = {"root": str(root), "tokens": torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))}
    calls = []
    for tie in (False, True):
        tag = "tied" if tie else "untied"
        hf = str(root / f"hf_{tag}")
        out[f"sd_{tag}"] = make_hf_model(hf, tie, seed=3 if tie else 4)
        out[f"logits_{tag}"] = hf_logits(hf, out["tokens"])
        calls += [["hf-to-mcore", "--hf-dir", hf, "--out", str(root / f"m_tp2_{tag}"), "--tp", "2"],
                  ["reshard", "--mcore-dir", str(root / f"m_tp2_{tag}"), "--out", str(root / f"m_pp2_{tag}"),
                   "--tp", "1", "--pp", "2"],
                  ["mcore-to-hf", "--mcore-dir", str(root / f"m_pp2_{tag}"), "--out", str(root / f"hf2_{tag}"),
                   "--hf-dir", hf, "--max-shard-size", "200KB"]]
    # V=120 with divisible_by 8 needs no padding at TP=1: embedding / lm_head take the zero-copy path
    calls += [["hf-to-mcore", "--hf-dir", str(root / "hf_untied"), "--out", str(root / "m_div8_untied"),
               "--make-vocab-size-divisible-by", "8"],
              ["mcore-to-hf", "--mcore-dir", str(root / "m_div8_untied"), "--out", str(root / "hf3_untied"),
               "--hf-dir", str(root / "hf_untied")]]
    proc = run_cli(calls)
    assert proc.returncode == 0 and proc.stdout.count("RC 0") == len(calls), proc.stdout + proc.stderr
    torch.save(out, root / "ref.pt")
    return out


def _read_hf_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


@pytest.mark.parametrize("tag", ["untied", "tied"])
def test_roundtrip_tp2_reshard_pp2_bit_identical(ckpts, tag):
    root = ckpts["root"]
    ref = ckpts[f"sd_{tag}"]
    back = _read_hf_dir(os.path.join(root, f"hf2_{tag}"))
    expected_names = set(ref) - ({"lm_head.weight"} if tag == "tied" else set())
    assert set(back) == expected_names
    for name, t in back.items():
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name
    files = sorted(os.listdir(os.path.join(root, f"hf2_{tag}")))
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer_config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded like HF
    meta = json.load(open(os.path.join(root, f"m_pp2_{tag}", "fipo_convert.json")))
    assert (meta["tp"], meta["pp"], meta["padded_vocab_size"]) == (1, 2, 128)
    meta2 = json.load(open(os.path.join(root, f"m_tp2_{tag}", "fipo_convert.json")))
    assert (meta2["tp"], meta2["pp"], meta2["padded_vocab_size"]) == (2, 1, 256)
    assert not [f for f in os.listdir(root) if ".tmp-" in f or f.endswith(".staging")]
    if tag == "untied":
        direct = _read_hf_dir(os.path.join(root, "hf3_untied"))
        assert set(direct) == set(ref) and all(torch.equal(direct[n], ref[n]) for n in ref)
    # and transformers loads the export and computes the same logits
    torch.testing.assert_close(hf_logits(os.path.join(root, f"hf2_{tag}"), ckpts["tokens"]),
                               ckpts[f"logits_{tag}"], rtol=0, atol=0)


def test_mcore_to_hf_config_mismatch_and_tools_script(ckpts, tmp_path):
    root = ckpts["root"]
    bad_hf = tmp_path / "hf_bad"
    bad_hf.mkdir()
    cfg = json.load(open(os.path.join(root, "hf_untied", "config.json")))
    cfg["rms_norm_eps"] = 1e-5
    json.dump(cfg, open(bad_hf / "config.json", "w"))
    out = tmp_path / "never"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "mcore-to-hf",
                           "--mcore-dir", os.path.join(root, "m_tp2_untied"), "--out", str(out),
                           "--hf-dir", str(bad_hf)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "rms_norm_eps" in proc.stderr and "config mismatch" in proc.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ---- the 2-process check ----------------------------------------------------------------------

def _check_sharded_state_dict_facts(model, hf_config, tp: int) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from fipo_megatron.convert.mapping import QwenDims, expected_mcore_shapes, padded_vocab

    dims = QwenDims.from_hf_config(hf_config)
    expected = expected_mcore_shapes(dims, padded_vocab(dims.vocab_size, tp))
    seen = set()
    for v in model.sharded_state_dict().values():
        if isinstance(v, ShardedTensor):
            assert v.key in expected, v.key
            assert tuple(v.global_shape) == expected[v.key], (v.key, v.global_shape)
            seen.add(v.key)
        elif isinstance(v, ShardedTensorFactory):
            assert v.key == "decoder.layers.mlp.linear_fc1.weight" and v.key in expected, v.key
            seen.add(v.key)
    return seen, set(expected)


def _gather_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab]


def _forward_full_logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Logits [b, s, V] on the last stage (None elsewhere); PP hand-off by plain send/recv."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fipo_megatron.megatron.qwen import forward_logits

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_pipeline_model_parallel_group()
    with torch.no_grad():
        if pp > 1 and stage > 0:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, src=dist.get_global_rank(group, stage - 1))
            model.set_input_tensor(hidden)
        out = forward_logits(model, tokens)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=dist.get_global_rank(group, stage + 1))
            return None
    return _gather_logits(out, vocab)


def _check_megatron_written_checkpoint(chunks, rank: int, path: str, hf_dir: str, ref_sd: dict) -> None:
    """save_model_weights (dist_checkpointing.save of the live TP=2 model: qkv / fc1 chunks per TP rank,
    fc1 through the swiglu factory) -> mcore-to-hf on rank 0 -> the original HF tensors, bit for bit."""
    import torch.distributed as dist

    from fipo_megatron.convert.mcore_to_hf import convert_mcore_to_hf
    from fipo_megatron.megatron.checkpoint import save_model_weights

    save_model_weights(path, chunks)
    if rank == 0:
        convert_mcore_to_hf(path, path + "_hf", hf_dir)
        back = _read_hf_dir(path + "_hf")
        assert set(back) == set(ref_sd)
        for name, t in back.items():
            assert torch.equal(t, ref_sd[name]), f"megatron-written checkpoint: {name} differs"
    dist.barrier()


def _worker(rank: int, world: int, ref_path: str) -> list[str]:
    from fipo_megatron.convert import iter_hf_tensors_from_model
    from fipo_megatron.megatron.checkpoint import load_model_weights
    from fipo_megatron.megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.megatron.qwen import build_model

    ref = torch.load(ref_path, weights_only=False)
    root, tokens = ref["root"], ref["tokens"]
    report = []
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        initialize_parallel(tp=tp, pp=pp)
        try:
            for tag in ("untied", "tied"):
                hf_dir = os.path.join(root, f"hf_{tag}")
                cfg = json.load(open(os.path.join(hf_dir, "config.json")))
                chunks = build_model(cfg)
                seen, expected_keys = _check_sharded_state_dict_facts(chunks[0], cfg, tp)
                # every expected key is produced by some rank (a PP stage holds only part of the model)
                everyone = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(everyone, sorted(seen))
                union = set().union(*map(set, everyone))
                assert union == expected_keys, (tp, pp, tag, sorted(expected_keys ^ union))
                ckpt = os.path.join(root, f"m_tp2_{tag}" if tp == 2 else f"m_pp2_{tag}")
                load_model_weights(ckpt, chunks)
                logits = _forward_full_logits(chunks[0], tokens, cfg["vocab_size"])
                if logits is not None:
                    diff = (logits - ref[f"logits_{tag}"]).abs().max().item()
                    assert diff <= 1e-4, f"tp={tp} pp={pp} {tag}: max |logits diff| = {diff}"
                    report.append(f"tp{tp}pp{pp}-{tag}: logits {diff:.2e} keys {len(seen)}")
                names = []
                for name, t in iter_hf_tensors_from_model(chunks, cfg):
                    assert torch.equal(t, ref[f"sd_{tag}"][name]), f"tp={tp} pp={pp} {tag}: {name} differs"
                    names.append(name)
                expected = [n for n in ref[f"sd_{tag}"] if not (tag == "tied" and n == "lm_head.weight")]
                assert sorted(names) == sorted(expected), (tp, pp, tag)
                report.append(f"tp{tp}pp{pp}-{tag}: live export {len(names)} tensors ok")
                if tp == 2 and tag == "untied":  # a checkpoint Megatron itself wrote at TP=2 exports too
                    _check_megatron_written_checkpoint(chunks, rank, os.path.join(root, "train_tp2"), hf_dir,
                                                       ref[f"sd_{tag}"])
                    report.append("megatron-written tp2 checkpoint exported ok")
        finally:
            destroy_parallel()
    return report


def test_logits_and_live_export_at_tp_pp_layouts(ckpts):
    from fipo_megatron.testing.distributed import run_distributed

    results = run_distributed(_worker, 2, os.path.join(ckpts["root"], "ref.pt"))
    joined = "\n".join(sum(results, []))
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        for tag in ("untied", "tied"):
            assert f"tp{tp}pp{pp}-{tag}: logits" in joined and f"tp{tp}pp{pp}-{tag}: live export" in joined
    assert "megatron-written tp2 checkpoint exported ok" in joined
