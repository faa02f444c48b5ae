"""``python -m data_pipeline {prepare,inspect,verify,bench}``.

Heavy modules (torch, webdataset, datasets) are imported inside the command functions, so
``--help`` and the light commands start quickly.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_pipeline.config import BUILTIN_CORPUS, DEFAULT_VOCAB_SIZE
from data_pipeline.errors import DataError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline",
        description="Tokenize and pack corpora into WebDataset shards, and check them.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prepare(commands)
    _add_inspect(commands)
    _add_verify(commands)
    _add_bench(commands)
    return parser


def _add_prepare(commands) -> None:
    p = commands.add_parser(
        "prepare", help="read, tokenize, pack and write shards + manifest.json",
        description="Read corpora, tokenize them, pack fixed-length samples and write "
                    "train-*.tar / val-*.tar shards, manifest.json and tokenizer.json. "
                    "An interrupted run resumes when started again with the same arguments.")
    p.add_argument("--input", nargs="+", default=[], metavar="PATH[:FIELD]",
                   help="files (.txt/.md: one document each; .jsonl[.gz]; .parquet), directories "
                        "(walked recursively), datasets saved with `datasets`, or hf:NAME for a "
                        "hub dataset. A :FIELD suffix names that input's text field or column "
                        "(man.jsonl:body info.parquet:content hf:user/name:content); a path that "
                        "exists as written is never split. recall:INPUT turns INPUT's documents into "
                        "key-value recall episodes for learning retrieval (mix it with --weights). "
                        "An input that yields no documents stops "
                        "the run (see --allow-empty-inputs). Default: "
                        f"{BUILTIN_CORPUS}, this Python's standard library sources (no download)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per --input: how many times each of its documents is used "
                        "on average (2 doubles a source, 0.5 keeps half of it); default 1 each")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seq-len", type=int, required=True, metavar="N",
                   help="tokens per training sample (each stored sample holds N+1 ids)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE_OR_NAME",
                     help="tokenizer.json, a directory with one, or a Hugging Face tokenizer name")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a byte-level BPE of N tokens on the training split "
                          f"(default when no --tokenizer: {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--eos-token", metavar="TOKEN",
                   help="end-of-document token (default: found among common names)")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="fraction of documents hashed into the validation split (default 0.01)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the document split and of weighted subsampling (default 0)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes (default 1); output is byte-identical for any N")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record or source instead of skipping and counting it")
    p.add_argument("--shard-mb", type=float, default=256.0, metavar="MB",
                   help="target shard size in MiB (default 256)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / parquet or dataset column holding the text, for every input "
                        "without its own :FIELD (default: text)")
    p.add_argument("--allow-empty-inputs", action="store_true",
                   help="go on, with a warning, when an input yields no documents (by default that "
                        "stops the run before any work, naming the input and why)")
    p.add_argument("--text-extensions", nargs="+", default=[".txt", ".md"], metavar="EXT",
                   help="file endings read as text documents, in directories and of files named by --input "
                   "(default .txt .md)")
    p.add_argument("--max-docs", type=int, metavar="N",
                   help="read at most N records from each input (quick runs)")
    p.add_argument("--tokenizer-train-docs", type=int, metavar="N",
                   help="train the tokenizer on at most N training documents (default: all)")
    p.add_argument("--hf-split", default="train", help="split of Hugging Face datasets (default train)")
    p.add_argument("--hf-config", help="configuration name of a Hugging Face hub dataset")
    p.add_argument("--recall-episodes", nargs=2, type=int, default=[1, 3], metavar=("LO", "HI"),
                   help="key-value episodes per recall:INPUT document (default 1 3)")
    p.add_argument("--recall-gap-chars", nargs=2, type=int, default=[0, 400], metavar=("LO", "HI"),
                   help="characters of the document's text between a recall fact and its query (default 0 400)")
    p.add_argument("--recall-digits", type=int, default=5, metavar="N",
                   help="digits per recalled value (default 5, as in the evaluation; 1 for an easier first stage)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished dataset or an unrelated run in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no skip warnings")
    p.set_defaults(func=_cmd_prepare)


def _add_inspect(commands) -> None:
    p = commands.add_parser("inspect", help="print the manifest summary and decode a sample",
                            description="Print a prepared dataset's summary and decode one sample.")
    p.add_argument("data_dir", metavar="DIR", help="a directory written by prepare")
    p.add_argument("--split", default="train", help="split of the sample to decode (default train)")
    p.add_argument("--sample", type=int, default=0, metavar="I", help="sample index (default 0)")
    p.add_argument("--max-chars", type=int, default=600, metavar="N",
                   help="print at most N characters of the decoded text (default 600)")
    p.set_defaults(func=_cmd_inspect)


def _add_verify(commands) -> None:
    p = commands.add_parser("verify", help="re-hash every shard against manifest.json",
                            description="Re-hash every shard and the tokenizer against "
                                        "manifest.json; exit status 1 if anything differs.")
    p.add_argument("data_dir", metavar="DIR", help="a directory written by prepare")
    p.set_defaults(func=_cmd_verify)


def _add_bench(commands) -> None:
    from data_pipeline.bench import add_arguments

    p = commands.add_parser(
        "bench", help="tokens/s of bare tokenizers, of prepare and of the loader",
        description="Measure, on one corpus: (a) bare tokenizers encode_batch with N threads, "
                    "(b) the whole prepare path with N workers, (c) the loader; print the "
                    "ratios of (b) and (c) to (a).")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_prepare(args) -> int:
    from data_pipeline.prepare import prepare
    from data_pipeline.summary import prepare_summary

    if args.quiet:
        logging.getLogger("data_pipeline").setLevel(logging.ERROR)
    result = prepare(
        inputs=args.input, weights=args.weights, output=args.output, seq_len=args.seq_len,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, eos_token=args.eos_token,
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
        strict=args.strict, shard_mb=args.shard_mb, text_field=args.text_field,
        allow_empty_inputs=args.allow_empty_inputs,
        text_extensions=tuple(args.text_extensions), max_docs=args.max_docs,
        tokenizer_train_docs=args.tokenizer_train_docs, hf_split=args.hf_split,
        hf_config=args.hf_config, recall_episodes=tuple(args.recall_episodes),
        recall_gap_chars=tuple(args.recall_gap_chars), recall_digits=args.recall_digits,
        overwrite=args.overwrite, progress=not args.quiet)
    print(prepare_summary(result.manifest, result.seconds, result.num_encoded_tokens))
    return 0


def _cmd_inspect(args) -> int:
    from data_pipeline.manifest import load_manifest
    from data_pipeline.summary import manifest_report, sample_report

    manifest = load_manifest(args.data_dir)
    lines = manifest_report(manifest)
    if manifest.num_samples(args.split) > 0:
        lines += sample_report(manifest, args.split, args.sample, args.max_chars)
    print("\n".join(lines))
    return 0


def _cmd_verify(args) -> int:
    from data_pipeline.manifest import load_manifest
    from data_pipeline.verify import verify_dataset

    manifest = load_manifest(args.data_dir)
    num_shards, problems = verify_dataset(manifest)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {num_shards} shards", file=sys.stderr)
        return 1
    print(f"ok: {num_shards} shards and the tokenizer match {args.data_dir}/manifest.json")
    return 0


def _cmd_bench(args) -> int:
    from data_pipeline.bench import run_bench

    run_bench(args)
    return 0


class _TqdmHandler(logging.Handler):
    """Writes log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        tqdm.write(prefix + record.getMessage(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return status 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("data_pipeline")
    if not logger.handlers:
        logger.addHandler(_TqdmHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
