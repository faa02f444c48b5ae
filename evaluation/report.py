"""Write the evaluation's outputs: results.json, a markdown report and PNG plots (no display needed)."""

from __future__ import annotations

import json
import math
import os

from matplotlib.figure import Figure

from .lengths import format_length


def _finite(value):
    """JSON has no NaN/Infinity: turn them into null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(results: dict, path: str) -> None:
    """Write `results` as indented JSON, atomically (a partial run leaves a valid file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(results), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# A uniform guess among the ten digits gets one digit in ten right (SPEC §7.2 scores five digits).
DIGIT_CHANCE = 0.1
CHANCE_MARK = "°"


def at_chance(entry: dict) -> bool:
    """Whether a retrieval cell's digit accuracy is not clearly above chance: below 10% plus two
    standard errors of a 10% binomial over its scored digits (5 per trial)."""
    accuracy, trials = entry.get("digit_acc"), entry.get("trials") or 0
    if accuracy is None or trials <= 0:
        return False
    digits = 5 * trials
    return accuracy <= DIGIT_CHANCE + 2 * math.sqrt(DIGIT_CHANCE * (1 - DIGIT_CHANCE) / digits)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _perplexity_section(entries: list[dict], lengths: list[int], meta: dict) -> list[str]:
    sources = list(dict.fromkeys(e["source"] for e in entries))
    by_key = {(e["source"], e["length"]): e for e in entries}
    rows = []
    for source in sources:
        for metric, spec in (("ppl", ".3f"), ("bpb", ".4f"), ("nll", ".4f")):
            rows.append([source, metric] + [_fmt(by_key.get((source, n), {}).get(metric), spec) for n in lengths])
    docs = ", ".join(f"{s}: {next(e['documents'] for e in entries if e['source'] == s)}" for s in sources)
    return [
        "## Fixed-target likelihood",
        "",
        f"The same {meta['target_tokens']} target tokens of every document are scored at each context length "
        f"(context = the L tokens just before them). Documents per source: {docs}. "
        "nll in nats/token; bpb = sum NLL / ln 2 / UTF-8 bytes of the targets.",
        "",
        *_table(["source", "metric"] + [format_length(n) for n in lengths], rows),
        "",
    ]


def _retrieval_table(entries: list[dict], lengths: list[int], metric: str) -> list[str]:
    by_key = {(e["task"], e["haystack"], e["depth"], e["length"]): e for e in entries}
    groups = list(dict.fromkeys((e["task"], e["haystack"]) for e in entries))
    depths = sorted({e["depth"] for e in entries})
    rows = []
    for task, haystack in groups:
        for depth in depths:
            cells = [by_key.get((task, haystack, depth, n), {}) for n in lengths]
            rows.append([task, haystack, f"{depth:g}"] + [_accuracy_text(c, metric) for c in cells])
        means = []
        for n in lengths:
            cell = [by_key.get((task, haystack, d, n), {}).get(metric) for d in depths]
            means.append(None if any(v is None for v in cell) else 100 * sum(cell) / len(cell))
        rows.append([task, haystack, "**mean**"] + [_fmt(v, ".1f") for v in means])
    return _table(["task", "haystack", "depth"] + [format_length(n) for n in lengths], rows)


def _accuracy_text(cell: dict, metric: str) -> str:
    """A cell's accuracy in %, marked when its digits are at chance."""
    value = cell.get(metric)
    text = _fmt(None if value is None else 100 * value, ".1f")
    return text + CHANCE_MARK if value is not None and at_chance(cell) else text


def _chance_note(entries: list[dict]) -> list[str]:
    """The line that says which cells are at chance, and what chance is."""
    measured = [e for e in entries if e.get("digit_acc") is not None]
    if not measured:
        return []
    count = sum(at_chance(e) for e in measured)
    lines = [f"{CHANCE_MARK} at chance: digit accuracy within two standard errors of "
             f"{100 * DIGIT_CHANCE:.0f}% (a uniform guess among the ten digits; exact-match chance is 0.001%)."]
    if count == len(measured):
        lines.append("**Every cell is at chance: this model has not learned to retrieve at any length, so "
                     "these tables say nothing about length extrapolation.**")
    elif count:
        lines.append(f"{count} of {len(measured)} cells are at chance.")
    return lines + [""]


def _retrieval_section(entries: list[dict], lengths: list[int], meta: dict) -> list[str]:
    return [
        "## Teacher-forced retrieval",
        "",
        f"{meta['trials']} trials per cell; all tokens of the five value digits are scored teacher-forced "
        "(a token is correct only when its logit is strictly the largest; ties count as wrong). "
        f"Tokens per digit 0-9: {', '.join(str(v) for v in meta['tokenizer']['digit_tokens'].values())}.",
        "",
        *_chance_note(entries),
        "Token accuracy (%):",
        "",
        *_retrieval_table(entries, lengths, "token_acc"),
        "",
        "Digit accuracy (%; a digit is correct when all its tokens are):",
        "",
        *_retrieval_table(entries, lengths, "digit_acc"),
        "",
        "Exact accuracy (% of trials with every value token correct):",
        "",
        *_retrieval_table(entries, lengths, "exact_acc"),
        "",
        *_generation_section(entries, lengths),
    ]


def _generation_section(entries: list[dict], lengths: list[int]) -> list[str]:
    if not any(e.get("free_exact_acc") is not None for e in entries):
        return []
    return [
        "## Free-generation retrieval",
        "",
        "The model writes the value itself: the context is prefilled into its decoding cache and as many "
        "tokens as the value takes are generated greedily.",
        "",
        "Exact match (% of trials whose generated text starts with the value \" d1 d2 d3 d4 d5\"):",
        "",
        *_retrieval_table(entries, lengths, "free_exact_acc"),
        "",
        "Digit accuracy (% of the five digits written in their place):",
        "",
        *_retrieval_table(entries, lengths, "free_digit_acc"),
        "",
    ]


def _timing_section(results: dict, lengths: list[int]) -> list[str]:
    rows = []
    for kind in ("retrieval", "perplexity"):
        entries = results.get(kind, [])
        for n in lengths:
            cells = [e for e in entries if e["length"] == n]
            if not cells:
                continue
            seconds = sum(e["seconds"] for e in cells) / len(cells)
            peaks = [e["peak_memory_bytes"] for e in cells if e.get("peak_memory_bytes")]
            peak = f"{max(peaks) / 2**30:.2f}" if peaks else "—"
            rows.append([kind, format_length(n), str(len(cells)), f"{seconds:.2f}", peak])
    return ["## Timing", "", *_table(["cells", "length", "count", "seconds/cell", "peak GiB"], rows), ""]


def write_markdown(results: dict, path: str) -> None:
    """Write report.md: run details, perplexity and retrieval tables, and timings."""
    meta = results["metadata"]
    lengths = meta["lengths"]
    lines = [
        "# Long-context evaluation",
        "",
        f"- model: `{meta['model_dir']}` ({meta['num_parameters']:,} parameters, preset {meta['config'].get('preset')})",
        f"- device: {meta['device']} ({meta['device_name']}), dtype {meta['dtype']}",
        f"- lengths: {', '.join(format_length(n) for n in lengths)}; seed {meta['seed']}",
        f"- training: {_training(meta)}",
        f"- total time: {meta.get('total_seconds', 0):.1f} s",
        "",
    ]
    for note in meta.get("notes", []):
        lines.append(f"> {note}")
    if meta.get("notes"):
        lines.append("")
    if results.get("perplexity"):
        lines += _perplexity_section(results["perplexity"], lengths, meta)
    if results.get("retrieval"):
        lines += _retrieval_section(results["retrieval"], lengths, meta)
    failed = [e for kind in ("retrieval", "perplexity") for e in results.get(kind, []) if e.get("error")]
    if failed:
        lines += ["## Failed cells", ""] + [f"- {_cell_label(e)}: {e['error']}" for e in failed] + [""]
    lines += _timing_section(results, lengths)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _training(meta: dict) -> str:
    """The training length and tokens seen from export.json, or why they are unknown."""
    export = meta.get("export") or {}
    if not meta.get("training_seq_len"):
        return "sequence length unknown (export.json does not record it)"
    seen = export.get("tokens_seen")
    seen = f", {seen:,} tokens seen" if isinstance(seen, int) and seen >= 0 else ""
    return f"sequence length {format_length(meta['training_seq_len'])}{seen}"


def _cell_label(entry: dict) -> str:
    if "task" in entry:
        return f"{entry['task']}/{entry['haystack']} L={entry['length']} depth={entry['depth']:g}"
    return f"perplexity/{entry['source']} L={entry['length']}"


# The perplexity panel spans at least this many percent either side of zero, so that a change of
# a fraction of a percent (noise at toy scale) is drawn as flat, not as a dramatic curve.
MIN_PERCENT_SPAN = 2.0


def relative_change(values: list[float]) -> list[float]:
    """Percent change of each value against the first one."""
    return [100.0 * (v / values[0] - 1.0) for v in values]


def percent_limits(series: list[list[float]], span: float = MIN_PERCENT_SPAN) -> tuple[float, float]:
    """y-limits for percent-change curves: the data with a margin, and never narrower than ±span."""
    values = [v for line in series for v in line] or [0.0]
    low, high = min(values), max(values)
    margin = 0.1 * (high - low)
    return min(low - margin, -span), max(high + margin, span)


def plot_perplexity(entries: list[dict], path: str, training_length: int | None = None) -> None:
    """perplexity.png: perplexity change (% vs the shortest length) and bits per byte (axis from zero) vs
    context length (log-x), one line per source, and the training length dashed when known."""
    fig = Figure(figsize=(10, 4), dpi=120, layout="constrained")
    axes = fig.subplots(1, 2)
    changes, top_bpb = [], 0.0
    for source in dict.fromkeys(e["source"] for e in entries):
        points = sorted((e["length"], e["ppl"], e["bpb"]) for e in entries if e["source"] == source and e.get("ppl") is not None)
        if not points:
            continue
        xs = [p[0] for p in points]
        change = relative_change([p[1] for p in points])
        changes.append(change)
        axes[0].plot(xs, change, marker="o", label=f"{source} (ppl {points[0][1]:.3g} at {format_length(xs[0])})")
        axes[1].plot(xs, [p[2] for p in points], marker="o", label=source)
        top_bpb = max([top_bpb, *(p[2] for p in points)])
    axes[0].set_ylim(*percent_limits(changes))
    axes[0].axhline(0.0, color="black", linewidth=0.6)
    axes[1].set_ylim(0, 1.1 * top_bpb or 1.0)
    labels = ("perplexity change vs the shortest length (%)", "bits per byte")
    for ax, ylabel in zip(axes, labels):
        ax.set_xscale("log", base=2)
        lengths = sorted({e["length"] for e in entries})
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        if training_length:
            ax.axvline(training_length, color="gray", linestyle="--", label="training length")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fixed-target likelihood vs context length")
    fig.savefig(path)


def plot_retrieval(entries: list[dict], path: str) -> None:
    """retrieval.png: token-accuracy heatmaps of depth x length, one panel per task (rows) x haystack (columns)."""
    _plot_heatmaps(entries, path, "token_acc", "token accuracy (%)")


def plot_generation(entries: list[dict], path: str) -> None:
    """generation.png: free-generation exact-match heatmaps, laid out as in retrieval.png."""
    _plot_heatmaps(entries, path, "free_exact_acc", "free-generation exact match (%)")


def _plot_heatmaps(entries: list[dict], path: str, metric: str, label: str) -> None:
    tasks = list(dict.fromkeys(e["task"] for e in entries))
    haystacks = list(dict.fromkeys(e["haystack"] for e in entries))
    lengths = sorted({e["length"] for e in entries})
    depths = sorted({e["depth"] for e in entries})
    by_key = {(e["task"], e["haystack"], e["depth"], e["length"]): e.get(metric) for e in entries}
    chance = {(e["task"], e["haystack"], e["depth"], e["length"]) for e in entries if at_chance(e)}
    panel_w, panel_h = max(3.5, 1.2 + 0.7 * len(lengths)), 1.6 + 0.5 * len(depths)
    fig = Figure(figsize=(panel_w * len(haystacks) + 1.2, panel_h * len(tasks)), dpi=120, layout="constrained")
    axes = fig.subplots(len(tasks), len(haystacks), squeeze=False)
    image = None
    for row, task in enumerate(tasks):
        for col, haystack in enumerate(haystacks):
            ax = axes[row][col]
            values = [[by_key.get((task, haystack, d, n)) for n in lengths] for d in depths]
            values = [[math.nan if v is None else 100 * v for v in line] for line in values]
            image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
            for i, line in enumerate(values):
                for j, v in enumerate(line):
                    text, color = ("—", "black") if math.isnan(v) else (f"{v:.0f}", "white" if v < 60 else "black")
                    if (task, haystack, depths[i], lengths[j]) in chance:
                        text += CHANCE_MARK
                    ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
            ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("context length")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{task} / {haystack}")
    fig.colorbar(image, ax=axes.ravel().tolist(), label=label)
    if chance:
        everything = len(chance) == sum(v is not None for v in by_key.values())
        fig.suptitle(f"{CHANCE_MARK} digits at chance ({100 * DIGIT_CHANCE:.0f}%)"
                     + (": every cell, the model does not retrieve at any length" if everything else ""),
                     fontsize=9)
    fig.savefig(path)
