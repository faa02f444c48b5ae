"""Polar attention (SPEC §2.6-§2.8) in Triton: the host side of the kernels in `triton_kernels.py`.

`polar_attention_triton` checks its inputs and calls the torch custom op `atma::polar_triton_fwd`;
its autograd formula calls `atma::polar_triton_bwd`. Both ops have fake implementations, so
`torch.compile` traces through them without a graph break.

Forward: one kernel launch. Backward: three launches. The query-parallel kernel computes the row
terms of SPEC §2.8 steps 1-3 and then dq; the key-parallel kernel computes dk and dv; a per-head
kernel adds up the per-tile partial sums in a fixed order into the gradients of v_null and of
the four raw scalars. The length terms t and nu are computed inside every kernel from the raw
per-head scalars. No atomics, so the two-pass backward is deterministic.

ATMA_POLAR_BWD=one_pass selects the one-pass backward instead. The query-parallel kernel then
computes only the row terms, and the key-parallel kernel also adds dq into an fp32 buffer with
atomic adds (FlashAttention-2's scheme). That is 5 tile products per tile pair instead of 7,
and dq is no longer bit-reproducible.

ATMA_POLAR_BWD=split is the two-pass backward with the row terms in a launch of their own, ahead
of the key-parallel kernel, and dq in another, which reads them back: one more launch, and a dq
kernel whose registers no longer hold the row terms' fp32 tiles (compiled for sm_90 with triton
3.6: no stack at its default tile, against 824 bytes per thread for the fused launch).

The default, ATMA_POLAR_BWD=auto, runs whichever of the two-pass and the split backward is faster
on this GPU: the first backward of each device, dtype, head dim, window flag and power-of-two
bucket of T times both on its own inputs (after each one's tile autotuning) and keeps the faster
for the rest of the process, as triton's autotuner keeps tiles. Both are free of atomics; they
give the same dq, dk and dv bit for bit and differ only in the order in which the per-head sums
are added (v_null and the four scalars, last bits). Without a GPU, under the interpreter or with
ATMA_POLAR_AUTOTUNE=0, "auto" is the two-pass backward.

Program order: the forward, dq and dk/dv kernels start the tiles with the most causal work first
(the last query tiles, the first key tiles), so the short programs fill the last wave;
ATMA_POLAR_SCHEDULE=in_order runs them tile by tile within each (batch, head) instead. The order
changes no result, only when each program runs.

Launch configurations: autotuned among the candidates of the device's launch class;
ATMA_POLAR_AUTOTUNE=0 keeps each class default, and ATMA_POLAR_CONFIG forces one configuration
per kernel (`forced_config`), e.g. to compare every candidate with the oracle.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import triton
from torch import Tensor

from ..common import (
    TRITON_DTYPES,
    autotune_enabled,
    check_launch_device,
    cuda_median_ms,
    device_class,
    forced_launch_configs,
    interpreting,
    tile_launcher,
)
from .triton_kernels import (
    LOG2E,
    polar_bwd_kernel_dkdv,
    polar_bwd_kernel_dq,
    polar_bwd_kernel_heads,
    polar_fwd_kernel,
    polar_length_terms_kernel,
    polar_program_order_kernel,
)

__all__ = [
    "polar_attention_triton",
    "polar_length_terms_triton",
    "polar_program_order_triton",
    "backward_variant",
    "auto_backward_choices",
    "describe_auto_choices",
    "reset_auto_backward",
    "longest_first",
    "launch_candidates",
    "autotune_candidates",
    "forced_config",
    "last_launch_configs",
    "reset_launch_configs",
    "KERNELS",
    "FORCE_ENV",
    "BACKWARD_ENV",
    "BACKWARD_VARIANTS",
    "AUTO_CANDIDATES",
    "SCHEDULE_ENV",
    "SCHEDULES",
]

# Whether the JIT kernels run under the CPU interpreter (read once, at import).
_INTERPRET = interpreting()

# ---------------------------------------------------------------------------------------------
# Launch configurations: (BM, BN, num_warps, num_stages). The forward and dq kernels need
# BM % BN == 0 and the key-parallel kernels (dkdv, onepass) BN % BM == 0 (their tile loops start
# on those boundaries). The first entry of each list is the class default; the rest are
# autotuning candidates. "rows" launches the dq kernel for the row terms alone (the one-pass and
# split backwards; no tile products, so BN is unused).
_CONFIGS_HALF = {
    "large": {
        "fwd": [(128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2),
                (64, 64, 4, 2)],
        "dq": [(64, 32, 8, 2), (128, 32, 8, 2), (128, 32, 4, 3), (128, 64, 8, 2), (32, 32, 4, 2),
               (64, 64, 8, 2)],
        "dkdv": [(32, 64, 8, 1), (16, 64, 8, 2), (32, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 2),
                 (16, 32, 4, 2)],
        "onepass": [(16, 64, 8, 2), (32, 64, 8, 1), (32, 128, 8, 2), (64, 64, 8, 2), (16, 128, 8, 2),
                    (16, 32, 4, 2)],
        "rows": [(32, 16, 8, 1), (16, 16, 4, 1)],
    },
    "mid": {
        "fwd": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        "dq": [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)],
        "dkdv": [(32, 64, 8, 1), (16, 64, 8, 2), (16, 32, 4, 2)],
        "onepass": [(16, 64, 8, 2), (32, 64, 8, 1), (16, 32, 4, 2)],
        "rows": [(32, 16, 8, 1), (16, 16, 4, 1)],
    },
    "small": {
        "fwd": [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        "dq": [(32, 32, 4, 2), (64, 32, 8, 2)],
        "dkdv": [(16, 32, 4, 2), (32, 64, 8, 1)],
        "onepass": [(16, 32, 4, 2), (32, 64, 8, 1)],
        "rows": [(16, 16, 4, 1), (32, 16, 8, 1)],
    },
}
# fp32 operands take twice the registers and shared memory of bf16 ones.
_CONFIGS_FP32 = {
    "fwd": [(32, 32, 4, 2), (64, 32, 4, 2)],
    "dq": [(32, 16, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(16, 32, 8, 1), (16, 32, 4, 2)],
    "onepass": [(16, 32, 8, 1), (16, 32, 4, 2)],
    "rows": [(16, 16, 4, 1), (32, 16, 8, 1)],
}
# One small configuration under the interpreter: tiles smaller than the test sequences, with
# BM != BN so that every loop boundary case is exercised.
_CONFIG_INTERPRET = {"fwd": (32, 16, 1, 1), "dq": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "onepass": (32, 64, 1, 1),
                     "rows": (16, 16, 1, 1)}
KERNELS = ("fwd", "dq", "dkdv", "onepass", "rows")
# The JIT kernel each launch kind runs, and the constexprs that separate its autotuning caches.
_KIND_KERNEL = {"fwd": polar_fwd_kernel, "dq": polar_bwd_kernel_dq, "dkdv": polar_bwd_kernel_dkdv,
                "onepass": polar_bwd_kernel_dkdv, "rows": polar_bwd_kernel_dq}
_TUNE_KEYS = {"fwd": ["D", "HAS_WINDOW", "T_BUCKET"], "dq": ["D", "HAS_WINDOW", "T_BUCKET", "ROW_TERMS"],
              "dkdv": ["D", "HAS_WINDOW", "T_BUCKET"], "onepass": ["D", "HAS_WINDOW", "T_BUCKET"],
              "rows": ["D", "HAS_WINDOW", "T_BUCKET"]}
# Forces one launch configuration per named kernel, in place of autotuning (or of the interpreter's
# configuration), e.g. ATMA_POLAR_CONFIG="fwd=128,64,8,2;dq=64,32,8,2;dkdv=32,64,8,1".
FORCE_ENV = "ATMA_POLAR_CONFIG"
# The backward variant: "auto" (default: the faster of the deterministic two, timed on first use),
# "two_pass", "one_pass" or "split".
BACKWARD_ENV = "ATMA_POLAR_BWD"
BACKWARD_VARIANTS = ("two_pass", "one_pass", "split")
# What "auto" times and picks from: the variants without atomics (every gradient bit-reproducible).
AUTO_CANDIDATES = ("two_pass", "split")
# "auto"'s pick per (device, dtype, head dim, window flag, T bucket): (variant, {variant: ms} or None).
_AUTO_CHOICES: dict[tuple, tuple[str, dict[str, float] | None]] = {}
# The order in which the programs of the forward, dq and dk/dv kernels start: "longest_first" (default;
# the tiles with the most causal work first) or "in_order" (tile by tile within each (batch, head)).
SCHEDULE_ENV = "ATMA_POLAR_SCHEDULE"
SCHEDULES = ("longest_first", "in_order")
_TUNED: dict = {}
# (BM, BN, num_warps, num_stages) of each launch kind's latest launch in this process.
_LAST_CONFIGS: dict[str, tuple[int, int, int, int]] = {}


def _key_parallel(kind: str) -> bool:
    return kind in ("dkdv", "onepass")


def _tiles_fit(kind: str, bm: int, bn: int) -> bool:
    """Whether the tile loops of `kind` can start on these boundaries (see the launch tables above)."""
    return (bn % bm == 0) if _key_parallel(kind) else (bm % bn == 0)


def launch_candidates(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> list:
    """Return every autotuning candidate (BM, BN, warps, stages) of one kernel, the class default first."""
    if dtype == torch.float32:
        cands = _CONFIGS_FP32[kind]
    else:
        cls = device_class(device, "ATMA_POLAR_TRITON_PROFILE")
        cands = _CONFIGS_HALF["small" if d > 128 else cls][kind]
    if d > 128:  # [BM, D] / [BN, D] tiles with D = 256 need half the rows
        cands = [(max(bm // 2, 16), max(bn // 2, 16), w, s) for bm, bn, w, s in cands]
    for bm, bn, _, _ in cands:
        assert _tiles_fit(kind, bm, bn), (kind, bm, bn)
    return list(cands)


def autotune_candidates(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> tuple:
    """The candidates autotuning runs: all of them, or the class default alone when ATMA_POLAR_AUTOTUNE=0."""
    cands = launch_candidates(kind, device, dtype, d)
    return tuple(cands if autotune_enabled("ATMA_POLAR_AUTOTUNE") else cands[:1])


def forced_config(kind: str) -> tuple[int, int, int, int] | None:
    """Return the launch configuration ATMA_POLAR_CONFIG forces on `kind`, or None."""
    config = forced_launch_configs(FORCE_ENV, KERNELS).get(kind)
    if config is None:
        return None
    bm, bn, warps, _ = config
    if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1) or warps & (warps - 1) or not _tiles_fit(kind, bm, bn):
        need = "BN % BM == 0" if _key_parallel(kind) else "BM % BN == 0"
        raise ValueError(
            f"{FORCE_ENV}: {kind}={','.join(map(str, config))} needs BM, BN powers of two >= 16 with {need} "
            "and a power-of-two warp count"
        )
    return config


def backward_variant() -> str:
    """Return the backward variant ATMA_POLAR_BWD selects: "auto" (default), "two_pass", "one_pass" or "split"."""
    value = os.environ.get(BACKWARD_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", *BACKWARD_VARIANTS):
        raise ValueError(f"{BACKWARD_ENV} must be one of auto, {', '.join(BACKWARD_VARIANTS)}; got {value!r}")
    return value


def auto_backward_choices() -> dict[tuple, tuple[str, dict[str, float] | None]]:
    """What ATMA_POLAR_BWD=auto picked so far: {(device, dtype, head dim, windowed, T bucket): (variant, {variant:
    median ms} or None where nothing was timed)}."""
    return dict(_AUTO_CHOICES)


def describe_auto_choices() -> list[dict]:
    """ATMA_POLAR_BWD=auto's picks for reports: per shape, {"shape": "cuda:0 bfloat16 d=128 T<=2048" (", windowed"
    where a window applies), "chosen": variant, "ms": {variant: median ms} or None, "text": one line of all three}."""
    out = []
    for (device, dtype, d, windowed, bucket), (chosen, times) in _AUTO_CHOICES.items():
        shape = f"{device} {str(dtype).replace('torch.', '')} d={d} T<={bucket}" + (", windowed" if windowed else "")
        timed = ", ".join(f"{variant} {ms:.3f} ms" for variant, ms in (times or {}).items())
        out.append({"shape": shape, "chosen": chosen, "ms": times,
                    "text": f"{shape}: {chosen}" + (f" (timed on first use: {timed})" if timed else " (nothing timed)")})
    return out


def reset_auto_backward() -> None:
    """Forget the picks of ATMA_POLAR_BWD=auto (the next backward of each shape times the candidates again)."""
    _AUTO_CHOICES.clear()


def _device_ms(fn, reps: int = 3) -> float:
    """Median device milliseconds of `fn` over `reps` calls, after one untimed call (it autotunes the launches'
    tiles on first use)."""
    return cuda_median_ms(fn, reps, 1)


def _can_time(q: Tensor) -> bool:
    """Whether "auto" times its candidates for q: on a GPU (not under the interpreter), with autotuning on."""
    return not _INTERPRET and q.device.type == "cuda" and autotune_enabled("ATMA_POLAR_AUTOTUNE")


def _auto_variant(q: Tensor, window: int | None, run) -> str:
    """The variant ATMA_POLAR_BWD=auto runs for q's shape: on a GPU, with autotuning on, the faster of
    AUTO_CANDIDATES, timed once per key by `run(variant)` on the call's own inputs; else two-pass."""
    key = (str(q.device), q.dtype, q.shape[3], window is not None, _t_bucket(q.shape[1]))
    if key not in _AUTO_CHOICES:
        if not _can_time(q):
            _AUTO_CHOICES[key] = ("two_pass", None)
        else:
            times, failures = {}, {}
            for variant in AUTO_CANDIDATES:
                try:
                    times[variant] = _device_ms(lambda variant=variant: run(variant))
                except Exception as exc:  # e.g. no tile of a variant fits this GPU: the others still can run
                    failures[variant] = exc
            if not times:
                raise next(iter(failures.values()))
            for variant, exc in failures.items():
                warnings.warn(f"ATMA_POLAR_BWD=auto: the {variant} Polar backward failed on its first use here "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it is left "
                              "out", stacklevel=2)
            _AUTO_CHOICES[key] = (min(times, key=times.get), times)
    return _AUTO_CHOICES[key][0]


