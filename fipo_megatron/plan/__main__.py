"""``python -m fipo_megatron.plan``: validate a parallel layout and print the per-GPU memory table.

Exit status: 0 valid and fits, 2 invalid layout or arguments, 3 valid but the estimate exceeds
``--gpu-memory-gib``. ``--json`` prints one JSON object instead of the table; ``--json-out FILE``
writes that object to FILE in addition to the normal output.
"""

from __future__ import annotations

import argparse
import json
import sys

from fipo_megatron.plan.layout import LayoutError, RunShape, validate_layout
from fipo_megatron.plan.memory import estimate_memory
from fipo_megatron.plan.models import get_preset, load_hf_config, param_count
from fipo_megatron.plan.throughput import estimate_train_time


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fipo_megatron.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", default="qwen2.5-32b", help="preset name (see plan/models.py)")
    m.add_argument("--hf-config", help="a Qwen2 config.json (or its directory); overrides --model")
    m.add_argument("--max-position-embeddings", type=int,
                   help="override the config's max_position_embeddings (e.g. 32768 for Math-7B)")
    g = ap.add_argument_group("layout")
    g.add_argument("--nodes", type=int, required=True, help="TRAINING nodes (not rollout nodes)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per training node")
    g.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    g.add_argument("--cp", type=int, default=1, help="context-parallel size")
    r = ap.add_argument_group("run")
    r.add_argument("--max-tokens-per-micro-batch", type=int, default=24576,
                   help="tokens per micro-batch per DP rank, before the CP split")
    r.add_argument("--max-prompt-length", type=int, default=2048, help="prompt tokens")
    r.add_argument("--max-response-length", type=int, default=20480, help="response tokens")
    r.add_argument("--global-batch-size", type=int, default=512, help="prompts per train batch")
    r.add_argument("--mini-batch-size", type=int, default=64, help="prompts per optimizer step")
    r.add_argument("--n-samples-per-prompt", type=int, default=16, help="responses per prompt")
    e = ap.add_argument_group("estimate")
    e.add_argument("--recompute", choices=["none", "selective", "full"], default="full",
                   help="activation recompute granularity assumed for the total (all three are printed): "
                        "none; selective = the trainer's --recompute-activations / --recompute-granularity "
                        "selective (core attention only); full = --recompute-granularity full")
    e.add_argument("--recompute-method", choices=["uniform", "block"],
                   help="with --recompute full: the trainer's --recompute-method (default here: uniform; "
                        "the trainer needs it given)")
    e.add_argument("--recompute-num-layers", type=int,
                   help="with --recompute full: the trainer's --recompute-num-layers (default here: 1, every "
                        "layer recomputed; the trainer needs it given)")
    e.add_argument("--grad-bytes", type=int, choices=[2, 4], default=4,
                   help="bytes per gradient element (4: fp32 main-grad buffer)")
    e.add_argument("--no-distributed-optimizer", action="store_true",
                   help="optimizer state not sharded over DP")
    e.add_argument("--logits-chunk-tokens", type=int, default=4096,
                   help="tokens per fp32 log-prob chunk (the trainer uses 4096; 0: the whole micro-batch)")
    e.add_argument("--attention", choices=["flash", "local"], default="flash",
                   help="flash: Transformer Engine or torch SDPA (no score matrix); local: megatron-core's "
                        "local DotProductAttention, which stores [b, heads, s, s] scores")
    e.add_argument("--fp32-logits", action="store_true",
                   help="model output upcast to fp32 (Megatron's Float16Module default; the trainer keeps bf16)")
    e.add_argument("--overhead-gib", type=float, default=4.0, help="fixed per-GPU overhead")
    e.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    e.add_argument("--avg-prompt-tokens", type=int, default=200, help="for the time estimate")
    e.add_argument("--avg-response-tokens", type=int, default=0,
                   help="for the time estimate (0: half the max response length)")
    e.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation")
    e.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    o = ap.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print JSON instead of the table")
    o.add_argument("--json-out", help="also write the JSON result to this file")
    return ap


