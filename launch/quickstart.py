"""The main job end to end on the built-in corpus: prepare -> pretrain -> export -> evaluate.

    python -m launch.quickstart [--out DIR]

No download and no GPU needed: the corpus is this Python interpreter's standard library, the
model is the `tiny` preset, and pretraining runs DeepSpeed ZeRO-3 on 2 CPU ranks (all GPUs when
there are some). Every step can be rerun: finished steps are reused, training resumes from its
last checkpoint (only with the flags it was started with). Each step prints the equivalent
stand-alone command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from data_pipeline.argtypes import int_at_least
from data_pipeline.config import MIN_VOCAB_SIZE
from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST_FILE, load_manifest
from launch.commands import free_port
from launch.supervise import INTERRUPTED_EXIT_CODE, run as run_supervised

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUT = """\
# Quickstart output

| path | what | made by |
|---|---|---|
| `shards/` | WebDataset shards (`train-*.tar`, `val-*.tar`), `manifest.json`, `tokenizer.json` | `python -m data_pipeline prepare` |
| `run/` | the training run: `checkpoints/` (DeepSpeed ZeRO), `tensorboard/`, `metrics.jsonl`, `config.yaml`, and `quickstart.json`: the quickstart flags the run was started with | `deepspeed pretrain/train.py` |
| `exported/` | the standalone model: `model.safetensors`, `config.json`, `tokenizer.json`, `export.json` | `python -m pretrain.export` |
| `eval/` | long-context evaluation: `results.json`, `report.md`, `perplexity.png`, `retrieval.png` | `python -m evaluation.long_context` |
| `summary.json` | the figures of this run and the commands that made each step | this quickstart |

Dashboards: `tensorboard --logdir run/tensorboard`.
"""


positive_int = int_at_least(1)
vocab_size = int_at_least(MIN_VOCAB_SIZE)


def multiples(text: str) -> str:
    """argparse type: comma-separated positive integers, e.g. 1,2,4 (returned as given)."""
    try:
        values = [int(m) for m in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,4, got {text!r}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="python -m launch.quickstart",
        description="Run the whole pipeline on the built-in corpus: prepare shards, pretrain a tiny ATMA "
        "with DeepSpeed ZeRO-3, export it, and run the long-context evaluation.",
    )
    p.add_argument("--out", default="quickstart", help="output directory (default: ./quickstart)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="training sequence length (default: 256)")
    p.add_argument("--vocab-size", type=vocab_size, default=2048,
                   help="BPE vocabulary trained on the corpus (default: 2048)")
    p.add_argument("--max-docs", type=positive_int, default=400, help="corpus files to read (default: 400)")
    p.add_argument("--steps", type=positive_int, default=150, help="optimizer steps (default: 150)")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, help="tokens per optimizer step (default: 8192)")
    p.add_argument("--micro-batch", type=positive_int, default=8,
                   help="sequences per micro-batch per rank (default: 8)")
    p.add_argument("--ranks", type=positive_int, default=None,
                   help="data-parallel ranks (default: all GPUs, or 2 CPU ranks without a GPU)")
    p.add_argument("--eval-multiples", type=multiples, default="1,2,4,8",
                   help="evaluation lengths as multiples of --seq-len (default: 1,2,4,8)")
    p.add_argument("--trials", type=positive_int, default=4, help="retrieval trials per cell (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p.parse_args(argv)


def batch_problem(tokens: int, micro_batch: int, seq_len: int, ranks: int, stage: str = "") -> str | None:
    """Why a token batch cannot be split into micro-batches on `ranks` ranks (None when it can);
    `stage` prefixes the names of the batch and length flags (e.g. "stage1-")."""
    per_pass = micro_batch * seq_len * ranks
    if tokens % per_pass:
        return (f"--{stage}batch-tokens {tokens} is not a multiple of --micro-batch ({micro_batch}) x "
                f"--{stage}seq-len ({seq_len}) x ranks ({ranks}) = {per_pass}")
    return None


def banner(step: int, title: str, command: list[str]) -> None:
    """Announce a step and the equivalent stand-alone command."""
    print(f"\n[{step}/4] {title}\n      $ {shlex.join(command)}", flush=True)


def default_ranks() -> int:
    """All visible GPUs, else 2 CPU ranks."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def run_prepare(args, shards: str) -> dict:
    """Step 1: tokenize and pack the built-in corpus (reused when already finished)."""
    from data_pipeline.prepare import prepare

    banner(1, "prepare shards from the built-in corpus (the Python standard library)",
           ["python", "-m", "data_pipeline", "prepare", "--output", shards, "--seq-len", str(args.seq_len),
            "--vocab-size", str(args.vocab_size), "--max-docs", str(args.max_docs), "--val-fraction", "0.05"])
    if finished_shards(shards, {"--seq-len": ("seq_len", args.seq_len), "--vocab-size": ("vocab_size", args.vocab_size),
                                "--max-docs": ("max_docs", args.max_docs)}):
        print("      shards already prepared: reusing them", flush=True)
    else:
        prepare(output=shards, seq_len=args.seq_len, vocab_size=args.vocab_size, max_docs=args.max_docs,
                val_fraction=0.05, progress=not args.no_progress)
    manifest = load_manifest(shards)
    info = {"train_tokens": manifest.num_tokens("train"), "val_tokens": manifest.num_tokens("val"),
            "vocab_size": manifest.vocab_size, "seq_len": manifest.seq_len}
    print(f"      {info['train_tokens']:,} training tokens, {info['val_tokens']:,} validation tokens, "
          f"vocab {info['vocab_size']}", flush=True)
    return info


