"""Configuration of ATMA models for Hugging Face `transformers` (loaded with trust_remote_code=True).

This file is copied next to the weights of an exported model; it needs only `transformers`.
Field names and defaults are those of the training project's `AtmaConfig` (its config.json keys).
"""

from transformers import PretrainedConfig

CORES = ("polar", "nope", "rope")


class AtmaConfig(PretrainedConfig):
    """Hyper-parameters of an ATMA model: LFM2 conv blocks and global (attention + memory) blocks."""

    model_type = "atma"

    def __init__(
        self,
        vocab_size=50304,
        hidden_size=1024,
        num_hidden_layers=16,
        head_dim=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        global_every=4,
        global_offset=2,
        mlp_ratio=4,
        conv_kernel_size=3,
        attn_kernel_size=4,
        core="polar",
        memory=True,
        window=None,
        mem_gamma_bias=3.9,
        mem_beta_bias=0.0,
        mem_chunk=64,
        num_random_keys=0,
        rms_norm_eps=1e-6,
        logit_softcap=15.0,
        rope_scale=0.12,
        init_scheme="default",
        preset=None,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if core not in CORES:
            raise ValueError(f"AtmaConfig.core must be one of {CORES}, got {core!r}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )
        super().__init__(**kwargs)
        # Set after the base class, whose own defaults (e.g. tie_word_embeddings) would override them.
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.global_every = global_every
        self.global_offset = global_offset
        self.mlp_ratio = mlp_ratio
        self.conv_kernel_size = conv_kernel_size
        self.attn_kernel_size = attn_kernel_size
        self.core = core
        self.memory = memory
        self.window = window
        self.mem_gamma_bias = mem_gamma_bias
        self.mem_beta_bias = mem_beta_bias
        self.mem_chunk = mem_chunk
        self.num_random_keys = num_random_keys
        self.rms_norm_eps = rms_norm_eps
        self.logit_softcap = logit_softcap
        self.rope_scale = rope_scale
        self.init_scheme = init_scheme
        self.preset = preset
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings

    def is_global(self, layer: int) -> bool:
        """Whether block `layer` is a global block (else an LFM2 conv block)."""
        return layer % self.global_every == self.global_offset
