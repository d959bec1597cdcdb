"""`fipo-convert`: HF <-> Megatron-Core checkpoint conversion and resharding.

    fipo-convert hf-to-mcore --hf-dir H --out M --tp T --pp P
    fipo-convert mcore-to-hf --mcore-dir M --out H2 --hf-dir H
    fipo-convert reshard     --mcore-dir M --out M2 --tp T --pp P

Exit status 0 on success, 2 on an invalid input (message names the field / file / tensor; a damaged
source checkpoint names the truncated or missing shard) or when the output cannot be written (no
space left on device, quota, read-only file system, permission), with no output directory left behind.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time

LAYOUT_NOTE = """\
The torch_dist checkpoint stores global tensors (layers stacked on a leading axis, fc1 as
[gate; up]), so one process writes it for any TP/PP and Megatron-Core loads its own slices at
whatever layout it runs; no worker processes are needed. TP/PP decide the vocabulary padding
(make_vocab_size_divisible_by * TP) and are validated (TP must divide the KV groups and heads,
PP the layers) and recorded in fipo_convert.json next to the checkpoint."""


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def write_error_text(exc: OSError) -> str:
    """A short, plain description of a failed write (``no space left on device`` for ENOSPC...)."""
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(exc.errno, str(exc))
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return what + where


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                   help="target tensor parallel size (must divide num_key_value_heads and heads)")
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                   help="target pipeline parallel size (must divide num_hidden_layers)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fipo-convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAYOUT_NOTE)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    h = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist (streaming)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAYOUT_NOTE,
                       description="Convert a Hugging Face Qwen2/Qwen2.5 checkpoint (config.json + safetensors, "
                                   "sharded or not) into a Megatron-Core torch_dist checkpoint, reading one "
                                   "tensor at a time. Optional Megatron arguments are checked against "
                                   "config.json; any disagreement is an error naming the field.")
    h.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)")
    h.add_argument("--out", required=True, help="output Megatron checkpoint directory (must not exist)")
    _add_layout(h)
    h.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="Megatron vocab padding unit")
    g = h.add_argument_group("Megatron arguments (optional; validated against config.json)")
    for arg, typ in (("num-layers", int), ("hidden-size", int), ("num-attention-heads", int),
                     ("num-query-groups", int), ("ffn-hidden-size", int), ("kv-channels", int),
                     ("vocab-size", int), ("rotary-base", float), ("norm-epsilon", float)):
        g.add_argument(f"--{arg}", type=typ, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="assert the model has a separate lm_head (tie_word_embeddings=false)")
    h.add_argument("--force", action="store_true", help="replace an existing --out")

    m = sub.add_parser("mcore-to-hf", help="Megatron torch_dist (any TP/PP) -> HF safetensors",
                       description="Export a Megatron-Core checkpoint (written by fipo-convert, or a training "
                                   "checkpoint dir / iter_XXXXXXX dir) to HF safetensors shards + "
                                   "model.safetensors.index.json, reading one layer at a time. config.json, "
                                   "generation_config.json and tokenizer files are copied from --hf-dir, whose "
                                   "config must match the checkpoint. Padded vocabulary rows are dropped; tied "
                                   "models get no lm_head.weight.")
    m.add_argument("--mcore-dir", required=True, help="Megatron checkpoint directory")
    m.add_argument("--out", required=True, help="output HF directory (must not exist)")
    m.add_argument("--hf-dir", required=True, help="HF directory supplying config.json and tokenizer files")
    m.add_argument("--max-shard-size", default="5GB", help="shard size like save_pretrained (default 5GB)")
    m.add_argument("--force", action="store_true", help="replace an existing --out")

    r = sub.add_parser("reshard", help="Megatron torch_dist -> another TP/PP layout",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAYOUT_NOTE,
                       description="Re-lay-out a fipo-convert Megatron checkpoint for another TP/PP: validates "
                                   "the layout against the recorded config, re-pads the vocabulary and "
                                   "rewrites the checkpoint layer by layer.")
    r.add_argument("--mcore-dir", required=True, help="Megatron checkpoint directory")
    r.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    _add_layout(r)
    r.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="vocab padding unit (default: the one recorded in the source, else 128)")
    r.add_argument("--hf-dir", default=None,
                   help="HF config.json source, needed for a checkpoint without fipo_convert.json (training "
                        "checkpoints); checked against the recorded config otherwise")
    r.add_argument("--force", action="store_true", help="replace an existing --out")
    return ap


def run(args: argparse.Namespace) -> str:
    if args.command == "hf-to-mcore":
        from .hf_to_mcore import convert_hf_to_mcore

        margs = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                               "ffn_hidden_size", "kv_channels", "vocab_size", "rotary_base",
                                               "norm_epsilon")}
        if args.untie_embeddings_and_output_weights:
            margs["tie_word_embeddings"] = False
        meta = convert_hf_to_mcore(args.hf_dir, args.out, args.tp, args.pp, args.make_vocab_size_divisible_by,
                                   margs, force=args.force)
        return f"wrote {args.out} (tp={meta['tp']}, pp={meta['pp']}, padded vocab {meta['padded_vocab_size']})"
    if args.command == "mcore-to-hf":
        from .mcore_to_hf import convert_mcore_to_hf

        files = convert_mcore_to_hf(args.mcore_dir, args.out, args.hf_dir, args.max_shard_size, force=args.force)
        return f"wrote {args.out}: {', '.join(files)}"
    from .reshard import reshard_checkpoint

    meta = reshard_checkpoint(args.mcore_dir, args.out, args.tp, args.pp, args.make_vocab_size_divisible_by,
                              force=args.force, hf_dir=args.hf_dir)
    return f"wrote {args.out} (tp={meta['tp']}, pp={meta['pp']}, padded vocab {meta['padded_vocab_size']})"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    from .validate import ConversionError

    t0 = time.time()
    try:
        msg = run(args)
    except ConversionError as e:
        print(f"fipo-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"fipo-convert {args.command}: error: {write_error_text(e)} while writing {args.out}; "
              "nothing was written there", file=sys.stderr)
        return 2
    print(f"fipo-convert {args.command}: {msg} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
