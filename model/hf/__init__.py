"""The model code shipped with an exported model for Hugging Face `transformers` (trust_remote_code).

`configuration_atma.py` and `modeling_atma.py` are copied verbatim next to the weights; they need
only torch and transformers and never import this project. Importing this package does not
import transformers.
"""

import os

SHIPPED_FILES = ("configuration_atma.py", "modeling_atma.py")
AUTO_MAP = {
    "AutoConfig": "configuration_atma.AtmaConfig",
    "AutoModelForCausalLM": "modeling_atma.AtmaForCausalLM",
}
MODEL_TYPE = "atma"
ARCHITECTURES = ["AtmaForCausalLM"]
# The keys config.json holds for transformers beside the AtmaConfig fields; `AtmaConfig.load` skips them.
TRANSFORMERS_CONFIG_KEYS = frozenset({
    "model_type", "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "use_cache", "dtype", "torch_dtype", "transformers_version",
})


def shipped_path(name: str) -> str:
    """Path of one of the SHIPPED_FILES in this package."""
    if name not in SHIPPED_FILES:
        raise ValueError(f"{name!r} is not shipped; choose from {', '.join(SHIPPED_FILES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


__all__ = ["ARCHITECTURES", "AUTO_MAP", "MODEL_TYPE", "SHIPPED_FILES", "TRANSFORMERS_CONFIG_KEYS", "shipped_path"]
