"""The ATMA model: config, layers and the hybrid decoder (compute cores in `kernels`)."""

from .config import PRESETS, AtmaConfig
from .modeling import AtmaForCausalLM, AtmaOutput, lm_loss_chunked
from .persistence import CheckpointError

__all__ = ["AtmaConfig", "AtmaForCausalLM", "AtmaOutput", "CheckpointError", "PRESETS", "lm_loss_chunked"]
