"""`AtmaForCausalLM`: the hybrid conv / global-attention decoder with a soft-capped LM head (SPEC §2-§4)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .attention import GlobalAttention
from .config import AtmaConfig
from .layers import MLP, LFM2Conv, RMSNorm, linear, softcap

CHECKPOINT_POLICIES = ("none", "global", "all")


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + mlp(norm2(x)) (SPEC §2.2)."""

    def __init__(self, config: AtmaConfig, layer: int):
        super().__init__()
        self.is_global = config.is_global(layer)
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_global:
            self.attn = GlobalAttention(config)
        else:
            self.attn = LFM2Conv(
                config.hidden_size, config.conv_kernel_size, zero_in_proj=config.init_scheme == "reference"
            )
        self.mlp = MLP(config.hidden_size, config.mlp_ratio)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, align = self.attn(self.norm1(x))
        x = x + mixed
        return x + self.mlp(self.norm2(x)), align


@dataclass
class AtmaOutput:
    """What `AtmaForCausalLM.forward` returns."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    align_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def lm_loss_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float,
    chunk_tokens: int = 8192,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of soft-capped logits, chunked over tokens and recomputed in backward.

    Never holds fp32 logits for more than `chunk_tokens` tokens at once (forward or backward).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)

    def chunk_sum(h_c, y_c, w, b):
        logits = softcap(F.linear(h_c, w.to(h_c.dtype), b.to(h_c.dtype)), cap)
        return F.cross_entropy(logits, y_c, reduction="sum")

    total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        h_c, y_c = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + torch_checkpoint(chunk_sum, h_c, y_c, weight, bias, use_reentrant=False)
        else:
            total = total + chunk_sum(h_c, y_c, weight, bias)
    if reduction == "sum":
        return total
    return total / max(y.numel(), 1)


class AtmaForCausalLM(nn.Module):
    """ATMA decoder: embedding, `L L G L` blocks, final RMSNorm, LM head with bias and soft-cap."""

    def __init__(self, config: AtmaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.proj = linear(config.hidden_size, config.vocab_size, zero=True)
        self.checkpoint_policy = "none"
        self.checkpoint_fn = None

    # ------------------------------------------------------------------ init
    def zero_init_names(self) -> list[str]:
        """Names of the parameters the init scheme starts at zero (SPEC §2.9, DESIGN departure 1)."""
        names = [n for n, _ in self.named_parameters()]
        if self.config.init_scheme == "reference":
            return [n for n in names if "proj" in n]
        return [n for n in names if "proj" in n and ".in_proj." not in n]

    # ------------------------------------------------------------------ checkpointing
    def set_activation_checkpointing(self, policy: str, checkpoint_fn=None) -> None:
        """Recompute block activations in backward: "none", "global" (global blocks only) or "all".

        `checkpoint_fn(fn, *args)` defaults to torch.utils.checkpoint (non-reentrant);
        DeepSpeed's `deepspeed.checkpointing.checkpoint` can be passed instead.
        """
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
        self.checkpoint_policy = policy
        self.checkpoint_fn = checkpoint_fn

    def _run_block(self, block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = self.checkpoint_policy == "all" or (self.checkpoint_policy == "global" and block.is_global)
        if not (wanted and self.training and torch.is_grad_enabled()):
            return block(x)
        if self.checkpoint_fn is not None:
            return self.checkpoint_fn(block, x)
        return torch_checkpoint(block, x, use_reentrant=False)

    # ------------------------------------------------------------------ forward
    def trunk(self, input_ids: torch.Tensor, *, output_hidden_states: bool = False):
        """Run embedding + blocks + final norm; return (normed hidden, per-block outputs, mean align loss)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        hidden_states, aligns = [], []
        for block in self.blocks:
            x, align = self._run_block(block, x)
            if block.is_global:
                aligns.append(align)
            if output_hidden_states:
                hidden_states.append(x)
        align_loss = torch.stack(aligns).mean() if aligns else x.new_zeros(())
        return self.norm(x), hidden_states, align_loss

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped fp32 logits of normed hidden states (SPEC §2.1)."""
        z = F.linear(hidden, self.proj.weight.to(hidden.dtype), self.proj.bias.to(hidden.dtype))
        return softcap(z, self.config.logit_softcap)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        return_logits: bool | None = None,
        loss_chunk_tokens: int = 8192,
    ) -> AtmaOutput:
        """Compute logits and, with `labels` (B,T), the mean next-token cross-entropy.

        With labels the loss is computed chunk by chunk and logits are not returned unless
        `return_logits=True`. `hidden_states` holds every block's residual output when asked.
        """
        hidden, hidden_states, align_loss = self.trunk(input_ids, output_hidden_states=output_hidden_states)
        if return_logits is None:
            return_logits = labels is None
        out = AtmaOutput(hidden_states=hidden_states, align_loss=align_loss, last_hidden_state=hidden)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            out.loss = lm_loss_chunked(
                hidden, self.proj.weight, self.proj.bias, labels,
                cap=self.config.logit_softcap, chunk_tokens=loss_chunk_tokens,
            )
        if return_logits:
            out.logits = self.logits(hidden)
        return out

    def num_parameters(self) -> int:
        """Total number of parameters (weights and biases)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str, *, max_shard_bytes: int | None = None) -> None:
        """Write model.safetensors (sharded above `max_shard_bytes`) and config.json to `directory`."""
        from .persistence import save_model

        save_model(self, directory, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, directory: str, *, map_location: str | torch.device = "cpu") -> "AtmaForCausalLM":
        """Load a directory written by `save_pretrained` (or by the export command)."""
        from .persistence import load_model

        return load_model(cls, directory, map_location=map_location)
