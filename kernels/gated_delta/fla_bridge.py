"""Bridge to flash-linear-attention's chunked gated delta rule (SPEC §4.7), with a safety guard.

flash-linear-attention (FLA) computes the gated delta rule of SPEC §4.4 in the same layout as
the `kernels.gated_delta_rule` contract: q, k [B, T, H, dk], v [B, T, H, dv], g (log-decay) and
beta [B, T, H], state [B, H, dk, dv]. FLA releases up to 0.6.x compute wrong gradients for the
gated backward on Hopper GPUs (compute capability 9.x) with triton < 3.7.1 (a triton
miscompilation, flash-linear-attention#640); `fla_is_usable` refuses that combination for any
call that will be differentiated, so that training never runs on known-wrong gradients, and the
caller falls back to the PyTorch path. Forward-only calls (evaluation) keep FLA there: the bug
is in the backward. `ATMA_FLA=0` turns the bridge off.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

__all__ = ["fla_guard_reason", "fla_is_usable", "fla_gated_delta_rule"]

_WARNED = False
_USABLE: dict = {}


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
) -> str | None:
    """Return why FLA must not be used for this (FLA version, triton version, GPU capability), or None.

    `backward=False` asks about a forward-only call, which the Hopper gradient bug does not touch.
    """
    if fla_version is None:
        return "flash-linear-attention is not installed (or failed to import)"
    if capability is None:
        return "flash-linear-attention needs a CUDA device"
    hopper = capability[0] == 9
    old_fla = _older_than(fla_version, (0, 7, 0))
    bad_triton = triton_version is None or _older_than(triton_version, (3, 7, 1))
    if backward and hopper and old_fla and bad_triton:
        return (
            f"flash-linear-attention {fla_version} computes wrong gated-delta gradients on Hopper "
            f"(compute capability {capability[0]}.{capability[1]}) with triton {triton_version} < 3.7.1 "
            "(flash-linear-attention#640)"
        )
    return None


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
        _USABLE[key] = fla_guard_reason(_installed_fla_version(), _triton_version(), capability, backward=backward)
    reason = _USABLE[key]
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
        # FLA's chunk kernels take bf16/fp16 only; fp32 callers get the fp32 PyTorch path.
        from .torch_impl import chunk_gated_delta_rule_torch

        return chunk_gated_delta_rule_torch(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state
        )
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    # Keywords throughout: other FLA entry points put extra gate arguments between g and beta.
    o, final_state = chunk_gated_delta_rule(
        q=q,
        k=k,
        v=v,
        g=g.float(),
        beta=beta,
        scale=1.0,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
    )
    return o, (final_state if output_final_state else None)