def finished_shards(shards: str, wanted: dict) -> bool:
    """Whether `shards` holds a finished dataset made with the settings asked for.

    `wanted` maps a flag to (manifest setting, value asked), or (setting, value, view) where view
    turns a recorded value into the flag's; raises DataError naming every flag whose value differs.
    """
    if not os.path.isfile(os.path.join(shards, MANIFEST_FILE)):
        return False
    manifest = load_manifest(shards)
    recorded = {"seq_len": manifest.seq_len, **manifest.settings}
    made, asked = [], []
    for flag, (key, value, *how) in wanted.items():
        view = how[0] if how else _setting
        if key in recorded and view(recorded[key]) != view(value):
            made.append(f"{flag} {_shown(view(recorded[key]))}")
            asked.append(f"{flag} {_shown(view(value))}")
    if made:
        raise DataError(f"{shards} was prepared with {', '.join(made)}, not {', '.join(asked)}; use another --out "
                        f"or remove {shards}")
    return True


RUN_SETTINGS_FILE = "quickstart.json"


def run_settings(args) -> dict:
    """The flags that shape the trained model, by flag (not --micro-batch or --ranks: same steps, same math)."""
    return {"--seq-len": args.seq_len, "--vocab-size": args.vocab_size, "--max-docs": args.max_docs,
            "--steps": args.steps, "--batch-tokens": args.batch_tokens}


def check_run_settings(run_dir: str, wanted: dict) -> None:
    """Raise DataError naming every flag whose value differs from the one `run_dir`'s run was started with."""
    path = os.path.join(run_dir, RUN_SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f)
    differ = [flag for flag, value in wanted.items() if flag in recorded and recorded[flag] != value]
    if differ:
        made = ", ".join(f"{flag} {recorded[flag]}" for flag in differ)
        asked = ", ".join(f"{flag} {wanted[flag]}" for flag in differ)
        raise DataError(f"{run_dir} was trained with {made}, not {asked}; rerun with {made} to continue it, or use "
                        f"another --out or remove {run_dir} to start fresh")


def record_run_settings(run_dir: str, settings: dict) -> None:
    """Write the settings a new run starts with into its run directory (kept as they are on a resume)."""
    path = os.path.join(run_dir, RUN_SETTINGS_FILE)
    if os.path.isfile(path):
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)


