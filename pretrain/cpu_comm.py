"""DeepSpeed's shared-memory all-reduce on CPU ranks: free its segments however the run ends.

When every rank of a CPU run is on one machine, DeepSpeed gives each rank a 66 MB segment in
/dev/shm named after the user, MASTER_ADDR, MASTER_PORT and the rank, and never removes it: every
such run leaves RAM behind until the machine restarts. Once every rank has mapped every segment
(DeepSpeed's initialisation waits for that), the names are no longer needed; unlinked, a segment's
memory is freed when the last process using it exits, on a crash or a kill too.
"""

from __future__ import annotations

import os

import torch.distributed as dist

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "deepspeed_allreduce_buffer"


def segment_path(rank: int, environ=os.environ) -> str:
    """Path of DeepSpeed's shared-memory all-reduce segment of `rank` for this run's rendezvous address."""
    name = f"{SEGMENT_PREFIX}_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_{environ.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def shm_in_use() -> bool:
    """Whether DeepSpeed's shared-memory all-reduce is set up in this run (the same answer on every rank)."""
    from deepspeed.comm import comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    # DeepSpeed's op sets the segments up only when every rank is local (LOCAL_SIZE == world size).
    return (getattr(backend, "shm_comm_op", None) is not None
            and os.environ.get("LOCAL_SIZE") == str(dist.get_world_size()))


def release_shm_segment() -> bool:
    """Unlink this rank's segment once every rank has passed initialisation; True when there was one."""
    if not shm_in_use():
        return False
    dist.barrier()  # every rank has mapped every other rank's segment before it gets here
    path = segment_path(dist.get_rank())
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
