"""CPU ranks: start DeepSpeed's communication backend without its shared-memory op.

On the CPU, DeepSpeed's torch backend compiles its `deepspeed_shm_comm` op when it starts (about a
minute on first use, on every new machine or cache) and gives each rank a 66 MB segment in /dev/shm
that it never removes. That op serves only `inference_all_reduce`, DeepSpeed's tensor-parallel
inference; training's collectives go through torch.distributed (gloo), which is what the backend
uses whenever the op is absent. So the trainer starts the backend without it.
"""

from __future__ import annotations

import contextlib
import importlib


@contextlib.contextmanager
def without_shm_comm_op():
    """Within the block, DeepSpeed's torch backend starts without compiling or loading its shared-memory op."""
    # By its full name: the package's attribute `deepspeed.comm.torch` can be PyTorch itself.
    ds_torch_backend = importlib.import_module("deepspeed.comm.torch")
    build = getattr(ds_torch_backend, "build_shm_op", None)
    if build is None:  # a DeepSpeed that no longer builds the op at start-up: nothing to leave out
        yield
        return
    ds_torch_backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_backend.build_shm_op = build

