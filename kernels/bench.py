"""Kernel benchmarks: Polar attention vs SDPA (flash and cuDNN), causal conv, gated-delta memory.

    python -m kernels.bench [--seq-lens 2048 8192 32768] [--iters 20] [--json results.json]

Everything is timed in one process on one GPU, so the ratios compare like with like. Polar runs
with H query heads over G key/value heads (GQA read in-kernel), its forward+backward once with
the default backward ("polar_triton": ATMA_POLAR_BWD=auto, the faster of two-pass and split, its
pick and their timings recorded), then once with each variant by name ("polar_triton_two_pass",
"_one_pass", "_split"), and the default once more with its programs started in order instead of
longest first ("polar_triton_in_order"; these four only at lengths up to --variants-up-to, when
given); SDPA runs the same query heads
with `enable_gqa=True` when the backend accepts it, else with K/V expanded to H heads before
timing (the "sdpa_gqa" field says which). Attention FLOPs count causal attention as
2*B*H*T^2*d per forward and 2.5x that for the backward (fwd+bwd = 3.5x).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import time
from unittest import mock

import torch

from data_pipeline.argtypes import writable_file

from .common import cuda_median_ms, describe_settings, kernel_settings
from .common.ops import NON_COMPUTING_OPS

DEFAULT_SEQ_LENS = (2048, 8192, 32768)
TOKENS_PER_BATCH = 16384  # B = 8, 2, 1 at T = 2K, 8K, 32K


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of `python -m kernels.bench`."""
    p = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="Time Polar attention against SDPA (flash and cuDNN backends), the causal conv "
        "and the gated-delta memory paths on one CUDA GPU.",
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS), metavar="T",
                   help="sequence lengths (default: 2048 8192 32768); batch = max(1, 16384 // T)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per case (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per case (default: 5)")
    p.add_argument("--heads", type=int, default=8, help="query heads H (default: 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads G of Polar (default: 2)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim d (default: 128)")
    p.add_argument("--conv-channels", type=int, default=1024, help="channels of the conv benchmark (default: 1024)")
    p.add_argument("--variants-up-to", type=int, default=None, metavar="T",
                   help="time Polar's named backward variants and its in-order program order only at lengths <= T "
                        "(default: at every length); longer lengths time its default line alone against SDPA "
                        "flash and cuDNN, the figures the goals at T >= 8K compare, in a fraction of the time")
    p.add_argument("--skip-attention", action="store_true", help="skip Polar vs SDPA")
    p.add_argument("--skip-conv", action="store_true", help="skip the causal conv")
    p.add_argument("--skip-memory", action="store_true", help="skip the gated-delta memory")
    p.add_argument("--fla-timing-only", action="store_true",
                   help="time flash-linear-attention even where its gradients are known to be wrong "
                        "(timing only; training never uses it there). A fault inside its kernels would end the "
                        "run: time it alone (--skip-attention --skip-conv)")
    p.add_argument("--count-ops", action="store_true",
                   help="instead of timing, count what one forward+backward of the gated-delta chunked path "
                        "dispatches per --seq-lens (batch 1, H and d as given), its state carried by the PyTorch "
                        "loop and by the Triton kernels: computing ATen ops and our custom ops (one kernel launch "
                        "each). Runs on a GPU or on the CPU (there the Triton carry needs TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="OUT", type=writable_file, default=None,
                   help="also write the results to this JSON file")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if any(t < 1 for t in args.seq_lens):
        parser.error("--seq-lens must be positive")
    if args.variants_up_to is not None and args.variants_up_to < 1:
        parser.error("--variants-up-to must be positive")
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    return args


