"""Arguments: Megatron-style flags, YAML + command-line precedence, help lines, early validation."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fipo_megatron.trainer.args import build_parser, load_yaml, parse_args
from fipo_megatron.trainer.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The flags the SLURM recipes use (issue 5); every one must exist with exactly this name.
RECIPE_FLAGS = """--config --tensor-model-parallel-size --pipeline-model-parallel-size --context-parallel-size
--global-batch-size --mini-batch-size --n-samples-per-prompt --ppo-epochs --max-tokens-per-micro-batch --lr --min-lr
--lr-warmup-iters --weight-decay --clip-grad --adam-beta1 --adam-beta2 --bf16 --seed --train-iters --load --save
--save-interval --hf-model-dir --train-data --eval-data --eval-interval --eval-samples-per-prompt --eval-temperature
--eval-top-p --max-prompt-length --max-response-length --overlong-buffer --overlong-penalty-factor --temperature
--top-p --algorithm --clip-ratio-low --clip-ratio-high --clip-ratio-c --future-kl-decay-rate --future-kl-clip-ratio
--future-kl-clip-high-only --no-future-kl-clip-high-only --future-kl-start --future-kl-window --future-kl-average
--future-kl-mask --safety-threshold --seq-filter-max-dual-clipped --kl-coef --dynamic-sampling --no-dynamic-sampling
--max-num-gen-batches --gen-batch-size --reward-fn --rollout-engine --rollout-urls --weight-sync
--weight-sync-bucket-mb --output-dir --use-distributed-optimizer --recompute-activations --log-interval
--tensorboard-dir --wandb-project --micro-batch-size --seq-length --recompute-granularity --recompute-method
--recompute-num-layers""".split()


@pytest.fixture
def files(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    return {"hf": str(hf), "data": str(data), "tmp": tmp_path}


def _base(files):
    return ["--hf-model-dir", files["hf"], "--train-data", files["data"]]


def test_recipe_flags_exist_and_every_flag_has_help():
    parser = build_parser()
    known = set(parser._option_string_actions)
    missing = [f for f in RECIPE_FLAGS if f not in known]
    assert not missing, missing
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings


def test_defaults_are_the_paper_recipe(files):
    cfg = parse_args(_base(files), world_size=8)
    assert (cfg.data.global_batch_size, cfg.data.n_samples_per_prompt, cfg.data.mini_batch_size) == (512, 16, 64)
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.clip_grad, o.lr_warmup_iters) == (1e-6, 0.1, 1.0, 10)
    lo = cfg.loss
    assert (lo.clip_ratio_low, lo.clip_ratio_high, lo.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (lo.decay_rate, lo.safety_threshold, lo.future_kl_clip_ratio) == (32.0, 10.0, 0.2)
    assert lo.future_kl_clip_high_only and cfg.algo.dynamic_sampling and lo.kl_coef == 0.0
    assert (cfg.data.max_response_length, cfg.reward.overlong_buffer, cfg.data.max_prompt_length) == (20480, 4096, 2048)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.eval.eval_top_p) == (1.0, 1.0, 0.7)
    assert lo.kind == "fipo" and lo.influence_bounds() == (1.0, 1.2)


def test_yaml_flat_and_nested_keys_command_line_wins(files):
    y = files["tmp"] / "c.yaml"
    y.write_text("lr: 3.0e-4\ntensor-model-parallel-size: 2\noptim:\n  ppo_epochs: 2\nalgo:\n  algorithm: dapo\n"
                 "eval-data: [a.jsonl, b.jsonl]\nfuture_kl_clip_high_only: false\n")
    cfg = parse_args(["--config", str(y), *_base(files), "--lr", "5e-4", "--future-kl-clip-high-only"],
                     validate=False)
    assert cfg.optim.lr == 5e-4                      # command line beats YAML
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.optim.ppo_epochs == 2
    assert cfg.loss.kind == "dapo"
    assert cfg.loss.future_kl_clip_high_only is True
    assert cfg.data.eval_data == ["a.jsonl", "b.jsonl"]
    cfg2 = parse_args(["--config", str(y), *_base(files), "--eval-data", "x,y", "--eval-data", "z"], validate=False)
    assert cfg2.data.eval_data == ["x", "y", "z"]   # repeatable + comma lists; CLI replaces the YAML list


def test_optional_and_negated_flags(files):
    cfg = parse_args([*_base(files), "--future-kl-window", "none", "--seq-filter-max-dual-clipped", "none",
                      "--no-dynamic-sampling", "--future-kl-window", "64"], validate=False)
    assert cfg.loss.future_kl_window == 64 and cfg.loss.seq_filter_max_dual_clipped is None
    assert cfg.algo.dynamic_sampling is False


def test_bad_values_are_listed_before_any_process_group(files):
    with pytest.raises(ValueError) as e:
        parse_args([*_base(files), "--global-batch-size", "100", "--mini-batch-size", "64", "--clip-ratio-c", "0.5",
                    "--tensor-model-parallel-size", "3"], world_size=8)
    msg = str(e.value)
    assert "--global-batch-size (100) must be a multiple of --mini-batch-size (64)" in msg
    assert "clip_ratio_c (--clip-ratio-c) must be finite and > 1" in msg and "not divisible by TP x PP x CP = 3" in msg
    with pytest.raises(ValueError, match="--lr: expected float"):
        parse_args([*_base(files), "--lr", "fast"])
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        y = files["tmp"] / "bad.yaml"
        y.write_text("learning_rate: 1\n")
        load_yaml(str(y))
    with pytest.raises(ValueError, match="data file not found"):
        parse_args(["--hf-model-dir", files["hf"], "--train-data", "/nonexistent.parquet"])


def test_micro_batch_size_and_seq_length(files):
    """Megatron's --micro-batch-size (sequence cap per micro-batch) and --seq-length (longest sequence)."""
    small = [*_base(files), "--max-prompt-length", "8", "--max-response-length", "24",
             "--max-tokens-per-micro-batch", "64", "--overlong-buffer", "4"]
    cfg = parse_args(small, world_size=8)
    assert cfg.optim.micro_batch_size is None and cfg.max_samples_per_micro_batch is None
    assert cfg.data.seq_length is None and cfg.seq_length == 32          # default: prompt + response
    cfg = parse_args([*small, "--micro-batch-size", "4", "--seq-length", "48"], world_size=8)
    assert cfg.max_samples_per_micro_batch == 4 and cfg.seq_length == 48
    assert parse_args([*small, "--micro-batch-size", "0"], world_size=8).max_samples_per_micro_batch is None
    assert parse_args([*small, "--micro-batch-size", "none"], world_size=8).max_samples_per_micro_batch is None
    y = files["tmp"] / "mb.yaml"
    y.write_text("micro-batch-size: 2\ndata:\n  seq_length: 40\n")
    cfg = parse_args(["--config", str(y), *small], world_size=8)
    assert cfg.optim.micro_batch_size == 2 and cfg.seq_length == 40
    with pytest.raises(ValueError) as e:
        parse_args([*small, "--seq-length", "31", "--micro-batch-size", "-1"], world_size=8)
    assert "--seq-length (31) is shorter than --max-prompt-length + --max-response-length (8 + 24 = 32)" in str(e.value)
    assert "--micro-batch-size must be >= 0" in str(e.value)
    with pytest.raises(ValueError, match=r"--max-tokens-per-micro-batch \(64\) must hold one full sequence: "
                                         r"--seq-length = 80 tokens"):
        parse_args([*small, "--seq-length", "80"], world_size=8)
    with pytest.raises(ValueError, match=r"padded to a multiple of 8 .* = 72"):   # TP=2 x CP=2: 2*CP*TP = 8
        parse_args([*small, "--seq-length", "66", "--max-tokens-per-micro-batch", "70", "--tensor-model-parallel-size",
                    "2", "--context-parallel-size", "2"], world_size=8)
    help_text = build_parser().format_help()
    assert "--micro-batch-size" in help_text and "--seq-length" in help_text


