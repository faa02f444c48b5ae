"""The paper's central comparison in miniature: Polar vs NoPE vs RoPE, each with and without memory.

    python -m launch.compare [--out DIR] [--seeds 0,1,2] [--steps N] [--seq-len 256]

Trains matched tiny models (same data, steps and optimizer; one run per model and seed) at a short
training length on the built-in corpus mixed with key-value recall episodes (``recall:INPUT``,
data_pipeline/recall.py), after a first stage on short recall samples with one-digit values, with
the next-token loss plus a loss on the copied numbers (``loss.copy_weight``, docs/results.md); the
first stage goes on while its copy loss shows that the lookup is not found yet, the main stage
while a retrieval check at the training length is below its goal (each up to a step limit);
evaluates fixed-target perplexity and teacher-forced retrieval from 1x to 16x that length, and
writes ``comparison.md``, ``comparison.json`` and two plots (mean over seeds, with the spread).
Every finished (model, seed) is kept: rerunning the same command skips it and resumes an
interrupted training run from its last checkpoint; ``--include`` adds the runs an earlier report
recorded (seeds run by another invocation or machine) without training them again. On a CPU
machine two runs train at once (``--parallel``), each on one rank with its share of the cores and
its output in its own ``compare.log``; one line per run started and finished shows the progress.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest
from evaluation.report import CHANCE_MARK, DIGIT_CHANCE, at_chance, percent_limits, relative_change

from .quickstart import (banner, batch_problem, default_ranks, finished_shards, int_at_least, multiples, positive_int,
                         run_pretrain, vocab_size)
from .supervise import INTERRUPTED_EXIT_CODE

VARIANTS = [(core, memory) for core in ("polar", "nope", "rope") for memory in (True, False)]
METRICS = ("ppl", "ppl_change", "bpb", "token_acc", "digit_acc", "exact_acc")
DEFAULT_MODEL_SET = ["hidden_size=64"]
# SPEC §2.11: RoPE's softmax scale 0.12 at head dimension 128.
PAPER_ROPE_SCALE, PAPER_HEAD_DIM = 0.12, 128
# The main stage's retrieval check draws its trials with the run's seed plus this, never the evaluation's.
CHECK_SEED_OFFSET = 1000


def rope_scale_for(args) -> float:
    """RoPE's softmax scale: --rope-scale, else the paper's logit range (head_dim x scale) at this head dim.

    q and k are RMS-normed per head (norm sqrt(head_dim) each), so the paper's 0.12 at head dimension
    128 bounds the logits by +-15.4; at the miniature's head dimension 32 the same 0.12 bounds them by
    +-3.8, too flat for one needle among hundreds of tokens to win the softmax.
    """
    if args.rope_scale is not None:
        return args.rope_scale
    from model.config import AtmaConfig

    overrides = dict(item.split("=", 1) for item in (args.model_set or DEFAULT_MODEL_SET))
    head_dim = int(overrides.get("head_dim", AtmaConfig.from_preset(args.preset).head_dim))
    return PAPER_ROPE_SCALE * PAPER_HEAD_DIM / head_dim


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="comparison", help="output directory (default: ./comparison)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="training length (default: 256)")
    p.add_argument("--vocab-size", type=vocab_size, default=2048,
                   help="BPE vocabulary trained on the corpus (default: 2048)")
    p.add_argument("--max-docs", type=positive_int, default=400, help="corpus files to read (default: 400)")
    p.add_argument("--recall-weight", type=float, default=4.0,
                   help="weight of the recall:builtin:stdlib input beside the plain corpus (0: no recall "
                        "episodes; default: 4.0)")
    p.add_argument("--recall-episodes", nargs=2, type=int, default=[4, 8], metavar=("LO", "HI"),
                   help="episodes per recall document (prepare --recall-episodes; default 4 8)")
    p.add_argument("--recall-gap-chars", nargs=2, type=int, default=[0, 700], metavar=("LO", "HI"),
                   help="characters between a fact and its query (prepare --recall-gap-chars; default 0 700: about "
                        "0-235 tokens of code at 3 characters a token, so training covers the distances of the "
                        "evaluation at the training length, up to a needle at 10%% depth of 256 tokens)")
    p.add_argument("--copy-weight", type=float, default=1.0,
                   help="weight of the extra loss on in-context copy targets (loss.copy_weight; default: 1.0)")
    p.add_argument("--copy-targets", choices=("all", "numbers"), default="numbers",
                   help="copy targets the copy loss counts (loss.copy_targets; default: numbers, the recalled values)")
    p.add_argument("--copy-context", type=positive_int, default=3,
                   help="tokens before a target that must repeat for it to be a copy target (loss.copy_context; "
                        "default: 3)")
    p.add_argument("--lm-weight", type=float, default=0.1,
                   help="weight of the plain next-token loss (loss.lm_weight; default: 0.1)")
    p.add_argument("--stage1-steps", type=int_at_least(0), default=600,
                   help="steps of a first stage on short recall samples with one-digit values, which teach the "
                        "lookup before the five-digit values of the main stage (0: no first stage; default: 600)")
    p.add_argument("--stage1-seq-len", type=positive_int, default=64,
                   help="sample length of the first stage (default: 64)")
    p.add_argument("--stage1-copy-loss", type=float, default=1.0,
                   help="the first stage goes on, half its steps at a time, while its copy loss (mean of the last 20 "
                        "logged values; ln 10 = 2.30 at chance) is above this: the lookup is not found yet (default: "
                        "1.0)")
    p.add_argument("--stage1-lr", type=float, default=1.5e-3,
                   help="learning rate of the first stage, constant after its warmup (default: 1.5e-3; at the main "
                        "stage's 3e-3 a polar+mem seed stayed at chance for 1,800 steps, at 1.5e-3 it found the "
                        "lookup in 400)")
    p.add_argument("--stage1-max-steps", type=positive_int, default=1800,
                   help="the first stage stops here whatever its copy loss (default: 1800)")
    p.add_argument("--stage1-batch-tokens", type=positive_int, default=2048,
                   help="tokens per optimizer step in the first stage (default: 2048, 32 samples of 64)")
    p.add_argument("--steps", type=positive_int, default=500,
                   help="optimizer steps of the main stage (default: 500; at 250 the models with memory and Polar "
                        "stopped short of the lookup at five digits)")
    p.add_argument("--copy-loss", type=float, default=1.0,
                   help="with no retrieval check (--retrieval-goal 0), the main stage goes on, half its steps at a "
                        "time, while its copy loss (mean of the last 20 logged values) is above this (default: 1.0; "
                        "Polar and NoPE runs at 90%% or more at 1x ended at 0.5-1.1, but RoPE runs retrieved 88%% "
                        "at 1.3 or more)")
    p.add_argument("--retrieval-goal", type=float, default=0.92,
                   help="the main stage goes on, half its steps at a time, while its retrieval token accuracy at "
                        "the training length is below this, measured on check trials of its own seed, not the "
                        "evaluation's (0: no check, the copy loss decides; default: 0.92, a margin over 90%% for "
                        "the evaluation's 96 trials, which differ from the check's by a few points)")
    p.add_argument("--check-trials", type=positive_int, default=32,
                   help="trials per cell of that check (default: 32, 384 trials over both tasks, haystacks and "
                        "three depths, a few seconds; two draws of 96 differed by up to 6 points)")
    p.add_argument("--max-steps", type=positive_int, default=2000,
                   help="the main stage stops here whatever its copy loss and retrieval (default: 2000; RoPE "
                        "models were still at 88%% after 1,250-1,500 steps)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the run config's)")
    p.add_argument("--rope-scale", type=float, default=None,
                   help="softmax scale of the RoPE models (default: the paper's logit range kept at this head "
                        "dimension, %.2f x %d / head_dim; q and k are RMS-normed, so logits lie within "
                        "+-head_dim x scale)" % (PAPER_ROPE_SCALE, PAPER_HEAD_DIM))
    p.add_argument("--batch-tokens", type=positive_int, default=4096, help="tokens per optimizer step (default: 4096)")
    p.add_argument("--micro-batch", type=positive_int, default=8,
                   help="sequences per micro-batch per rank (default: 8)")
    p.add_argument("--ranks", type=positive_int, default=None, help="training ranks (default: all GPUs, else 2 CPU ranks)")
    p.add_argument("--preset", default="tiny", help="model preset for every variant (default: tiny)")
    p.add_argument("--model-set", action="append", default=None, metavar="KEY=VALUE",
                   help="override one model config field for every variant (repeatable; default: hidden_size=64, "
                        "the width at which the tiny models learn retrieval at lr 3e-3), e.g. head_dim=64")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, one run each per model (default: 0,1,2)")
    p.add_argument("--eval-multiples", type=multiples, default="1,2,4,8,16",
                   help="evaluation lengths / training length (default: 1,2,4,8,16)")
    p.add_argument("--trials", type=positive_int, default=8, help="retrieval trials per cell (default: 8)")
    p.add_argument("--variants", default=",".join(variant_name(c, m) for c, m in VARIANTS),
                   help="subset to run, e.g. polar+mem,nope+mem (default: all six)")
    p.add_argument("--parallel", type=positive_int, default=None,
                   help="(model, seed) runs trained at once, each on one rank with its share of the cores, its "
                        "output in RUN_DIR/compare.log (default: 2 on a CPU machine with 2 or more cores, where two "
                        "one-rank runs finish sooner than one two-rank run after another; else 1)")
    p.add_argument("--include", action="append", default=None, metavar="COMPARISON_JSON",
                   help="take the (model, seed) runs recorded in an earlier report's comparison.json instead of "
                        "training them, e.g. seeds run by another invocation or on another machine; it must share "
                        "the training length, evaluation lengths, steps, loss and RoPE scale (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs finished so far, training nothing")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # NAME:SEED, one run for a --parallel parent
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not 0 <= args.retrieval_goal <= 1:
        p.error(f"--retrieval-goal must be a fraction in [0, 1], got {args.retrieval_goal}")
    if args.stage1_lr <= 0:
        p.error(f"--stage1-lr must be positive, got {args.stage1_lr}")
    for flag, value in (("--recall-weight", args.recall_weight), ("--copy-weight", args.copy_weight),
                        ("--lm-weight", args.lm_weight)):
        if value < 0:
            p.error(f"{flag} must be >= 0, got {value}")
    for flag, (lo, hi), low in (("--recall-episodes", args.recall_episodes, 1),
                                ("--recall-gap-chars", args.recall_gap_chars, 0)):
        if not low <= lo <= hi:
            p.error(f"{flag} takes LO HI with {low} <= LO <= HI, got {lo} {hi}")
    for flag, value in (("--lr", args.lr), ("--rope-scale", args.rope_scale)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    return args


def default_parallel() -> int:
    """2 on a CPU machine with at least 2 cores, else 1 (a GPU run uses every GPU for one run at a time)."""
    import torch

    return 2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1


def batch_problems(args) -> str | None:
    """Why the token batch of a stage cannot be split into micro-batches on the ranks each run trains on."""
    ranks = 1 if (args.parallel or default_parallel()) > 1 else args.ranks or default_ranks()
    stages = [(args.batch_tokens, args.seq_len, "")]
    if args.stage1_steps > 0:
        stages.append((args.stage1_batch_tokens, args.stage1_seq_len, "stage1-"))
    for tokens, seq_len, stage in stages:
        problem = batch_problem(tokens, args.micro_batch, seq_len, ranks, stage)
        if problem:
            return problem
    return None


def variant_name(core: str, memory: bool) -> str:
    """Display name, e.g. polar+mem."""
    return f"{core}+mem" if memory else core


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; raises ValueError with a one-line reason."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least one seed and no repeats, got {text!r}")
    return seeds


def summarise(results: dict) -> dict:
    """Per length: perplexity, bits/byte, and retrieval accuracies averaged over tasks, haystacks and depths."""
    rows: dict[int, dict] = {}
    for r in results.get("perplexity", []):
        if "ppl" in r:
            rows.setdefault(r["length"], {})["ppl"] = r["ppl"]
            rows[r["length"]]["bpb"] = r["bpb"]
    acc: dict[int, list] = {}
    for r in results.get("retrieval", []):
        if "token_acc" in r:
            acc.setdefault(r["length"], []).append(r)
    for length, cells in acc.items():
        row = rows.setdefault(length, {})
        for metric in ("token_acc", "digit_acc", "exact_acc"):
            row[metric] = sum(c[metric] for c in cells) / len(cells)
        row["trials"] = sum(c["trials"] for c in cells)
        row["at_chance"] = at_chance(row)
    rows = dict(sorted(rows.items()))
    # Perplexity change against this run's shortest length: its spread over seeds is the spread of
    # the change, not of the level (runs of different lengths differ in level).
    levels = [row["ppl"] for row in rows.values() if "ppl" in row]
    for row in rows.values():
        if "ppl" in row:
            row["ppl_change"] = relative_change([levels[0], row["ppl"]])[1]
    return rows


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean, standard deviation, min and max over seeds of every metric, per length (string keys)."""
    lengths = sorted({int(n) for summary in per_seed.values() for n in summary})
    table = {}
    for n in lengths:
        rows = [summary[str(n)] for summary in per_seed.values() if str(n) in summary]
        entry = {"seeds": len(rows)}
        for metric in METRICS:
            values = [row[metric] for row in rows if metric in row]
            if not values:
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            entry[metric] = mean
            entry[f"{metric}_sd"] = sd
            entry[f"{metric}_min"], entry[f"{metric}_max"] = min(values), max(values)
        trials = sum(row.get("trials", 0) for row in rows)
        if "digit_acc" in entry:
            entry["trials"] = trials
            entry["at_chance"] = at_chance(entry)
        table[str(n)] = entry
    return table