def longest_first() -> bool:
    """Whether ATMA_POLAR_SCHEDULE starts the heaviest tiles first ("longest_first", the default) or runs
    them in order ("in_order")."""
    value = os.environ.get(SCHEDULE_ENV, "longest_first").strip().lower() or "longest_first"
    if value not in SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV} must be one of {', '.join(SCHEDULES)}; got {value!r}")
    return value == "longest_first"


def last_launch_configs() -> dict[str, tuple[int, int, int, int]]:
    """The (BM, BN, num_warps, num_stages) each launch kind ran with last in this process: autotuned, forced
    or the interpreter's; `reset_launch_configs` starts the record afresh."""
    return dict(_LAST_CONFIGS)


def reset_launch_configs() -> None:
    """Forget the launches `last_launch_configs` reports."""
    _LAST_CONFIGS.clear()


def _fixed_config(kind: str) -> tuple[int, int, int, int] | None:
    """The configuration `kind` launches without autotuning: forced, or the interpreter's; else None."""
    return forced_config(kind) or (_CONFIG_INTERPRET[kind] if _INTERPRET else None)


def _smallest_tile(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> int:
    """The smallest tile along the parallel axis (BM, or BN for key-parallel kinds) a launch may pick."""
    axis = 1 if _key_parallel(kind) else 0
    fixed = _fixed_config(kind)
    configs = [fixed] if fixed is not None else autotune_candidates(kind, device, dtype, d)
    return min(c[axis] for c in configs)


def _launcher(kernel, name: str, device: torch.device, dtype: torch.dtype, d: int):
    """Return a callable kernel[grid](...) that picks the block sizes (autotuned on a GPU unless
    forced) and returns the (BM, BN) it launched with."""
    fixed = _fixed_config(name)
    cands = autotune_candidates(name, device, dtype, d) if fixed is None else ()
    # The one-pass kernel adds into dq_acc: each timed trial starts from zero.
    launch = tile_launcher(kernel, ("BM", "BN"), fixed, cands, key=_TUNE_KEYS[name], cache=_TUNED,
                           cache_key=(name, cands), reset_to_zero=["dq_acc"] if name == "onepass" else None)

    def run(grid, *args, **kw):
        config = launch(grid, *args, **kw)
        _LAST_CONFIGS[name] = tuple(config)
        return config[0], config[1]

    return run


def _t_bucket(T: int) -> int:
    """Autotuning key for the sequence length: the next power of two (min 256)."""
    return max(256, triton.next_power_of_2(T))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get fp32-accurate products: three TF32 tensor-core passes (no plain TF32)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Launches.


def _polar_fwd(q, k, v, v_null, params, window: int | None, save: bool):
    """Launch the forward kernel; returns (direction, magnitude, s, m, l, q2), the last four empty
    (zero elements) unless `save`."""
    B, T, H, D = q.shape
    G = k.shape[2]
    direction = torch.empty_like(q)
    magnitude = torch.empty((B, T, H), device=q.device, dtype=q.dtype)
    if save:
        s = torch.empty((B, T, H, D), device=q.device, dtype=torch.float32)
        m, l, q2 = (torch.empty((B, T, H), device=q.device, dtype=torch.float32) for _ in range(3))
    else:
        s, m, l, q2 = (q.new_empty(0, dtype=torch.float32) for _ in range(4))
    run = _launcher(polar_fwd_kernel, "fwd", q.device, q.dtype, D)
    run(
        lambda meta: (triton.cdiv(T, meta["BM"]) * B * H,),
        q, k, v, v_null, *params, direction, magnitude,
        *((s, m, l, q2) if save else (direction,) * 4),  # never written when SAVE is off
        T, H, G, window or 0, LOG2E / math.sqrt(D), _t_bucket(T),
        D=D, HAS_WINDOW=window is not None, SAVE=save,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_INTERPRET, LONGEST_FIRST=longest_first(),
    )
    return direction, magnitude, s, m, l, q2


def _polar_bwd(g_dir, g_mag, q, k, v, v_null, params, s, m, l, q2, window: int | None, variant: str):
    """Launch the backward kernels of `variant` ("auto": see `_auto_variant`); returns the gradients of
    (q, k, v, v_null, *params)."""
    if variant == "auto":
        variant = _auto_variant(q, window, lambda v_: _polar_bwd(g_dir, g_mag, q, k, v, v_null, params, s, m, l, q2,
                                                                 window, v_))
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"the Polar backward variant must be one of auto, {', '.join(BACKWARD_VARIANTS)}; "
                         f"got {variant!r}")
    B, T, H, D = q.shape
    G = k.shape[2]
    dev, f32 = q.device, torch.float32
    one_pass = variant == "one_pass"
    g_dir, g_mag = g_dir.contiguous(), g_mag.contiguous()
    common = dict(D=D, HAS_WINDOW=window is not None, DOT_PREC=_dot_precision(q.dtype), UPCAST=_INTERPRET,
                  LONGEST_FIRST=longest_first())
    scalars = (T, H, G, window or 0, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), _t_bucket(T))

    # Row terms (and, two-pass, dq). g_s goes to the key-parallel kernel in the io dtype.
    gs = torch.empty_like(q)
    gl, gq2 = (torch.empty((B, T, H), device=dev, dtype=f32) for _ in range(2))
    # One slot of per-head partial sums per (batch, query tile, head); sized for the smallest tile
    # the launch may pick, and only the slots of the tile it picks are read.
    rows_kind = "dq" if variant == "two_pass" else "rows"
    slots = B * triton.cdiv(T, _smallest_tile(rows_kind, dev, q.dtype, D))
    part_s = torch.empty((slots, H, 4), device=dev, dtype=f32)
    part_v = torch.empty((slots, H, D), device=dev, dtype=f32)
    if one_pass:
        dq = torch.zeros(q.shape, device=dev, dtype=f32)  # atomic adds land here
    else:
        dq = torch.empty_like(q)

    def query_parallel(kind: str, sums: torch.Tensor, **flags) -> int:
        """Launch the query-parallel kernel as `kind`, its per-head sums into `sums`; returns its BM."""
        run = _launcher(polar_bwd_kernel_dq, kind, dev, q.dtype, D)
        bm, _ = run(lambda meta: (triton.cdiv(T, meta["BM"]) * B * H,),
                    q, k, v, v_null, *params, s, m, l, q2, g_dir, g_mag, gs, gl, gq2, dq, sums, part_v,
                    *scalars, **flags, **common)
        return bm

    bm = query_parallel(rows_kind, part_s, DQ_LOOP=variant == "two_pass", ROW_TERMS=True)

    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kind = "onepass" if one_pass else "dkdv"
    if variant == "two_pass":
        part_t = gl  # never touched by the two-pass kernels
    else:  # the temperature sums of the launch with the dq products (one-pass: key tiles, split: query tiles)
        tiles = triton.cdiv(T, _smallest_tile(kind if one_pass else "dq", dev, q.dtype, D))
        part_t = torch.empty((B * tiles, H), device=dev, dtype=f32)
    null_base, null_slope_raw, len_gain_raw, _ = params
    run = _launcher(polar_bwd_kernel_dkdv, kind, dev, q.dtype, D)
    _, bn = run(lambda meta: (triton.cdiv(T, meta["BN"]) * B * G,),
                q, k, v, null_base, null_slope_raw, len_gain_raw, gs, m, gl, gq2, dk, dv, dq, part_t,
                *scalars, ONE_PASS=one_pass, **common)
    temperature_slots = B * triton.cdiv(T, bn) if one_pass else 0
    if variant == "split":
        # the dq loop alone: it reads g_s, g_L and g_Q2 back and writes only the temperature sums
        temperature_slots = B * triton.cdiv(T, query_parallel("dq", part_t, DQ_LOOP=True, ROW_TERMS=False))

    d_v_null = torch.empty_like(v_null)
    d_params = [torch.empty_like(p) for p in params]
    polar_bwd_kernel_heads[(H,)](
        part_s, part_v, part_t, *params[1:], d_v_null, *d_params, B * triton.cdiv(T, bm), temperature_slots, H,
        D=D, RB=16 if _INTERPRET else 32, num_warps=4,
    )
    if one_pass and dq.dtype != q.dtype:
        dq = dq.to(q.dtype)
    return dq, dk, dv, d_v_null, *d_params


