"""Training-time reader: shards to ``(B, T)`` batches for one data-parallel rank, resumable.

All ranks walk one global sample stream, epoch after epoch (``order.EpochOrder``): global
position ``p`` belongs to rank ``p % world_size``, so each epoch gives every sample to exactly
one rank. A rank's batch ``j`` holds its samples ``j*B .. j*B+B-1``; DataLoader worker ``w``
builds batches ``w, w+K, w+2K, ...``, which the DataLoader returns in order. Samples are read
by random access, so nothing before the resume point is ever read again.

The resumable state is one number, the global position of the next batch. It is the same on
every rank, so it survives checkpoints that keep only one rank's client state.

Every sample is checked as it is read (its stored digest, and its token ids against the
manifest's vocabulary); a failure is one ``ShardError`` line, also when a worker process hit it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.manifest import Manifest, as_manifest
from data_pipeline.order import EpochOrder
from data_pipeline.shard_reader import ShardReader

STATE_VERSION = 1
DEFAULT_SHUFFLE_WINDOW = 8192


class TokenBatches(IterableDataset):
    """Token arrays ``(rows, seq_len + 1)`` of one rank's batches from global position ``start``.

    It yields numpy arrays rather than tensors: sending a small array through the DataLoader's
    pipe costs far less than a shared-memory tensor, and ``TokenLoader`` converts in the
    training process.
    """

    def __init__(self, dataset: str | os.PathLike | Manifest, *, split: str, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, shuffle_window: int, num_epochs: int | None,
                 drop_last: bool, verify: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        if batch_size < 1 or shuffle_window < 1:
            raise DataError("batch_size and shuffle_window must be at least 1")
        if num_epochs is not None and num_epochs < 1:
            raise DataError(f"num_epochs must be at least 1 (or None for no end), got {num_epochs}")
        self.manifest = as_manifest(dataset)
        self.split = split
        self.reader = ShardReader(self.manifest, split, verify=verify)
        self.num_samples = self.manifest.num_samples(split)
        if self.num_samples == 0:
            raise DataError(f"{self.manifest.data_dir}: split {split!r} has no samples")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, shuffle_window
        self.num_epochs, self.drop_last = num_epochs, drop_last
        self.start = 0
        self._orders: dict[int, EpochOrder] = {}

    @property
    def global_batch(self) -> int:
        """Samples consumed by all ranks together per step."""
        return self.batch_size * self.world_size

    def end(self, start: int) -> float:
        """Global position where the stream stops when it starts at ``start`` (inf: no end)."""
        if self.num_epochs is None:
            return math.inf
        total = self.num_epochs * self.num_samples
        if self.drop_last:
            return start + (max(total - start, 0) // self.global_batch) * self.global_batch
        return total

    def num_batches(self, start: int) -> int:
        """Batches this rank yields from global position ``start``; raises TypeError if endless."""
        end = self.end(start)
        if end == math.inf:
            raise TypeError("an endless loader (num_epochs=None) has no length")
        rank_samples = max(0, -(-(int(end) - start - self.rank) // self.world_size))
        return -(-rank_samples // self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start = self.start
        end = self.end(start)
        batch = worker
        try:
            while True:
                batch_tokens = self.read_batch(start, batch, end)
                if batch_tokens is None:
                    return
                yield batch_tokens
                batch += num_workers
        except DataError as err:
            if info is None:
                raise
            # The DataLoader would re-raise it with the worker's traceback inside the message;
            # TokenLoader raises it in the training process as the one line it is.
            yield err
        finally:
            self.reader.close()

    def read_batch(self, start: int, batch: int, end: float) -> np.ndarray | None:
        """Tokens ``(rows, seq_len + 1)`` of this rank's batch ``batch``; None past the end."""
        k = batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        positions = start + self.rank + k * self.world_size
        positions = positions[positions < end]
        if len(positions) == 0:
            return None
        layout = self.reader.layout
        out = np.empty((len(positions), layout.num_tokens), dtype=layout.dtype)
        epochs = positions // self.num_samples
        places = []
        for epoch in np.unique(epochs):
            in_epoch = positions[epochs == epoch] - epoch * self.num_samples
            shards, locals_ = self._order(int(epoch)).locate(in_epoch)
            places += zip(shards.tolist(), locals_.tolist())
        self.reader.read_rows(places, out)
        return out

    def _order(self, epoch: int) -> EpochOrder:
        order = self._orders.get(epoch)
        if order is None:
            self._orders = {epoch: EpochOrder(self.reader.num_samples, epoch=epoch, seed=self.seed,
                                              shuffle=self.shuffle, window=self.shuffle_window)}
            order = self._orders[epoch]
        return order

    @functools.cached_property
    def data_id(self) -> str:
        """Identity of the split's data: a hash over its shards' sha256 values."""
        digest = hashlib.sha256()
        for shard in self.manifest.split(self.split).shards:
            digest.update(shard.sha256.encode())
        return digest.hexdigest()[:16]


