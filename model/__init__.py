"""The ATMA model: config, layers, the hybrid decoder and fp64 reference oracles."""

from .config import PRESETS, AtmaConfig
from .modeling import AtmaForCausalLM, AtmaOutput, lm_loss_chunked
from .persistence import CheckpointError

__all__ = ["AtmaConfig", "AtmaForCausalLM", "AtmaOutput", "CheckpointError", "PRESETS", "lm_loss_chunked"]
