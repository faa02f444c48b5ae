"""Load an exported model for evaluation: weights checked against export.json, device and dtype
choice, full-context forward (window removed)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from data_pipeline.journal import file_sha256
from model import AtmaForCausalLM, CheckpointError
from model.device import default_device, usable_device

from .errors import EvaluationError

DTYPES = ("bf16", "fp32")
EXPORT_INFO = "export.json"
WEIGHTS_CHECKSUMS = "weights_sha256"


def resolve_device(name: str | None) -> torch.device:
    """`name` as a torch.device this machine has, defaulting to cuda when available, else cpu."""
    try:
        return usable_device(name if name is not None else default_device())
    except ValueError as err:
        raise EvaluationError(str(err)) from None


def resolve_dtype(name: str | None, device: torch.device) -> tuple[str, torch.dtype | None]:
    """The activation dtype name and the autocast dtype it implies (None: plain fp32); bf16 on GPU by default."""
    if name is None:
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise EvaluationError(f"bad --dtype {name!r}: choose {' or '.join(DTYPES)}")
    return name, (torch.bfloat16 if name == "bf16" else None)


def load_model(model_dir: str, device: torch.device, *, keep_window: bool = False) -> tuple[AtmaForCausalLM, int | None]:
    """Load `model_dir` in eval mode on `device`; return it and the sliding window removed from it (None if none).

    SPEC §7 evaluates the full-context forward, so a training window is dropped unless `keep_window`.
    """
    if not os.path.isdir(model_dir):
        raise EvaluationError(f"{model_dir}: model directory not found")
    try:
        model = AtmaForCausalLM.from_pretrained(model_dir)
    except CheckpointError as err:
        raise EvaluationError(str(err)) from None
    removed = None
    if model.config.window is not None and not keep_window:
        removed = model.config.window
        # The window is a forward-time mask with no parameters of its own, so the weights carry over as is.
        full = AtmaForCausalLM(dataclasses.replace(model.config, window=None))
        full.load_state_dict(model.state_dict(), strict=True)
        model = full
    return model.to(device).eval(), removed


def read_export_info(model_dir: str) -> dict | None:
    """The optional export.json beside the weights (source run, step, tokens seen, seq_len, weights'
    sha256, provenance), or None."""
    path = os.path.join(model_dir, EXPORT_INFO)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise EvaluationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise EvaluationError(f"{path}: expected a JSON object")
    return info


def check_weights(model_dir: str, export_info: dict | None) -> str | None:
    """Check every weights file export.json lists against its sha256, before anything is loaded.

    Raises EvaluationError naming the first file that is missing or differs. Returns a one-line
    notice when there is nothing to check against (no export.json, or one from an older export
    without checksums), else None.
    """
    listed = (export_info or {}).get(WEIGHTS_CHECKSUMS)
    if not listed:
        why = f"no {EXPORT_INFO}" if export_info is None else f"{EXPORT_INFO} records no {WEIGHTS_CHECKSUMS}"
        return f"{model_dir}: {why} (an older export); the weights are loaded unchecked"
    if not isinstance(listed, dict):
        raise EvaluationError(f"{os.path.join(model_dir, EXPORT_INFO)}: {WEIGHTS_CHECKSUMS} is not a mapping "
                              "of file name to sha256")
    for name, expected in sorted(listed.items()):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise EvaluationError(f"{path}: missing (listed in {EXPORT_INFO})")
        actual = file_sha256(path)
        if actual != expected:
            raise EvaluationError(f"{path}: sha256 {actual[:12]}... does not match {EXPORT_INFO} "
                                  f"({str(expected)[:12]}...); the file changed after export, export it again")
    return None
