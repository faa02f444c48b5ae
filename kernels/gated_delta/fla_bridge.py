"""Bridge to flash-linear-attention's chunked gated delta rule (SPEC §4.7), with a safety guard.

flash-linear-attention (FLA) computes the gated delta rule of SPEC §4.4 in the same layout as
the `kernels.gated_delta_rule` contract: q, k [B, T, H, dk], v [B, T, H, dv], g (log-decay) and
beta [B, T, H], state [B, H, dk, dv]. FLA releases up to 0.6.x compute wrong gradients for the
gated backward on Hopper GPUs (compute capability 9.x) with triton < 3.7.1 (a triton
miscompilation, flash-linear-attention#640); `fla_is_usable` refuses that combination for any
call that will be differentiated, so that training never runs on known-wrong gradients, and the
caller falls back to the PyTorch path, unless FLA's own fix for it is in place: with `tilelang`
installed (and a CUDA toolkit's nvcc), FLA runs the affected kernel in its TileLang backend.
Forward-only calls (evaluation) keep FLA there: the bug is in the backward. `ATMA_FLA=0` turns the
bridge off. `fla_timing_only()` lets a benchmark time FLA's backward on such a machine anyway (the
figure a fresh install gets), lifting FLA 0.6's own run-time refusal there for the block; the
trainer refuses to start while it is active.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import warnings

import torch

__all__ = [
    "fla_gated_delta_rule", "fla_guard_reason", "fla_is_usable", "fla_refusal", "fla_tilelang_fix",
    "fla_timing_only", "fla_timing_only_active",
]

_WARNED = False
_USABLE: dict = {}
_TIMING_ONLY = False


def _release(version: str) -> tuple[int, int, int, bool]:
    """Parse "3.7.1", "3.7.1+git4b2c", "0.6.0rc1" into (major, minor, patch, is_prerelease)."""
    public = version.strip().split("+")[0]
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)", public)
    if match is None:
        raise ValueError(f"cannot parse version {version!r}")
    major, minor, patch, rest = match.groups()
    pre = bool(re.match(r"[.\-_]?(a|b|c|rc|alpha|beta|pre|preview|dev)", rest.lower()))
    return int(major), int(minor or 0), int(patch or 0), pre


def _older_than(version: str, bound: tuple[int, int, int]) -> bool:
    """Return True when `version` sorts before `bound` (a pre-release of `bound` counts as older)."""
    major, minor, patch, pre = _release(version)
    return (major, minor, patch) < bound or ((major, minor, patch) == bound and pre)


def fla_guard_reason(
    fla_version: str | None,
    triton_version: str | None,
    capability: tuple[int, int] | None,
    *,
    backward: bool = True,
    tilelang: bool = False,
) -> str | None:
    """Return why FLA must not be used for this (FLA version, triton version, GPU capability), or None.

    `backward=False` asks about a forward-only call, which the Hopper gradient bug does not touch.
    `tilelang=True`: FLA runs the kernel the bug is in (`chunk_bwd_dqkwg`) in its TileLang backend,
    FLA's own fix for that combination, so its backward is safe there too.
    """
    if fla_version is None:
        return "flash-linear-attention is not installed (or failed to import)"
    if capability is None:
        return "flash-linear-attention needs a CUDA device"
    if backward and _hopper_bug_applies(fla_version, triton_version, capability) and not tilelang:
        return (
            f"flash-linear-attention {fla_version} computes wrong gated-delta gradients on Hopper "
            f"(compute capability {capability[0]}.{capability[1]}) with triton {triton_version} < 3.7.1 "
            "(flash-linear-attention#640); torch >= 2.13 installs a triton with the fix, or installing "
            "tilelang (with a CUDA toolkit's nvcc) lets FLA run the affected kernel in TileLang (on an H200 "
            "one memory layer's forward and backward took 4.1 ms in FLA's kernels, 26 ms on the chunked path)"
        )
    return None


def _hopper_bug_applies(fla_version: str | None, triton_version: str | None, capability) -> bool:
    """True for FLA <= 0.6.x on Hopper with triton < 3.7.1: the combination of flash-linear-attention#640."""
    return (fla_version is not None and capability is not None and capability[0] == 9
            and _older_than(fla_version, (0, 7, 0))
            and (triton_version is None or _older_than(triton_version, (3, 7, 1))))