def _fmt_table(res: dict) -> str:
    lay, mem, shape, tt = res["layout"], res["memory"], res["model"], res["train_time_estimate"]
    lines = [
        f"model {shape['name']}: {res['params_billion']:.2f}B parameters "
        f"(h={shape['hidden_size']}, L={shape['num_layers']}, heads={shape['num_attention_heads']}, "
        f"kv={shape['num_kv_heads']}, ffn={shape['intermediate_size']}, vocab={shape['vocab_size']})",
        f"layout: {lay['nodes']} nodes x {lay['gpus_per_node']} GPUs = {lay['world_size']}  "
        f"TP={lay['tp']} PP={lay['pp']} CP={lay['cp']} DP={lay['dp']}  "
        f"sequence_parallel={lay['sequence_parallel']}  layers/stage={lay['layers_per_stage']}",
        f"sequences: pad to x{lay['seq_pad_multiple']}, longest {lay['padded_max_seq_len']} tokens; "
        f"micro-batch {res['run']['max_tokens_per_micro_batch']} tokens -> "
        f"{lay['tokens_per_gpu_per_micro_batch']} per GPU; {lay['sequences_per_step']} sequences "
        f"per step, {lay['optimizer_steps_per_train_batch']} optimizer steps, "
        f"{lay['sequences_per_mini_batch_per_dp_rank']} sequences per DP rank per optimizer step",
        f"memory per GPU (GiB, worst stage = {mem['stage']}, recompute={_recompute_label(mem)}):",
    ]
    rows = [("weights (bf16)", "weights_gib"), ("gradients", "gradients_gib"),
            ("optimizer (fp32 master + Adam, sharded)", "optimizer_gib"),
            (f"activations (recompute={mem['recompute']})", "activations_gib"),
            ("attention scores (local attention only)", "attention_scores_gib"),
            ("logits (bf16 or fp32) + log-prob chunks", "logits_gib"), ("fixed overhead", "overhead_gib")]
    for label, key in rows:
        lines.append(f"  {label:<42s} {mem[key]:8.2f}")
    lines.append(f"  {'total':<42s} {mem['total_gib']:8.2f}  of {mem['gpu_memory_gib']:.1f}  "
                 f"-> {'fits' if mem['fits'] else 'DOES NOT FIT'}")
    full = (f"{mem['recompute_method']}, {mem['recompute_num_layers']}" if mem["recompute"] == "full"
            else "uniform, 1")
    lines.append(f"  activations: no recompute {mem['activations_no_recompute_gib']:.2f}, selective "
                 f"{mem['activations_selective_recompute_gib']:.2f}, full ({full}) "
                 f"{mem['activations_full_recompute_gib']:.2f}; stage totals {mem['stage_totals_gib']}")
    lines.append(
        f"train-side time per step (ESTIMATE, MFU {tt['mfu']}, avg response "
        f"{tt['avg_response_tokens']} tokens): {tt['train_seconds_per_step']:.0f} s, "
        f"{tt['train_tokens_per_second_per_gpu']:.0f} tokens/s/GPU; rollout time not modelled")
    for w in lay["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _recompute_label(mem: dict) -> str:
    if mem["recompute"] != "full":
        return mem["recompute"]
    return f"full, {mem['recompute_method']}, {mem['recompute_num_layers']} layer(s)"


def plan(args: argparse.Namespace) -> dict:
    if args.recompute != "full" and (args.recompute_method is not None or args.recompute_num_layers is not None):
        raise ValueError("--recompute-method / --recompute-num-layers need --recompute full")
    method = args.recompute_method or "uniform"
    num_layers = args.recompute_num_layers if args.recompute_num_layers is not None else 1
    model = load_hf_config(args.hf_config) if args.hf_config else get_preset(args.model)
    if args.max_position_embeddings:
        model = model.with_max_positions(args.max_position_embeddings)
    run = RunShape(args.max_prompt_length, args.max_response_length, args.global_batch_size,
                   args.mini_batch_size, args.n_samples_per_prompt, args.max_tokens_per_micro_batch)
    layout = validate_layout(model, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                             tp=args.tp, pp=args.pp, cp=args.cp, run=run)
    mem = estimate_memory(model, layout, run, recompute=args.recompute, recompute_method=method,
                          recompute_num_layers=num_layers, grad_bytes=args.grad_bytes,
                          distributed_optimizer=not args.no_distributed_optimizer,
                          logits_chunk_tokens=args.logits_chunk_tokens or None,
                          overhead_gib=args.overhead_gib, gpu_memory_gib=args.gpu_memory_gib,
                          attention=args.attention, fp32_logits=args.fp32_logits)
    tt = estimate_train_time(model, layout, run, avg_prompt_tokens=args.avg_prompt_tokens,
                             avg_response_tokens=args.avg_response_tokens
                             or args.max_response_length // 2,
                             mfu=args.mfu, peak_tflops_per_gpu=args.peak_tflops,
                             recompute=args.recompute, recompute_method=method,
                             recompute_num_layers=num_layers)
    return {"valid": True, "model": model.to_dict(), "params_billion": param_count(model) / 1e9,
            "run": run.__dict__ | {"max_seq_len": run.max_seq_len},
            "layout": layout.to_dict(), "memory": mem.to_dict(),
            "train_time_estimate": tt.to_dict()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = plan(args)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        if args.json or args.json_out:
            err = {"valid": False, "errors": e.problems}
            if args.json:
                print(json.dumps(err, indent=2))
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(err, f, indent=2)
        return 2
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2) if args.json else _fmt_table(res))
    if not res["memory"]["fits"]:
        print(f"error: estimated {res['memory']['total_gib']:.1f} GiB per GPU exceeds "
              f"--gpu-memory-gib {args.gpu_memory_gib}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
