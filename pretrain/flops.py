"""Analytic training FLOPs per token of an ATMA model, and peak FLOP/s of known accelerators.

DeepSpeed's profiler cannot see Triton kernels, so MFU is computed from the architecture:
forward FLOPs per token are counted per layer kind and multiplied by 3 for forward + backward.
"""

from __future__ import annotations

from model import AtmaConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
PEAK_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("B300", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def peak_flops_for(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a CUDA device name, or None when unknown."""
    for key, value in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def forward_flops_per_token(config: AtmaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token, by component, at training length `seq_len` (causal)."""
    D, H, G, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    r = config.mlp_ratio
    n_global = len(config.global_layers)
    n_conv = config.num_hidden_layers - n_global
    mlp = 2 * (D * 2 * r * D + r * D * D) * config.num_hidden_layers
    conv = n_conv * (2 * (D * 3 * D + D * D) + 2 * config.conv_kernel_size * D + 4 * D)
    proj = 2 * (D * 2 * H * d + 2 * D * G * d + H * d * D)
    if config.core == "polar":
        proj += 2 * H * D
    canon = 0 if config.core == "rope" else 2 * config.attn_kernel_size * (H * d + 2 * G * d)
    # Causal attention: on average (T + 1) / 2 visible keys, two matmuls (QK^T and PV) of 2*d each.
    visible = (seq_len + 1) / 2 if config.window is None else min(config.window, (seq_len + 1) / 2)
    core = 2 * 2 * H * d * visible
    if config.core == "polar":
        core += 6 * H * visible  # temperature, exp, and the running p^2 sum per visible key
    attention = n_global * (proj + canon + core)
    memory = 0.0
    if config.memory:
        chunk = config.mem_chunk
        mem_proj = 2 * (2 * D * H + 2 * D * H * d)
        # Delta rule per head: state decay/predict/write/read (4 d^2) plus intra-chunk work (~2 C d).
        mem_core = H * (4 * d * d + 2 * chunk * 2 * d)
        memory = n_global * (mem_proj + mem_core)
    head = 2 * D * config.vocab_size
    return {"mlp": mlp, "conv": conv, "attention": attention, "memory": memory, "lm_head": head}


def train_flops_per_token(config: AtmaConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (3x forward)."""
    return 3.0 * sum(forward_flops_per_token(config, seq_len).values())