def polar_length_terms_triton(T: int, window: int | None, null_base, null_slope_raw, len_gain_raw):
    """The temperature t and null floor nu [H, T] as the kernels compute them in-kernel (fp32).

    It runs the kernels' own `_length_terms`; tests compare it with
    `kernels.common.numerics.polar_length_terms`.
    """
    H = null_base.shape[0]
    t = torch.empty((H, T), device=null_base.device, dtype=torch.float32)
    nu = torch.empty_like(t)
    bt = 64
    polar_length_terms_kernel[(triton.cdiv(T, bt), H)](
        null_base, null_slope_raw, len_gain_raw, t, nu, T, H, window or 0,
        HAS_WINDOW=window is not None, BT=bt,
    )
    return t, nu


def polar_program_order_triton(T: int, tile: int, slices: int, *, key_tiles: bool, device=None) -> Tensor:
    """The (tile, slice) int32 [programs, 2] that each program id of a grid of ceil(T / tile) * slices owns, in
    the order ATMA_POLAR_SCHEDULE sets: the mapping of the key-parallel kernels or of the query-parallel ones."""
    programs = triton.cdiv(T, tile) * slices
    out = torch.empty((programs, 2), device=device, dtype=torch.int32)
    polar_program_order_kernel[(programs,)](out, T, TILE=tile, KEY_TILES=key_tiles, LONGEST_FIRST=longest_first())
    return out


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake implementations for tracing.