def _tilelang_runs_the_affected_kernel() -> bool:
    """Whether FLA's dispatch will send `chunk_bwd_dqkwg` (the kernel of #640) to its TileLang backend.

    Mirrors FLA's own choice: backend dispatch on (FLA_DISABLE_BACKEND_DISPATCH unset), tilelang importable
    with a usable nvcc, and the backend enabled (FLA_TILELANG; on by default on Hopper with triton >= 3.4).
    """
    if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1":
        return False
    try:
        import fla.backends
        from fla.ops.common.backends import CommonTileLangBackend

        if getattr(fla.backends, "_DISPATCH_DISABLED", False):
            return False
        if not hasattr(CommonTileLangBackend, "chunk_bwd_dqkwg"):  # a release whose fix covers another kernel
            return False
        return bool(CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled())
    except Exception:  # FLA absent, broken, or laid out otherwise: no fix known to be in place
        return False


def fla_tilelang_fix(capability: tuple[int, int] | None) -> bool:
    """True where the installed FLA has the Hopper gradient bug and runs the affected kernel in TileLang instead."""
    return (_hopper_bug_applies(_installed_fla_version(), _triton_version(), capability)
            and _tilelang_runs_the_affected_kernel())


def fla_refusal(capability: tuple[int, int] | None, *, backward: bool = True) -> str | None:
    """Why the installed FLA must not run here (a GPU of `capability`; None: no CUDA device), or None."""
    tilelang = backward and fla_tilelang_fix(capability)
    return fla_guard_reason(_installed_fla_version(), _triton_version(), capability, backward=backward,
                            tilelang=tilelang)


def _installed_fla_version() -> str | None:
    try:
        import fla  # noqa: F401
    except Exception:  # an installed but broken FLA (missing triton, CUDA init errors) counts as absent
        return None
    version = getattr(fla, "__version__", None)
    if version is None:
        from importlib import metadata

        for dist in ("flash-linear-attention", "fla-core"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return "0"
    return str(version)


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return str(triton.__version__)


def _warn_once(reason: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"gated-delta memory uses the PyTorch chunked path: {reason}.", RuntimeWarning, stacklevel=3
        )


@contextlib.contextmanager
def fla_timing_only():
    """Within this block FLA runs wherever it is installed and a CUDA device is present, even where its
    gradients are known to be wrong: for timing only, never for training."""
    global _TIMING_ONLY
    previous, _TIMING_ONLY = _TIMING_ONLY, True
    try:
        with _fla_refusal_lifted():
            yield
    finally:
        _TIMING_ONLY = previous


# FLA 0.6 refuses the gated backward itself on Hopper with triton < 3.7.1: `chunk_bwd_dqkwg` raises
# when this flag of its module (imported from fla.utils at import time) is False.
_FLA_REFUSAL = ("fla.ops.common.chunk_o", "TRITON_ABOVE_3_7_1")


@contextlib.contextmanager
def _fla_refusal_lifted():
    """Lift FLA's own run-time refusal of its Hopper backward for the block (timing only)."""
    module_name, flag = _FLA_REFUSAL
    try:
        module = importlib.import_module(module_name)
    except Exception:  # FLA absent or broken: nothing to lift, and the guard keeps FLA off anyway
        module = None
    if module is None or not hasattr(module, flag):
        yield
        return
    saved = getattr(module, flag)
    setattr(module, flag, True)
    try:
        yield
    finally:
        setattr(module, flag, saved)


def fla_timing_only_active() -> bool:
    """True inside `fla_timing_only()`."""
    return _TIMING_ONLY


def fla_is_usable(device: torch.device | str, *, backward: bool = True) -> bool:
    """Return True when FLA may run the gated delta rule on `device`; warns once per process otherwise.

    `backward=False`: the call will not be differentiated (evaluation), so only the forward must be safe.
    """
    if os.environ.get("ATMA_FLA", "1").strip() == "0":
        return False
    device = torch.device(device)
    key = (device.type, device.index, backward)
    if key not in _USABLE:
        capability = None
        if device.type == "cuda" and torch.cuda.is_available():
            index = device.index if device.index is not None else torch.cuda.current_device()
            capability = tuple(torch.cuda.get_device_capability(index))
        _USABLE[key] = fla_refusal(capability, backward=backward)
    reason = _USABLE[key]
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    if reason is not None and _TIMING_ONLY and on_gpu and _installed_fla_version() is not None:
        return True
    if reason is not None:
        _warn_once(reason)
        return False
    return True


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule via FLA's chunk kernel: q, k [B,T,H,dk] (unit norm), v [B,T,H,dv] -> (o, state [B,H,dk,dv])."""
    if q.dtype == torch.float32:
        # FLA's chunk kernels take bf16/fp16 only; fp32 callers get the fp32 chunked path (its
        # state carried by the Triton kernels where the Triton backend applies).
        from ..dispatch import kernel_backend
        from .torch_impl import chunk_gated_delta_rule_torch

        return chunk_gated_delta_rule_torch(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            carry=kernel_backend(q.device),
        )
    o, final_state, _, _ = _fla_fwd(q, k, v, g.float(), beta, initial_state, output_final_state)
    return o, (final_state if output_final_state else None)


# FLA's chunk kernels behind two custom ops, so a compiled block traces them as single calls
# (FLA's public entry point is wrapped in @torch.compiler.disable, which would break the graph).
# They chain FLA's own host functions, the ones its autograd.Function calls, with FLA's
# defaults: chunk size 64, scale 1 (the queries are already normalised), no varlen.
_FLA_CHUNK = 64


def _on_device(x: torch.Tensor):
    """FLA's launches go to the current CUDA device: make it x's (nothing to do off CUDA, e.g. the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("atma::gated_delta_fla_fwd", mutates_args=())
def _fla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None, output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FLA forward: o, the final state (empty unless asked for), the chunk-local cumulative g and A."""
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd

    # FLA's kernels index every tensor as dense: the host functions do not make them so themselves.
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    initial_state = None if initial_state is None else initial_state.contiguous()
    with _on_device(q):
        g_cum, o, A, final_state, *_ = chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=1.0, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=_FLA_CHUNK,
        )
    if final_state is None:
        final_state = q.new_empty(0, dtype=torch.float32)
    return o.to(q.dtype).contiguous(), final_state, g_cum.contiguous(), A.contiguous()


