"""The global mixer: gated GQA surround with a Polar, NoPE or RoPE core plus gated-delta memory (SPEC §2.5)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .cached_attention import polar_attention_cached, softmax_attention_cached
from .config import AtmaConfig
from .layers import CausalDepthwiseConv, head_rms_norm, linear
from .memory import GatedDeltaMemory


class HalfTruncatedRotary(nn.Module):
    """RoPE on pairs (x_f, x_{f+d/2}) with d/4 live frequencies from 1 to 1/1024 and d/4 zeros (SPEC §2.11)."""

    def __init__(self, head_dim: int):
        super().__init__()
        quarter = head_dim // 4
        live = (1.0 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
        self.register_buffer("angular_freq", torch.cat([live, live.new_zeros(quarter)]))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate x (B,T,heads,d) by position offset..offset+T-1, in fp32."""
        T = x.shape[1]
        pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
        theta = pos[:, None] * self.angular_freq.float()[None, :]  # (T, d/2)
        cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        y = torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)
        return y.to(x.dtype)


def sliding_causal_mask(T_q: int, T_k: int, window: int | None, *, prefix: int = 0, device=None) -> torch.Tensor:
    """Boolean (T_q, prefix + T_k) mask: `prefix` always-visible keys, then causal (and windowed) keys."""
    i = torch.arange(T_q, device=device)[:, None]
    j = torch.arange(T_k, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    if prefix:
        mask = torch.cat([mask.new_ones(T_q, prefix), mask], dim=1)
    return mask


class GlobalAttention(nn.Module):
    """q+gate / k / v projections, QK-norm, canon convs, GQA core, sigmoid-gated output, memory branch."""

    def __init__(self, config: AtmaConfig):
        super().__init__()
        D, H, G, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.core, self.window, self.num_random_keys = config.core, config.window, config.num_random_keys
        self.H, self.G, self.d = H, G, d
        self.q = nn.Linear(D, 2 * H * d)
        self.k = nn.Linear(D, G * d)
        self.v = nn.Linear(D, G * d)
        self.proj = linear(H * d, D, zero=True)
        if config.core != "rope":
            K = config.attn_kernel_size
            self.canon_q = CausalDepthwiseConv(H * d, K)
            self.canon_k = CausalDepthwiseConv(G * d, K)
            self.canon_v = CausalDepthwiseConv(G * d, K)
        if config.core == "polar":
            self.mu_proj = linear(H, D, zero=True)
            self.v_null = nn.Parameter(torch.zeros(H, d))
            self.null_base = nn.Parameter(torch.full((H,), 2.0))
            self.null_slope_raw = nn.Parameter(torch.full((H,), 0.5))
            self.len_gain_raw = nn.Parameter(torch.full((H,), -1.0))
            self.mag_beta_raw = nn.Parameter(torch.full((H,), -1.5))
        if config.core == "rope":
            self.rotary = HalfTruncatedRotary(d)
            self.scale = config.rope_scale
        else:
            self.scale = 1.0 / math.sqrt(d)
        self.mem = (
            GatedDeltaMemory(
                D, H, d, gamma_bias=config.mem_gamma_bias, beta_bias=config.mem_beta_bias, chunk=config.mem_chunk
            )
            if config.memory
            else None
        )

    # ------------------------------------------------------------------ pieces
    def project_qkv(self, x: torch.Tensor, state=None):
        """Return q (B,T,H,d), gate (B,T,H,d), k, v (B,T,G,d) after QK-norm and canon (SPEC §2.5 steps 1-4).

        With a decoding `state` the canon convs continue from its histories (updated in place).
        """
        B, T, _ = x.shape
        H, G, d = self.H, self.G, self.d
        qg = self.q(x).view(B, T, H, 2 * d)
        q, gate = qg[..., :d], qg[..., d:]
        k = self.k(x).view(B, T, G, d)
        v = self.v(x).view(B, T, G, d)
        q, k = head_rms_norm(q), head_rms_norm(k)
        if self.core != "rope":
            q = q + self._canon("canon_q", q.reshape(B, T, H * d), state).view(B, T, H, d)
            k = k + self._canon("canon_k", k.reshape(B, T, G * d), state).view(B, T, G, d)
            v = v + self._canon("canon_v", v.reshape(B, T, G * d), state).view(B, T, G, d)
        return q, gate, k, v

    def _canon(self, name: str, x: torch.Tensor, state) -> torch.Tensor:
        """Canon conv `name` of x (B,T,C); with a state, continued from and saved to its attribute `name`."""
        conv = getattr(self, name)
        if state is None:
            return conv(x)
        y, history = conv.extend(x, getattr(state, name))
        setattr(state, name, history)
        return y

    def polar_params(self):
        """The five per-head Polar parameter tensors, in kernel argument order."""
        return self.v_null, self.null_base, self.null_slope_raw, self.len_gain_raw, self.mag_beta_raw

    def softmax_core(self, q, k, v, *, extra_k=None, extra_v=None) -> torch.Tensor:
        """Causal softmax attention (B,T,H,d) -> (B,T,H,d), optionally with always-visible extra keys."""
        B, T = q.shape[:2]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        prefix = 0
        if extra_k is not None:
            prefix = extra_k.shape[1]
            kh = torch.cat([extra_k.transpose(1, 2), kh], dim=2)
            vh = torch.cat([extra_v.transpose(1, 2), vh], dim=2)
        if self.window is None and prefix == 0:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            mask = sliding_causal_mask(T, T, self.window, prefix=prefix, device=q.device)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.transpose(1, 2)

    def random_keys(self, x: torch.Tensor, *, with_values: bool):
        """Detached distractor keys (and values) from Gaussian inputs through W_k (W_v) (SPEC §5.3)."""
        B, D = x.shape[0], x.shape[-1]
        with torch.no_grad():
            x_r = torch.randn(B, self.num_random_keys, D, device=x.device, dtype=x.dtype)
            k_r = self.k(x_r).view(B, -1, self.G, self.d)
            if self.core != "nope":
                k_r = head_rms_norm(k_r)
            v_r = self.v(x_r).view(B, -1, self.G, self.d) if with_values else None
        return k_r, v_r

    def polar_distractor_loss(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Mean null-sink mass stolen by random keys (SPEC §5.3, Polar): uses raw causal counts."""
        k_r, _ = self.random_keys(x, with_values=False)
        B, T = q.shape[:2]
        r = self.H // self.G
        qf = q.float().view(B, T, self.G, r, self.d)
        sigma = torch.einsum("btgrd,bngd->bgrtn", qf, k_r.float()) / math.sqrt(self.d)
        sigma = sigma.reshape(B, self.H, T, -1)
        n = kernels.polar_visible_counts(T, None, device=q.device, dtype=torch.float32)
        _, null_base, null_slope, len_gain, _ = (p.float() for p in self.polar_params())
        t, nu = kernels.polar_length_terms(n, null_base, null_slope, len_gain)
        logits = torch.cat([sigma * t[None, :, :, None], (t * nu)[None, :, :, None].expand(B, -1, -1, 1)], dim=-1)
        w = torch.softmax(logits, dim=-1)
        return w[..., :-1].sum(-1).mean()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mixer output (B,T,D) and the distractor alignment loss (0 when off)."""
        B, T, _ = x.shape
        q, gate, k, v = self.project_qkv(x)
        align = x.new_zeros((), dtype=torch.float32)
        use_distractor = self.training and self.num_random_keys > 0
        if self.core == "polar":
            c, mu = kernels.polar_attention(q, k, v, *self.polar_params(), window=self.window)
            out = self.proj((c * torch.sigmoid(gate)).reshape(B, T, -1)) + self.mu_proj(mu.to(x.dtype))
            if use_distractor:
                align = self.polar_distractor_loss(x, q)
        else:
            qc, kc = (self.rotary(q), self.rotary(k)) if self.core == "rope" else (q, k)
            o = self.softmax_core(qc, kc, v)
            out = self.proj((o * torch.sigmoid(gate)).reshape(B, T, -1))
            if use_distractor:
                k_r, v_r = self.random_keys(x, with_values=True)
                o_noisy = self.softmax_core(qc, kc, v, extra_k=k_r, extra_v=v_r)
                align = F.mse_loss(o_noisy.float(), o.float())
        if self.mem is not None:
            k_h, v_h = self._expand_heads(k), self._expand_heads(v)
            out = out + self.mem(x, q, k_h, v_h)
        return out, align

    def _expand_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,G,d) -> (B,T,H,d): query head h reads key/value head h // (H // G) (SPEC §2.5 step 5)."""
        r = self.H // self.G
        return x.repeat_interleave(r, dim=2) if r > 1 else x

    def extend(self, x: torch.Tensor, state, offset: int) -> torch.Tensor:
        """Mixer output for x (B,T,D) at positions offset.. after the tokens in `state` (updated in place).

        At offset 0 the core runs its parallel path, as in `forward`; later tokens attend to the
        cached keys through `model.cached_attention` (SPEC §2.6: counts and window at each position).
        """
        B, T, _ = x.shape
        q, gate, k, v = self.project_qkv(x, state)
        qc, kc = (self.rotary(q, offset), self.rotary(k, offset)) if self.core == "rope" else (q, k)
        num_cached = len(state.kv)
        keys, values = state.kv.append(kc, v)
        k_start = offset - num_cached
        if self.core == "polar":
            if offset == 0:
                c, mu = kernels.polar_attention(q, k, v, *self.polar_params(), window=self.window)
            else:
                c, mu = polar_attention_cached(
                    q, keys, values, *self.polar_params(), q_start=offset, k_start=k_start, window=self.window
                )
            out = self.proj((c * torch.sigmoid(gate)).reshape(B, T, -1)) + self.mu_proj(mu.to(x.dtype))
        else:
            if offset == 0:
                o = self.softmax_core(qc, kc, v)
            else:
                o = softmax_attention_cached(
                    qc, keys, values, scale=self.scale, q_start=offset, k_start=k_start, window=self.window
                )
            out = self.proj((o * torch.sigmoid(gate)).reshape(B, T, -1))
        if self.mem is not None:
            out = out + self.mem.extend(x, q, self._expand_heads(k), self._expand_heads(v), state)
        return out
