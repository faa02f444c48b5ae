"""``bench``: throughput of bare ``tokenizers``, of the whole prepare path and of the loader.

All figures come from one run on one corpus. Baseline and prepare runs alternate round by
round, so slow periods on a shared machine hit both; each ratio is taken within a round and
the median over rounds is reported. The baseline runs in a fresh process per measurement with
``RAYON_NUM_THREADS`` set to the same core budget as the prepare run it is compared with. The
loader is timed the same way: with and without its per-sample checks (digest and token ids),
alternating within each round, so the cost of the checks is a ratio from one run.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import pickle
import platform
import resource
import shutil
import statistics
import tempfile
import time

from data_pipeline.argtypes import int_at_least, positive_float, writable_file
from data_pipeline.config import BUILTIN_CORPUS, DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE
from data_pipeline.manifest import write_json_atomic

_WARMUP_BATCHES = 10
_positive_int = int_at_least(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench command's flags."""
    p.add_argument("--input", nargs="+", default=[], metavar="PATH",
                   help=f"corpus, as for prepare (default {BUILTIN_CORPUS})")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE", help="tokenizer to use (default: train one)")
    tok.add_argument("--vocab-size", type=int_at_least(MIN_VOCAB_SIZE), default=None, metavar="N",
                     help=f"vocabulary of the BPE trained for the run (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--max-docs", type=_positive_int, metavar="N", help="read at most N records per input")
    p.add_argument("--text-field", default="text", help="text field of JSON/parquet inputs")
    p.add_argument("--seq-len", type=_positive_int, default=1024, metavar="N", help="sample length (default 1024)")
    p.add_argument("--workers", nargs="+", type=_positive_int, default=[1, 2], metavar="N",
                   help="core budgets to compare: N tokenizer threads vs N prepare workers "
                        "(default 1 2)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="R",
                   help="rounds of (baseline, prepare) per core budget (default 3)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B",
                   help="loader sequences per batch (default 16)")
    p.add_argument("--loader-workers", nargs="+", type=int_at_least(0), default=[0, 2], metavar="K",
                   help="DataLoader worker counts to measure (default 0 2)")
    p.add_argument("--loader-seconds", type=positive_float, default=3.0, metavar="S",
                   help="seconds to time each loader (with and without its per-sample checks) for, "
                        "after warm-up (default 3)")
    p.add_argument("--loader-rounds", type=_positive_int, default=10, metavar="R",
                   help="slices the loader timing is cut into, checked and unchecked taking turns "
                        "(default 10)")
    p.add_argument("--loader-only", action="store_true",
                   help="measure only (c), the loader with and without its per-sample checks, on "
                        "shards prepared once with the largest --workers")
    p.add_argument("--work-dir", metavar="DIR",
                   help="keep the tokenizer and shards here (default: a temporary directory)")
    p.add_argument("--json", metavar="FILE", type=writable_file,
                   help="also write all figures to FILE as JSON, after each core budget and loader")


def run_bench(args: argparse.Namespace) -> dict:
    """Run every measurement, print the report and return the figures."""
    work = args.work_dir or tempfile.mkdtemp(prefix="data_pipeline_bench_")
    os.makedirs(work, exist_ok=True)
    figures: dict = {}
    try:
        _measure(args, work, figures)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    for line in report(figures):
        print(line)
    return figures


def _measure(args, work: str, figures: dict) -> None:
    """Fill `figures`, writing them to --json after each core budget and loader (an interrupted run keeps
    what it measured)."""
    from data_pipeline.config import PrepareConfig
    from data_pipeline.tokenizer import load_tokenizer

    config = PrepareConfig(output=work, seq_len=args.seq_len, inputs=args.input,
                           max_docs=args.max_docs, text_field=args.text_field)
    texts = _documents(config)
    tokenizer_path = os.path.join(work, "bench-tokenizer.json")
    figures.update({"machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
                    "python": platform.python_version(), "inputs": config.inputs,
                    "num_documents": len(texts), "num_chars": sum(map(len, texts)),
                    "seq_len": args.seq_len})

    def save() -> None:
        if args.json:
            write_json_atomic(args.json, figures)
    if args.tokenizer:
        info = load_tokenizer(args.tokenizer)
    else:
        info = _train(texts, args.vocab_size or DEFAULT_VOCAB_SIZE, figures)
    with open(tokenizer_path, "w", encoding="utf-8") as f:
        f.write(info.json_text)
    figures["tokenizer"] = info.origin
    prepared = os.path.join(work, f"prepare-{args.workers[-1]}")
    figures["budgets"] = {}
    if args.loader_only:
        _prepare_once(args, args.workers[-1], tokenizer_path, prepared)
    else:
        texts_path = os.path.join(work, "texts.pkl")
        with open(texts_path, "wb") as f:
            pickle.dump(texts, f, protocol=pickle.HIGHEST_PROTOCOL)
        for n in args.workers:
            figures["budgets"][str(n)] = _budget(args, n, texts_path, tokenizer_path, work)
            save()
    figures["loader"] = {}
    for k in args.loader_workers:
        figures["loader"][str(k)] = _loader_checks(prepared, args, k)
        save()


