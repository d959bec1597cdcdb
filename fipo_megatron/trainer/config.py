"""Trainer configuration: one dataclass per concern, each field carrying its command-line flag and help.

Contract:
- Every field has ``metadata={"flag": "--megatron-style-name", "help": "..."}``;
  :mod:`fipo_megatron.trainer.args` builds the argument parser and reads YAML from these fields, so
  the flag names, YAML keys (flag without ``--``, dashes or underscores) and defaults live here only.
- Defaults are the paper's recipe (appendix B, Qwen2.5-32B, FIPO column) where one exists.
- :meth:`TrainConfig.validate` raises ``ValueError`` listing every bad value; it needs no process
  group (the world size is read from ``WORLD_SIZE`` as torchrun sets it), so a bad value fails
  before any distributed initialisation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from fipo_megatron.algo.losses import PolicyLossConfig
from fipo_megatron.models.rules import round_up, sequence_pad_multiple


def _f(default: Any, flag: str, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    meta = {"flag": flag, "help": help, **{k: v for k, v in kw.items() if k in ("choices", "negatable", "repeat")}}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ParallelConfig:
    """Megatron model-parallel layout and numerics."""

    tensor_model_parallel_size: int = _f(1, "--tensor-model-parallel-size", "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = _f(1, "--pipeline-model-parallel-size", "Pipeline-parallel size (PP).")
    context_parallel_size: int = _f(1, "--context-parallel-size",
                                    "Context-parallel size (CP): packed sequences split zigzag over CP ranks "
                                    "(TE attention on GPUs that have it, the torch SDPA attention elsewhere, "
                                    "CPU included).")
    use_distributed_optimizer: bool = _f(False, "--use-distributed-optimizer",
                                         "Shard optimizer state across data-parallel ranks (ZeRO-1).")
    # Activation recompute, with Megatron-LM's argument semantics (megatron/training/arguments.py).
    recompute_activations: bool = _f(False, "--recompute-activations",
                                     "Selective activation recompute, as in Megatron-LM: the same as "
                                     "--recompute-granularity selective (only the core attention is recomputed). "
                                     "For whole-layer recompute use --recompute-granularity full.")
    recompute_granularity: Optional[str] = _f(None, "--recompute-granularity",
                                              "Activation recompute granularity: 'selective' recomputes the core "
                                              "attention of every layer; 'full' recomputes whole transformer "
                                              "layers and needs --recompute-method and --recompute-num-layers "
                                              "(unset: no recompute).", choices=("full", "selective"))
    recompute_method: Optional[str] = _f(None, "--recompute-method",
                                         "Full recompute only: 'uniform' splits each pipeline stage's layers into "
                                         "chunks of --recompute-num-layers and keeps only each chunk's input; "
                                         "'block' recomputes the first --recompute-num-layers layers of each stage "
                                         "and keeps all activations of the rest.", choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = _f(None, "--recompute-num-layers",
                                             "Full recompute only: layers per recompute chunk (uniform; must divide "
                                             "the layers per pipeline stage) or layers recomputed per stage (block; "
                                             "at most the layers per pipeline stage).")
    distributed_timeout_minutes: int = _f(360, "--distributed-timeout-minutes",
                                          "Collective timeout; other ranks wait in a broadcast while rank 0 drives "
                                          "a rollout or an evaluation, which can take long.")
    sequence_packing: str = _f("thd", "--sequence-packing", "Micro-batch layout: thd, packed sequences (the only "
                               "layout: Transformer Engine's attention on GPUs that have it, the torch SDPA attention "
                               "elsewhere, CPU included; the padded-rows 'bshd' layout was retired). 'auto' = thd.",
                               choices=("auto", "thd"))
    bf16: bool = _f(False, "--bf16", "Train in bfloat16 with fp32 master weights (off = fp32; CPU runs use fp32).")


@dataclass
class ModelConfig:
    """Where the model and tokenizer come from."""

    hf_model_dir: Optional[str] = _f(None, "--hf-model-dir",
                                     "Hugging Face model dir (config.json + tokenizer). Its weights initialise "
                                     "the model when --load holds no checkpoint; the HF rollout engine loads it.")


@dataclass
class DataConfig:
    """Prompt data and batch shapes (in prompts unless stated)."""

    train_data: list = _f([], "--train-data", "Train prompt file(s), parquet/JSONL in the verl/DAPO schema "
                          "(repeatable or comma-separated).", repeat=True)
    eval_data: list = _f([], "--eval-data", "Held-out prompt file(s) for evaluation (repeatable or comma-separated).",
                         repeat=True)
    max_prompt_length: int = _f(2048, "--max-prompt-length", "Longest prompt in tokens; longer rows are skipped.")
    max_response_length: int = _f(20480, "--max-response-length", "Longest response in tokens (generation cap).")
    seq_length: Optional[int] = _f(None, "--seq-length",
                                   "Megatron's sequence length, adapted to RL: the most prompt + response tokens of "
                                   "one sequence (sizes the model's position range; --max-tokens-per-micro-batch "
                                   "must hold one such sequence). Default: --max-prompt-length + "
                                   "--max-response-length; a smaller value is an error.")
    global_batch_size: int = _f(512, "--global-batch-size", "Prompts per train batch (one RL step).")
    mini_batch_size: int = _f(64, "--mini-batch-size", "Prompts per optimizer step (DAPO recipe: 32, FIPO: 64).")
    n_samples_per_prompt: int = _f(16, "--n-samples-per-prompt", "Responses sampled per prompt (group size G).")
    gen_batch_size: Optional[int] = _f(None, "--gen-batch-size",
                                       "Prompts per generation batch (default: --global-batch-size); dynamic "
                                       "sampling draws more generation batches until the train batch is full.")


@dataclass
class RolloutConfig:
    """The rollout engine and weight synchronisation."""

    rollout_engine: str = _f("hf", "--rollout-engine", "Rollout engine kind.", choices=("hf", "sglang", "vllm"))
    rollout_urls: list = _f([], "--rollout-urls", "Server URL(s) for sglang/vllm server engines (comma list).",
                            repeat=True)
    temperature: float = _f(1.0, "--temperature", "Sampling temperature for training rollouts.")
    top_p: float = _f(1.0, "--top-p", "Nucleus top-p for training rollouts.")
    weight_sync: str = _f("nccl", "--weight-sync", "How weights reach a server engine (sglang or vllm): nccl "
                          "(broadcast from rank 0) or disk (HF safetensors in --weight-sync-dir, which the servers "
                          "must read; vLLM servers need VLLM_SERVER_DEV_MODE=1). The in-process hf engine always "
                          "receives tensors directly; in-process vllm always reloads from --weight-sync-dir.",
                          choices=("nccl", "disk"))
    rollout_max_batch_size: int = _f(256, "--rollout-max-batch-size",
                                     "Most sequences the in-process hf engine decodes at once.")
    rollout_gpus_per_server: int = _f(0, "--rollout-gpus-per-server",
                                      "GPUs (workers) per rollout server, for the NCCL weight-update group; 0 = ask "
                                      "each server (SGLang /get_server_info tp_size x dp_size).")
    weight_sync_master_port: int = _f(29700, "--weight-sync-master-port",
                                      "TCP port on global rank 0's host for the trainer-to-servers NCCL group.")
    weight_sync_master_addr: Optional[str] = _f(None, "--weight-sync-master-addr",
                                                "Address of global rank 0 that the rollout servers can reach, for "
                                                "the NCCL group (default: rank 0's address on the interface that "
                                                "routes to the first --rollout-urls server).")
    rollout_max_in_flight_per_server: int = _f(512, "--rollout-max-in-flight-per-server",
                                               "Most requests in flight to one rollout server (sglang/vllm); "
                                               "512 as slime keeps per SGLang server.")
    rollout_gpu_memory_utilization: float = _f(0.3, "--rollout-gpu-memory-utilization",
                                               "GPU memory fraction of the in-process vllm engine (--rollout-engine "
                                               "vllm without --rollout-urls), which shares rank 0's GPU with "
                                               "Megatron (vLLM's own default, 0.9, leaves Megatron nothing).")
    rollout_skip_version_check: bool = _f(False, "--rollout-skip-version-check",
                                          "Accept an sglang/vllm version outside the supported window with a "
                                          "warning instead of an error (for a version you have verified).")
    weight_sync_dir: Optional[str] = _f(None, "--weight-sync-dir",
                                        "Shared directory for --weight-sync disk (default OUTPUT_DIR/weight_sync).")
    weight_sync_bucket_mb: int = _f(512, "--weight-sync-bucket-mb", "Bucket size in MiB for streaming weights.")
    weight_sync_through_rank0: bool = _f(False, "--weight-sync-through-rank0",
                                         "Send every weight through global rank 0 (full tensors broadcast over the "
                                         "pipeline) instead of one sender per pipeline stage (the default for SGLang, "
                                         "and for vLLM servers with --weight-sync disk; vLLM NCCL always uses rank 0).")
    weight_sync_flatten: bool = _f(False, "--weight-sync-flatten",
                                   "NCCL weight sync: one contiguous buffer per bucket (vLLM 'packed') or per dtype of "
                                   "a bucket (SGLang load_format 'flattened_bucket') instead of one broadcast per "
                                   "tensor.")
    rollout_timeout: float = _f(3600.0, "--rollout-timeout",
                                "Seconds one request to a rollout server (sglang/vllm) may take before it is retried "
                                "(3 retries); when the last try fails the run stops on every rank with the engine's "
                                "error, the last checkpoint intact. A line is printed whenever a rollout made no "
                                "progress for a minute.")


@dataclass
class RewardConfig:
    """How responses are scored."""

    reward_fn: str = _f("math_dapo", "--reward-fn", "Reward function: math_dapo, math_verify, or a dotted path "
                        "'pkg.module:function' taking (solution, ground_truth).")
    overlong_buffer: int = _f(4096, "--overlong-buffer", "DAPO soft overlong buffer in tokens (0 disables).")
    overlong_penalty_factor: float = _f(1.0, "--overlong-penalty-factor", "Maximum overlong penalty.")


@dataclass
class AlgoConfig:
    """Dynamic sampling (the policy loss's own settings are the ``loss`` section,
    :class:`fipo_megatron.algo.losses.PolicyLossConfig`)."""

    dynamic_sampling: bool = _f(True, "--dynamic-sampling",
                                "DAPO dynamic sampling: drop groups whose accuracy has no spread.", negatable=True)
    max_num_gen_batches: int = _f(10, "--max-num-gen-batches",
                                  "Most generation batches per step for dynamic sampling (0 = unbounded).")
    dynamic_sampling_on_exhausted: str = _f("error", "--dynamic-sampling-on-exhausted",
                                            "When --max-num-gen-batches batches did not fill the train batch: "
                                            "'error' stops the run with the counts (verl's behaviour); 'partial' "
                                            "trains on the groups kept so far and logs batch/short=1.",
                                            choices=("error", "partial"))


@dataclass
class OptimConfig:
    """Optimizer, schedule and the PPO update loop."""

    lr: float = _f(1e-6, "--lr", "Peak learning rate (AdamW).")
    min_lr: float = _f(1e-6, "--min-lr", "Learning rate after warm-up (constant schedule: = --lr).")
    lr_warmup_iters: int = _f(10, "--lr-warmup-iters", "Linear warm-up, in optimizer steps.")
    weight_decay: float = _f(0.1, "--weight-decay", "AdamW weight decay.")
    clip_grad: float = _f(1.0, "--clip-grad", "Global gradient-norm clip (0 disables).")
    adam_beta1: float = _f(0.9, "--adam-beta1", "AdamW beta1.")
    adam_beta2: float = _f(0.999, "--adam-beta2", "AdamW beta2.")
    ppo_epochs: int = _f(1, "--ppo-epochs", "Passes over each train batch.")
    max_tokens_per_micro_batch: int = _f(24576, "--max-tokens-per-micro-batch",
                                         "Token budget per micro-batch (dynamic batch size with packing).")
    micro_batch_size: Optional[int] = _f(None, "--micro-batch-size",
                                         "Megatron's micro-batch size, adapted to RL packing: at most N sequences "
                                         "per micro-batch, in addition to the --max-tokens-per-micro-batch token "
                                         "budget (none or 0 = no count limit, the token budget alone decides).")


@dataclass
class EvalConfig:
    """Held-out evaluation (avg@k, cons@k, pass@k)."""

    eval_interval: int = _f(10, "--eval-interval", "Evaluate every N steps (and before training); 0 disables.")
    eval_samples_per_prompt: int = _f(32, "--eval-samples-per-prompt", "k samples per eval problem.")
    eval_temperature: float = _f(1.0, "--eval-temperature", "Eval sampling temperature.")
    eval_top_p: float = _f(0.7, "--eval-top-p", "Eval nucleus top-p (the paper uses 0.7).")
    eval_max_prompts: Optional[int] = _f(None, "--eval-max-prompts", "Use at most this many prompts per eval set.")


@dataclass
class CheckpointConfig:
    """Checkpoint save / load."""

    load: Optional[str] = _f(None, "--load", "Checkpoint dir to resume from (its 'latest' step), or a converted "
                             "model-only Megatron checkpoint to start from.")
    save: Optional[str] = _f(None, "--save", "Checkpoint dir to write (atomic, with a latest-step pointer). When it "
                             "already holds a checkpoint the run resumes from it (restart with the same command).")
    save_interval: int = _f(0, "--save-interval", "Save every N steps (and at the end); 0 = only at the end.")
    keep_last_checkpoints: int = _f(0, "--keep-last-checkpoints",
                                    "Keep only the K newest checkpoints under --save (older ones are deleted after "
                                    "each successful save); 0 keeps all.")
    ref_load: Optional[str] = _f(None, "--ref-load", "With --kl-coef > 0: the reference model's weights (model-only "
                                 "torch_dist checkpoint, or a training checkpoint dir whose latest step is used). "
                                 "Default: the run's initial weights (the model-only --load, or --hf-model-dir "
                                 "converted), recorded in every checkpoint so a resumed run keeps the same reference.")


@dataclass
class LogConfig:
    """Where metrics go."""

    output_dir: str = _f("outputs/run", "--output-dir", "Run directory: metrics.jsonl, eval.jsonl, plots, config.")
    log_interval: int = _f(1, "--log-interval", "Print a metrics line every N steps (JSONL gets every step).")
    tensorboard_dir: Optional[str] = _f(None, "--tensorboard-dir", "TensorBoard dir (default OUTPUT_DIR/tb; "
                                        "'none' disables).")
    wandb_project: Optional[str] = _f(None, "--wandb-project", "Log to this wandb project when set.")
    progress: bool = _f(True, "--progress", "tqdm progress bars on rank 0.", negatable=True)


@dataclass
class RunConfig:
    """Length and reproducibility of the run."""

    train_iters: int = _f(100, "--train-iters", "RL steps (train batches) to run in total, resume included.")
    seed: int = _f(1234, "--seed", "Random seed (data order, sampling, init).")


SECTIONS: dict[str, type] = {
    "run": RunConfig, "parallel": ParallelConfig, "model": ModelConfig, "data": DataConfig,
    "rollout": RolloutConfig, "reward": RewardConfig, "algo": AlgoConfig, "loss": PolicyLossConfig,
    "optim": OptimConfig,
    "eval": EvalConfig, "checkpoint": CheckpointConfig, "log": LogConfig,
}


@dataclass
class TrainConfig:
    """All sections. Build with :func:`fipo_megatron.trainer.args.parse_args`."""

    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{field_name: value}`` over all sections (field names are unique across sections)."""
        out: dict[str, Any] = {}
        for sec in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, sec)))
        return out

    # ----------------------------------------------------------------- derived quantities
    @property
    def data_parallel_size(self) -> int:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        p = self.parallel
        return max(1, world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                * p.context_parallel_size))

    @property
    def seq_length(self) -> int:
        """Longest prompt + response of one sequence: ``--seq-length`` or max prompt + max response."""
        d = self.data
        return d.seq_length if d.seq_length is not None else d.max_prompt_length + d.max_response_length

    @property
    def max_samples_per_micro_batch(self) -> Optional[int]:
        """``--micro-batch-size`` as the packing's count cap (None = no cap; 0 means none too)."""
        return self.optim.micro_batch_size or None

    @property
    def gen_batch_size(self) -> int:
        return self.data.gen_batch_size or self.data.global_batch_size

    @property
    def recompute_granularity(self) -> Optional[str]:
        """Effective recompute granularity: ``--recompute-activations`` means ``selective`` (Megatron-LM)."""
        p = self.parallel
        return "selective" if p.recompute_activations else p.recompute_granularity

    def recompute_overrides(self) -> dict[str, Any]:
        """The TransformerConfig fields of the recompute flags (empty when no recompute)."""
        gran = self.recompute_granularity
        if gran is None:
            return {}
        if gran == "selective":
            return {"recompute_granularity": "selective"}  # recompute_modules defaults to ["core_attn"]
        p = self.parallel
        return {"recompute_granularity": "full", "recompute_method": p.recompute_method,
                "recompute_num_layers": p.recompute_num_layers}

    # ----------------------------------------------------------------- validation
    def _validate_recompute(self, need) -> None:
        """Megatron-LM's rules for the recompute flags (arguments.py + TransformerConfig.__post_init__),
        checked here so that a bad combination fails before any process group starts."""
        p = self.parallel
        gran, method, n = p.recompute_granularity, p.recompute_method, p.recompute_num_layers
        need(not (p.recompute_activations and gran == "full"),
             "--recompute-activations means --recompute-granularity selective (as in Megatron-LM); it "
             "contradicts --recompute-granularity full: give only one of them")
        if gran != "full":
            what = ("--recompute-activations / --recompute-granularity selective" if self.recompute_granularity
                    else "no recompute")
            need(method is None, f"--recompute-method {method} needs --recompute-granularity full (got {what})")
            need(n is None, f"--recompute-num-layers {n} needs --recompute-granularity full (got {what})")
            return
        need(method is not None, "--recompute-granularity full needs --recompute-method uniform|block "
             "(Megatron-LM has no default for it)")
        need(n is not None, "--recompute-granularity full needs --recompute-num-layers N "
             "(e.g. --recompute-method uniform --recompute-num-layers 1: recompute every layer)")
        if n is None:
            return
        need(n >= 1, f"--recompute-num-layers must be >= 1, got {n}")
        layers = self._hf_num_layers()
        pp = p.pipeline_model_parallel_size
        if layers is None or n < 1 or pp < 1 or layers % pp:
            return
        per_stage = layers // pp
        need(n <= per_stage, f"--recompute-num-layers {n} must be between 1 and the layers per pipeline stage "
             f"({layers} layers / PP {pp} = {per_stage})")
        need(method != "uniform" or n > per_stage or per_stage % n == 0,
             f"--recompute-method uniform: --recompute-num-layers {n} must divide the layers per pipeline "
             f"stage ({layers} layers / PP {pp} = {per_stage}); Megatron recomputes chunks of exactly N layers")

    def _hf_num_layers(self) -> Optional[int]:
        """num_hidden_layers of --hf-model-dir's config.json, or None when it cannot be read."""
        if self.model.hf_model_dir is None:
            return None
        try:
            with open(os.path.join(self.model.hf_model_dir, "config.json"), encoding="utf-8") as fh:
                layers = json.load(fh).get("num_hidden_layers")
        except (OSError, ValueError, AttributeError):
            return None
        return layers if isinstance(layers, int) and layers >= 1 else None

    def validate(self, world_size: Optional[int] = None) -> "TrainConfig":
        """Raise ``ValueError`` listing every invalid value (no process group needed). Returns self."""
        errs: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errs.append(msg)

        p, d, r, a, o, e, c = self.parallel, self.data, self.rollout, self.algo, self.optim, self.eval, self.checkpoint
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            need(getattr(p, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(p, name)}")
        world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        need(mp >= 1 and world % max(mp, 1) == 0,
             f"world size {world} is not divisible by TP x PP x CP = {mp}")
        dp = max(1, world // max(mp, 1))
        need(p.distributed_timeout_minutes >= 1,
             f"--distributed-timeout-minutes must be >= 1, got {p.distributed_timeout_minutes}")
        self._validate_recompute(need)
        need(self.run.train_iters >= 0, f"--train-iters must be >= 0, got {self.run.train_iters}")
        need(d.global_batch_size >= 1, f"--global-batch-size must be >= 1, got {d.global_batch_size}")
        need(d.mini_batch_size >= 1, f"--mini-batch-size must be >= 1, got {d.mini_batch_size}")
        need(d.n_samples_per_prompt >= 1, f"--n-samples-per-prompt must be >= 1, got {d.n_samples_per_prompt}")
        if d.global_batch_size >= 1 and d.mini_batch_size >= 1:
            need(d.global_batch_size % d.mini_batch_size == 0,
                 f"--global-batch-size ({d.global_batch_size}) must be a multiple of --mini-batch-size "
                 f"({d.mini_batch_size})")
            need((d.mini_batch_size * d.n_samples_per_prompt) % dp == 0,
                 f"responses per mini-batch (--mini-batch-size x --n-samples-per-prompt = "
                 f"{d.mini_batch_size * d.n_samples_per_prompt}) must be divisible by the data-parallel size {dp}")
        need(d.gen_batch_size is None or d.gen_batch_size >= 1,
             f"--gen-batch-size must be >= 1, got {d.gen_batch_size}")
        need(d.max_prompt_length >= 1, f"--max-prompt-length must be >= 1, got {d.max_prompt_length}")
        need(d.max_response_length >= 1, f"--max-response-length must be >= 1, got {d.max_response_length}")
        need(bool(d.train_data), "--train-data is required (a parquet/JSONL prompt file)")
        for path in list(d.train_data) + list(d.eval_data):
            need(os.path.isfile(path), f"data file not found: {path}")
        need(self.model.hf_model_dir is not None, "--hf-model-dir is required (config.json + tokenizer)")
        if self.model.hf_model_dir is not None:
            need(os.path.isfile(os.path.join(self.model.hf_model_dir, "config.json")),
                 f"--hf-model-dir {self.model.hf_model_dir}: no config.json there")
        need(r.rollout_engine in ("hf", "sglang", "vllm"),
             f"--rollout-engine must be hf|sglang|vllm, got {r.rollout_engine!r}")
        need(r.rollout_engine == "hf" or bool(r.rollout_urls) or r.rollout_engine == "vllm",
             f"--rollout-engine {r.rollout_engine} needs --rollout-urls")
        need(r.temperature > 0, f"--temperature must be > 0 for RL sampling, got {r.temperature}")
        need(0 < r.top_p <= 1, f"--top-p must be in (0, 1], got {r.top_p}")
        need(r.rollout_timeout > 0, f"--rollout-timeout must be > 0 seconds, got {r.rollout_timeout}")
        need(r.rollout_max_in_flight_per_server >= 1,
             f"--rollout-max-in-flight-per-server must be >= 1, got {r.rollout_max_in_flight_per_server}")
        need(0 < r.rollout_gpu_memory_utilization < 1,
             f"--rollout-gpu-memory-utilization must be in (0, 1), got {r.rollout_gpu_memory_utilization}")
        need(c.keep_last_checkpoints >= 0, f"--keep-last-checkpoints must be >= 0 (0 keeps all), got "
             f"{c.keep_last_checkpoints}")
        need(r.weight_sync_bucket_mb >= 1, f"--weight-sync-bucket-mb must be >= 1, got {r.weight_sync_bucket_mb}")
        rw = self.reward
        need(0 <= rw.overlong_buffer <= d.max_response_length,
             f"--overlong-buffer must be in [0, --max-response-length={d.max_response_length}], "
             f"got {rw.overlong_buffer}")
        need(rw.overlong_penalty_factor >= 0,
             f"--overlong-penalty-factor must be >= 0, got {rw.overlong_penalty_factor}")
        for problem in self.loss.problems():  # the loss's own validation, one copy
            need(False, problem)
        need(c.ref_load is None or os.path.isdir(c.ref_load), f"--ref-load {c.ref_load}: no such directory")
        need(a.max_num_gen_batches >= 0, f"--max-num-gen-batches must be >= 0, got {a.max_num_gen_batches}")
        need(o.lr >= 0, f"--lr must be >= 0 (0: a dry run that keeps the weights), got {o.lr}")
        need(0 <= o.min_lr <= o.lr, f"--min-lr must be in [0, --lr], got {o.min_lr}")
        need(o.lr_warmup_iters >= 0, f"--lr-warmup-iters must be >= 0, got {o.lr_warmup_iters}")
        need(o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}")
        need(o.clip_grad >= 0, f"--clip-grad must be >= 0, got {o.clip_grad}")
        need(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "--adam-beta1/--adam-beta2 must be in [0, 1)")
        need(o.ppo_epochs >= 1, f"--ppo-epochs must be >= 1, got {o.ppo_epochs}")
        need(o.micro_batch_size is None or o.micro_batch_size >= 0,
             f"--micro-batch-size must be >= 0 (0 or none = no count limit), got {o.micro_batch_size}")
        full = d.max_prompt_length + d.max_response_length
        need(d.seq_length is None or d.seq_length >= full,
             f"--seq-length ({d.seq_length}) is shorter than --max-prompt-length + --max-response-length "
             f"({d.max_prompt_length} + {d.max_response_length} = {full}); raise --seq-length or lower those")
        seq = max(full, d.seq_length or 0)
        pad = sequence_pad_multiple(max(p.context_parallel_size, 1), max(p.tensor_model_parallel_size, 1))
        seq_padded = round_up(seq, pad)
        need(o.max_tokens_per_micro_batch >= seq_padded,
             f"--max-tokens-per-micro-batch ({o.max_tokens_per_micro_batch}) must hold one full sequence: "
             f"{'--seq-length' if d.seq_length is not None else '--max-prompt-length + --max-response-length'} = "
             f"{seq} tokens" + (f", padded to a multiple of {pad} (2 x CP x TP, or TP) = {seq_padded}"
                                if seq_padded != seq else ""))
        need(e.eval_interval >= 0, f"--eval-interval must be >= 0, got {e.eval_interval}")
        need(e.eval_samples_per_prompt >= 1, f"--eval-samples-per-prompt must be >= 1, got {e.eval_samples_per_prompt}")
        need(e.eval_temperature >= 0, f"--eval-temperature must be >= 0, got {e.eval_temperature}")
        need(0 < e.eval_top_p <= 1, f"--eval-top-p must be in (0, 1], got {e.eval_top_p}")
        need(c.save_interval >= 0, f"--save-interval must be >= 0, got {c.save_interval}")
        need(c.save_interval == 0 or c.save is not None, "--save-interval needs --save (where to write checkpoints)")
        need(self.log.log_interval >= 1, f"--log-interval must be >= 1, got {self.log.log_interval}")
        if errs:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(errs))
        return self