@torch.library.custom_op("atma::polar_triton_fwd", mutates_args=())
def polar_triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, v_null: Tensor, null_base: Tensor, null_slope_raw: Tensor,
    len_gain_raw: Tensor, mag_beta_raw: Tensor, window: Optional[int], save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward kernel: (direction, magnitude, s, M, L, Q2); the statistics are empty unless `save`."""
    params = (null_base, null_slope_raw, len_gain_raw, mag_beta_raw)
    return _polar_fwd(q, k, v, v_null, params, window, save)


@polar_triton_fwd.register_fake
def _polar_triton_fwd_fake(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window, save):
    B, T, H, D = q.shape
    stats = (B, T, H) if save else (0,)
    return (
        q.new_empty(q.shape), q.new_empty((B, T, H)),
        q.new_empty((B, T, H, D) if save else (0,), dtype=torch.float32),
        *(q.new_empty(stats, dtype=torch.float32) for _ in range(3)),
    )


@torch.library.custom_op("atma::polar_triton_bwd", mutates_args=())
def polar_triton_bwd(
    g_dir: Tensor, g_mag: Tensor, q: Tensor, k: Tensor, v: Tensor, v_null: Tensor, null_base: Tensor,
    null_slope_raw: Tensor, len_gain_raw: Tensor, mag_beta_raw: Tensor, s: Tensor, m: Tensor, l: Tensor,
    q2: Tensor, window: Optional[int], variant: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: the gradients of (q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw)."""
    params = (null_base, null_slope_raw, len_gain_raw, mag_beta_raw)
    return _polar_bwd(g_dir, g_mag, q, k, v, v_null, params, s, m, l, q2, window, variant)