def to_tensors(tokens: np.ndarray, pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids`` = tokens[:, :-1] and ``labels`` = tokens[:, 1:], as contiguous int64."""
    batch = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64)),
        "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:], dtype=np.int64)),
    }
    if pin_memory:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _as_is(batch):
    return batch


class TokenLoader:
    """Iterable over one rank's batches with ``state_dict``/``load_state_dict`` for exact resume.

    Iterating continues from the current position (a second ``for`` loop picks up where the
    first stopped); ``reset()`` goes back to the beginning.
    """

    def __init__(self, dataset: TokenBatches, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None):
        self.dataset = dataset
        self.position = 0
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )

    def __iter__(self):
        start = self.position
        self.dataset.start = start
        end = self.dataset.end(start)
        for j, tokens in enumerate(self._loader):
            if isinstance(tokens, DataError):
                raise tokens
            self.position = int(min(start + (j + 1) * self.dataset.global_batch, end))
            yield to_tensors(tokens, self.pin_memory)

    def __len__(self) -> int:
        return self.dataset.num_batches(self.position)

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in (0-based)."""
        return self.position // self.dataset.num_samples

    def reset(self) -> None:
        """Go back to the first batch of the first epoch."""
        self.position = 0

    def state_dict(self) -> dict:
        """Resumable state; identical on every rank at the same step."""
        d = self.dataset
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "split": d.split,
            "data_id": d.data_id,
            "num_samples": d.num_samples,
            "seed": d.seed,
            "shuffle": d.shuffle,
            "shuffle_window": d.shuffle_window,
            "world_size": d.world_size,
            "batch_size": d.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the next batch after the one where ``state`` was taken.

        The data and the order settings must match; world size and batch size may change, in
        which case the new ranks continue the same global stream from the saved position.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "data_id", "num_samples", "seed", "shuffle", "shuffle_window"):
            if state.get(key) != mine[key]:
                raise DataError(f"loader state was saved with {key}={state.get(key)!r}, "
                                f"this loader has {key}={mine[key]!r}")
        self.position = int(state["position"])


def build_loader(dataset: str | os.PathLike | Manifest, *, split: str = "train", batch_size: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_epochs: int | None = None,
                 shuffle_window: int = DEFAULT_SHUFFLE_WINDOW, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None,
                 verify: bool = True) -> TokenLoader:
    """A resumable loader of ``{"input_ids", "labels"}`` int64 ``(batch_size, seq_len)`` batches.

    Args:
        dataset: a directory written by ``prepare`` (holds manifest.json), or its already
            loaded ``Manifest`` (then manifest.json is not read again).
        split: "train" or "val".
        batch_size: sequences per rank per batch.
        rank, world_size: this process's data-parallel rank and the data-parallel size.
        num_workers: DataLoader worker processes (the batches are the same for any value).
        seed, shuffle, shuffle_window: the sample order (see ``order.py``).
        drop_last: with finite epochs, stop at the last full global batch so all ranks see
            the same number of batches; if False the last batches may be shorter or missing
            on some ranks.
        num_epochs: passes over the split; None cycles forever (reshuffled every epoch).
        verify: check every sample as it is read: its stored digest and its token ids against
            the manifest's vocabulary (ShardError naming shard, sample and ``verify``). Only the
            loader benchmark turns it off, to measure what the checks cost.
    """
    batches = TokenBatches(dataset, split=split, batch_size=batch_size, rank=rank,
                           world_size=world_size, seed=seed, shuffle=shuffle,
                           shuffle_window=shuffle_window, num_epochs=num_epochs,
                           drop_last=drop_last, verify=verify)
    return TokenLoader(batches, num_workers=num_workers, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor,
                       multiprocessing_context=multiprocessing_context)
