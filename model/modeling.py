"""`AtmaForCausalLM`: the hybrid conv / global-attention decoder with a soft-capped LM head (SPEC §2-§4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .attention import GlobalAttention
from .cache import AtmaCache
from .config import AtmaConfig
from .layers import MLP, CausalDepthwiseConv, LFM2Conv, RMSNorm, ZeroInitLinear, softcap
from .lm_loss import softcap_cross_entropy_sums

CHECKPOINT_POLICIES = ("none", "global", "all")


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + mlp(norm2(x)) (SPEC §2.2).

    The mixer is the global attention mixer in global blocks and the LFM2 gated conv elsewhere.
    """

    # The mixer's parameters are named blocks.{i}.attn.* in both kinds of block (SPEC §2.12).
    MIXER_KEY = "attn"

    def __init__(self, config: AtmaConfig, layer: int):
        super().__init__()
        self.is_global = config.is_global(layer)
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_global:
            mixer = GlobalAttention(config)
        else:
            mixer = LFM2Conv(config.hidden_size, config.conv_kernel_size, zero_in_proj=config.init_scheme == "reference")
        self.add_module(self.MIXER_KEY, mixer)
        self.mlp = MLP(config.hidden_size, config.mlp_ratio)

    @property
    def mixer(self) -> nn.Module:
        """The token mixer: `GlobalAttention` in a global block, `LFM2Conv` otherwise."""
        return self._modules[self.MIXER_KEY]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's math; `AtmaForCausalLM.compile_blocks` compiles this, not the module call."""
        mixed, align = self.mixer(self.norm1(x))
        x = x + mixed
        return x + self.mlp(self.norm2(x)), align

    def extend(self, x: torch.Tensor, state, offset: int) -> torch.Tensor:
        """The block on x (B,T,D) at positions offset.. after the tokens in `state` (updated in place)."""
        x = x + self.mixer.extend(self.norm1(x), state, offset)
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.ModuleList):
    """The decoder's blocks in order; calling it runs them all, as one module call that DeepSpeed's ZeRO-3
    can take as one leaf module (the trainer does on one rank)."""

    def forward(self, x: torch.Tensor, *, checkpoint_policy: str = "none", output_hidden_states: bool = False):
        """Run every block on x; return (output, each global block's align loss, each block's output when asked)."""
        hidden_states, aligns = [], []
        for block in self:
            x, align = self._run_block(block, x, checkpoint_policy)
            if block.is_global:
                aligns.append(align)
            if output_hidden_states:
                hidden_states.append(x)
        return x, aligns, hidden_states

    def _run_block(self, block: Block, x: torch.Tensor, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = policy == "all" or (policy == "global" and block.is_global)
        if not (wanted and self.training and torch.is_grad_enabled()):
            return block(x)
        return torch_checkpoint(block, x, use_reentrant=False)


class AtmaOutput(dict):
    """What `AtmaForCausalLM.forward` returns: a dict with attribute access.

    Keys: loss, focus_loss, kl_loss, head_loss, logits, hidden_states (list), align_loss. Being a dict lets
    DeepSpeed ZeRO-3 find the tensors inside and hook their backward.
    """

    FIELDS = ("loss", "focus_loss", "kl_loss", "head_loss", "logits", "hidden_states", "align_loss")

    def __init__(self, **values):
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"unknown AtmaOutput field(s): {sorted(unknown)}")
        super().__init__({name: None for name in self.FIELDS})
        self["hidden_states"] = []
        self.update(values)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        if name not in self.FIELDS:
            raise AttributeError(f"unknown AtmaOutput field {name!r}")
        self[name] = value


