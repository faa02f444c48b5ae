"""The ATMA model: config, layers and the hybrid decoder (compute cores in `kernels`)."""

from .cache import AtmaCache
from .config import PRESETS, AtmaConfig
from .generation import Generation, greedy_generate
from .modeling import AtmaForCausalLM, AtmaOutput, lm_loss_chunked
from .persistence import CheckpointError

__all__ = [
    "AtmaCache", "AtmaConfig", "AtmaForCausalLM", "AtmaOutput", "CheckpointError", "Generation", "PRESETS",
    "greedy_generate", "lm_loss_chunked",
]
