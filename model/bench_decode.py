"""`python -m model.bench_decode`: prefill seconds and decode ms/token with the decoding cache, batch 1.

For every context length L: one prefill of L tokens into an empty cache, then `--decode-tokens`
greedy steps of one token each (SPEC §8.2 serving protocol: batch 1, exact-length prompts). In the
same run, two baselines on the same prompt: the same model without a cache (the full forward over
the whole sequence for each new token, `--recompute-steps` of them), and a NoPE model of the same
size decoding with its softmax KV cache (SDPA), the paper's matched softmax baseline. Prints one
table with the ratios and writes everything to `--json`.

Memory: on a GPU the peak allocated bytes of each phase (on the CPU the process's resident-memory
high-water mark so far); everywhere the bytes of decoding state the cache holds after the last
step (fixed-size conv and memory state plus the keys and values). Before any timing, cached greedy
decoding is checked against full recomputation on the same device (`check_cache`); no figure is
printed when they differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import sys
import time

import torch

from . import PRESETS, AtmaConfig, AtmaForCausalLM
from .device import default_device, usable_device, writable_file


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    """Peak allocated CUDA bytes since the last reset, or the process's peak resident bytes on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def parse_lengths(text: str) -> list[int]:
    """"2k,8k,32k" -> [2048, 8192, 32768] (k = 1024)."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            lengths.append(int(part.rstrip("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad length {part!r}: use integers with an optional k suffix, e.g. 2k,8k") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"needs positive lengths, got {text!r}")
    return lengths


def build_model(config: AtmaConfig, device: torch.device, dtype: torch.dtype) -> AtmaForCausalLM:
    """A randomly initialised model in eval mode (the weights do not change the timings)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AtmaForCausalLM(config)
    return model.to(dtype).eval()


def time_cached(model, prompt: torch.Tensor, decode_tokens: int, warmup: int) -> dict:
    """Prefill seconds, per-token decode milliseconds (median over steps after `warmup`), memory."""
    device = prompt.device
    cache = model.new_cache()
    _peak_reset(device)
    _sync(device)
    start = time.perf_counter()
    hidden = model.extend(prompt, cache)
    token = model.logits(hidden[:, -1:].float()).argmax(-1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    prefill_peak = _peak(device)
    _peak_reset(device)
    steps_ms = []
    for _ in range(warmup + decode_tokens):
        _sync(device)
        start = time.perf_counter()
        hidden = model.extend(token, cache)
        token = model.logits(hidden[:, -1:].float()).argmax(-1)
        _sync(device)
        steps_ms.append(1e3 * (time.perf_counter() - start))
    steps_ms = steps_ms[warmup:]
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": statistics.median(steps_ms),
        "decode_ms_min": min(steps_ms),
        "decode_ms_max": max(steps_ms),
        "prefill_peak_bytes": prefill_peak,
        "decode_peak_bytes": _peak(device),
        "cache_bytes": cache.num_bytes(),
    }


