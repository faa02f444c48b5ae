"""Compile the Polar Triton kernels for an NVIDIA architecture without a GPU, and report each
kernel's registers, spills and shared memory.

    python -m kernels.polar.compile_report [--arch 90] [--dtype bf16] [--head-dim 128] [--profile large]

Each kernel is compiled in its launch class's default configuration (the first candidate of
`triton_impl.launch_candidates`), without a window, with `triton.compile` for
`GPUTarget("cuda", arch, 32)`. The bundled `cuobjdump` then reads the register count, the stack and
local (spill) bytes and the static shared memory from the cubin. Triton's dynamic shared memory
is `metadata.shared`. The figures hold for the triton installed here, which may differ from the
GPU machine's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..common.cubin import resource_usage

__all__ = ["compile_kernel", "resource_usage", "report", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointer arguments in the io dtype (q, k, v and what is laid out like them); the rest are fp32.
_IO_POINTERS = {"q", "k", "v", "o", "mu", "g_dir", "g_mag", "gs", "dk", "dv"}
_INT_SCALARS = {"T", "H", "G", "WINDOW", "T_BUCKET", "R", "R_T"}
_FLOAT_SCALARS = {"qk_scale", "inv_sqrt_d"}


def _signature(kernel, io: str, dq_io: bool) -> dict:
    """Triton signature of `kernel`: pointers in the io dtype or fp32, i32 / fp32 scalars, constexprs."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in _INT_SCALARS:
            sig[name] = "i32"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in _IO_POINTERS or (name == "dq" and dq_io):
            sig[name] = "*" + io
        else:
            sig[name] = "*fp32"
    return sig


def _kernel_cases(dtype: torch.dtype, d: int) -> list:
    """(label, kernel, constexprs, launch options, dq in the io dtype) for every launch of one
    forward and the three backward variants, each in its class default configuration."""
    from . import triton_impl as impl
    from .triton_kernels import polar_bwd_kernel_dkdv, polar_bwd_kernel_dq, polar_bwd_kernel_heads, polar_fwd_kernel

    def default(kind):
        bm, bn, warps, stages = impl.launch_candidates(kind, torch.device("cuda"), dtype, d)[0]
        return dict(BM=bm, BN=bn), dict(num_warps=warps, num_stages=stages), (bm, bn, warps, stages)

    common = dict(D=d, HAS_WINDOW=False, DOT_PREC=impl._dot_precision(dtype), UPCAST=False, LONGEST_FIRST=True)
    cases = []
    tiles, opts, cfg = default("fwd")
    cases.append((f"fwd {cfg}", polar_fwd_kernel, {**common, **tiles, "SAVE": True}, opts, True))
    tiles, opts, cfg = default("dq")
    cases.append((f"dq + row terms {cfg}", polar_bwd_kernel_dq, {**common, **tiles, "DQ_LOOP": True, "ROW_TERMS": True},
                  opts, True))
    cases.append((f"dq alone (split) {cfg}", polar_bwd_kernel_dq,
                  {**common, **tiles, "DQ_LOOP": True, "ROW_TERMS": False}, opts, True))
    tiles, opts, cfg = default("rows")
    cases.append((f"row terms (one-pass, split) {cfg}", polar_bwd_kernel_dq,
                  {**common, **tiles, "DQ_LOOP": False, "ROW_TERMS": True}, opts, False))
    tiles, opts, cfg = default("dkdv")
    cases.append((f"dkdv {cfg}", polar_bwd_kernel_dkdv, {**common, **tiles, "ONE_PASS": False}, opts, True))
    tiles, opts, cfg = default("onepass")
    cases.append((f"onepass {cfg}", polar_bwd_kernel_dkdv, {**common, **tiles, "ONE_PASS": True}, opts, False))
    cases.append(("heads (32 rows, 4 warps)", polar_bwd_kernel_heads, dict(D=d, RB=32), dict(num_warps=4), True))
    return cases


def compile_kernel(kernel, constexprs: dict, options: dict, *, io: str, dq_io: bool, arch: int):
    """Compile one JIT kernel for GPUTarget("cuda", arch, 32); returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=_signature(kernel, io, dq_io), constexprs=constexprs)
    # FP fusion (FMA contraction) on, as the launches on a GPU compile by default.
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": True, **options})


def report(arch: int, dtype: torch.dtype, d: int) -> list[dict]:
    """Compile every Polar kernel launch in its default configuration; return one record per launch."""
    io = _TRITON_TYPE[dtype]
    records = []
    for label, kernel, constexprs, options, dq_io in _kernel_cases(dtype, d):
        start = time.time()
        compiled = compile_kernel(kernel, constexprs, options, io=io, dq_io=dq_io, arch=arch)
        records.append({"kernel": label, "seconds": round(time.time() - start, 1), **resource_usage(compiled)})
    return records


def main(argv=None) -> int:
    """Print the compile report; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m kernels.polar.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="q, k, v dtype (default: bf16)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    parser.add_argument("--profile", choices=("large", "mid", "small"), default="large",
                        help="launch class whose default configurations are compiled (default: large)")
    args = parser.parse_args(argv)
    os.environ["ATMA_POLAR_TRITON_PROFILE"] = args.profile
    import triton

    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, d={args.head_dim}, class {args.profile}, "
          "no window; bytes per thread for stack/local, per block for shared")
    for rec in report(args.arch, _DTYPES[args.dtype], args.head_dim):
        print(f"  {rec['kernel']:<44s} regs {rec['reg']:3d}  spill(local) {rec['local']:5d}  stack {rec['stack']:5d}  "
              f"shared dynamic {rec['dynamic_shared']:6d} static {rec['shared']:5d}  ({rec['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