def _documents(config) -> list[str]:
    """The texts prepare would encode (both splits, bad records left out)."""
    from data_pipeline.mixing import iter_mixed
    from data_pipeline.records import parse_record
    from data_pipeline.sources import resolve_sources

    texts = []
    sources = resolve_sources(config.inputs, config.weights, config.text_field, config.text_extensions)
    for mixed in iter_mixed(sources, config):
        parsed = parse_record(mixed.record.kind, mixed.record.payload, sources[mixed.source].text_field)
        if parsed.text is not None:
            texts.append(parsed.text)
    return texts


def _train(texts: list[str], vocab_size: int, figures: dict):
    from data_pipeline.tokenizer import train_bpe

    started = time.perf_counter()
    info = train_bpe(texts, vocab_size)
    figures["tokenizer_train_seconds"] = time.perf_counter() - started
    return info


def _budget(args, n: int, texts_path: str, tokenizer_path: str, work: str) -> dict:
    """Alternating rounds of baseline (n threads) and prepare (n workers)."""
    rounds = []
    for _ in range(args.repeats):
        base = _encode_in_child(texts_path, tokenizer_path, n, fast=False)
        fast = _encode_in_child(texts_path, tokenizer_path, n, fast=True)
        whole = _prepare_once(args, n, tokenizer_path, os.path.join(work, f"prepare-{n}"))
        rounds.append({
            "encode_batch": base["rate"], "encode_batch_fast": fast["rate"],
            "prepare": whole["rate"], "num_tokens": whole["num_tokens"],
            "ratio": whole["rate"] / base["rate"],
            "cpu_ratio": whole["per_cpu_second"] / base["per_cpu_second"],
            "cpu_seconds": {"encode_batch": base["cpu"], "encode_batch_fast": fast["cpu"],
                            "prepare": whole["cpu"]},
        })
    keys = ("encode_batch", "encode_batch_fast", "prepare", "ratio", "cpu_ratio")
    return {"rounds": rounds, **{k: _spread([r[k] for r in rounds]) for k in keys}}