def time_recompute(model, prompt: torch.Tensor, steps: int) -> dict:
    """Milliseconds per new token without a cache: the full forward over the growing sequence."""
    device = prompt.device
    sequence = prompt
    _peak_reset(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        hidden = model.trunk(sequence)[0]
        token = model.logits(hidden[:, -1:].float()).argmax(-1)
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
        sequence = torch.cat([sequence, token], dim=1)
    return {"recompute_ms_per_token": statistics.median(times), "recompute_peak_bytes": _peak(device)}


def check_cache(config: AtmaConfig, device: torch.device, *, prompt_len: int = 160, steps: int = 6) -> float:
    """Greedy decoding with the cache vs full recomputation on `device` (tiny preset, fp32, live weights).

    Returns the largest logit difference; raises RuntimeError when the tokens differ or it exceeds
    1e-3, so that no timing is reported for a cache that computes something else.
    """
    from .generation import greedy_generate

    small = AtmaConfig.from_preset("tiny", core=config.core, memory=config.memory, window=config.window)
    model = build_model(small, device, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, small.vocab_size, (1, prompt_len), generator=gen).to(device)
    cached = greedy_generate(model, prompt, steps, return_logits=True)
    full = greedy_generate(model, prompt, steps, use_cache=False, return_logits=True)
    diff = (cached.logits - full.logits).abs().max().item()
    if not torch.equal(cached.tokens, full.tokens) or diff > 1e-3:
        raise RuntimeError(f"cached decoding differs from recomputation on {device} ({small.core}): max logit diff {diff:.3g}")
    return diff


def run(args, save=lambda record: None) -> dict:
    """Measure every length; return the JSON record, passed to `save` after each length (complete: false)."""
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config = AtmaConfig.from_preset(args.preset, core=args.core, memory=not args.no_memory)
    models = {args.core: build_model(config, device, dtype)}
    if args.baseline_core and args.baseline_core != args.core:
        models[args.baseline_core] = build_model(dataclasses.replace(config, core=args.baseline_core), device, dtype)
    checks = {core: check_cache(model.config, device) for core, model in models.items()}
    print("cache check (cached vs recomputed greedy logits, fp32): "
          + ", ".join(f"{core} max diff {diff:.2e}" for core, diff in checks.items()), flush=True)
    print(header(args), flush=True)
    gen = torch.Generator().manual_seed(1)
    rows = []
    record = {
        "preset": args.preset, "core": args.core, "baseline_core": args.baseline_core, "memory": not args.no_memory,
        "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "decode_tokens": args.decode_tokens,
        "warmup": args.warmup, "recompute_steps": args.recompute_steps, "cache_check_max_logit_diff": checks,
        "rows": rows, "complete": False,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    with torch.inference_mode():
        # One short untimed pass per model: lazy imports and kernel compilation stay out of the figures.
        for model in models.values():
            time_cached(model, torch.randint(0, config.vocab_size, (1, 64)).to(device), 2, 0)
        for length in args.lengths:
            prompt = torch.randint(0, config.vocab_size, (1, length), generator=gen).to(device)
            row = {"length": length}
            for core, model in models.items():
                cached = time_cached(model, prompt, args.decode_tokens, args.warmup)
                row[core] = cached
                if core == args.core and args.recompute_steps > 0:
                    row[core].update(time_recompute(model, prompt, args.recompute_steps))
            main = row[args.core]
            if "recompute_ms_per_token" in main:
                main["cache_speedup"] = main["recompute_ms_per_token"] / main["decode_ms_per_token"]
            if args.baseline_core in row and args.baseline_core != args.core:
                base = row[args.baseline_core]
                row["decode_ratio_vs_baseline"] = main["decode_ms_per_token"] / base["decode_ms_per_token"]
                row["prefill_ratio_vs_baseline"] = main["prefill_s"] / base["prefill_s"]
            rows.append(row)
            print(format_row(row, args), flush=True)
            save(record)  # the lengths done survive a time limit or an out-of-memory on the longer ones
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record["complete"] = True
    return record


def _mib(value) -> str:
    return f"{value / 2**20:,.1f}"


def header(args) -> str:
    """The table header printed before the first row."""
    base = args.baseline_core if args.baseline_core and args.baseline_core != args.core else None
    cols = ["length", f"{args.core} prefill s", "decode ms/tok", "recompute ms/tok", "cache speedup",
            "state MiB", "peak MiB"]
    if base:
        cols += [f"{base} prefill s", f"{base} decode ms/tok", "decode ratio", "prefill ratio"]
    return " | ".join(cols)


def format_row(row: dict, args) -> str:
    """One table line: the measured core, its recompute baseline and the softmax baseline."""
    main = row[args.core]
    cells = [
        str(row["length"]), f"{main['prefill_s']:.3f}", f"{main['decode_ms_per_token']:.2f}",
        f"{main.get('recompute_ms_per_token', float('nan')):.2f}", f"{main.get('cache_speedup', float('nan')):.1f}x",
        _mib(main["cache_bytes"]), _mib(max(main["prefill_peak_bytes"], main["decode_peak_bytes"])),
    ]
    if "decode_ratio_vs_baseline" in row:
        base = row[args.baseline_core]
        cells += [f"{base['prefill_s']:.3f}", f"{base['decode_ms_per_token']:.2f}",
                  f"{row['decode_ratio_vs_baseline']:.2f}x", f"{row['prefill_ratio_vs_baseline']:.2f}x"]
    return " | ".join(cells)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (defaults: the paper's model on a GPU, the tiny preset on the CPU)."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="python -m model.bench_decode",
        description="Batch-1 prefill and decode timings with the decoding cache, against full recomputation "
        "and a NoPE (SDPA softmax) model with its KV cache, measured in the same run.",
    )
    p.add_argument("--preset", default="atma-378m" if gpu else "tiny", choices=sorted(PRESETS),
                   help="model preset (default: atma-378m on a GPU, tiny on the CPU)")
    p.add_argument("--core", default="polar", choices=["polar", "nope", "rope"], help="core measured (default: polar)")
    p.add_argument("--baseline-core", default="nope", choices=["polar", "nope", "rope", "none"],
                   help="softmax baseline with its KV cache, same size ('none' to skip; default: nope)")
    p.add_argument("--no-memory", action="store_true", help="models without the gated-delta memory branch")
    p.add_argument("--lengths", type=parse_lengths, default=None,
                   help="context lengths, e.g. 2k,4k,8k (default: 2k,...,64k on a GPU, 512,1k,2k,4k on the CPU)")
    p.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per length (default: 32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them (default: 2)")
    p.add_argument("--recompute-steps", type=int, default=3,
                   help="new tokens timed without the cache (full forward each; 0 to skip; default: 3)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if gpu else "fp32",
                   help="weights and activations (default: bf16 on a GPU, fp32 on the CPU); logits are fp32")
    p.add_argument("--json", metavar="PATH", type=writable_file, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = [2048 * 2**i for i in range(6)] if gpu else [512, 1024, 2048, 4096]
    if args.baseline_core == "none":
        args.baseline_core = None
    if args.decode_tokens < 1 or args.warmup < 0 or args.recompute_steps < 0:
        p.error("--decode-tokens must be >= 1, --warmup and --recompute-steps >= 0")
    return args


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    try:
        usable_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"preset {args.preset}, {args.dtype} on {args.device}, batch 1, {args.decode_tokens} decode tokens "
          f"(median), {args.recompute_steps} recomputed; ratios: {args.core} / {args.baseline_core}")

    def save(record):
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
                f.write("\n")

    try:
        record = run(args, save)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    save(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
