"""The paper's central comparison in miniature: Polar vs NoPE vs RoPE, each with and without memory.

    python -m launch.compare [--out DIR] [--steps N] [--seq-len 256]

Trains matched tiny models (same data, seed, steps and optimizer) at a short training length,
evaluates fixed-target perplexity and teacher-forced retrieval from 1x to 16x that length, and
writes `comparison.md`, `comparison.json` and two plots to the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from evaluation.report import CHANCE_MARK, DIGIT_CHANCE, at_chance, percent_limits, relative_change

from .quickstart import banner, run_prepare, run_pretrain

VARIANTS = [(core, memory) for core in ("polar", "nope", "rope") for memory in (True, False)]


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="comparison", help="output directory (default: ./comparison)")
    p.add_argument("--seq-len", type=int, default=256, help="training length (default: 256)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-docs", type=int, default=400)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=None)
    p.add_argument("--preset", default="tiny", help="model preset for every variant (default: tiny)")
    p.add_argument("--eval-multiples", default="1,2,4,8,16", help="evaluation lengths / training length")
    p.add_argument("--trials", type=int, default=8, help="retrieval trials per cell")
    p.add_argument("--variants", default=",".join(f"{c}{'+mem' if m else ''}" for c, m in VARIANTS),
                   help="subset to run, e.g. polar+mem,nope+mem")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def variant_name(core: str, memory: bool) -> str:
    """Display name, e.g. polar+mem."""
    return f"{core}+mem" if memory else core


def summarise(results: dict) -> dict:
    """Per length: perplexity, bits/byte, and retrieval token/exact accuracy averaged over tasks/depths."""
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
    return dict(sorted(rows.items()))


def write_report(out: str, table: dict, args, lengths: list[int], seconds: float) -> None:
    """comparison.md (tables), comparison.json and the two plots."""
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"lengths": lengths, "train_len": args.seq_len, "steps": args.steps, "table": table}, f, indent=2)
    head = "| model | " + " | ".join(f"{n // args.seq_len}x ({n})" for n in lengths) + " |"
    sep = "|---" * (len(lengths) + 1) + "|"
    lines = [f"# Miniature comparison: train at {args.seq_len}, evaluate to {lengths[-1]}", "",
             f"Preset `{args.preset}`, {args.steps} steps x {args.batch_tokens} tokens, identical data and seed; "
             f"{args.trials} retrieval trials per (task, haystack, depth) cell; {seconds / 60:.0f} min in all.", ""]
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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    for metric, ylabel, fname in (("ppl", "perplexity change vs 1x (%)", "comparison_perplexity.png"),
                                  ("token_acc", "retrieval token accuracy (%)", "comparison_retrieval.png")):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        series = []
        for name, rows in table.items():
            xs = [n for n in lengths if metric in rows.get(str(n), {})]
            if not xs:
                continue
            ys = [rows[str(n)][metric] for n in xs]
            ys = relative_change(ys) if metric == "ppl" else [100 * y for y in ys]
            series.append(ys)
            ax.plot(xs, ys, marker="o", label=name, linestyle="-" if name.endswith("+mem") else "--")
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
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)


def _cell(row: dict, metric: str, fmt: str) -> str:
    """One table cell: the value (accuracies in %), marked when the retrieval there is at chance."""
    if metric not in row:
        return "-"
    value = row[metric] * (100 if metric.endswith("_acc") else 1)
    text = fmt.format(value)
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


def main(argv=None) -> int:
    """Train, export and evaluate each variant, then write the comparison report."""
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {variant_name(c, m): (c, m) for c, m in VARIANTS}
    unknown = [v for v in wanted if v not in known]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    start = time.time()
    shards = os.path.join(out, "shards")
    run_prepare(args, shards)
    lengths = [int(m) * args.seq_len for m in args.eval_multiples.split(",")]
    from evaluation.long_context import run_evaluation
    from pretrain.export import export

    table = {}
    for i, name in enumerate(wanted, start=1):
        core, memory = known[name]
        base = os.path.join(out, name)
        run_pretrain(args, shards, os.path.join(base, "run"),
                     [f"model.preset={args.preset}", f"model.overrides.core={core}",
                      f"model.overrides.memory={'true' if memory else 'false'}", "train.seed=0", "data.seed=0"],
                     step=2, title=f"[{i}/{len(wanted)}] pretrain {name}")
        export(os.path.join(base, "run"), os.path.join(base, "exported"))
        banner(4, f"[{i}/{len(wanted)}] evaluate {name} at {lengths}", ["python", "-m", "evaluation.long_context",
               os.path.join(base, "exported"), "--lengths", ",".join(map(str, lengths)), "--data", shards])
        results = run_evaluation(os.path.join(base, "exported"), lengths, os.path.join(base, "eval"), data=shards,
                                 trials=args.trials, progress=not args.no_progress)
        table[name] = {str(k): v for k, v in summarise(results).items()}
        write_report(out, table, args, lengths, time.time() - start)
    print(f"\nWrote {os.path.join(out, 'comparison.md')} and the plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
