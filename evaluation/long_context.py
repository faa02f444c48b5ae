"""`python -m evaluation.long_context MODEL_DIR --lengths 2k,4k,...,64k --out DIR`.

Evaluates an exported model at several context lengths: fixed-target perplexity and bits per
byte (SPEC §7.3) and teacher-forced passkey / needle-in-a-haystack retrieval (SPEC §7.2), then
writes results.json, report.md, perplexity.png and retrieval.png. With --free-generation the model
also writes each value itself with its decoding cache (evaluation/generation.py; generation.png).

Before any cell runs, the weights are checked against export.json's sha256, shard data against
the model's tokenizer.json (the sha256 in its manifest.json), one forward is measured and its
logits must be finite, and the plan (cells, tokens, estimated time per length) is printed, with a
warning when it is long for the device. A cell that runs out of memory (GPU
or CPU) or meets non-finite logits is recorded as that cell's error and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass

import tokenizers
import torch
from tqdm import tqdm

from kernels import kernel_choice

from .codec import TextCodec, load_codec
from .errors import EvaluationError, NonFiniteLogitsError
from .haystack import Needle, make_needle
from .heldout import DataSource, check_tokenizer, open_source
from .inputs import build_haystacks, perplexity_documents
from .loading import check_weights, load_model, read_export_info, resolve_device, resolve_dtype
from .perplexity import run_perplexity_cell
from .plan import Forwards, ForwardTime, cell_forwards, describe, estimate_seconds
from .report import plot_generation, plot_perplexity, plot_retrieval, write_json, write_markdown
from .retrieval import run_retrieval_cell
from .scoring import check_finite, hidden_at
from .settings import DEFAULT_DEPTHS, DEFAULT_SEED, FREE_GENERATION_DEFAULT, PERPLEXITY, check_settings, resolve_plan


@dataclass(frozen=True)
class Cell:
    """One unit of work: a perplexity (source, length) or a retrieval (task, haystack, length, depth)."""

    kind: str
    length: int
    name: str
    haystack: str = ""
    depth: float = 0.0

    @property
    def label(self) -> str:
        """Short text for the progress bar."""
        if self.kind == PERPLEXITY:
            return f"ppl {self.name} L={self.length}"
        return f"{self.name}/{self.haystack} L={self.length} d={self.depth:g}"


def _needle_record(needle: Needle) -> dict:
    return {"sample": needle.sample, "cue": needle.cue, "value": needle.value, "value_tokens": len(needle.value_ids)}


# ---------------------------------------------------------------------- the run
def _plan_cells(lengths, tasks, haystacks, depths, ppl_names) -> list[Cell]:
    cells = []
    for length in lengths:
        cells += [Cell(PERPLEXITY, length, name) for name in ppl_names]
        cells += [
            Cell("retrieval", length, task, haystack, depth)
            for task in tasks if task != PERPLEXITY
            for haystack in haystacks
            for depth in depths
        ]
    return cells


def _run_cell(cell: Cell, model, codec: TextCodec, prepared: dict, settings: dict) -> dict:
    """Run one cell; record seconds, peak CUDA memory, and an error instead of numbers on out-of-memory."""
    device, autocast_dtype = settings["device"], settings["autocast_dtype"]
    if cell.kind == PERPLEXITY:
        entry = {"source": cell.name, "length": cell.length}
    else:
        entry = {"task": cell.name, "haystack": cell.haystack, "length": cell.length, "depth": cell.depth}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        if cell.kind == PERPLEXITY:
            docs = prepared["docs"][cell.name][0]
            entry.update(run_perplexity_cell(
                model, codec, docs, cell.length, max_length=settings["max_length"],
                target_tokens=settings["target_tokens"], device=device, autocast_dtype=autocast_dtype,
            ))
        else:
            entry.update(run_retrieval_cell(
                model, prepared["needles"][cell.name], prepared["haystacks"][cell.haystack], cell.length,
                cell.depth, eos_id=codec.eos_id, device=device, autocast_dtype=autocast_dtype,
                decode=codec.decode if settings["free_generation"] else None,
            ))
    except torch.OutOfMemoryError:
        entry["error"] = "out of memory"
        torch.cuda.empty_cache()
    except (RuntimeError, MemoryError) as err:
        if not is_cpu_out_of_memory(err):
            raise
        entry["error"] = f"out of memory ({_first_line(err)})"
        gc.collect()
    except NonFiniteLogitsError as err:
        entry["error"] = str(err)
    entry["seconds"] = time.perf_counter() - start
    entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return entry


def is_cpu_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the host allocator running out of memory (torch's CPU allocator, or Python's)."""
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err)


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timed_forward(model, settings: dict, length: int) -> tuple[float, torch.Tensor]:
    """Seconds of one forward of `length` seeded random tokens, and fp32 logits at up to 64 of its positions."""
    device = settings["device"]
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    positions = sorted({int(p) for p in torch.linspace(0, length - 1, min(length, 64))})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    hidden = hidden_at(model, ids, positions, autocast_dtype=settings["autocast_dtype"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, model.logits(hidden).float()


def _first_forwards(model, model_dir: str, settings: dict, length: int, longest: int) -> list[tuple[int, float]]:
    """Warm up, check the logits, and time forwards of `length` and min(4 x `length`, `longest`) tokens.

    The warm-up keeps lazy imports and kernel compilation out of the timing; each timing is the
    faster of two runs, as other load on the machine only ever slows a forward down. A longer
    forward that runs out of memory is left out (the cells at that length will record it). Raises
    EvaluationError when the logits are not finite: nothing can be measured on such a model.
    """
    with torch.inference_mode():
        _, logits = _timed_forward(model, settings, length)
        try:
            check_finite(logits, f"at the first forward ({length} tokens)")
        except NonFiniteLogitsError as err:
            raise EvaluationError(f"{model_dir}: {err}: the weights are damaged or training diverged; "
                                  "nothing was evaluated") from None
        measured = [(length, min(_timed_forward(model, settings, length)[0] for _ in range(2)))]
        longer = min(4 * length, longest)
        if longer > length:
            try:
                measured.append((longer, min(_timed_forward(model, settings, longer)[0] for _ in range(2))))
            except (RuntimeError, MemoryError) as err:
                if not (isinstance(err, torch.OutOfMemoryError) or is_cpu_out_of_memory(err)):
                    raise
                gc.collect()
    return measured


def _plan(cells: list[Cell], model, prepared: dict, settings: dict, measured: list[tuple[int, float]]) -> dict:
    """Print the work about to be done and its estimated time (a warning when long); return it for results.json."""
    work: dict[int, list[Forwards]] = {}
    for cell in cells:
        num_docs = len(prepared["docs"][cell.name][0]) if cell.kind == PERPLEXITY else 0
        value_tokens = max((len(n.value_ids) for n in prepared["needles"].get(cell.name, [])), default=0)
        count, forward_length = cell_forwards(cell.kind, cell.length, num_docs=num_docs, trials=settings["trials"],
                                              target_tokens=settings["target_tokens"], value_tokens=value_tokens,
                                              free_generation=settings["free_generation"])
        work.setdefault(cell.length, []).append(Forwards(1, count, forward_length))
    forward_time = ForwardTime.fit(model.config, measured[0], measured[-1])
    estimates = {n: estimate_seconds(forwards, forward_time) for n, forwards in work.items()}
    lines, warning = describe(work, estimates, device=str(settings["device"]), measured=measured)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return {"cells": len(cells), "tokens": sum(f.tokens for fs in work.values() for f in fs),
            "estimated_seconds": sum(estimates.values()), "estimated_seconds_per_length": estimates,
            "measured_forwards": [{"tokens": n, "seconds": t} for n, t in measured], "warning": warning}


def _metadata(model_dir, model, codec, settings, prepared, notes, export_info) -> dict:
    device = settings["device"]
    return {
        "model_dir": os.path.abspath(model_dir),
        "config": model.config.to_dict(),
        "num_parameters": model.num_parameters(),
        "export": export_info,
        "training_seq_len": (export_info or {}).get("seq_len"),
        "tokenizer": {
            "path": codec.path, "vocab_size": codec.vocab_size, "eos_id": codec.eos_id, "eos_token": codec.eos_token,
            "digit_tokens": {str(d): len(codec.digit_ids(d)) for d in range(10)},
        },
        "lengths": settings["lengths"],
        "max_length": settings["max_length"],
        "tasks": list(settings["tasks"]),
        "haystacks": list(settings["haystacks"]),
        "depths": list(settings["depths"]),
        "trials": settings["trials"],
        "seed": settings["seed"],
        "target_tokens": settings["target_tokens"],
        "data": {name: info for name, (_, info) in prepared["docs"].items()},
        "haystack_sources": prepared["haystack_info"],
        "needles": {task: [_needle_record(n) for n in ns] for task, ns in prepared["needles"].items()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": settings["dtype"],
        "window_removed": settings["window_removed"],
        "free_generation": settings["free_generation"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "tokenizers": tokenizers.__version__},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
    }


def _write_outputs(results: dict, out_dir: str) -> None:
    """Write the plots that have data (removing stale ones), then report.md and results.json listing them."""
    plots = {
        "perplexity.png": (functools.partial(plot_perplexity, training_length=results["metadata"]["training_seq_len"]),
                           results[PERPLEXITY], "ppl"),
        "retrieval.png": (plot_retrieval, results["retrieval"], "token_acc"),
        "generation.png": (plot_generation, results["retrieval"], "free_exact_acc"),
    }
    outputs = {"results": os.path.join(out_dir, "results.json"), "report": os.path.join(out_dir, "report.md")}
    for name, (plot, entries, key) in plots.items():
        path = os.path.join(out_dir, name)
        if any(e.get(key) is not None for e in entries):
            plot(entries, path)
            outputs[name.removesuffix(".png") + "_plot"] = path
        elif os.path.exists(path):
            os.remove(path)
    results["metadata"]["outputs"] = outputs
    write_markdown(results, outputs["report"])
    write_json(results, outputs["results"])


def run_evaluation(
    model_dir: str,
    lengths,
    out_dir: str,
    *,
    data: str | list[str] | None = None,
    tasks=None,
    haystacks=None,
    depths=DEFAULT_DEPTHS,
    trials: int = 10,
    seed: int = DEFAULT_SEED,
    target_tokens: int = 256,
    max_docs: int = 8,
    concat_docs: bool = False,
    text_field: str = "text",
    device: str | None = None,
    dtype: str | None = None,
    keep_window: bool = False,
    progress: bool = True,
    free_generation: bool = FREE_GENERATION_DEFAULT,
) -> dict:
    """Evaluate `model_dir` at every length and write results.json, report.md and plots to `out_dir`.

    Args:
        lengths: ints or a string such as "2k,4k,...,64k".
        data: held-out text (prepared shard directory, one of its .tar shards, .txt/.md, .jsonl/.jsonl.gz), one path or several;
            the first also gives the real haystack. Without data only synthetic retrieval runs.
        tasks: subset of ("passkey", "niah", "perplexity"); haystacks: subset of ("synthetic", "real").
        device/dtype: default cuda + bf16 when a GPU is present, else cpu + fp32.
        free_generation: also let the model write each retrieval value itself (greedy, with the
            decoding cache) and score exact matches; costs one more prefill per trial.
    Returns:
        The results dict written to results.json ("metadata", "retrieval", "perplexity").
    """
    lengths, depths = check_settings(lengths, depths, trials, target_tokens, max_docs)
    check_out_dir(out_dir)
    paths = [data] if isinstance(data, str) else list(data or [])
    tasks, haystacks, notes = resolve_plan(tasks, haystacks, bool(paths))
    torch_device = resolve_device(device)
    dtype_name, autocast_dtype = resolve_dtype(dtype, torch_device)
    if not os.path.isdir(model_dir):
        raise EvaluationError(f"{model_dir}: model directory not found")
    export_info = read_export_info(model_dir)
    notice = check_weights(model_dir, export_info)
    if notice:
        notes = [*notes, notice]
    codec = load_codec(model_dir)
    sources: list[DataSource] = [open_source(p, text_field=text_field) for p in paths]
    for source in sources:
        check_tokenizer(source, codec)
    model, removed_window = load_model(model_dir, torch_device, keep_window=keep_window)
    vocab_size = model.config.vocab_size
    if codec.vocab_size > vocab_size:
        raise EvaluationError(f"{codec.path}: {codec.vocab_size} tokens, more than the model's vocab_size {vocab_size}")
    max_length = lengths[-1]
    retrieval_tasks = [t for t in tasks if t != PERPLEXITY]
    needles = {t: [make_needle(codec, t, s, seed) for s in range(trials)] for t in retrieval_tasks}
    prepared = {"needles": needles, "docs": {}, "haystacks": {}, "haystack_info": {}}
    if PERPLEXITY in tasks:
        prepared["docs"] = perplexity_documents(
            sources, codec, max_length + target_tokens, max_docs=max_docs, concat=concat_docs, vocab_size=vocab_size
        )
    if retrieval_tasks:
        prepared["haystacks"], prepared["haystack_info"] = build_haystacks(haystacks, codec, needles, sources, lengths, vocab_size)
    settings = {
        "device": torch_device, "autocast_dtype": autocast_dtype, "dtype": dtype_name, "lengths": lengths,
        "max_length": max_length, "tasks": tasks, "haystacks": haystacks, "depths": depths, "trials": trials,
        "seed": seed, "target_tokens": target_tokens, "window_removed": removed_window,
        "free_generation": free_generation,
    }
    cells = _plan_cells(lengths, tasks, haystacks if retrieval_tasks else (), depths, list(prepared["docs"]))
    measured = _first_forwards(model, model_dir, settings, min(lengths[0], 256), lengths[-1])
    if notice:
        print(f"notice: {notice}", file=sys.stderr, flush=True)
    plan = _plan(cells, model, prepared, settings, measured)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise EvaluationError(f"{out_dir}: cannot create the output directory ({err.strerror})") from None
    metadata = _metadata(model_dir, model, codec, settings, prepared, notes, export_info)
    results = {"metadata": {**metadata, "plan": plan}, "retrieval": [], "perplexity": []}
    start = time.perf_counter()
    bar = tqdm(cells, desc="long-context eval", unit="cell", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for cell in bar:
            bar.set_postfix_str(cell.label)
            entry = _run_cell(cell, model, codec, prepared, settings)
            results[PERPLEXITY if cell.kind == PERPLEXITY else "retrieval"].append(entry)
            results["metadata"]["total_seconds"] = time.perf_counter() - start
            write_json(results, os.path.join(out_dir, "results.json"))
    bar.close()
    peaks = [e["peak_memory_bytes"] for k in ("retrieval", PERPLEXITY) for e in results[k] if e["peak_memory_bytes"]]
    results["metadata"]["peak_memory_bytes"] = max(peaks) if peaks else None
    _write_outputs(results, out_dir)
    return results


def check_out_dir(out_dir: str) -> None:
    """EvaluationError when `out_dir` is a file or could not be created, checked before any work (nothing is created)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvaluationError(f"{out_dir}: exists and is not a directory; --out names the directory the results go to")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EvaluationError(f"{out_dir}: cannot create the output directory ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvaluationError(f"{out_dir}: cannot create the output directory ({parent} is not writable)")


# ---------------------------------------------------------------------- command line
def _comma_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m evaluation.long_context`."""
    p = argparse.ArgumentParser(
        prog="python -m evaluation.long_context",
        description=(
            "Long-context evaluation of an exported ATMA model directory (model.safetensors, config.json, "
            "tokenizer.json). Measures (1) fixed-target likelihood: the same --target-tokens tokens of each "
            "held-out document are scored after the L tokens just before them, for every length L, giving "
            "nll, perplexity and bits per byte vs L; (2) teacher-forced retrieval: a cue and a five-digit "
            "value are hidden at each depth of a haystack of exactly L tokens, the cue is repeated at the end "
            "and the value tokens are scored teacher-forced (token accuracy, exact accuracy, NLL). Writes "
            "results.json, report.md, perplexity.png and retrieval.png to --out."
        ),
        epilog="example: python -m evaluation.long_context exported/run1 --lengths 2k,4k,...,64k "
        "--data shards/ --out eval/run1",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model directory")
    p.add_argument("--lengths", default="2k,4k,...,64k",
                   help="context lengths: integers with optional k (x1024) / m suffix, comma-separated; "
                   "'a,b,...,c' repeats the ratio b/a up to c (default: 2k,4k,...,64k)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files in it are replaced)")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="held-out text, repeatable: a directory written by `python -m data_pipeline prepare` (its val "
                   "split), one .tar shard of such a directory, a .txt/.md file (one document) or .jsonl/.jsonl.gz "
                   "(one document per line). Each gives a perplexity source; the first also gives the real haystack. "
                   "Without it only synthetic retrieval runs")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files (default: text)")
    p.add_argument("--tasks", type=_comma_list, default=None,
                   help="comma list from passkey,niah,perplexity (default: all; perplexity only with --data)")
    p.add_argument("--haystacks", type=_comma_list, default=None,
                   help="comma list from synthetic,real (default: both; real only with --data)")
    p.add_argument("--depths", type=_comma_list, default=[str(d) for d in DEFAULT_DEPTHS],
                   help="needle depths in [0, 1], fraction of the haystack before the needle (default: 0.1,0.5,0.9)")
    p.add_argument("--trials", type=int, default=10, help="needles per retrieval cell (default: 10)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"needle seed; sample s of task t draws from Random('seed:t:s') (default: {DEFAULT_SEED})")
    p.add_argument("--target-tokens", type=int, default=256, help="scored target tokens per document (default: 256)")
    p.add_argument("--max-docs", type=int, default=8, help="documents per perplexity source (default: 8)")
    p.add_argument("--concat-docs", action="store_true",
                   help="text sources: concatenate documents into one stream cut into windows, instead of "
                   "skipping documents shorter than max length + target (shards are always read as a stream)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="activation dtype of the trunk (default: bf16 on GPU, fp32 on CPU); logits are fp32")
    p.add_argument("--keep-window", action="store_true",
                   help="keep the model's sliding attention window (default: removed, full-context forward)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--free-generation", action=argparse.BooleanOptionalAction, default=FREE_GENERATION_DEFAULT,
                   help="also generate each retrieval value greedily with the decoding cache and score exact "
                   "matches (one more prefill per trial; default: %(default)s)")
    return p


def _depths(values: list[str]) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise EvaluationError(f"bad --depths {','.join(values)}: expected numbers in [0, 1]") from None


def failed_cells(results: dict) -> list[dict]:
    """The cells recorded with an error (out of memory, non-finite logits)."""
    return [e for kind in ("retrieval", PERPLEXITY) for e in results[kind] if e.get("error")]


def main(argv=None) -> int:
    """Run the command line; returns 0 (cells that ran out of memory are results too), 1 when a cell
    met non-finite logits, 2 for a user error (printed as one line) or 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        kernel_choice()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        results = run_evaluation(
            args.model_dir, args.lengths, args.out, data=args.data, tasks=args.tasks, haystacks=args.haystacks,
            depths=_depths(args.depths), trials=args.trials, seed=args.seed, target_tokens=args.target_tokens,
            max_docs=args.max_docs, concat_docs=args.concat_docs, text_field=args.text_field, device=args.device,
            dtype=args.dtype, keep_window=args.keep_window, progress=not args.no_progress,
            free_generation=args.free_generation,
        )
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished cells are in {os.path.join(args.out, 'results.json')}", file=sys.stderr)
        return 130
    meta = results["metadata"]
    print(f"evaluated {meta['model_dir']} at {len(meta['lengths'])} lengths in {meta['total_seconds']:.1f} s")
    for name, path in meta["outputs"].items():
        print(f"  {name}: {path}")
    failed = failed_cells(results)
    if failed:
        num_cells = len(results["retrieval"]) + len(results[PERPLEXITY])
        print(f"warning: {len(failed)} of {num_cells} cells failed, first: {failed[0]['error']} "
              f"(listed in {meta['outputs']['report']})", file=sys.stderr)
    return 1 if any(e["error"].startswith("non-finite") for e in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
