"""Bad inputs to fipo-convert: each is a clear error and no output directory is left behind.

Inputs are synthetic multi-shard Qwen2 safetensors checkpoints (written with the safetensors
reference writer); validation happens before Megatron is imported, so these run in-process.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fipo_megatron.convert import hf_to_mcore
from fipo_megatron.convert.cli import main as cli_main
from fipo_megatron.convert.mapping import QwenDims, expected_hf_shapes
from fipo_megatron.convert.validate import ConversionError

CFG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=2, hidden_size=64,
           num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=200, rms_norm_eps=1e-6,
           tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=128, torch_dtype="float32")


def make_hf_dir(path, cfg=CFG, shapes_override=None) -> str:
    from safetensors.torch import save_file

    os.makedirs(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    shapes = expected_hf_shapes(QwenDims.from_hf_config(cfg))
    shapes.update(shapes_override or {})
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(halves):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: torch.randn(shapes[n]) for n in part}, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return str(path)


def assert_nothing_written(tmp_path, out) -> None:
    assert not os.path.exists(out)
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p or p.endswith(".staging")]
    assert not leftovers, leftovers


def test_missing_shard_file(tmp_path):
    hf = make_hf_dir(tmp_path / "hf")
    os.remove(os.path.join(hf, "model-00002-of-00002.safetensors"))
    out = str(tmp_path / "m")
    with pytest.raises(ConversionError, match="missing shard file .*model-00002-of-00002.safetensors"):
        hf_to_mcore.convert_hf_to_mcore(hf, out, tp=1)
    assert_nothing_written(tmp_path, out)


def test_truncated_safetensors(tmp_path):
    hf = make_hf_dir(tmp_path / "hf")
    shard = os.path.join(hf, "model-00001-of-00002.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    out = str(tmp_path / "m")
    with pytest.raises(ConversionError, match="model-00001-of-00002.safetensors: truncated safetensors file"):
        hf_to_mcore.convert_hf_to_mcore(hf, out, tp=1)
    assert_nothing_written(tmp_path, out)


def test_config_mismatch_with_megatron_arguments_via_cli(tmp_path, capsys):
    hf = make_hf_dir(tmp_path / "hf")
    out = str(tmp_path / "m")
    rc = cli_main(["hf-to-mcore", "--hf-dir", hf, "--out", out, "--num-query-groups", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "config mismatch in 'num_query_groups'" in err and "num_kv_heads=2" in err
    rc = cli_main(["hf-to-mcore", "--hf-dir", hf, "--out", out, "--norm-epsilon", "1e-5"])
    assert rc == 2 and "config mismatch in 'norm_epsilon'" in capsys.readouterr().err
    assert_nothing_written(tmp_path, out)


def test_tensor_shape_disagrees_with_config(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", shapes_override={"model.layers.1.mlp.up_proj.weight": (128, 64)})
    out = str(tmp_path / "m")
    with pytest.raises(ConversionError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(128, 64\), expected "
                                              r"\(96, 64\)"):
        hf_to_mcore.convert_hf_to_mcore(hf, out)
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("tp,pp,msg", [(4, 1, "tp=4 does not divide num_key_value_heads=2"),
                                       (3, 1, "tp=3 does not divide num_key_value_heads=2"),
                                       (1, 3, "pp=3 does not divide num_hidden_layers=2")])
def test_layout_refused(tmp_path, capsys, tp, pp, msg):
    hf = make_hf_dir(tmp_path / "hf")
    out = str(tmp_path / "m")
    assert cli_main(["hf-to-mcore", "--hf-dir", hf, "--out", out, "--tp", str(tp), "--pp", str(pp)]) == 2
    assert msg in capsys.readouterr().err
    assert_nothing_written(tmp_path, out)


def test_existing_output_refused_and_failure_midway_cleans_up(tmp_path, monkeypatch):
    hf = make_hf_dir(tmp_path / "hf")
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_mcore.convert_hf_to_mcore(hf, str(out))
    out.rmdir()

    def failing_save(ckpt_dir, items, dims):  # dies after writing part of the output
        open(os.path.join(ckpt_dir, "__0_0.distcp"), "wb").write(b"partial")
        next(iter(items))
        raise OSError("disk full")

    monkeypatch.setattr(hf_to_mcore, "save_mcore_checkpoint", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf_to_mcore.convert_hf_to_mcore(hf, str(out))
    assert_nothing_written(tmp_path, str(out))


def test_missing_config_and_mcore_dir(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert cli_main(["hf-to-mcore", "--hf-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]) == 2
    assert "config.json" in capsys.readouterr().err
    hf = make_hf_dir(tmp_path / "hf")
    assert cli_main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "h"),
                     "--hf-dir", hf]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert_nothing_written(tmp_path, str(tmp_path / "h"))


def _mcore_checkpoint(tmp_path) -> tuple[str, str]:
    hf = make_hf_dir(tmp_path / "hf")
    mcore = str(tmp_path / "mcore")
    assert cli_main(["hf-to-mcore", "--hf-dir", hf, "--out", mcore]) == 0
    return hf, mcore


def test_mcore_to_hf_truncated_shard_and_full_disk_exit_2(tmp_path, capsys, monkeypatch):
    """A truncated .distcp shard and a full disk while writing: a clear error (the file / 'no space left
    on device'), exit status 2, no output left behind."""
    import errno

    from fipo_megatron.convert import safetensors_io

    hf, mcore = _mcore_checkpoint(tmp_path)
    out = str(tmp_path / "h")
    real_write = safetensors_io.ShardedSafetensorsWriter.write
    calls = []

    def full_disk(self, name, t):
        calls.append(name)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out, "model.safetensors"))
        return real_write(self, name, t)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "write", full_disk)
    assert cli_main(["mcore-to-hf", "--mcore-dir", mcore, "--out", out, "--hf-dir", hf]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and out in err
    assert_nothing_written(tmp_path, out)
    monkeypatch.undo()

    shard = sorted(f for f in os.listdir(mcore) if f.endswith(".distcp"))[0]
    with open(os.path.join(mcore, shard), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(mcore, shard)) // 2)
    assert cli_main(["mcore-to-hf", "--mcore-dir", mcore, "--out", out, "--hf-dir", hf]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and shard in err and "truncated" in err
    assert_nothing_written(tmp_path, out)