def read_included(paths: list[str], args, lengths: list[int], wanted: list[str], seeds: list[int]) -> dict:
    """The runs earlier reports recorded, for the models and seeds asked for: {(name, seed): run}.

    Each run is {"summary", "stage1_steps", "main_steps", "seconds", "source"}; raises ValueError when
    a report was made with other settings or two reports record the same run.
    """
    mine = {"train_len": args.seq_len, "lengths": lengths, "steps": args.steps,
            "loss": {"lm_weight": args.lm_weight, "copy_weight": args.copy_weight, "copy_context": args.copy_context},
            "rope_scale": rope_scale_for(args)}
    runs: dict[tuple[str, int], dict] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"--include {path}: cannot read it as a comparison report ({err})") from None
        if not isinstance(report, dict) or "per_seed" not in report:
            raise ValueError(f"--include {path}: not a comparison.json (no per_seed runs)")
        for key, value in mine.items():
            if key in report and report[key] != value:
                raise ValueError(f"--include {path}: made with {key} {report[key]!r}, this comparison has {value!r}")
        for name, by_seed in report["per_seed"].items():
            for seed_text, summary in by_seed.items():
                seed = int(seed_text)
                if name not in wanted or seed not in seeds:
                    continue
                if (name, seed) in runs:
                    raise ValueError(f"{name} seed {seed} is recorded in both {runs[name, seed]['source']} and {path}")
                runs[name, seed] = {
                    "summary": summary, "source": path,
                    "stage1_steps": report.get("stage1_steps", {}).get(name, {}).get(seed_text),
                    "main_steps": report.get("main_steps", {}).get(name, {}).get(seed_text),
                    "seconds": report.get("run_seconds", {}).get(name, {}).get(seed_text)}
    return runs