def _prepare_once(args, n: int, tokenizer_path: str, output: str) -> dict:
    """One whole prepare run: wall-clock rate and CPU seconds of this process and its workers."""
    from data_pipeline.prepare import prepare

    logger = logging.getLogger("data_pipeline")
    level = logger.level
    logger.setLevel(logging.ERROR)  # skip warnings would only interleave with the report
    before = _cpu_seconds()
    try:
        result = prepare(inputs=args.input, output=output, seq_len=args.seq_len,
                         tokenizer=tokenizer_path, max_docs=args.max_docs, workers=n,
                         text_field=args.text_field, overwrite=True, progress=False)
    finally:
        logger.setLevel(level)
    cpu = _cpu_seconds() - before
    return {"rate": result.num_encoded_tokens / result.seconds, "cpu": cpu,
            "num_tokens": result.num_encoded_tokens,
            "per_cpu_second": result.num_encoded_tokens / cpu}


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished child processes (the prepare workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _encode_in_child(texts_path: str, tokenizer_path: str, threads: int, fast: bool) -> dict:
    """Rate and CPU time of one ``encode_batch`` call over all texts, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    saved = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    try:
        child = context.Process(target=_encode_child, args=(texts_path, tokenizer_path, fast, queue))
        child.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    figures = queue.get()
    child.join()
    return figures


def _encode_child(texts_path: str, tokenizer_path: str, fast: bool, queue) -> None:
    from tokenizers import Tokenizer

    with open(texts_path, "rb") as f:
        texts = pickle.load(f)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    wall, cpu = time.perf_counter(), time.process_time()
    num_tokens = sum(len(e) for e in encode(texts, add_special_tokens=False))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    queue.put({"rate": num_tokens / wall, "cpu": cpu, "per_cpu_second": num_tokens / cpu})


def _loader_checks(data_dir: str, args, num_workers: int) -> dict:
    """Loader tokens/s with and without the per-sample checks, timed in alternating slices.

    Both loaders run side by side (workers started and warm) and take turns for
    ``--loader-seconds / --loader-rounds`` each, so load from elsewhere on the machine hits
    both; the cost is taken per round and its median reported.
    """
    from data_pipeline.loader import build_loader

    streams = {}
    for verify in (True, False):
        loader = build_loader(data_dir, batch_size=args.batch_size, num_workers=num_workers,
                              num_epochs=None, shuffle=True, verify=verify)
        streams[verify] = iter(loader)
        for _ in range(_WARMUP_BATCHES):
            next(streams[verify])
    seconds = args.loader_seconds / args.loader_rounds
    rounds = []
    for r in range(args.loader_rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        timed = {verify: _timed_slice(streams[verify], seconds) for verify in order}
        checked, unchecked = timed[True], timed[False]
        rounds.append({"checked": checked["rate"], "unchecked": unchecked["rate"],
                       "cost": 1.0 - checked["rate"] / unchecked["rate"],
                       "cpu_cost": 1.0 - checked["per_cpu_second"] / unchecked["per_cpu_second"]})
    del streams  # stops the DataLoader workers
    keys = ("checked", "unchecked", "cost", "cpu_cost")
    figures = {"rounds": rounds, **{k: _spread([r[k] for r in rounds]) for k in keys}}
    return {**figures, "tokens_per_s": figures["checked"]["median"], "batch_size": args.batch_size,
            "seq_len": args.seq_len, "seconds": args.loader_seconds}


def _timed_slice(stream, seconds: float) -> dict:
    """Tokens/s of ``stream`` over about ``seconds``, by wall time and by this process's CPU time."""
    num_tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while True:
        num_tokens += next(stream)["input_ids"].numel()
        elapsed = time.perf_counter() - wall
        if elapsed >= seconds:
            break
    cpu = max(time.process_time() - cpu, 1e-9)
    return {"rate": num_tokens / elapsed, "per_cpu_second": num_tokens / cpu}


def report(figures: dict) -> list[str]:
    """The human-readable bench report."""
    lines = [f"corpus: {', '.join(figures['inputs'])}: {figures['num_documents']:,} documents, "
             f"{figures['num_chars'] / 1e6:.1f}M characters; tokenizer: {figures['tokenizer']}; "
             f"machine: {figures['machine']}, Python {figures['python']}"]
    if "tokenizer_train_seconds" in figures:
        lines.append(f"tokenizer training: {figures['tokenizer_train_seconds']:.1f}s (all cores)")
    best_base = 0.0
    for n, b in figures["budgets"].items():
        rounds = len(b["rounds"])
        best_base = max(best_base, b["encode_batch"]["median"])
        per_round = ", ".join(f"{r['ratio']:.2f}" for r in b["rounds"])
        lines += [
            f"core budget {n} ({rounds} rounds, {b['rounds'][0]['num_tokens']:,} tokens):",
            f"  (a) tokenizers encode_batch, {n} thread(s):      {_rate(b['encode_batch'])}",
            f"      tokenizers encode_batch_fast, {n} thread(s): {_rate(b['encode_batch_fast'])}",
            f"  (b) prepare, {n} worker(s), whole path:          {_rate(b['prepare'])}",
            f"      ratio (b)/(a): median {b['ratio']['median']:.2f} (per round: {per_round}); "
            f"(b)/encode_batch_fast: {b['prepare']['median'] / b['encode_batch_fast']['median']:.2f}",
            f"      tokens per CPU-second, (b)/(a): median {b['cpu_ratio']['median']:.2f} "
            f"(CPU time is less sensitive than wall time to other load on the machine)",
        ]
    for k, run in figures["loader"].items():
        rate = run["tokens_per_s"]
        versus = f" = {rate / best_base:.0f}x (a)" if best_base else ""
        per_round = ", ".join(f"{100 * r['cost']:.1f}" for r in run["rounds"])
        lines += [
            f"  (c) loader, {k} DataLoader workers, batch {run['batch_size']}x{run['seq_len']}: "
            f"{rate / 1e6:.1f}M tokens/s{versus}",
            f"      without the per-sample checks (digest, token ids): {run['unchecked']['median'] / 1e6:.1f}M "
            f"tokens/s; cost of the checks: median {100 * run['cost']['median']:.1f}% "
            f"(per round, %: {per_round})",
        ]
        if k == "0":
            lines.append(f"      cost per CPU-second of the training process: median "
                         f"{100 * run['cpu_cost']['median']:.1f}%")
    return lines


def _rate(spread: dict) -> str:
    return f"{spread['median'] / 1e6:.3f}M tokens/s (mean {spread['mean'] / 1e6:.3f} ± {spread['std'] / 1e6:.3f})"
