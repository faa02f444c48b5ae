"""Options of the model's command-line tools: --device (a device this machine has, or a one-line reason) and
an output file checked before any work."""

from __future__ import annotations

import argparse
import os

import torch


def default_device() -> str:
    """cuda when a CUDA device is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_device(name: str) -> torch.device:
    """`name` as a torch.device this machine has (cpu, cuda or cuda:N); ValueError with a one-line reason."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: unknown device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def writable_file(text: str) -> str:
    """An argparse type: a file path that can be created or replaced, so a long run cannot end unable to save."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist")
    if os.path.isdir(text) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not a file that can be written")
    return text
