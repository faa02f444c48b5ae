"""`AtmaConfig`: the model's hyper-parameters, checked at construction, with named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .hf import TRANSFORMERS_CONFIG_KEYS

CORES = ("polar", "nope", "rope")
INIT_SCHEMES = ("default", "reference")
_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "num_attention_heads",
    "num_key_value_heads", "global_every", "mlp_ratio", "conv_kernel_size", "attn_kernel_size", "mem_chunk",
)
_NUMBERS = ("mem_gamma_bias", "mem_beta_bias", "rms_norm_eps", "logit_softcap", "rope_scale")


@dataclass(kw_only=True, slots=True)
class AtmaConfig:
    """Hyper-parameters of an ATMA model (SPEC §1.1); field names are the public config.json keys."""

    vocab_size: int = 50304
    """Rows of the embedding and the LM head (the tokenizer's vocabulary, padded)."""

    hidden_size: int = 1024
    """Width of the residual stream."""

    num_hidden_layers: int = 16
    """Number of blocks: LFM2 conv blocks and global (attention + memory) blocks."""

    head_dim: int = 128
    """Width of one attention head; a power of two >= 4."""

    num_attention_heads: int = 8
    """Query heads of a global block."""

    num_key_value_heads: int = 2
    """Key/value heads of a global block (grouped-query attention); divides num_attention_heads."""

    global_every: int = 4
    """Block i is global iff i % global_every == global_offset (SPEC §1.1)."""

    global_offset: int = 2
    """Position of the global block inside each group of global_every blocks; in [0, global_every)."""

    mlp_ratio: int = 4
    """MLP hidden width as a multiple of hidden_size (SPEC §2.3)."""

    conv_kernel_size: int = 3
    """Taps of the LFM2 gated short convolution (SPEC §2.4)."""

    attn_kernel_size: int = 4
    """Taps of the depthwise causal "canon" convs on q/k/v of the polar and nope cores (SPEC §2.5)."""

    core: str = "polar"
    """Attention core of the global blocks: polar, nope or rope (SPEC §2.6, §2.11)."""

    memory: bool = True
    """Add the gated-delta fast-weight memory branch to every global block (SPEC §4)."""

    window: int | None = None
    """Sliding attention window in tokens; null attends to the full context."""

    mem_gamma_bias: float = 3.9
    """Constant added to the memory's retention logits (sigmoid(3.9) = 0.98; SPEC §4.3)."""

    mem_beta_bias: float = 0.0
    """Constant added to the memory's write-strength logits (SPEC §4.3)."""

    mem_chunk: int = 64
    """Chunk length of the PyTorch chunked memory path (SPEC §4.6); FLA chunks internally."""

    num_random_keys: int = 0
    """Random keys per sequence for the distractor alignment loss; 0 turns it off (SPEC §5.3)."""

    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""

    logit_softcap: float = 15.0
    """Logits are soft-capped to (-cap, cap) by cap * z / sqrt(z^2 + cap^2) (SPEC §2.1; not tanh); positive."""

    rope_scale: float = 0.12
    """Softmax scale of the rope core (SPEC §2.11)."""

    init_scheme: str = "default"
    """default zeroes output projections only; reference also zeroes conv in_proj (DESIGN departure 1)."""

    preset: str | None = field(default=None, compare=False)
    """Name of the preset this config was built from (informational)."""

    def __post_init__(self):
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"AtmaConfig.{name} must be a positive integer, got {value!r}")
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"AtmaConfig.{name} must be a number, got {value!r}")
        if self.core not in CORES:
            raise ValueError(f"AtmaConfig.core must be one of {CORES}, got {self.core!r}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"AtmaConfig.init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if not isinstance(self.memory, bool):
            raise ValueError(f"AtmaConfig.memory must be true or false, got {self.memory!r}")
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise ValueError(f"AtmaConfig.window must be a positive integer or null, got {self.window!r}")
        if not _is_int(self.global_offset) or not 0 <= self.global_offset < self.global_every:
            raise ValueError(
                f"AtmaConfig.global_offset must be in [0, global_every={self.global_every}), got {self.global_offset!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"AtmaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim & (self.head_dim - 1) or self.head_dim < 4:
            raise ValueError(f"AtmaConfig.head_dim must be a power of two >= 4, got {self.head_dim}")
        if not _is_int(self.num_random_keys) or self.num_random_keys < 0:
            raise ValueError(f"AtmaConfig.num_random_keys must be an integer >= 0, got {self.num_random_keys!r}")
        if self.logit_softcap <= 0:
            raise ValueError(f"AtmaConfig.logit_softcap must be > 0, got {self.logit_softcap}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"AtmaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.global_layers:
            raise ValueError(
                f"AtmaConfig has no global block: {self.num_hidden_layers} layers with "
                f"global_offset={self.global_offset}, global_every={self.global_every}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def global_layers(self) -> list[int]:
        """Indices of the global (attention + memory) blocks."""
        return [i for i in range(self.num_hidden_layers) if i % self.global_every == self.global_offset]

    def is_global(self, layer: int) -> bool:
        """Whether block `layer` is a global block (else an LFM2 conv block)."""
        return layer % self.global_every == self.global_offset

    @property
    def layout(self) -> str:
        """The block layout as letters, e.g. "LLGL LLGL" (G global, L conv)."""
        letters = "".join("G" if self.is_global(i) else "L" for i in range(self.num_hidden_layers))
        return " ".join(letters[i : i + 4] for i in range(0, len(letters), 4))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AtmaConfig":
        """Build a config from a dict, rejecting unknown keys with a clear message."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AtmaConfig field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def save(self, path: str) -> None:
        """Write the config as JSON to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "AtmaConfig":
        """Read a config.json written by `save` (keys added for transformers are skipped)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        # An exported config.json also describes the model to transformers (model/hf); those keys are not ours.
        data = {k: v for k, v in data.items() if k not in TRANSFORMERS_CONFIG_KEYS}
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AtmaConfig":
        """Return the named preset with `overrides` applied (see `PRESETS`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        data = dict(PRESETS[name])
        data.update(overrides)
        data["preset"] = name
        return cls.from_dict(data)


PRESETS: dict[str, dict] = {
    # CPU tests and the quickstart demo: about 3M parameters at an 8K vocab.
    "tiny": dict(
        vocab_size=8192, hidden_size=128, num_hidden_layers=4, head_dim=32,
        num_attention_heads=4, num_key_value_heads=1,
    ),
    # A small research model between tiny and the paper's: 154,760,976 parameters.
    "atma-155m": dict(
        vocab_size=50304, hidden_size=768, num_hidden_layers=8, head_dim=64,
        num_attention_heads=12, num_key_value_heads=3,
    ),
    # The paper's model (SPEC §1.1, §2.10): 378,220,864 parameters with polar + memory.
    "atma-378m": dict(
        vocab_size=50304, hidden_size=1024, num_hidden_layers=16, head_dim=128,
        num_attention_heads=8, num_key_value_heads=2,
    ),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