def test_cli_exits_2_with_a_message_and_no_torch_distributed():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "fipo_megatron.train", "--train-iters", "-1"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert res.returncode == 2
    assert "--train-iters must be >= 0" in res.stderr and "--hf-model-dir is required" in res.stderr
    assert "Traceback" not in res.stderr


def test_tiny_demo_config_parses():
    cfg = parse_args(["--config", os.path.join(ROOT, "examples/tiny-cpu/config.yaml")], validate=False)
    assert isinstance(cfg, TrainConfig) and cfg.parallel.tensor_model_parallel_size == 2
    assert re.match(r"^(fipo|dapo|grpo)$", cfg.loss.kind)


@pytest.mark.parametrize("recipe", ["qwen2.5-32b/fipo.sbatch", "qwen2.5-32b/dapo.sbatch",
                                    "qwen2.5-7b-math/fipo.sbatch"])
def test_slurm_recipe_command_lines_parse(recipe):
    """The recipes' dry-run trainer command parses; validation at their world size fails only on the
    placeholder paths of the dry run."""
    script = os.path.join(ROOT, "examples", recipe)
    assert os.path.exists(script), f"{recipe} missing"
    res = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if "-m fipo_megatron.train" in ln]
    assert lines, res.stdout + res.stderr
    import shlex

    words = shlex.split(lines[0])
    world = int(words[words.index("--nnodes") + 1]) * int(words[words.index("--nproc-per-node") + 1])
    argv = words[words.index("fipo_megatron.train") + 1:]
    cfg = parse_args(argv, validate=False)
    with pytest.raises(ValueError) as e:
        cfg.validate(world_size=world)
    problems = [p for p in str(e.value).splitlines()[1:]]
    assert problems and all("not found" in p or "no config.json" in p for p in problems), str(e.value)


