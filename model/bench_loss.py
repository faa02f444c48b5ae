"""`python -m model.bench_loss`: forward + backward of the LM head's soft-capped cross-entropy.

Times the fused, chunked path (`model.lm_loss`) against its baseline in the same run: the naive
autograd path run chunk by chunk under activation checkpointing (logits recomputed in backward,
each elementwise op of the soft-cap and the cross-entropy its own tensor), which is how the loss
was computed before the fused path. The loss is the training's LM term (no focus mask), so the
fused path computes its gradients in the forward; the same path with the logits recomputed in
backward is timed too, and where it runs its rows in the Triton kernels of `kernels.softcap_ce` (a
GPU), the same path with its rows in PyTorch. With `--distill` the loss is the LM term plus the
distillation KL to random target logits (temperature 2) from the same pass of the head, weighted one
to one: the fused path takes the weights and computes the gradients in the forward, as training does,
and the same path without them keeps the targets and recomputes the logits in backward. All are
checked to agree before any timing. Prints ms per call (median), the ratios, and writes everything to
`--json` (after each path, so a time limit on a later one keeps the earlier figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

from kernels import NON_COMPUTING_OPS

from .device import default_device, usable_device, writable_file
from .lm_loss import (CPU_LOGITS_PER_CHUNK, softcap_cross_entropy_sums, softcap_cross_entropy_sums_naive,
                      uses_row_kernels)

BASELINE = "naive chunked (baseline)"
TORCH_ROWS = "fused, PyTorch rows"
RECOMPUTED = "fused, logits recomputed"
DISTILL_TEMPERATURE = 2.0
DISTILL_WEIGHTS = (1.0, 0.0, 1.0)  # the CE and KL sums one to one (no focus sum)


def naive_chunked(h, w, b, y, *, cap: float, chunk_tokens: int, targets=None, temperature: float = 1.0):
    """The baseline: the naive sums chunk by chunk (with `targets`, the KL's too), each chunk recomputed in
    backward."""
    def chunk_sums(h_c, w, b, y_c, t_c):
        return softcap_cross_entropy_sums_naive(h_c, w, b, y_c, cap=cap, targets=t_c, temperature=temperature)

    total = 0
    for start in range(0, h.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_sums, h[rows], w, b, y[rows], None if targets is None else targets[rows],
                                   use_reentrant=False)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, inputs, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `repeats` forward + backward calls of `fn` after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        for t in inputs[:3]:
            t.grad = None
        _sync(device)
        start = time.perf_counter()
        fn(*inputs).sum().backward()
        _sync(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times


def logits_traffic(fn, inputs, min_numel: int) -> dict:
    """Bytes that one forward + backward of `fn` reads and writes in tensors of >= `min_numel` elements
    (the logits-sized ones), summed over the computing ops and custom ops it dispatches, and those ops."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    found = {"bytes": 0, "ops": 0}

    class Traffic(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "atma" or (func.namespace == "aten" and func._opname not in NON_COMPUTING_OPS):
                big = [t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                       if isinstance(t, torch.Tensor) and t.numel() >= min_numel]
                found["bytes"] += sum(big)
                found["ops"] += bool(big)
            return out

    for t in inputs[:3]:
        t.grad = None
    with Traffic():
        fn(*inputs).sum().backward()
    return found


def save_record(record: dict, path: str | None) -> None:
    """Write `record` to `path` as JSON, whole or not at all (no-op without a path)."""
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (defaults: a micro-batch of the CPU comparison's models)."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m model.bench_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows of the LM head's input (default: 2048)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default: 64)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default: 2048)")
    p.add_argument("--chunk-tokens", type=int, default=8192,
                   help="loss.loss_chunk_tokens of both paths (default: 8192, the run config's); on the CPU the "
                        f"fused path caps a chunk at {CPU_LOGITS_PER_CHUNK} logits")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per path (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if gpu else "fp32",
                   help="dtype of the head's input (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--count-bytes", action="store_true",
                   help="instead of timing, count the bytes each path's ops read and write in logits-sized "
                        "tensors (at least 3 rows, larger than the head's weight: keep --hidden small) in one "
                        "forward + backward, per logit; no GPU needed (the Triton rows run on the CPU with "
                        "TRITON_INTERPRET=1 ATMA_KERNELS=triton)")
    p.add_argument("--distill", action="store_true",
                   help="the LM term plus the distillation KL to random target logits in the head's dtype "
                        "(temperature 2), both with weight 1, as training weighs them")
    p.add_argument("--json", metavar="PATH", type=writable_file, help="write the results as JSON")
    args = p.parse_args(argv)
    if min(args.tokens, args.hidden, args.vocab, args.chunk_tokens, args.repeats) < 1 or args.warmup < 0:
        p.error("--tokens, --hidden, --vocab, --chunk-tokens and --repeats must be >= 1, --warmup >= 0")
    return args


def count_bytes(paths: dict, inputs, args, record: dict) -> int:
    """`--count-bytes`: print (and write) each path's logits-sized traffic per logit; returns 0."""
    logits = args.tokens * args.vocab
    # logits-sized: at least 3 rows of logits and more elements than the head's weight (V x hidden)
    min_numel = max(3 * args.vocab, args.vocab * args.hidden + 1)
    record["traffic"] = {name: logits_traffic(fn, inputs, min_numel) for name, fn in paths.items()}
    save_record(record, args.json)
    print(f"{args.tokens} tokens x vocab {args.vocab}, {args.dtype}, chunk {args.chunk_tokens} tokens: bytes read and "
          "written in logits-sized tensors, one forward + backward")
    for name, found in record["traffic"].items():
        print(f"  {name:<32} {found['bytes'] / logits:7.1f} bytes per logit in {found['ops']:4d} ops")
    return 0


def main(argv=None) -> int:
    """Check every path agrees with the naive one, then time them (or count their traffic); print the table."""
    args = parse_args(argv)
    try:
        device = usable_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device=device, generator=g) / args.hidden**0.5).to(dtype)
    w.requires_grad_()
    b = torch.zeros(args.vocab, device=device, dtype=dtype, requires_grad=True)
    y = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    kw = {"cap": 15.0, "chunk_tokens": args.chunk_tokens}
    targets = None
    if args.distill:
        targets = (4.0 * torch.randn(args.tokens, args.vocab, device=device, generator=g)).to(dtype)
        kw.update(temperature=DISTILL_TEMPERATURE)
    fused_kw = dict(kw, targets_rows=None if targets is None else (lambda start, end: targets[start:end]))
    if targets is None:
        def fused(*t, **extra):
            return softcap_cross_entropy_sums(*t, **fused_kw, **extra)

        def recomputed(*t):
            return softcap_cross_entropy_sums(*t, **fused_kw, grads_in_forward=False)

        def baseline(*t):
            return naive_chunked(*t, **kw)
    else:  # the loss is the weighted sum of the CE and the KL sums, as training takes them
        coefs = torch.tensor(DISTILL_WEIGHTS, device=device)

        def fused(*t, **extra):
            return softcap_cross_entropy_sums(*t, **fused_kw, weights=DISTILL_WEIGHTS, **extra)[1]

        def recomputed(*t):  # the sums without the weights: the targets kept, the logits again in backward
            return (softcap_cross_entropy_sums(*t, **fused_kw) * coefs).sum()

        def baseline(*t):
            return (naive_chunked(*t, **kw, targets=targets) * coefs).sum()
    paths = {"fused": fused, RECOMPUTED: recomputed}
    if uses_row_kernels(h.device, h.dtype):  # the fused path with its rows in PyTorch, as before the kernels
        paths[TORCH_ROWS] = lambda *t: fused(*t, elementwise="torch")
    paths[BASELINE] = baseline
    inputs = (h, w, b, y)
    sums = {name: fn(*inputs).detach().double() for name, fn in paths.items()}
    for name, value in sums.items():
        if not torch.allclose(value, sums[BASELINE], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5):
            print(f"error: the {name} and naive sums differ: {value.tolist()} vs {sums[BASELINE].tolist()}",
                  file=sys.stderr)
            return 1
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "settings": vars(args)}
    if args.count_bytes:
        return count_bytes(paths, inputs, args, record)
    record["ms"] = {}
    for name, fn in paths.items():
        record["ms"][name] = statistics.median(time_calls(fn, inputs, args.repeats, args.warmup, device))
        save_record(record, args.json)
    ms = record["ms"]
    record["speedup"] = ms[BASELINE] / ms["fused"]
    if RECOMPUTED in ms:
        record["grads_in_forward_speedup"] = ms[RECOMPUTED] / ms["fused"]
    if TORCH_ROWS in ms:
        record["row_kernels_speedup"] = ms[TORCH_ROWS] / ms["fused"]
    save_record(record, args.json)
    loss = "LM + distillation KL" if args.distill else "LM"
    print(f"{loss}: {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, {args.dtype} on "
          f"{record['device']}, chunk {args.chunk_tokens} tokens; forward + backward, median of {args.repeats}")
    for name, value in ms.items():
        print(f"  {name:<32} {value:9.2f} ms")
    print(f"  fused speedup                    {record['speedup']:9.2f}x (same run)")
    if RECOMPUTED in ms:
        print(f"  gradients in forward             {record['grads_in_forward_speedup']:9.2f}x (same run)")
    if TORCH_ROWS in ms:
        print(f"  Triton rows over PyTorch rows    {record['row_kernels_speedup']:9.2f}x (same run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
