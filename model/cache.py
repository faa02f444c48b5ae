"""Decoding state of an ATMA model (SPEC §2.6, §4.8): what each block keeps between calls.

Per LFM2 conv block, the last K - 1 inputs of its causal conv. Per global block, the last
K - 1 inputs of each canon conv (polar, nope), the attention keys and values (post-canon; rotated
for rope), and the gated-delta memory state (B, H, dk, dv) in fp32. Everything but the keys and
values has a fixed size, so a new token costs O(1) in the conv and memory branches.

Shape legend: B batch, n cached keys, G key/value heads, d head dim, C channels, K conv taps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import AtmaConfig


class KVCache:
    """Keys and values of one global block, (B, n, G, d) each, appended in place (amortised O(1) per token).

    `keep` bounds what is kept: with a window W a later query sees only the last W - 1 earlier keys
    (SPEC §2.6), so keep = W - 1; None keeps every key.
    """

    def __init__(self, keep: int | None = None):
        self.keep = keep
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def keys(self) -> torch.Tensor | None:
        """The kept keys (B, n, G, d), oldest first; None before the first append."""
        return None if self._k is None else self._k[:, self._start : self._end]

    @property
    def values(self) -> torch.Tensor | None:
        """The kept values (B, n, G, d), oldest first; None before the first append."""
        return None if self._v is None else self._v[:, self._start : self._end]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add T keys and values (B, T, G, d); return the kept keys and values before trimming plus the new ones.

        The returned views are what the T new queries may read; afterwards only the last `keep` stay.
        """
        T = k.shape[1]
        if self._k is None or self._end + T > self._k.shape[1]:
            self._grow(k, v, T)
        self._k[:, self._end : self._end + T] = k
        self._v[:, self._end : self._end + T] = v
        start, self._end = self._start, self._end + T
        if self.keep is not None:
            self._start = max(self._start, self._end - self.keep)
        return self._k[:, start : self._end], self._v[:, start : self._end]

    def _grow(self, k: torch.Tensor, v: torch.Tensor, T: int) -> None:
        """Move the kept entries to the front of buffers with room for at least T more (doubling)."""
        live = len(self)
        capacity = max(16, 2 * (live + T))
        new_k = k.new_empty((k.shape[0], capacity, *k.shape[2:]))
        new_v = v.new_empty((v.shape[0], capacity, *v.shape[2:]))
        if live:
            new_k[:, :live] = self.keys
            new_v[:, :live] = self.values
        self._k, self._v, self._start, self._end = new_k, new_v, 0, live

    def num_bytes(self) -> int:
        """Bytes held by the key and value buffers (allocated capacity)."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


@dataclass
class ConvBlockState:
    """State of an LFM2 conv block: its conv's last K - 1 inputs (B, K-1, D); None before the first token."""

    conv: torch.Tensor | None = None


@dataclass
class GlobalBlockState:
    """State of a global block: canon conv inputs, attention keys/values, memory state (B, H, dk, dv) fp32."""

    kv: KVCache
    canon_q: torch.Tensor | None = None
    canon_k: torch.Tensor | None = None
    canon_v: torch.Tensor | None = None
    memory: torch.Tensor | None = None


@dataclass
class AtmaCache:
    """Decoding state of every block, the number of tokens already seen and the number of sequences."""

    layers: list[ConvBlockState | GlobalBlockState]
    seq_len: int = 0
    batch_size: int | None = None

    @classmethod
    def empty(cls, config: AtmaConfig) -> "AtmaCache":
        """A cache that has seen no token yet, laid out for `config`'s blocks."""
        keep = None if config.window is None else config.window - 1
        layers = [
            GlobalBlockState(kv=KVCache(keep)) if config.is_global(i) else ConvBlockState()
            for i in range(config.num_hidden_layers)
        ]
        return cls(layers=layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor by name (e.g. "blocks.2.memory", "blocks.2.keys"), for comparison and accounting."""
        out = {}
        for i, state in enumerate(self.layers):
            if isinstance(state, ConvBlockState):
                named = {"conv": state.conv}
            else:
                named = {
                    "canon_q": state.canon_q, "canon_k": state.canon_k, "canon_v": state.canon_v,
                    "memory": state.memory, "keys": state.kv.keys, "values": state.kv.values,
                }
            out.update({f"blocks.{i}.{name}": t for name, t in named.items() if t is not None})
        return out

    def num_bytes(self) -> int:
        """Bytes of decoding state held (key/value buffers at their allocated capacity)."""
        total = 0
        for state in self.layers:
            if isinstance(state, GlobalBlockState):
                total += state.kv.num_bytes()
                tensors = (state.canon_q, state.canon_k, state.canon_v, state.memory)
            else:
                tensors = (state.conv,)
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