# ---------------------------------------------------------------- activation recompute (Megatron-LM semantics)
def _layers_files(files, layers=28):
    import json

    (files["tmp"] / "hf" / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return _base(files)


def test_recompute_activations_means_selective(files):
    base = _layers_files(files)
    cfg = parse_args(base, world_size=8)
    assert cfg.recompute_granularity is None and cfg.recompute_overrides() == {}
    cfg = parse_args([*base, "--recompute-activations"], world_size=8)
    assert cfg.recompute_granularity == "selective"
    assert cfg.recompute_overrides() == {"recompute_granularity": "selective"}
    cfg = parse_args([*base, "--recompute-granularity", "selective"], world_size=8)
    assert cfg.recompute_overrides() == {"recompute_granularity": "selective"}
    cfg = parse_args([*base, "--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", "5", "--pipeline-model-parallel-size", "2"], world_size=8)
    assert cfg.recompute_overrides() == {"recompute_granularity": "full", "recompute_method": "block",
                                         "recompute_num_layers": 5}
    help_ = build_parser().format_help()
    assert "--recompute-granularity selective" in help_ and "--recompute-granularity full" in help_


@pytest.mark.parametrize("extra, message", [
    # full has no defaults (Megatron-LM: TransformerConfig refuses method/num_layers None with full)
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform"],
     "--recompute-granularity full needs --recompute-num-layers"),
    (["--recompute-activations", "--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1"], "contradicts --recompute-granularity full"),
    (["--recompute-method", "uniform"], "--recompute-method uniform needs --recompute-granularity full"),
    (["--recompute-activations", "--recompute-method", "block"], "needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"],
     "--recompute-num-layers 2 needs --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "0"],
     "--recompute-num-layers must be >= 1"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "15",
      "--pipeline-model-parallel-size", "2"], r"between 1 and the layers per pipeline stage \(28 layers / PP 2 = 14\)"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "4",
      "--pipeline-model-parallel-size", "2"], "--recompute-num-layers 4 must divide the layers per pipeline stage"),
])
def test_recompute_bad_combinations_fail_early(files, extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args([*_layers_files(files), *extra], world_size=8)


def test_recompute_full_valid_choices(files):
    base = _layers_files(files)
    for method, n, pp in (("uniform", 1, 1), ("uniform", 7, 2), ("uniform", 14, 2), ("block", 14, 2),
                          ("block", 3, 4)):
        cfg = parse_args([*base, "--recompute-granularity", "full", "--recompute-method", method,
                          "--recompute-num-layers", str(n), "--pipeline-model-parallel-size", str(pp)],
                         world_size=8)
        assert cfg.recompute_overrides()["recompute_num_layers"] == n
    with pytest.raises(SystemExit):   # argparse choices
        parse_args([*base, "--recompute-granularity", "partial"], world_size=8)


def test_rollout_importance_sampling_flags(files):
    """Off by default; the flags reach the loss config; bad values are listed with their flags."""
    assert TrainConfig().loss.rollout_is == "none" and TrainConfig().loss.rollout_mask == "none"
    cfg = parse_args([*_base(files), "--rollout-is", "sequence", "--rollout-is-threshold", "3",
                      "--rollout-mask", "geometric", "--rollout-mask-threshold", "1.2"], validate=False)
    assert (cfg.loss.rollout_is, cfg.loss.rollout_is_threshold, cfg.loss.rollout_mask) == ("sequence", 3.0, "geometric")
    assert cfg.loss.rollout_mask_bounds() == (pytest.approx(1 / 1.2), 1.2)
    with pytest.raises(ValueError) as e:
        parse_args([*_base(files), "--rollout-is-threshold", "0.5", "--rollout-mask-threshold-lower", "2"])
    assert "rollout_is_threshold (--rollout-is-threshold) must be finite and >= 1" in str(e.value)
    assert "rollout_mask_threshold_lower (--rollout-mask-threshold-lower) must be None or in (0, 1]" in str(e.value)
    with pytest.raises(SystemExit):  # argparse's own "invalid choice" message, exit 2
        parse_args([*_base(files), "--rollout-mask", "tokens"], validate=False)
    y = files["tmp"] / "bad_mask.yaml"
    y.write_text("rollout_mask: tokens\n")
    with pytest.raises(ValueError, match="--rollout-mask: .tokens. is not one of none, token, sequence, geometric"):
        parse_args(["--config", str(y), *_base(files)])