def _included_lines(included: dict) -> list[str]:
    """The report's account of the runs taken from earlier reports, per report and model."""
    if not included:
        return []
    lines = ["Runs taken from earlier reports, not trained in this invocation:", ""]
    for source, runs in included.items():
        by_model: dict[str, list[str]] = {}
        for run in runs:
            name, _, seed = run.rpartition(":")
            by_model.setdefault(name, []).append(seed)
        listed = "; ".join(f"{name} seed{'s' if len(s) > 1 else ''} {', '.join(s)}" for name, s in by_model.items())
        lines.append(f"- `{source}`: {listed}")
    return lines + [""]


def _cell(row: dict, metric: str, fmt: str) -> str:
    """One table cell: mean ± sd over seeds (accuracies in %), marked when the retrieval there is at chance."""
    if metric not in row:
        return "-"
    scale = 100 if metric.endswith("_acc") else 1
    text = fmt.format(row[metric] * scale)
    if row.get("seeds", 1) > 1:
        text += " ± " + fmt.format(row.get(f"{metric}_sd", 0.0) * scale)
    return text + CHANCE_MARK if metric.endswith("_acc") and row.get("at_chance") else text


def _chance_lines(table: dict) -> str:
    """What the chance mark means, and a plain warning when no model retrieves at all."""
    cells = [row for rows in table.values() for row in rows.values() if "at_chance" in row]
    note = (f"{CHANCE_MARK} at chance: digit accuracy within two standard errors of {100 * DIGIT_CHANCE:.0f}% "
            "(a uniform guess among the ten digits).")
    if cells and all(row["at_chance"] for row in cells):
        note += (" **Every model is at chance at every length, the training length included: none learned "
                 "to retrieve, so these numbers say nothing about extrapolation.**")
    return note