@torch.library.custom_op("atma::gated_delta_fla_bwd", mutates_args=())
def _fla_bwd(
    grad_o: torch.Tensor, grad_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    g_cum: torch.Tensor, beta: torch.Tensor, A: torch.Tensor, initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FLA backward: gradients of q, k, v, g, beta and the initial state (empty when None)."""
    from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd

    if grad_state is not None and grad_state.numel() == 0:
        # Autograd gives the empty placeholder of a final state nobody asked for (training's case) a
        # zero-size gradient; handed to FLA as `dht`, its kernel would read B*H*K*V values from it.
        grad_state = None
    # The saved inputs are the caller's tensors, in whatever layout they came (the forward used dense copies).
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    initial_state = None if initial_state is None else initial_state.contiguous()
    with _on_device(q):
        dq, dk, dv, dbeta, dg, dh0, *_ = chunk_gated_delta_rule_bwd(
            q=q, k=k, v=v, g=g_cum, beta=beta, A=A, scale=1.0, initial_state=initial_state,
            do=grad_o.contiguous(), dht=None if grad_state is None else grad_state.contiguous(),
            chunk_size=_FLA_CHUNK,
        )
    if dh0 is None:
        dh0 = q.new_empty(0, dtype=torch.float32)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g_cum.dtype), dbeta.to(beta.dtype), dh0)
    return tuple(x.contiguous() for x in grads)


@_fla_fwd.register_fake
def _fla_fwd_fake(q, k, v, g, beta, initial_state, output_final_state):
    B, T, H, K = q.shape
    state_shape = (B, H, K, v.shape[-1]) if output_final_state else (0,)
    return (v.new_empty(v.shape), q.new_empty(state_shape, dtype=torch.float32),
            g.new_empty(g.shape, dtype=torch.float32), k.new_empty((B, T, H, _FLA_CHUNK)))


@_fla_bwd.register_fake
def _fla_bwd_fake(grad_o, grad_state, q, k, v, g_cum, beta, A, initial_state):
    dh0 = q.new_empty(0 if initial_state is None else initial_state.shape, dtype=torch.float32)
    return (*(x.new_empty(x.shape) for x in (q, k, v, g_cum, beta)), dh0)


def _fla_setup_context(ctx, inputs, output):
    q, k, v, _, beta, initial_state, _ = inputs
    _, _, g_cum, A = output
    ctx.save_for_backward(q, k, v, g_cum, beta, A, initial_state)
    ctx.mark_non_differentiable(g_cum, A)


def _fla_backward(ctx, grad_o, grad_state, *_):
    q, k, v, g_cum, beta, A, initial_state = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(v)
    *grads, dh0 = _fla_bwd(grad_o, grad_state, q, k, v, g_cum, beta, A, initial_state)
    return (*grads, dh0 if initial_state is not None else None, None)


_fla_fwd.register_autograd(_fla_backward, setup_context=_fla_setup_context)
