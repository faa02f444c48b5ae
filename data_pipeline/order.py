"""The training sample order: a pure function of (seed, epoch, position).

Epoch ``e`` visits every sample of a split once: shards in a seeded permutation, then samples
shuffled inside consecutive windows of ``window`` samples (a shuffle buffer whose content is
fixed in advance, so any position can be looked up without reading what came before it).
The hash-based permutation is written out here rather than taken from a library RNG so the
order never changes with a numpy version.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CACHED_WINDOWS = 4


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation(n: int, *keys: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by the integer ``keys``."""
    state = np.zeros(1, dtype=np.uint64)
    for key in keys:
        state = mix64(state ^ (np.array([key & (2**64 - 1)], dtype=np.uint64) + _GOLDEN))
    ranks = mix64(np.arange(n, dtype=np.uint64) * _GOLDEN ^ state)
    return np.argsort(ranks, kind="stable")


class EpochOrder:
    """Maps a position within one epoch to (shard, index within shard)."""

    def __init__(self, shard_sizes: np.ndarray, *, epoch: int, seed: int, shuffle: bool,
                 window: int):
        self.epoch, self.seed, self.shuffle, self.window = epoch, seed, shuffle, window
        num_shards = len(shard_sizes)
        self.shards = permutation(num_shards, seed, epoch, 0) if shuffle else np.arange(num_shards)
        sizes = np.asarray(shard_sizes, dtype=np.int64)[self.shards]
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.num_samples = int(self.ends[-1]) if num_shards else 0
        self._windows: OrderedDict[int, np.ndarray] = OrderedDict()

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, local index) arrays for epoch positions in ``[0, num_samples)``."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.shuffle:
            positions = self._unshuffle(positions)
        slot = np.searchsorted(self.ends, positions, side="right")
        return self.shards[slot], positions - self.starts[slot]

    def _unshuffle(self, positions: np.ndarray) -> np.ndarray:
        window_ids = positions // self.window
        out = np.empty_like(positions)
        for w in np.unique(window_ids):
            chosen = window_ids == w
            base = int(w) * self.window
            out[chosen] = base + self._window_permutation(int(w))[positions[chosen] - base]
        return out

    def _window_permutation(self, w: int) -> np.ndarray:
        perm = self._windows.get(w)
        if perm is None:
            size = min(self.window, self.num_samples - w * self.window)
            perm = permutation(size, self.seed, self.epoch, w + 1)
            self._windows[w] = perm
            if len(self._windows) > _CACHED_WINDOWS:
                self._windows.popitem(last=False)
        return perm