def batch_for(T: int) -> int:
    """Batch size used at sequence length T (16K tokens per call, at least one sequence)."""
    return max(1, TOKENS_PER_BATCH // T)


def attention_flops(B: int, H: int, T: int, d: int, *, backward: bool) -> float:
    """Causal attention FLOPs: 2*B*H*T^2*d forward, 3.5x that for forward + backward."""
    fwd = 2.0 * B * H * T * T * d
    return fwd * 3.5 if backward else fwd


def _time_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` runs, timed with CUDA events."""
    return cuda_median_ms(fn, iters, warmup)


def _peak_extra_mib(fn) -> float:
    """Peak memory fn() allocates beyond what is live before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(name: str, fwd, fwd_bwd, args, flops_fwd: float | None, flops_fb: float | None) -> dict:
    """Time fwd and fwd_bwd (fwd may be None: forward+backward only); returns the record."""
    rec = {"name": name}
    # Forward and forward+backward are measured separately: a backend that refuses its backward
    # (flash-linear-attention on Hopper with an old triton) still reports its forward.
    for key, fn, flops in (("fwd", fwd, flops_fwd), ("fwd_bwd", fwd_bwd, flops_fb)):
        if fn is None:
            continue
        try:
            rec[f"{key}_ms"] = _time_ms(fn, args.iters, args.warmup)
            rec[f"{key}_peak_mib"] = _peak_extra_mib(fn)
        except Exception as exc:  # one failing backend must not hide the others' numbers
            rec.pop(f"{key}_ms", None)
            rec["error" if key == "fwd" else "fwd_bwd_error"] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            torch.cuda.synchronize()
            if key == "fwd":
                return rec
            continue
        if flops is not None:
            rec[f"{key}_tflops"] = flops / rec[f"{key}_ms"] / 1e9
    return rec


def kernel_ms(fn, iters: int) -> dict[str, dict]:
    """Per call of fn(): device milliseconds and launches of each CUDA kernel it runs (torch.profiler over
    `iters` calls after one untimed call)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    # Only the device's own events: a host-side launch call carries its kernel's time too.
    return {ev.key: {"ms": ev.self_device_time_total / 1000 / iters, "launches": ev.count / iters}
            for ev in prof.key_averages() if ev.device_type == DeviceType.CUDA and ev.self_device_time_total > 0}


def add_launches(rec: dict, fn, iters: int, *, polar: bool = True) -> None:
    """Add to a record where its forward+backward spends its device time, kernel by kernel (`launch_ms`), and
    for a Polar record the tiles each launch kind ran with (`configs`: BM, BN, warps, stages)."""
    from .polar.triton_impl import last_launch_configs, reset_launch_configs

    reset_launch_configs()
    try:
        rec["launch_ms"] = kernel_ms(fn, iters)
    except Exception as exc:  # a profiler failure must not cost the timings measured already
        rec["launch_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if polar:
        rec["configs"] = {kind: list(config) for kind, config in sorted(last_launch_configs().items())}


def bench_attention(args, T: int, *, variants: bool = True) -> list[dict]:
    """Polar (Triton) and SDPA flash / cuDNN at one sequence length; `variants`: also Polar's named backward
    variants and its in-order program order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    from .polar import triton_impl
    from .polar.triton_impl import polar_attention_triton

    B, H, G, d = batch_for(T), args.heads, args.kv_heads, args.head_dim
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    fwd_flops = attention_flops(B, H, T, d, backward=False)
    fb_flops = attention_flops(B, H, T, d, backward=True)
    out = []

    q = torch.randn(B, T, H, d, device=dev, dtype=dt, generator=gen).requires_grad_()
    k = torch.randn(B, T, G, d, device=dev, dtype=dt, generator=gen).requires_grad_()
    v = torch.randn(B, T, G, d, device=dev, dtype=dt, generator=gen).requires_grad_()
    v_null = torch.zeros(H, d, device=dev, requires_grad=True)
    scalars = [torch.full((H,), val, device=dev, requires_grad=True) for val in (2.0, 0.5, -1.0, -1.5)]
    g_dir = torch.randn(B, T, H, d, device=dev, dtype=dt, generator=gen)
    g_mag = torch.randn(B, T, H, device=dev, dtype=dt, generator=gen)
    inputs = [q, k, v, v_null, *scalars]

    def polar_fwd():
        with torch.no_grad():
            polar_attention_triton(*inputs)

    def polar_fb():
        c, mu = polar_attention_triton(*inputs)
        torch.autograd.grad((c, mu), inputs, (g_dir, g_mag))

    def backward_run() -> dict:
        """The backward variant the default line ran: ATMA_POLAR_BWD's, and what "auto" picked with its timings."""
        variant = triton_impl.backward_variant()
        if variant != "auto":
            return {"backward": variant}
        key = (str(q.device), q.dtype, d, False, triton_impl._t_bucket(T))
        chosen, times = triton_impl.auto_backward_choices().get(key, (None, None))
        return {"backward": "auto", "backward_chosen": chosen, "backward_auto_ms": times}

    rec = _measure("polar_triton", polar_fwd, polar_fb, args, fwd_flops, fb_flops)
    rec.update(T=T, B=B, H=H, G=G, d=d, schedule=_schedule(), **backward_run())
    if "fwd_bwd_ms" in rec:
        add_launches(rec, polar_fb, args.iters)
    out.append(rec)
    if variants:
        out += polar_variant_records(polar_fwd, polar_fb, backward_run, args, fwd_flops, fb_flops,
                                     dict(T=T, B=B, H=H, G=G, d=d))
    polar_lines = len(out)

    qs = torch.randn(B, H, T, d, device=dev, dtype=dt, generator=gen).requires_grad_()
    ks = torch.randn(B, G, T, d, device=dev, dtype=dt, generator=gen).requires_grad_()
    vs = torch.randn(B, G, T, d, device=dev, dtype=dt, generator=gen).requires_grad_()
    ke = ks.detach().repeat_interleave(H // G, dim=1).requires_grad_()
    ve = vs.detach().repeat_interleave(H // G, dim=1).requires_grad_()
    g_o = torch.randn(B, H, T, d, device=dev, dtype=dt, generator=gen)
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        for gqa in (True, False):
            kk, vv = (ks, vs) if gqa else (ke, ve)
            extra = {"enable_gqa": True} if gqa and G != H else {}

            def sdpa_fwd(kk=kk, vv=vv, extra=extra, backend=backend):
                with sdpa_kernel(backend), torch.no_grad():
                    F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, **extra)

            def sdpa_fb(kk=kk, vv=vv, extra=extra, backend=backend):
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, **extra)
                torch.autograd.grad(o, (qs, kk, vv), g_o)

            rec = _measure(name, sdpa_fwd, sdpa_fb, args, fwd_flops, fb_flops)
            rec.update(T=T, B=B, H=H, G=G if gqa else H, d=d, sdpa_gqa="enable_gqa" if gqa else "expanded K/V")
            if "error" not in rec or not gqa:
                break
        out.append(rec)
    add_speed_ratios(out[:polar_lines], out[polar_lines:])
    add_speed_ratios(out[1:polar_lines], out[:1])  # each line against the default: > 1 means it is faster
    return out


def polar_variant_records(polar_fwd, polar_fb, backward_run, args, fwd_flops, fb_flops, shape: dict) -> list[dict]:
    """Polar's forward+backward with each backward variant by name, then the default with its programs in order."""
    from .polar import triton_impl

    out = []
    # The same forward, then each backward variant by name: the two-pass, the one-pass (dq by atomic
    # adds) and the split (row terms and dq in launches of their own); forward+backward only.
    for variant in triton_impl.BACKWARD_VARIANTS:
        with mock.patch.dict(os.environ, {"ATMA_POLAR_BWD": variant}):
            rec = _measure(f"polar_triton_{variant}", None, polar_fb, args, fwd_flops, fb_flops)
            if "fwd_bwd_ms" in rec:
                add_launches(rec, polar_fb, args.iters)
        rec.update(**shape, backward=variant)
        out.append(rec)
    # The default line's settings with its programs started tile by tile instead of longest first:
    # the baseline of the order, timed in the same run.
    with mock.patch.dict(os.environ, {"ATMA_POLAR_SCHEDULE": "in_order"}):
        rec = _measure("polar_triton_in_order", polar_fwd, polar_fb, args, fwd_flops, fb_flops)
        if "fwd_bwd_ms" in rec:
            add_launches(rec, polar_fb, args.iters)
        rec.update(**shape, schedule=_schedule(), **backward_run())
    out.append(rec)
    return out


def _schedule() -> str:
    """The Polar program order ATMA_POLAR_SCHEDULE sets."""
    from .polar.triton_impl import longest_first

    return "longest_first" if longest_first() else "in_order"


def add_speed_ratios(polar_records: list[dict], baselines: list[dict]) -> None:
    """Add to each Polar record its speed ratio against each baseline: "<fwd|fwd_bwd>_speed_vs_<name>"
    = baseline ms / Polar ms (> 1 means Polar is faster), for every time both records have."""
    for polar in polar_records:
        for rec in baselines:
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if key in rec and key in polar:
                    polar[f"{key[:-3]}_speed_vs_{rec['name']}"] = rec[key] / polar[key]


def bench_conv(args, T: int) -> list[dict]:
    """Causal depthwise conv, Triton vs PyTorch, for the LFM2 (K=3) and canon (K=4) widths."""
    from .causal_conv import triton_impl as conv_triton
    from .causal_conv.torch_impl import causal_conv1d_torch
    from .causal_conv.triton_impl import causal_conv1d_triton

    B, C, dev = batch_for(T), args.conv_channels, torch.device("cuda")
    out = []
    for K in (3, 4):
        x = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(C, K, device=dev, requires_grad=True)
        gy = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16)
        for name, fn in (("conv_triton", causal_conv1d_triton), ("conv_torch", causal_conv1d_torch)):
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(x, w)

            def fb(fn=fn):
                torch.autograd.grad(fn(x, w), (x, w), gy)

            rec = _measure(name, fwd, fb, args, None, None)
            if "fwd_bwd_ms" in rec:  # the device's own time: is a short call bound by the host?
                add_launches(rec, fb, args.iters, polar=False)
            if name == "conv_triton":  # the tiles the autotuner picked: (BT, BC, warps, stages) per pass
                rec["configs"] = {kind: list(c) for kind, c in sorted(conv_triton.last_launch_configs().items())}
            rec.update(T=T, B=B, C=C, K=K)
            out.append(rec)
    return out


def bench_memory(args, T: int) -> list[dict]:
    """Gated delta rule fwd+bwd: flash-linear-attention (when usable) vs the chunked path, its state
    carried by the Triton kernels and by the PyTorch loop."""
    import torch.nn.functional as F

    from .gated_delta import fla_bridge

    B, H, d, dev = batch_for(T), args.heads, args.head_dim, torch.device("cuda")
    q = F.normalize(torch.randn(B, T, H, d, device=dev), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(B, T, H, d, device=dev), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 3.9).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, T, H, device=dev)).requires_grad_()
    go = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16)
    out = []
    paths = []
    reason = fla_bridge.fla_refusal(tuple(torch.cuda.get_device_capability()))
    if reason is None or (args.fla_timing_only and fla_bridge._installed_fla_version() is not None):
        paths.append(("memory_fla" if reason is None else "memory_fla_timing_only", fla_bridge.fla_gated_delta_rule))
    else:
        out.append({"name": "memory_fla", "T": T, "B": B, "skipped": reason})
    from .gated_delta.torch_impl import chunk_gated_delta_rule_torch

    # The chunked path with its state carried by the Triton kernels (what training runs where FLA
    # is refused) and by the PyTorch loop (the baseline of that carry).
    paths.append(("memory_triton_carry", functools.partial(chunk_gated_delta_rule_torch, carry="triton")))
    paths.append(("memory_torch", chunk_gated_delta_rule_torch))
    for name, fn in paths:
        def fwd(fn=fn):
            with torch.no_grad():
                fn(q, k, v, g, beta)

        def fb(fn=fn):
            o, _ = fn(q, k, v, g, beta)
            torch.autograd.grad(o, (q, k, v, g, beta), go)

        # Timing only: FLA's backward runs although its gradients are known to be wrong here.
        with fla_bridge.fla_timing_only() if name == "memory_fla_timing_only" else contextlib.nullcontext():
            rec = _measure(name, fwd, fb, args, None, None)
            if "fwd_bwd_ms" in rec:
                add_launches(rec, fb, args.iters, polar=False)
        rec.update(T=T, B=B, H=H, d=d)
        out.append(rec)
    return out


def _fmt(rec: dict) -> str:
    if "skipped" in rec:
        return f"  {rec['name']:<24s} skipped: {rec['skipped']}"
    if "error" in rec:
        return f"  {rec['name']:<24s} error: {rec['error']}"
    if "fwd_ms" in rec:
        line = f"  {rec['name']:<24s} fwd {rec['fwd_ms']:8.3f} ms"
        if "fwd_tflops" in rec:
            line += f" {rec['fwd_tflops']:6.1f} TFLOP/s"
    else:  # forward+backward only (the one-pass backward)
        line = f"  {rec['name']:<24s} fwd {'(as above)':>11s}"
        if "fwd_bwd_ms" not in rec:
            return line + f" | fwd+bwd error: {rec.get('fwd_bwd_error', 'not measured')}"
    if "fwd_bwd_ms" in rec:
        line += f" | fwd+bwd {rec['fwd_bwd_ms']:8.3f} ms"
        if "fwd_bwd_tflops" in rec:
            line += f" {rec['fwd_bwd_tflops']:6.1f} TFLOP/s"
        line += (f" | peak extra fwd {rec['fwd_peak_mib']:7.1f} MiB," if "fwd_peak_mib" in rec else " | peak extra")
        line += f" fwd+bwd {rec['fwd_bwd_peak_mib']:7.1f} MiB"
    else:
        line += f" | peak extra fwd {rec['fwd_peak_mib']:7.1f} MiB | fwd+bwd error: {rec['fwd_bwd_error']}"
    if "sdpa_gqa" in rec:
        line += f" [{rec['sdpa_gqa']}]"
    ratios = [f"{k.replace('_speed_vs_', ' vs ')}={v:.2f}x" for k, v in rec.items() if "_speed_vs_" in k]
    if ratios:
        line += "\n" + " " * 28 + "speed ratio (>1 = Polar faster): " + ", ".join(ratios)
    if rec.get("launch_ms"):
        slowest = sorted(rec["launch_ms"].items(), key=lambda item: -item[1]["ms"])
        kernels = [f"{name[:40]} {t['ms']:.3f} ms" + (f" x{t['launches']:g}" if t["launches"] != 1 else "")
                   for name, t in slowest[:6]]
        rest = sum(t["ms"] for _, t in slowest[6:])
        line += "\n" + " " * 28 + "fwd+bwd by kernel: " + ", ".join(kernels) + (
            f", {len(slowest) - 6} more {rest:.3f} ms" if len(slowest) > 6 else "")
        # well below the call's time: the device waited for the host (launches, Python) between kernels
        line += f"; device busy {sum(t['ms'] for _, t in slowest):.3f} of {rec['fwd_bwd_ms']:.3f} ms"
    elif rec.get("launch_error"):
        line += "\n" + " " * 28 + f"fwd+bwd by kernel: {rec['launch_error']}"
    if rec.get("backward") == "auto":
        timed = rec.get("backward_auto_ms") or {}
        times = ", ".join(f"{variant} {ms:.3f} ms" for variant, ms in timed.items())
        line += "\n" + " " * 28 + f"backward auto: {rec.get('backward_chosen') or 'not run'}" + (
            f" (timed on first use: {times})" if times else "")
    if rec.get("configs"):
        tiles = [f"{kind} ({','.join(map(str, config))})" for kind, config in rec["configs"].items()]
        names = "BT,BC" if rec["name"].startswith("conv") else "BM,BN"
        line += "\n" + " " * 28 + f"tiles ({names},warps,stages): " + ", ".join(tiles)
    return line


def environment() -> dict:
    """Versions and device, recorded with every result."""
    import triton

    try:
        from importlib import metadata

        fla_version = metadata.version("flash-linear-attention")
    except Exception:
        fla_version = None
    return {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "flash_linear_attention": fla_version,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel_settings": kernel_settings(),
    }


def main(argv=None) -> int:
    """Run the benchmarks; returns the process exit code (2 without a CUDA GPU)."""
    args = parse_args(argv)
    if args.count_ops:
        return count_main(args)
    if not torch.cuda.is_available():
        print("kernels.bench: no CUDA GPU available; the benchmarks need one (nothing was run)", file=sys.stderr)
        return 2
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items() if k != "kernel_settings"))
    print(f"kernel settings from the environment: {describe_settings(env['kernel_settings'])}")
    print(f"iters={args.iters} warmup={args.warmup} H={args.heads} G={args.kv_heads} d={args.head_dim} bf16, causal")
    results = []
    record = {"environment": env, "args": vars(args), "results": results, "complete": False}
    for T in args.seq_lens:
        print(f"T={T} B={batch_for(T)}")
        recs = []
        if not args.skip_attention:
            variants = args.variants_up_to is None or T <= args.variants_up_to
            if not variants:
                print(f"  Polar's backward variants and in-order line not timed here (--variants-up-to "
                      f"{args.variants_up_to})")
            recs += bench_attention(args, T, variants=variants)
        if not args.skip_conv:
            recs += bench_conv(args, T)
        if not args.skip_memory:
            recs += bench_memory(args, T)
        for rec in recs:
            print(_fmt(rec), flush=True)
        results += recs
        torch.cuda.empty_cache()
        save_record(record, args.json)  # the lengths done survive a time limit on the longer ones
    record["complete"] = True
    save_record(record, args.json)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def count_dispatch(fn) -> dict:
    """Run fn() and count what it dispatches: computing ATen ops, our custom ops, and all ATen ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"aten_computing": 0, "aten_all": 0, "custom_ops": 0}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespace = func.namespace
            if namespace == "aten":
                counts["aten_all"] += 1
                counts["aten_computing"] += func._opname not in NON_COMPUTING_OPS
            elif namespace == "atma":
                counts["custom_ops"] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return counts


def count_memory_ops(args, T: int, device: torch.device) -> list[dict]:
    """Dispatch counts of one forward+backward of the chunked path at (1, T, H, d), per state carry."""
    import torch.nn.functional as F

    from .common import interpreting
    from .gated_delta.torch_impl import chunk_gated_delta_rule_torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    H, d = args.heads, args.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q, k = (F.normalize(rnd(1, T, H, d), dim=-1).bfloat16().requires_grad_() for _ in range(2))
    v = rnd(1, T, H, d).bfloat16().requires_grad_()
    g = F.logsigmoid(rnd(1, T, H) + 3.9).requires_grad_()
    beta = torch.sigmoid(rnd(1, T, H)).requires_grad_()
    out = []
    for name, carry in (("memory_torch", "torch"), ("memory_triton_carry", "triton")):
        if carry == "triton" and device.type != "cuda" and not interpreting():
            out.append({"name": name, "T": T, "skipped": "the Triton carry needs a GPU or TRITON_INTERPRET=1"})
            continue

        def step(carry=carry):
            o, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, carry=carry)
            torch.autograd.grad(o, (q, k, v, g, beta), torch.ones_like(o))

        out.append({"name": name, "T": T, "B": 1, "H": H, "d": d, **count_dispatch(step)})
    return out


def count_main(args) -> int:
    """`--count-ops`: print (and write) the dispatch counts of the gated-delta paths; returns 0."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"dispatch counts of one forward+backward, B=1 H={args.heads} d={args.head_dim} bf16 on {device}")
    results = []
    for T in args.seq_lens:
        for rec in count_memory_ops(args, T, device):
            results.append(rec)
            if "skipped" in rec:
                print(f"  T={T} {rec['name']:<22s} skipped: {rec['skipped']}")
            else:
                print(f"  T={T} {rec['name']:<22s} computing ATen ops {rec['aten_computing']:6d}  "
                      f"custom ops {rec['custom_ops']:3d}  all ATen ops {rec['aten_all']:6d}", flush=True)
    save_record({"environment": {"device": str(device), "torch": torch.__version__}, "args": vars(args),
                 "results": results, "complete": True}, args.json)
    return 0


def save_record(record: dict, path: str | None) -> None:
    """Write `record` to `path` as JSON (no-op without a path)."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