@polar_triton_bwd.register_fake
def _polar_triton_bwd_fake(g_dir, g_mag, q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw,
                           s, m, l, q2, window, variant):
    return tuple(torch.empty_like(x) for x in (q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw))


def _setup_context(ctx, inputs, output):
    q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, window, save = inputs
    _, _, s, m, l, q2 = output
    # The statistics get no gradient, and no zero-filled one is made for them.
    ctx.mark_non_differentiable(s, m, l, q2)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, s, m, l, q2)
    ctx.window, ctx.save = window, save


def _backward(ctx, g_dir, g_mag, *_):
    if not ctx.save:
        raise RuntimeError("polar_attention_triton: the forward ran without saving statistics for a backward "
                           "(no input required grad, or grad mode was off)")
    saved = ctx.saved_tensors
    q = saved[0]
    if g_dir is None:  # only the magnitude was used
        g_dir = torch.zeros_like(q)
    if g_mag is None:  # only the direction was used
        g_mag = q.new_zeros(q.shape[:3])
    grads = torch.ops.atma.polar_triton_bwd(g_dir, g_mag, *saved, ctx.window, backward_variant())
    return (*grads, None, None)


polar_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry.


def _check_inputs(q, k, v, v_null, params, window) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q must be (B, T, H, d) and k, v (B, T, G, d)")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(
            f"k and v must be (B, T, G, d) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    G = k.shape[2]
    if G == 0 or H % G != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton Polar kernel needs a head dim that is a power of two >= 16, got {D}")
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(v_null.shape) != (H, D) or any(tuple(p.shape) != (H,) for p in params):
        raise ValueError(f"v_null must be ({H}, {D}) and the four per-head scalars ({H},)")
    if not all(p.is_floating_point() and p.device == q.device for p in (v_null, *params)):
        raise ValueError("v_null and the four per-head scalars must be floating point, on the device of q")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be a positive integer or None, got {window}")
    check_launch_device(q, _INTERPRET, "polar_attention_triton")


def polar_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_null: torch.Tensor,
    null_base: torch.Tensor,
    null_slope_raw: torch.Tensor,
    len_gain_raw: torch.Tensor,
    mag_beta_raw: torch.Tensor,
    *,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar attention (SPEC §2.6) in Triton: q [B,T,H,d], k, v [B,T,G,d] -> (direction [B,T,H,d], mu [B,T,H])."""
    params = (null_base, null_slope_raw, len_gain_raw, mag_beta_raw)
    _check_inputs(q, k, v, v_null, params, window)
    B, T, H, D = q.shape
    if q.numel() == 0:
        return q.new_empty(q.shape), q.new_empty((B, T, H))
    if window is not None and int(window) >= T:
        window = None  # a window covering the whole sequence changes neither the band nor the count
    window = None if window is None else int(window)
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(), v_null.contiguous(), *(p.contiguous() for p in params))
    # Statistics for the backward are written only when a gradient can be asked for.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    direction, magnitude, *_ = torch.ops.atma.polar_triton_fwd(*inputs, window, save)
    return direction, magnitude