def _setting(value):
    """A setting in the form manifest.json keeps it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _shown(value) -> str:
    """A setting as its flag takes it (lists space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def run_pretrain(args, shards: str, run_dir: str, extra_sets: list[str] = (), *, step: int = 2,
                 title: str = "pretrain the tiny ATMA") -> list[str]:
    """Step 2: DeepSpeed ZeRO-3 pretraining through the deepspeed launcher (resumes automatically)."""
    ranks = args.ranks or default_ranks()
    train_args = [
        "pretrain/train.py", "--config", "pretrain/configs/tiny-cpu.yaml", "--data", shards, "--run-dir", run_dir,
        "--max-steps", str(args.steps),
        "--set", f"batch.tokens={args.batch_tokens}", "--set", f"batch.micro_batch_size={args.micro_batch}",
        "--set", f"checkpoint.every={max(args.steps // 3, 1)}", "--set", "logging.every=5",
        "--set", f"logging.val_every={max(args.steps // 3, 1)}",
        "--set", f"logging.progress={'false' if args.no_progress else 'true'}",
    ]
    for assignment in extra_sets:
        train_args += ["--set", assignment]
    # A free rendezvous port: a second run on this machine must not collide with the first.
    launcher = ["--num_gpus", str(ranks), "--master_port", str(free_port())]
    shown = ["deepspeed", *launcher, *train_args]
    banner(step, f"{title} with DeepSpeed ZeRO-3 on {ranks} rank(s)", shown)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *launcher, *train_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("WANDB_MODE", "offline")
    code = run_supervised(cmd, cwd=ROOT, env=env)
    if code == INTERRUPTED_EXIT_CODE:
        print(f"Stopped by Ctrl-C; rerun the same command to continue from the checkpoint in {run_dir}/checkpoints",
              file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE)
    if code != 0:
        raise SystemExit(f"error: pretraining failed (exit code {code}); rerun to resume from the "
                         f"last checkpoint in {run_dir}/checkpoints")
    reached = last_checkpoint_step(run_dir)
    if reached < args.steps:
        # A SIGTERM (a scheduler's stop) makes the ranks save and exit with 0: not a finished run.
        print(f"Stopped at step {reached} of {args.steps}; rerun the same command to continue from the checkpoint "
              f"in {run_dir}/checkpoints", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE)
    return shown


def last_checkpoint_step(run_dir: str) -> int:
    """Step of the newest complete checkpoint of a run (0 when it has none)."""
    from pretrain.checkpoint import TAG_RE, complete_tags

    tags = complete_tags(os.path.join(run_dir, "checkpoints"))
    return int(TAG_RE.match(tags[-1]).group(1)) if tags else 0


def read_curve(run_dir: str) -> dict:
    """First and last training loss and the last validation loss from metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    train = [r for r in rows if "loss/total" in r]
    val = [r for r in rows if "loss/val" in r]
    return {
        "first_train_loss": train[0]["loss/total"] if train else None,
        "last_train_loss": train[-1]["loss/total"] if train else None,
        "last_val_loss": val[-1]["loss/val"] if val else None,
        "steps": train[-1]["step"] if train else 0,
        "tokens_per_s": train[-1].get("perf/tokens_per_s") if train else None,
    }


def main(argv=None) -> int:
    """Run the four steps and print where everything is."""
    args = parse_args(argv)
    problem = batch_problem(args.batch_tokens, args.micro_batch, args.seq_len, args.ranks or default_ranks())
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    shards, run_dir = os.path.join(out, "shards"), os.path.join(out, "run")
    exported, eval_dir = os.path.join(out, "exported"), os.path.join(out, "eval")
    try:
        check_run_settings(run_dir, run_settings(args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(LAYOUT)
    start = time.time()
    timings = {}

    t = time.time()
    try:
        data_info = run_prepare(args, shards)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    timings["prepare_s"] = time.time() - t

    t = time.time()
    record_run_settings(run_dir, run_settings(args))
    train_cmd = run_pretrain(args, shards, run_dir)
    timings["pretrain_s"] = time.time() - t

    from pretrain.export import export

    banner(3, "export the last checkpoint to a standalone model",
           ["python", "-m", "pretrain.export", run_dir, exported])
    t = time.time()
    record = export(run_dir, exported)
    timings["export_s"] = time.time() - t
    print(f"      {record['checkpoint']}: step {record['step']}, {record['num_parameters']:,} parameters", flush=True)

    from evaluation.long_context import run_evaluation

    lengths = [int(m) * args.seq_len for m in args.eval_multiples.split(",")]
    banner(4, "long-context evaluation (fixed-target perplexity and retrieval)",
           ["python", "-m", "evaluation.long_context", exported, "--lengths", ",".join(map(str, lengths)),
            "--data", shards, "--trials", str(args.trials), "--out", eval_dir])
    t = time.time()
    results = run_evaluation(exported, lengths, eval_dir, data=shards, trials=args.trials,
                             progress=not args.no_progress)
    timings["evaluate_s"] = time.time() - t
    timings["total_s"] = time.time() - start

    curve = read_curve(run_dir)
    summary = {"data": data_info, "training": curve, "export": record, "timings": timings,
               "commands": {"pretrain": shlex.join(train_cmd)},
               "evaluation": {"lengths": lengths, "retrieval_cells": len(results.get("retrieval", [])),
                              "perplexity": [{k: r.get(k) for k in ("length", "ppl", "bpb")}
                                             for r in results.get("perplexity", [])]}}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"\nDone in {timings['total_s'] / 60:.1f} min. Training loss {curve['first_train_loss']:.3f} -> "
          f"{curve['last_train_loss']:.3f}" + (f", validation {curve['last_val_loss']:.3f}" if curve["last_val_loss"] else ""))
    for row in summary["evaluation"]["perplexity"]:
        print(f"  context {row['length']:>6}: perplexity {row['ppl']:.2f}, {row['bpb']:.3f} bits/byte")
    print(f"Report:      {os.path.join(eval_dir, 'report.md')}")
    print(f"Plots:       {os.path.join(eval_dir, 'perplexity.png')}, {os.path.join(eval_dir, 'retrieval.png')}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    print(f"Everything:  {out} (see README.md there)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\nStopped by Ctrl-C; rerun the same command to continue (finished steps are reused)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