def write_report(out: str, table: dict, args, lengths: list[int], seconds: float, per_seed: dict | None = None,
                 stage1_steps: dict | None = None, main_steps: dict | None = None,
                 run_seconds: dict | None = None, included: dict | None = None) -> None:
    """comparison.md (tables of mean ± sd over seeds), comparison.json and the two plots.

    ``included`` maps an earlier report's path to the "name:seed" runs taken from it.
    """
    seeds = getattr(args, "seeds", "0")
    done = sorted({int(seed) for runs in (per_seed or {}).values() for seed in runs})
    rope_scale = rope_scale_for(args) if hasattr(args, "rope_scale") else None
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"lengths": lengths, "train_len": args.seq_len, "steps": args.steps, "seeds": seeds,
                   "loss": {"lm_weight": args.lm_weight, "copy_weight": args.copy_weight,
                            "copy_context": args.copy_context}, "rope_scale": rope_scale,
                   "stage1_steps": stage1_steps or {}, "main_steps": main_steps or {},
                   "run_seconds": run_seconds or {}, "included": included or {}, "table": table,
                   "per_seed": per_seed or {}}, f, indent=2)
    head = "| model | " + " | ".join(f"{n // args.seq_len}x ({n})" for n in lengths) + " |"
    sep = "|---" * (len(lengths) + 1) + "|"
    asked = [int(seed) for seed in str(seeds).split(",") if seed.strip()]
    seeds_text = f"seeds {', '.join(map(str, done or asked))}"
    if per_seed and done != sorted(asked):
        seeds_text += f" (of {', '.join(map(str, asked))} asked for)"
    lines = [f"# Miniature comparison: train at {args.seq_len}, evaluate to {lengths[-1]}", "",
             f"Preset `{args.preset}`, main stage {_main_steps_text(args)} x {args.batch_tokens} tokens, identical data; "
             f"{seeds_text} (mean ± standard deviation where a model has more than one); {args.trials} retrieval "
             f"trials per (task, haystack, depth) cell; {seconds / 60:.0f} min in this invocation (runs "
             f"finished by an earlier one are reused, not counted). Loss: next-token x "
             f"{args.lm_weight} + copy targets x {args.copy_weight} (context {args.copy_context})."
             + (f" RoPE softmax scale {rope_scale:g}." if rope_scale is not None else ""), ""]
    lines += _included_lines(included or {})
    if stage1_steps or main_steps:
        stage1_steps, main_steps = stage1_steps or {}, main_steps or {}
        goal = getattr(args, "retrieval_goal", 0)
        main_rule = (f"its retrieval check at 1x is below {100 * goal:g}%" if goal
                     else f"its copy loss is above {getattr(args, 'copy_loss', '-')}")
        lines += ["Steps of each run, first stage / main stage (the first goes on while its copy loss is above "
                  f"{getattr(args, 'stage1_copy_loss', '-')}, the main stage while {main_rule}), and the run's "
                  "wall time:", "",
                  "| model | " + " | ".join(f"seed {seed}" for seed in done) + " |", "|---" * (len(done) + 1) + "|"]
        run_seconds = run_seconds or {}
        for name in [n for n in table if n in stage1_steps or n in main_steps]:
            cells = [f"{stage1_steps.get(name, {}).get(str(seed), '-')} / "
                     f"{main_steps.get(name, {}).get(str(seed), '-')}"
                     + _minutes_text(run_seconds.get(name, {}).get(str(seed))) for seed in done]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        timed_runs = [t for runs in run_seconds.values() for t in runs.values()]
        if timed_runs:
            parallel = getattr(args, "parallel", None) or default_parallel()
            total = sum(sum(t.values()) for t in timed_runs) / 60
            lines += [f"Wall time of the {len(timed_runs)} timed runs (first stage + main stage + evaluation, over "
                      f"every invocation): {total:.0f} min in all; {parallel} at a time, about "
                      f"{total / parallel / 60:.1f} h.", ""]
    for metric, title, fmt in (("ppl", "Fixed-target perplexity (lower is better)", "{:.3f}"),
                               ("bpb", "Bits per byte", "{:.3f}"),
                               ("token_acc", "Retrieval token accuracy, % (mean over tasks, haystacks, depths)",
                                "{:.1f}"),
                               ("exact_acc", "Retrieval exact accuracy, %", "{:.1f}")):
        lines += [f"## {title}", "", head, sep]
        for name, rows in table.items():
            cells = [_cell(rows.get(str(n), {}), metric, fmt) for n in lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if metric == "token_acc":
            lines += _chance_lines(table), ""
    with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    _plot(out, table, args, lengths)


def _minutes_text(timing: dict | None) -> str:
    """A run's wall time as the steps table shows it: ', 14 min' (empty when it was not timed)."""
    return f", {sum(timing.values()) / 60:.0f} min" if timing else ""


def _main_steps_text(args) -> str:
    """The main stage's steps as the report states them: fixed, or from --steps up to --max-steps."""
    limit = getattr(args, "max_steps", args.steps)
    return f"{args.steps} steps" if limit <= args.steps else f"{args.steps}-{limit} steps"


def plot_series(rows: dict, metric: str, lengths: list[int]) -> tuple[list, list, list, list]:
    """Lengths, mean and min-max over seeds of one plotted metric, in percent.

    Perplexity is plotted as each run's change against its own 1x, so a bar is the spread of the
    change over seeds, not of the perplexity level.
    """
    key = "ppl_change" if metric == "ppl" else metric
    xs = [n for n in lengths if key in rows.get(str(n), {})]
    scale = 1.0 if metric == "ppl" else 100.0
    mean = [scale * rows[str(n)][key] for n in xs]
    low = [scale * rows[str(n)].get(f"{key}_min", rows[str(n)][key]) for n in xs]
    high = [scale * rows[str(n)].get(f"{key}_max", rows[str(n)][key]) for n in xs]
    return xs, mean, low, high


def _plot(out: str, table: dict, args, lengths: list[int]) -> None:
    """Perplexity as % change against 1x and retrieval accuracy from 0 to 100, mean over seeds with min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    for metric, ylabel, fname in (("ppl", "perplexity change vs 1x (%)", "comparison_perplexity.png"),
                                  ("token_acc", "retrieval token accuracy (%)", "comparison_retrieval.png")):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        series = []
        for name, rows in table.items():
            xs, mean, low, high = plot_series(rows, metric, lengths)
            if not xs:
                continue
            series.append(low + high)
            errors = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
            ax.errorbar(xs, mean, yerr=errors, marker="o", capsize=3, label=name,
                        linestyle="-" if name.endswith("+mem") else "--")
        if metric == "ppl":
            ax.set_ylim(*percent_limits(series))
            ax.axhline(0.0, color="black", linewidth=0.6)
        else:
            ax.set_ylim(0, 100)
            ax.axhline(100 * DIGIT_CHANCE, color="red", linewidth=0.8, linestyle=":", label="chance (digits)")
        ax.set_xscale("log", base=2)
        ax.axvline(args.seq_len, color="grey", linewidth=0.8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)


def stage1_shards(shards: str) -> str:
    """Where the first stage's shards live beside the main ones."""
    return shards.rstrip(os.sep) + "-stage1"


def eval_shards(args, shards: str) -> str:
    """The held-out data of the evaluation and the retrieval check: the corpus without recall episodes.

    The training shards' held-out split holds the recall episodes of its documents too, so a real
    haystack cut from it carries facts in the training's format (distractors a memory model
    answers with); the evaluation reads the same held-out documents without them.
    """
    return shards.rstrip(os.sep) + "-eval" if args.recall_weight > 0 else shards


def prepare_shards(args, shards: str) -> None:
    """The built-in corpus plus its recall episodes, the corpus alone for the evaluation, and the first
    stage's short one-digit episodes (same tokenizer); each reused when already prepared."""
    from data_pipeline.config import BUILTIN_CORPUS
    from data_pipeline.prepare import prepare
    from data_pipeline.recall import RECALL_PREFIX

    inputs, weights = [BUILTIN_CORPUS], [1.0]
    if args.recall_weight > 0:
        inputs.append(RECALL_PREFIX + BUILTIN_CORPUS)
        weights.append(args.recall_weight)
    recall = dict(recall_episodes=tuple(args.recall_episodes), recall_gap_chars=tuple(args.recall_gap_chars))
    recall_flags = ["--recall-episodes", *map(str, args.recall_episodes),
                    "--recall-gap-chars", *map(str, args.recall_gap_chars)]
    command = ["python", "-m", "data_pipeline", "prepare", "--input", *inputs, "--weights", *map(str, weights),
               "--output", shards, "--seq-len", str(args.seq_len), "--vocab-size", str(args.vocab_size),
               "--max-docs", str(args.max_docs), "--val-fraction", "0.05", *recall_flags]
    banner(1, "prepare shards: the built-in corpus and its recall episodes", command)
    common = {"--max-docs": ("max_docs", args.max_docs), "--recall-episodes": ("recall_episodes", args.recall_episodes)}
    if finished_shards(shards, {"--seq-len": ("seq_len", args.seq_len), "--vocab-size": ("vocab_size", args.vocab_size),
                                "--recall-weight": ("weights", weights, _recall_weight), **common,
                                "--recall-gap-chars": ("recall_gap_chars", args.recall_gap_chars)}):
        print("      shards already prepared: reusing them", flush=True)
    else:
        prepare(inputs=inputs, weights=weights, output=shards, seq_len=args.seq_len, vocab_size=args.vocab_size,
                max_docs=args.max_docs, val_fraction=0.05, progress=not args.no_progress, **recall)
    tokenizer = os.path.join(shards, "tokenizer.json")
    held_out = eval_shards(args, shards)
    if held_out != shards:
        # Same documents, seed and fraction: a document's split depends on its key alone, and a
        # recall episode keeps its document's key, so these are the training shards' held-out documents.
        command = ["python", "-m", "data_pipeline", "prepare", "--input", BUILTIN_CORPUS, "--output", held_out,
                   "--seq-len", str(args.seq_len), "--tokenizer", tokenizer, "--max-docs", str(args.max_docs),
                   "--val-fraction", "0.05"]
        banner(1, "prepare shards: the corpus alone, whose held-out part the evaluation reads", command)
        if finished_shards(held_out, {"--seq-len": ("seq_len", args.seq_len), **common}):
            check_tokenizer(held_out, shards)
            print("      shards already prepared: reusing them", flush=True)
        else:
            prepare(inputs=[BUILTIN_CORPUS], weights=[1.0], output=held_out, seq_len=args.seq_len, tokenizer=tokenizer,
                    max_docs=args.max_docs, val_fraction=0.05, progress=not args.no_progress)
    if args.stage1_steps <= 0:
        return
    short, gaps = stage1_shards(shards), (args.recall_gap_chars[0], min(args.recall_gap_chars[1], 100))
    command = ["python", "-m", "data_pipeline", "prepare", "--input", RECALL_PREFIX + BUILTIN_CORPUS, "--weights",
               "4", "--output", short, "--seq-len", str(args.stage1_seq_len), "--tokenizer", tokenizer,
               "--max-docs", str(args.max_docs), "--val-fraction", "0.05", "--recall-episodes",
               *map(str, args.recall_episodes), "--recall-gap-chars", *map(str, gaps), "--recall-digits", "1"]
    banner(1, "prepare shards: first-stage recall episodes with one-digit values", command)
    if finished_shards(short, {"--stage1-seq-len": ("seq_len", args.stage1_seq_len), **common,
                               "--recall-gap-chars": ("recall_gap_chars", gaps)}):
        check_tokenizer(short, shards)
        print("      shards already prepared: reusing them", flush=True)
        return
    prepare(inputs=[RECALL_PREFIX + BUILTIN_CORPUS], weights=[4.0], output=short, seq_len=args.stage1_seq_len,
            tokenizer=tokenizer, max_docs=args.max_docs, val_fraction=0.05, progress=not args.no_progress,
            recall_episodes=tuple(args.recall_episodes), recall_gap_chars=gaps, recall_digits=1)


def _recall_weight(weights: list | None) -> float:
    """--recall-weight as a prepare's weights record it (0: the corpus alone)."""
    return weights[1] if weights and len(weights) > 1 else 0


def check_tokenizer(derived: str, shards: str) -> None:
    """Raise DataError when shards made with the main shards' tokenizer were made with another one."""
    if load_manifest(derived).tokenizer_sha256 != load_manifest(shards).tokenizer_sha256:
        raise DataError(f"{derived} was prepared with another tokenizer than {shards}; use another --out or "
                        f"remove {derived}")


def recent_copy_loss(run_dir: str, last: int = 20) -> float | None:
    """Mean of the last `last` logged copy losses of a run (None when it logged none)."""
    values, path = [], os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "loss/copy" in row:
                values.append(row["loss/copy"])
    return sum(values[-last:]) / len(values[-last:]) if values else None


def copy_loss_reason(run_dir: str, goal: float):
    """A `more_needed(steps)` check: why to go on while the run's recent copy loss is above `goal`."""

    def more_needed(steps: int) -> str | None:
        loss = recent_copy_loss(run_dir)
        if loss is None or loss <= goal:
            return None
        return f"copy loss {loss:.2f} after {steps} steps, above {goal} (the lookup is not found yet)"

    return more_needed


def train_adaptively(run, target_file: str, first: int, limit: int, more: int, more_needed, label: str) -> int:
    """Train to `first` steps, then on, `more` at a time, while `more_needed(steps)` gives a reason (up to `limit`).

    `run(steps)` trains (or resumes) the run up to `steps`; `more_needed(steps)` returns why it
    should go on, or None. The target is kept in `target_file`, so an interrupted run resumes
    towards the same step. Returns the steps trained.
    """
    steps = first
    if os.path.isfile(target_file):
        with open(target_file, encoding="utf-8") as f:
            steps = int(f.read())
    while True:
        os.makedirs(os.path.dirname(target_file), exist_ok=True)
        with open(target_file, "w", encoding="utf-8") as f:
            f.write(f"{steps}\n")
        run(steps)
        if steps >= limit:
            return steps
        reason = more_needed(steps)
        if reason is None:
            return steps
        extra = min(max(more, 1), limit - steps)
        print(f"{label}: {reason}: {extra} steps more", flush=True)
        steps += extra


def train_stage1(args, shards: str, stage1: str, sets: list[str], label: str) -> int:
    """Train the first stage until its copy loss shows the lookup (or its step limit); returns its steps.

    Whether a small model finds the lookup in a given number of steps varies with the seed (a
    plateau at chance, then a drop), so the stage goes on, half its steps at a time, while the copy
    loss is above --stage1-copy-loss. The target is kept in STAGE1/steps.
    """
    # A constant rate after the warmup: a decay over so short a stage slows the onset of retrieval.
    stage1_sets = [s for s in sets if not s.startswith("optim.lr=")]
    stage1_sets += [f"optim.lr={args.stage1_lr:g}", "schedule.kind=constant",
                    f"schedule.warmup_steps={min(50, args.stage1_steps // 5)}"]
    run_dir = os.path.join(stage1, "run")

    def run(steps: int) -> None:
        short = argparse.Namespace(**{**vars(args), "steps": steps, "batch_tokens": args.stage1_batch_tokens})
        run_pretrain(short, stage1_shards(shards), run_dir, stage1_sets, step=2,
                     title=f"{label}: stage 1 (one-digit values, {args.stage1_seq_len}-token samples)")

    return train_adaptively(run, os.path.join(stage1, "steps"), args.stage1_steps, args.stage1_max_steps,
                            args.stage1_steps // 2, copy_loss_reason(run_dir, args.stage1_copy_loss), f"{label}: stage 1")


def retrieval_check(args, shards: str, base: str, seed: int) -> float | None:
    """Retrieval token accuracy of the run's newest checkpoint at the training length, on check trials (None: no cells).

    The check draws its trials with a seed of its own (`CHECK_SEED_OFFSET` past the run's), so the
    final evaluation's trials never decide how long a model trains.
    """
    from evaluation.long_context import run_evaluation
    from pretrain.export import export

    check = os.path.join(base, "check")
    export(os.path.join(base, "run"), os.path.join(check, "exported"))
    results = run_evaluation(os.path.join(check, "exported"), [args.seq_len], os.path.join(check, "eval"),
                             data=eval_shards(args, shards), tasks=("passkey", "niah"), trials=args.check_trials,
                             seed=seed + CHECK_SEED_OFFSET, progress=False)
    return summarise(results).get(args.seq_len, {}).get("token_acc")


def main_stage_reason(args, shards: str, base: str, seed: int):
    """Why the main stage should go on: its check retrieval below --retrieval-goal (with no check: its copy loss)."""
    if args.retrieval_goal <= 0:
        return copy_loss_reason(os.path.join(base, "run"), args.copy_loss)

    def more_needed(steps: int) -> str | None:
        # The check decides on its own: RoPE models retrieve 88% at copy losses of 1.3 or more,
        # so a copy-loss gate in front of it kept them training to the step limit unchecked.
        accuracy = retrieval_check(args, shards, base, seed)
        if accuracy is None:
            print(f"retrieval check after {steps} steps: no retrieval cells, so no extension", flush=True)
            return None
        if accuracy >= args.retrieval_goal:
            print(f"retrieval check after {steps} steps: {100 * accuracy:.1f}% at {args.seq_len} tokens", flush=True)
            return None
        return (f"retrieval {100 * accuracy:.1f}% at {args.seq_len} tokens after {steps} steps (check trials), "
                f"below {100 * args.retrieval_goal:g}%")

    return more_needed


def train_main(args, shards: str, base: str, sets: list[str], label: str, seed: int) -> int:
    """Train the main stage (five-digit values at the training length); returns its steps.

    It goes on, half its steps at a time, while its retrieval at the training length on check
    trials is below --retrieval-goal (with no check: while its copy loss is above --copy-loss), up
    to --max-steps. Each extension recomputes the warmup-stable-decay schedule
    over the longer run, so the rate rises back to its peak and decays again at the end.
    """
    main_sets = sets + ["schedule.kind=wsd", f"schedule.warmup_steps={min(10, args.steps // 5)}"]
    run_dir = os.path.join(base, "run")

    def run(steps: int) -> None:
        longer = argparse.Namespace(**{**vars(args), "steps": steps})
        run_pretrain(longer, shards, run_dir, main_sets, step=2, title=f"{label}: pretrain")

    return train_adaptively(run, os.path.join(base, "main_steps"), args.steps, max(args.max_steps, args.steps),
                            args.steps // 2, main_stage_reason(args, shards, base, seed), label)


TIMING_FILE = "timing.json"


@contextlib.contextmanager
def timed(base: str, part: str, replace: bool = False):
    """Add the wall time of the enclosed work, interrupted or not, to BASE/timing.json under `part`
    (or, with `replace`, put it in place of what that part took before)."""
    start = time.time()
    try:
        yield
    finally:
        path = os.path.join(base, TIMING_FILE)
        timing = read_timing(base)
        timing[part] = (0.0 if replace else timing.get(part, 0.0)) + time.time() - start
        os.makedirs(base, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(timing, f, indent=2)


def read_timing(base: str) -> dict:
    """Seconds a run has spent so far in each part (first stage, main stage, evaluation), over every invocation."""
    path = os.path.join(base, TIMING_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_one(args, shards: str, base: str, core: str, memory: bool, seed: int, lengths: list[int], label: str) -> dict:
    """Train, export and evaluate one (model, seed), or read its results when a previous run finished it."""
    results_path = os.path.join(base, "eval", "results.json")
    done_marker = os.path.join(base, "done")
    if os.path.isfile(done_marker) and os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
        read = evaluated_on(results)
        if read == os.path.abspath(eval_shards(args, shards)):
            print(f"\n{label}: finished earlier, reusing {results_path}", flush=True)
            return results
        print(f"\n{label}: trained earlier but evaluated on {read}; evaluating it again (no training)", flush=True)
        return evaluate_run(args, shards, base, seed, lengths, label, replace=True)
    sets = [f"model.preset={args.preset}", f"model.overrides.core={core}",
            f"model.overrides.memory={'true' if memory else 'false'}", f"train.seed={seed}", f"data.seed={seed}"]
    sets += [f"model.overrides.{assignment}" for assignment in (args.model_set or DEFAULT_MODEL_SET)]
    if args.lr is not None:
        sets.append(f"optim.lr={args.lr}")
    if core == "rope":
        sets.append(f"model.overrides.rope_scale={rope_scale_for(args):g}")
    sets += [f"loss.lm_weight={args.lm_weight}", f"loss.copy_weight={args.copy_weight}",
             f"loss.copy_context={args.copy_context}", f"loss.copy_targets={args.copy_targets}"]
    from pretrain.export import export

    if args.stage1_steps > 0:
        stage1 = os.path.join(base, "stage1")
        if not os.path.isfile(os.path.join(stage1, "done")):
            with timed(base, "stage1"):
                steps = train_stage1(args, shards, stage1, sets, label)
                export(os.path.join(stage1, "run"), os.path.join(stage1, "exported"))
            with open(os.path.join(stage1, "done"), "w", encoding="utf-8") as f:
                f.write(f"trained {steps} steps and exported\n")
        sets.append(f"train.init_from={os.path.join(stage1, 'exported')}")
    with timed(base, "main"):
        train_main(args, shards, base, sets, label, seed)
        export(os.path.join(base, "run"), os.path.join(base, "exported"))
    return evaluate_run(args, shards, base, seed, lengths, label)


def evaluated_on(results: dict) -> str | None:
    """The held-out data an evaluation's results were measured on (None when it read none)."""
    # The metadata names each data source by its directory's name: {"shards-eval": {"path": ...}}.
    paths = [info.get("path") for info in results.get("metadata", {}).get("data", {}).values()]
    return os.path.abspath(paths[0]) if len(paths) == 1 and paths[0] else None


def evaluate_run(args, shards: str, base: str, seed: int, lengths: list[int], label: str,
                 replace: bool = False) -> dict:
    """Evaluate a trained and exported run on the held-out corpus, then mark it done; returns the results."""
    from evaluation.long_context import run_evaluation

    data = eval_shards(args, shards)
    banner(4, f"{label}: evaluate at {lengths}", ["python", "-m", "evaluation.long_context",
           os.path.join(base, "exported"), "--lengths", ",".join(map(str, lengths)), "--data", data])
    with timed(base, "eval", replace=replace):
        results = run_evaluation(os.path.join(base, "exported"), lengths, os.path.join(base, "eval"), data=data,
                                 trials=args.trials, seed=seed, progress=not args.no_progress)
    with open(os.path.join(base, "done"), "w", encoding="utf-8") as f:
        f.write("trained, exported and evaluated\n")
    return results


def main(argv=None) -> int:
    """Train, export and evaluate each variant and seed, then write the comparison report."""
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {variant_name(c, m): (c, m) for c, m in VARIANTS}
    unknown = [v for v in wanted if v not in known]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problem = None if args.report_only else batch_problems(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    start = time.time()
    shards = os.path.join(out, "shards")
    if not args.report_only:
        try:
            prepare_shards(args, shards)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    lengths = [int(m) * args.seq_len for m in args.eval_multiples.split(",")]
    # Seed by seed, every model in each: a comparison cut short still compares all models.
    jobs = [(name, seed) for seed in seeds for name in wanted]
    if args.only is not None:
        name, _, seed = args.only.rpartition(":")
        core, memory = known[name]
        run_one(args, shards, os.path.join(out, name, f"seed{seed}"), core, memory, int(seed), lengths, args.only)
        return 0
    try:
        included = read_included(args.include or [], args, lengths, wanted, seeds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = [job for job in jobs if job not in included]
    table, per_seed = {}, {}

    stage1_steps: dict[str, dict] = {}
    main_steps: dict[str, dict] = {}
    run_seconds: dict[str, dict] = {}
    sources: dict[str, list[str]] = {}

    def record(name: str, seed: int, summary: dict, stage1: int | None, main: int | None, timing: dict | None) -> None:
        per_seed.setdefault(name, {})[seed] = summary
        table[name] = aggregate(per_seed[name])
        for kept, steps in ((stage1_steps, stage1), (main_steps, main)):
            if steps is not None:
                kept.setdefault(name, {})[str(seed)] = steps
        if timing:
            run_seconds.setdefault(name, {})[str(seed)] = timing
        # Rows in the order asked for, whatever order the runs finish in.
        ordered = {n: table[n] for n in wanted if n in table}
        write_report(out, ordered, args, lengths, time.time() - start, per_seed,
                     {n: stage1_steps[n] for n in wanted if n in stage1_steps},
                     {n: main_steps[n] for n in wanted if n in main_steps},
                     {n: run_seconds[n] for n in wanted if n in run_seconds}, sources)

    def finished(name: str, seed: int, results: dict) -> None:
        base = os.path.join(out, name, f"seed{seed}")
        record(name, seed, {str(k): v for k, v in summarise(results).items()},
               _read_steps(os.path.join(base, "stage1", "steps")), _read_steps(os.path.join(base, "main_steps")),
               read_timing(base))

    for (name, seed), run in sorted(included.items(), key=lambda item: (item[0][1], wanted.index(item[0][0]))):
        sources.setdefault(run["source"], []).append(f"{name}:{seed}")
        record(name, seed, run["summary"], run["stage1_steps"], run["main_steps"], run["seconds"])
    if included:
        print(f"{len(included)} run(s) taken from {', '.join(sources)}; {len(jobs)} to run or reuse here", flush=True)

    if args.report_only:
        missing = []
        for name, seed in jobs:
            base = os.path.join(out, name, f"seed{seed}")
            if os.path.isfile(os.path.join(base, "done")) and os.path.isfile(os.path.join(base, "eval", "results.json")):
                finished(name, seed, _read_results(out, name, seed))
            else:
                missing.append(f"{name} seed {seed}")
        if not per_seed:
            print(f"error: no finished run in {out}", file=sys.stderr)
            return 1
        if missing:
            print(f"not finished (left out of the report): {', '.join(missing)}")
        print(f"Wrote {os.path.join(out, 'comparison.md')} and the plots in {out}")
        return 0
    parallel = args.parallel or default_parallel()
    if parallel <= 1:
        for k, (name, seed) in enumerate(jobs):
            core, memory = known[name]
            label = f"[{k + 1}/{len(jobs)}] {name} seed {seed}"
            finished(name, seed, run_one(args, shards, os.path.join(out, name, f"seed{seed}"), core, memory, seed,
                                         lengths, label))
    else:
        failed = run_parallel(jobs, parallel, lambda job: _child(argv, out, *job, parallel),
                              lambda job: finished(*job, _read_results(out, *job)))
        if failed:
            logs = ", ".join(_child_log(out, *job) for job in failed)
            print(f"error: {len(failed)} run(s) failed; see {logs} (rerun the same command to resume them)",
                  file=sys.stderr)
            return 1
    print(f"\nWrote {os.path.join(out, 'comparison.md')} and the plots in {out}")
    return 0


def _read_steps(path: str) -> int | None:
    """The step count a stage wrote when it finished (None when it has not)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return int(f.read())


def _child_log(out: str, name: str, seed: int) -> str:
    """Where a parallel run's output goes."""
    return os.path.join(out, name, f"seed{seed}", "compare.log")


def _read_results(out: str, name: str, seed: int) -> dict:
    """The evaluation results of a finished (model, seed)."""
    with open(os.path.join(out, name, f"seed{seed}", "eval", "results.json"), encoding="utf-8") as f:
        return json.load(f)


def _child(argv, out: str, name: str, seed: int, parallel: int) -> subprocess.Popen:
    """Start one (model, seed) as `python -m launch.compare ... --only NAME:SEED` on one rank and its cores."""
    log = _child_log(out, name, seed)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "launch.compare", *argv, "--out", out, "--only", f"{name}:{seed}",
           "--parallel", "1", "--ranks", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // parallel)), PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return spawn(cmd, env, log, cwd=root)


def spawn(cmd: list, env: dict, log: str, cwd: str | None = None) -> subprocess.Popen:
    """Start one run with its output appended to `log`, in a session of its own.

    A terminal's Ctrl-C then reaches the comparison only, which passes it on to each run once: a run
    that got it twice would take the second as "stop without saving" (launch/supervise.py).
    """
    with open(log, "a", encoding="utf-8") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def run_parallel(jobs: list, parallel: int, start, on_success, poll_s: float = 1.0) -> list:
    """Run `jobs` with at most `parallel` at once: `start(job)` returns a Popen, `on_success(job)` runs in this
    process after a job exits with 0; returns the jobs that failed. A line per start and per end."""
    pending, running, failed = list(jobs), {}, []
    total, done = len(jobs), 0

    def pass_on(signum: int) -> None:
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def hang_up(signum, frame) -> None:
        # The terminal closed: the runs, each in a session of its own, get what it would have sent them.
        pass_on(signum)
        raise SystemExit(128 + signum)

    def terminate(signum, frame) -> None:
        raise _Terminated()

    previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, hang_up),
                signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                running[job] = (start(job), time.time())
                print(f"[{done + len(running)}/{total}] started {job[0]} seed {job[1]}", flush=True)
            time.sleep(poll_s)
            for job, (proc, began) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[job]
                done += 1
                minutes = (time.time() - began) / 60
                if code == 0:
                    on_success(job)
                    print(f"[{done}/{total}] finished {job[0]} seed {job[1]} in {minutes:.1f} min", flush=True)
                elif code == INTERRUPTED_EXIT_CODE:
                    raise KeyboardInterrupt  # a run stopped by Ctrl-C (its checkpoint saved): stop them all
                else:
                    failed.append(job)
                    print(f"[{done}/{total}] FAILED {job[0]} seed {job[1]} (exit code {code}) after {minutes:.1f} "
                          f"min", flush=True)
    except (KeyboardInterrupt, _Terminated) as stop:
        # Each run saves a checkpoint and stops on one Ctrl-C or SIGTERM (the runs are in sessions of
        # their own, so a terminal's Ctrl-C reached this process only), then this waits for them.
        signum = signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT
        pass_on(signum)
        for proc, _ in running.values():
            while proc.poll() is None:
                try:
                    proc.wait()
                except KeyboardInterrupt:  # Ctrl-C again: pass it on, the runs stop without saving
                    pass_on(signal.SIGINT)
        how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"Stopped by {how}; rerun the same command to resume every unfinished run", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else 128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed


class _Terminated(Exception):
    """SIGTERM reached the comparison."""


if __name__ == "__main__":
    sys.exit(main())