def lm_loss_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    cap: float,
    chunk_tokens: int = 8192,
    focus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of soft-capped logits, chunked over tokens (`model.lm_loss`).

    Returns (mean over all tokens, mean over the tokens where the boolean `focus` (B,T) is set, or
    None without `focus`; 0 when it selects nothing). Never holds fp32 logits for more than
    `chunk_tokens` tokens at once (forward or backward).
    """
    mean, focus_mean, _, _ = lm_and_kl_loss_chunked(hidden, weight, bias, labels, None, cap=cap,
                                                    chunk_tokens=chunk_tokens, focus=focus)
    return mean, focus_mean


def lm_and_kl_loss_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor | None,
    target_logits_rows,
    *,
    cap: float,
    temperature: float = 1.0,
    chunk_tokens: int = 8192,
    focus: torch.Tensor | None = None,
    recompute_targets: bool = False,
    weights: tuple[float, float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`lm_loss_chunked` and, with `target_logits_rows(start, end)` -> target logits for flattened token rows,
    the mean over tokens of tau^2 * KL(softmax(target/tau) || softmax(logits/tau)) (else None), from one pass of
    the head per chunk (forward and recomputation): the logits and their gradient products serve both terms.
    Without `labels` (the KL alone) the cross-entropy means are 0.

    The fourth value is None unless `weights` (of the mean CE, the focus mean and the KL term in the caller's
    loss) are given: then it is their weighted sum, the one of the four that takes a gradient (computed in
    the forward, `model.lm_loss`), and the three terms come back detached."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = None if labels is None else labels.reshape(-1)
    f = None if focus is None else focus.reshape(-1).to(h.dtype)
    n = max(h.shape[0], 1)
    n_focus = None if f is None else f.sum().clamp_min(1)
    kw = dict(cap=cap, chunk_tokens=chunk_tokens, targets_rows=target_logits_rows, temperature=temperature,
              recompute_targets=recompute_targets)
    weighted = None
    if weights is None:
        total = softcap_cross_entropy_sums(h, weight, bias, y, f, **kw)
    else:
        lm_w, focus_w, kl_w = weights
        coefs = (lm_w / n, 0.0 if n_focus is None else focus_w / n_focus, kl_w * temperature**2 / n)
        total, weighted = softcap_cross_entropy_sums(h, weight, bias, y, f, weights=coefs, **kw)
    focus_mean = None if f is None else total[1] / n_focus
    kl = None if target_logits_rows is None else total[2] * temperature**2 / n
    return total[0] / n, focus_mean, kl, weighted


class SoftcapLMHead(ZeroInitLinear):
    """LM head with bias and the algebraic soft-cap; computes logits, chunked CE and chunked KL.

    Everything that reads the head's weight runs inside this module's forward, so ZeRO-3
    gathers the weight for it.
    """

    def __init__(self, hidden: int, vocab: int, cap: float):
        super().__init__(hidden, vocab)
        self.cap = cap

    def forward(self, hidden, labels=None, *, chunk_tokens=8192, kl_targets=None, kl_temperature=1.0, focus=None,
                kl_recompute_targets=False, term_weights=None):
        """Return {"logits"} without targets, else {"lm"} (and {"focus"} with a `focus` mask) and/or {"kl"};
        with `term_weights` (of lm, focus and kl in the caller's loss) also {"weighted"}, their weighted sum,
        the only one of them that takes a gradient."""
        if labels is None and kl_targets is None:
            z = F.linear(hidden, self.weight.to(hidden.dtype), self.bias.to(hidden.dtype))
            return {"logits": softcap(z, self.cap)}
        # One pass of the head per chunk for every term; without labels the cross-entropy sums are zero
        # and the KL's gradients come from the forward (model.lm_loss).
        lm, focus_loss, kl, weighted = lm_and_kl_loss_chunked(
            hidden, self.weight, self.bias, labels, kl_targets, cap=self.cap, temperature=kl_temperature,
            chunk_tokens=chunk_tokens, focus=focus, recompute_targets=kl_recompute_targets, weights=term_weights,
        )
        out = {"lm": lm} if labels is not None else {}
        if kl is not None:
            out["kl"] = kl
        if focus_loss is not None:
            out["focus"] = focus_loss
        if weighted is not None:
            out["weighted"] = weighted
        return out


class AtmaForCausalLM(nn.Module):
    """ATMA decoder: embedding, `L L G L` blocks, final RMSNorm, LM head with bias and soft-cap."""

    def __init__(self, config: AtmaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = BlockStack(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.proj = SoftcapLMHead(config.hidden_size, config.vocab_size, config.logit_softcap)
        self.checkpoint_policy = "none"

    # ------------------------------------------------------------------ roles and checkpointing
    def parameter_roles(self) -> dict[str, str]:
        """Role of every parameter by name: "embed", "head", "conv", "matrix" or "scalar".

        Roles follow the owning module, not the name: the embedding table, the LM head's weight,
        depthwise conv kernels, other tensors of two or more dims, and one-dim tensors (biases,
        norm weights, per-head Polar scalars; the LM head's bias too, SPEC §6.2).
        """
        roles = {}
        for prefix, module in self.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                # Under ZeRO-3, p.shape is a flat stub; ds_shape keeps the declared shape.
                ndim = len(getattr(p, "ds_shape", p.shape))
                if isinstance(module, nn.Embedding):
                    role = "embed"
                elif isinstance(module, SoftcapLMHead) and pname == "weight":
                    role = "head"
                elif isinstance(module, CausalDepthwiseConv):
                    role = "conv"
                else:
                    role = "matrix" if ndim >= 2 else "scalar"
                roles[f"{prefix}.{pname}" if prefix else pname] = role
        return roles

    def set_activation_checkpointing(self, policy: str) -> None:
        """Recompute block activations in backward: "none", "global" (global blocks only) or "all"."""
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
        self.checkpoint_policy = policy

    def compile_blocks(self, **options) -> None:
        """torch.compile every block's `compute` (torchtitan's per-block compile), with `options` for torch.compile.

        The module call stays eager, so hooks on a block (ZeRO-3 gathers its parameters there when
        the block is a ZeRO-3 leaf module) run outside the compiled graph.
        """
        for block in self.blocks:
            block.compute = torch.compile(block.compute, **options)

    # ------------------------------------------------------------------ forward
    def trunk(self, input_ids: torch.Tensor, *, output_hidden_states: bool = False):
        """Run embedding + blocks + final norm; return (normed hidden, per-block outputs, mean align loss)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        x, aligns, hidden_states = self.blocks(x, checkpoint_policy=self.checkpoint_policy,
                                               output_hidden_states=output_hidden_states)
        align_loss = torch.stack(aligns).mean() if aligns else x.new_zeros(())
        return self.norm(x), hidden_states, align_loss

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self) -> AtmaCache:
        """An empty decoding cache laid out for this model's blocks (see `extend`)."""
        return AtmaCache.empty(self.config)

    def extend(self, input_ids: torch.Tensor, cache: AtmaCache) -> torch.Tensor:
        """Run input_ids (B,T) after the tokens already in `cache`; return normed hidden states (B,T,D).

        The cache is updated in place. On an empty cache this is a prefill on the parallel paths
        (the same kernels as `trunk`); afterwards each call continues from the cached state, so
        one token per call is a decode step. Logits: `self.logits(hidden)`.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, seq_len) with seq_len >= 1, got shape {tuple(input_ids.shape)}")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(self.blocks)}: use model.new_cache()")
        if cache.batch_size is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"the cache holds {cache.batch_size} sequences, input_ids {input_ids.shape[0]}")
        x = self.embed(input_ids)
        for block, state in zip(self.blocks, cache.layers):
            x = block.extend(x, state, cache.seq_len)
        cache.seq_len += input_ids.shape[1]
        cache.batch_size = input_ids.shape[0]
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped fp32 logits of normed hidden states (SPEC §2.1)."""
        return self.proj(hidden)["logits"]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        return_logits: bool | None = None,
        loss_chunk_tokens: int = 8192,
        kl_targets=None,
        kl_temperature: float = 1.0,
        focus: torch.Tensor | None = None,
        kl_recompute_targets: bool = False,
        head_loss_weights: tuple[float, float, float] | None = None,
    ) -> AtmaOutput:
        """Compute logits and, with `labels` (B,T), the mean next-token cross-entropy.

        With labels the loss is computed chunk by chunk and logits are not returned unless
        `return_logits=True`. With a boolean `focus` (B,T) beside `labels`, `focus_loss` is the mean
        cross-entropy over the focused tokens. `kl_targets(start, end)` -> target logits for flattened token rows
        adds `kl_loss` (distillation); `kl_recompute_targets` asks it again in backward instead of keeping
        the targets from forward to backward. `hidden_states` holds every block's residual output when asked.
        `head_loss_weights` (the weights of `loss`, `focus_loss` and `kl_loss` in the caller's loss) makes
        `head_loss` their weighted sum, the one head term that takes a gradient, computed in the forward for
        any combination of the three (the three then come back detached, for logging).
        """
        hidden, hidden_states, align_loss = self.trunk(input_ids, output_hidden_states=output_hidden_states)
        if return_logits is None:
            return_logits = labels is None and kl_targets is None
        out = AtmaOutput(hidden_states=hidden_states, align_loss=align_loss)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if focus is not None and (labels is None or focus.shape != labels.shape):
            raise ValueError("focus needs labels of the same shape")
        if labels is not None or kl_targets is not None:
            losses = self.proj(
                hidden, labels, chunk_tokens=loss_chunk_tokens, kl_targets=kl_targets, kl_temperature=kl_temperature,
                focus=focus, kl_recompute_targets=kl_recompute_targets, term_weights=head_loss_weights,
            )
            out.loss, out.focus_loss, out.kl_loss = losses.get("lm"), losses.get("focus"), losses.get("kl")
            out.head_loss = losses.get("weighted")
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
