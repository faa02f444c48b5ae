"""`AtmaConfig`: the model's hyper-parameters, validated at construction, with named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

CORES = ("polar", "nope", "rope")
INIT_SCHEMES = ("default", "reference")


@dataclass
class AtmaConfig:
    """Hyper-parameters of an ATMA model (SPEC §1.1); field names are the public config.json keys."""

    vocab_size: int = 50304
    hidden_size: int = 1024
    num_hidden_layers: int = 16
    head_dim: int = 128
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    # Block i is a global (attention + memory) block iff i % global_every == global_offset (SPEC §1.1).
    global_every: int = 4
    global_offset: int = 2
    mlp_ratio: int = 4
    conv_kernel_size: int = 3
    attn_kernel_size: int = 4
    core: str = "polar"
    memory: bool = True
    window: int | None = None
    mem_gamma_bias: float = 3.9
    mem_beta_bias: float = 0.0
    mem_chunk: int = 64
    num_random_keys: int = 0
    rms_norm_eps: float = 1e-6
    logit_softcap: float = 15.0
    rope_scale: float = 0.12
    init_scheme: str = "default"
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field when a setting is impossible."""
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "num_attention_heads",
            "num_key_value_heads", "global_every", "mlp_ratio", "conv_kernel_size",
            "attn_kernel_size", "mem_chunk",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AtmaConfig.{name} must be a positive integer, got {value!r}")
        if self.core not in CORES:
            raise ValueError(f"AtmaConfig.core must be one of {CORES}, got {self.core!r}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"AtmaConfig.init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if not isinstance(self.memory, bool):
            raise ValueError(f"AtmaConfig.memory must be true or false, got {self.memory!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"AtmaConfig.window must be a positive integer or null, got {self.window!r}")
        if not 0 <= self.global_offset < self.global_every:
            raise ValueError(
                f"AtmaConfig.global_offset must be in [0, global_every={self.global_every}), got {self.global_offset}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"AtmaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim & (self.head_dim - 1) or self.head_dim < 4:
            raise ValueError(f"AtmaConfig.head_dim must be a power of two >= 4, got {self.head_dim}")
        if self.core == "rope" and self.head_dim % 4 != 0:
            raise ValueError("AtmaConfig.head_dim must be divisible by 4 for the rope core")
        if self.num_random_keys < 0:
            raise ValueError(f"AtmaConfig.num_random_keys must be >= 0, got {self.num_random_keys}")
        if self.logit_softcap <= 0:
            raise ValueError(f"AtmaConfig.logit_softcap must be > 0, got {self.logit_softcap}")
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
            raise ValueError(f"unknown AtmaConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str) -> None:
        """Write the config as JSON to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "AtmaConfig":
        """Read a config.json written by `save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
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
