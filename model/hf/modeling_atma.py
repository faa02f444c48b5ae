"""ATMA for Hugging Face `transformers`: `AtmaForCausalLM` with incremental decoding for `generate()`.

This file is copied next to the weights of an exported model and loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; it needs only torch and
transformers. ATMA is a hybrid decoder: LFM2 gated short-conv blocks and global blocks whose
mixer is Polar attention (or NoPE / RoPE softmax attention) plus an additive gated-delta memory.
Parameter names are those of the training project, so its safetensors load unchanged.

Decoding state per block (`AtmaCache`): the last K-1 inputs of every causal conv, the attention
keys and values (only the last W-1 with a window W), and the memory state (B, H, dk, dv) in fp32.
Polar's temperature and null sink are evaluated at each query's own visible-key count
n = min(position + 1, W).

Shape legend: B batch, T tokens, H query heads, G key/value heads, r = H // G, d head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_atma import AtmaConfig

# F.normalize epsilon of the Polar direction and floor of its renormalisations.
POLAR_EPS = 1e-6
# Each (B, H, rows, keys) intermediate of the Polar reduction stays near this many elements.
BLOCK_ELEMENTS = 1 << 24
# The output field that carries the cache ("cache" in recent transformers, "past_key_values" before).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    """Algebraic soft-cap cap * z / sqrt(z^2 + cap^2), in fp32 or wider."""
    z = z.double() if z.dtype == torch.float64 else z.float()
    return cap * z * torch.rsqrt(z * z + cap * cap)


def head_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMS norm over the last dim with PyTorch's default epsilon."""
    return F.rms_norm(x, (x.shape[-1],))


# ---------------------------------------------------------------------- decoding state
class KVBuffer:
    """Keys and values (B, n, G, d) of one global block, appended in place; keeps the last `keep` (None: all)."""

    def __init__(self, keep):
        self.keep = keep
        self.k = self.v = None
        self.start = self.end = 0

    def __len__(self):
        return self.end - self.start

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add (B, T, G, d) keys and values; return the kept ones before trimming plus the new ones."""
        T = k.shape[1]
        if self.k is None or self.end + T > self.k.shape[1]:
            live = len(self)
            capacity = max(16, 2 * (live + T))
            new_k = k.new_empty((k.shape[0], capacity, *k.shape[2:]))
            new_v = v.new_empty((v.shape[0], capacity, *v.shape[2:]))
            if live:
                new_k[:, :live] = self.k[:, self.start : self.end]
                new_v[:, :live] = self.v[:, self.start : self.end]
            self.k, self.v, self.start, self.end = new_k, new_v, 0, live
        self.k[:, self.end : self.end + T] = k
        self.v[:, self.end : self.end + T] = v
        start, self.end = self.start, self.end + T
        if self.keep is not None:
            self.start = max(self.start, self.end - self.keep)
        return self.k[:, start : self.end], self.v[:, start : self.end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class BlockState:
    """Decoding state of one block: conv histories (by module name), KV buffer, memory state."""

    def __init__(self, keep):
        self.histories = {}
        self.kv = KVBuffer(keep)
        self.memory = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        self.histories = {name: h.index_select(0, index) for name, h in self.histories.items()}
        self.kv.reorder(index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)


class AtmaCache:
    """Decoding state of every block plus the number of tokens already seen."""

    is_compileable = False

    def __init__(self, config: AtmaConfig):
        keep = None if config.window is None else config.window - 1
        self.layers = [BlockState(keep) for _ in range(config.num_hidden_layers)]
        self.seq_len = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already seen."""
        return self.seq_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows `beam_idx` in every block (beam search)."""
        for state in self.layers:
            state.reorder(beam_idx)


# ---------------------------------------------------------------------- attention and memory math
def visible_keys(q_start, num_q, k_start, num_k, window, device):
    """Boolean (num_q, num_k): key j (from k_start) is visible to query p (from q_start) iff j <= p and p - j < W."""
    p = torch.arange(q_start, q_start + num_q, device=device)[:, None]
    j = torch.arange(k_start, k_start + num_k, device=device)[None, :]
    visible = j <= p
    if window is not None:
        visible = visible & (p - j < window)
    return visible


def polar_attention(q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw, *, q_start, k_start, window):
    """Polar attention of q (B,Tq,H,d) at positions q_start.. over k, v (B,Tk,G,d) at positions k_start..

    Per query at position p with n = min(p + 1, W) visible keys: temperature t = 1 + softplus(a) ln n,
    null floor nu = b + softplus(s) sqrt(ln(n + 1)); one softmax over t * q.k / sqrt(d) and the null
    logit t * nu; direction = normalised (sum_j w_j v_j + w_null v_null); magnitude =
    tanh(softplus(beta) ln(1 + n_eff (1 - w_null))) with n_eff the participation ratio of the real
    weights. Returns (direction (B,Tq,H,d), magnitude (B,Tq,H)) in q's dtype; computed in fp32 or
    wider, also under autocast.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _polar_reduce(q, k, v, (v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw),
                             q_start=q_start, k_start=k_start, window=window)


def _polar_reduce(q, k, v, params, *, q_start, k_start, window):
    B, Tq, H, d = q.shape
    Tk, G = k.shape[1], k.shape[2]
    r = H // G
    cdt = compute_dtype(q.dtype)
    v_null_, base_, slope_, gain_, beta_ = (p.to(cdt) for p in params)
    n = torch.arange(q_start + 1, q_start + Tq + 1, device=q.device, dtype=cdt)
    if window is not None:
        n = n.clamp(max=window)
    t = 1.0 + F.softplus(gain_)[:, None] * torch.log(n)[None, :]
    nu = base_[:, None] + F.softplus(slope_)[:, None] * torch.sqrt(torch.log(n + 1.0))[None, :]
    t, null_logit = t.view(G, r, Tq), (t * nu).view(G, r, Tq)
    beta_eff = F.softplus(beta_).view(G, r, 1)
    qg = q.to(cdt).view(B, Tq, G, r, d).permute(0, 2, 3, 1, 4)  # (B,G,r,Tq,d)
    kg = k.to(cdt).transpose(1, 2)[:, :, None]  # (B,G,1,Tk,d)
    vg = v.to(cdt).transpose(1, 2)[:, :, None]
    rows = max(1, BLOCK_ELEMENTS // max(1, B * H * Tk))
    directions, magnitudes = [], []
    for i0 in range(0, Tq, rows):
        i1 = min(i0 + rows, Tq)
        # Keys these rows can see: up to the last row's own key, from W - 1 before the first row.
        j1 = q_start + i1 - k_start
        j0 = 0 if window is None else max(0, q_start + i0 - window + 1 - k_start)
        sigma = torch.matmul(qg[:, :, :, i0:i1], kg[..., j0:j1, :].transpose(-1, -2)) / math.sqrt(d)
        visible = visible_keys(q_start + i0, i1 - i0, k_start + j0, j1 - j0, window, q.device)
        real = torch.where(visible, sigma * t[:, :, i0:i1, None], float("-inf"))
        m = torch.maximum(real.amax(dim=-1), null_logit[:, :, i0:i1])
        p = torch.exp(real - m[..., None])
        p_null = torch.exp(null_logit[:, :, i0:i1] - m)
        z = p.sum(-1) + p_null
        w, w_null = p / z[..., None], p_null / z
        s = torch.matmul(w, vg[..., j0:j1, :]) + w_null[..., None] * v_null_.view(G, r, 1, d)
        directions.append(s / s.norm(dim=-1, keepdim=True).clamp_min(POLAR_EPS))
        w_real = w.sum(-1)
        w_hat = w / w_real[..., None].clamp_min(POLAR_EPS)
        n_eff = 1.0 / (w_hat * w_hat).sum(-1).clamp_min(POLAR_EPS)
        magnitudes.append(torch.tanh(beta_eff * torch.log1p(n_eff * w_real)))
    direction = torch.cat(directions, dim=3).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, d)
    magnitude = torch.cat(magnitudes, dim=3).permute(0, 3, 1, 2).reshape(B, Tq, H)
    return direction.to(q.dtype), magnitude.to(q.dtype)


def softmax_attention(q, k, v, *, scale, q_start, k_start, window):
    """Softmax attention of q (B,Tq,H,d) at positions q_start.. over k, v (B,Tk,G,d) at positions k_start.."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q_start == k_start and window is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = visible_keys(q_start, q.shape[1], k_start, k.shape[1], window, q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def gated_delta_chunked(q, k, v, g, beta, state, chunk):
    """Gated delta rule over T tokens, chunk by chunk (WY form); returns o (B,T,H,dv) and the final state.

    q, k (B,T,H,dk) unit-norm, v (B,T,H,dv), g = log-decay and beta (B,T,H); state (B,H,dk,dv) = M^T
    or None (zeros). Per token: M <- gamma M; M <- M + beta (v - M k) k^T; read M q after the write.
    Computed in fp32 or wider, also under autocast.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _gated_delta_chunks(q, k, v, g, beta, state, chunk)


def _gated_delta_chunks(q, k, v, g, beta, state, chunk):
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    cdt = torch.promote_types(compute_dtype(q.dtype), torch.float32)
    S = q.new_zeros((B, H, dk, dv), dtype=cdt) if state is None else state.to(cdt)
    outputs = []
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        qc, kc, vc = (x[:, c0:c1].transpose(1, 2).to(cdt) for x in (q, k, v))  # (B,H,C,d)
        gc, bc = (x[:, c0:c1].transpose(1, 2).to(cdt) for x in (g, beta))  # (B,H,C)
        lam = gc.cumsum(-1)  # inclusive cumulative log-decay
        C = c1 - c0
        lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        decay = torch.exp((lam[..., :, None] - lam[..., None, :]).masked_fill(~lower, float("-inf")))
        strict = decay * (~torch.eye(C, dtype=torch.bool, device=q.device))
        system = torch.eye(C, dtype=cdt, device=q.device) + bc[..., None] * (kc @ kc.transpose(-1, -2)) * strict
        rhs = bc[..., None] * (vc - torch.exp(lam)[..., None] * (kc @ S))
        u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        outputs.append(torch.exp(lam)[..., None] * (qc @ S) + ((qc @ kc.transpose(-1, -2)) * decay) @ u)
        to_end = torch.exp(lam[..., -1:] - lam)[..., None] * kc
        S = torch.exp(lam[..., -1])[..., None, None] * S + to_end.transpose(-1, -2) @ u
    o = torch.cat(outputs, dim=2).transpose(1, 2)
    return o.to(v.dtype), S


def gated_delta_step(q, k, v, g, beta, state):
    """One token of the gated delta rule (recurrent form): decay, delta write, readout; O(1) per token."""
    cdt = torch.promote_types(state.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q_, k_, v_ = q[:, 0].to(cdt), k[:, 0].to(cdt), v[:, 0].to(cdt)
        decayed = state.to(cdt) * torch.exp(g[:, 0].to(cdt))[..., None, None]
        prediction = torch.einsum("bhkv,bhk->bhv", decayed, k_)
        S = decayed + beta[:, 0].to(cdt)[..., None, None] * k_[..., :, None] * (v_ - prediction)[..., None, :]
        o = torch.einsum("bhkv,bhk->bhv", S, q_)
    return o[:, None].to(v.dtype), S


# ---------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm with a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv (weight (C, 1, K), no bias) that continues from the last K-1 inputs."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(kernel_size), 1.0 / math.sqrt(kernel_size))

    def forward(self, x: torch.Tensor, history: torch.Tensor | None):
        """x (B,T,C) after `history` (B,K-1,C; None: zeros); returns y (B,T,C) and the new history."""
        K = self.weight.shape[-1]
        if history is None:
            inputs = F.pad(x, (0, 0, K - 1, 0))
        else:
            inputs = torch.cat([history.to(x.dtype), x], dim=1)
        if x.shape[1] == 1:
            # One decode step: the K taps against the last K inputs, without a conv launch.
            y = torch.einsum("bkc,ck->bc", inputs, self.weight[:, 0].to(x.dtype))[:, None]
        else:
            y = F.conv1d(inputs.transpose(1, 2), self.weight.to(x.dtype), groups=x.shape[-1]).transpose(1, 2)
        return y, inputs[:, inputs.shape[1] - (K - 1) :].clone()


class MLP(nn.Module):
    """Squared-ReLU gated MLP: proj(g * relu(a)^2) with [a, g] = split(fc(x))."""

    def __init__(self, hidden: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 2 * ratio * hidden)
        self.proj = nn.Linear(ratio * hidden, hidden)

    def forward(self, x):
        a, g = self.fc(x).chunk(2, dim=-1)
        return self.proj(g * F.relu(a).square())


class LFM2Conv(nn.Module):
    """LFM2 gated short convolution: out_proj(C * conv(B * U)) with [B, C, U] = split(in_proj(x))."""

    def __init__(self, config: AtmaConfig):
        super().__init__()
        D = config.hidden_size
        self.in_proj = nn.Linear(D, 3 * D)
        self.conv = CausalDepthwiseConv(D, config.conv_kernel_size)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x, state: BlockState, offset: int):
        b_gate, c_gate, u = self.in_proj(x).chunk(3, dim=-1)
        y, state.histories["conv"] = self.conv(b_gate * u, state.histories.get("conv"))
        return self.out_proj(c_gate * y)


class HalfTruncatedRotary(nn.Module):
    """RoPE on pairs (x_f, x_{f+d/2}) with d/4 live frequencies from 1 to 1/1024 and d/4 zeros."""

    def __init__(self, head_dim: int):
        super().__init__()
        quarter = head_dim // 4
        live = (1.0 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
        self.register_buffer("angular_freq", torch.cat([live, live.new_zeros(quarter)]))

    def forward(self, x, offset: int):
        """Rotate x (B,T,heads,d) by positions offset..offset+T-1, in fp32."""
        pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float32)
        theta = pos[:, None] * self.angular_freq.float()[None, :]
        cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class GatedDeltaMemory(nn.Module):
    """Gated-delta fast-weight memory read with the attention's q, k, v (the additive third channel)."""

    def __init__(self, config: AtmaConfig):
        super().__init__()
        D, H, d = config.hidden_size, config.num_attention_heads, config.head_dim
        self.num_heads, self.head_dim, self.chunk = H, d, config.mem_chunk
        self.gamma_bias, self.beta_bias = config.mem_gamma_bias, config.mem_beta_bias
        self.w_gamma = nn.Linear(D, H)
        self.w_beta = nn.Linear(D, H)
        self.gate = nn.Linear(D, H * d)
        self.proj = nn.Linear(H * d, D)

    def forward(self, x, q, k, v, state: BlockState):
        """x: normed block input (B,T,D); q, k, v (B,T,H,d); the memory state continues in `state`."""
        B, T, _ = x.shape
        g = F.logsigmoid(self.w_gamma(x).float() + self.gamma_bias)
        beta = torch.sigmoid(self.w_beta(x).float() + self.beta_bias)
        q_hat = F.normalize(q.float(), dim=-1, eps=1e-12).to(v.dtype)
        k_hat = F.normalize(k.float(), dim=-1, eps=1e-12).to(v.dtype)
        if state.memory is not None and T == 1:
            r, state.memory = gated_delta_step(q_hat, k_hat, v, g, beta, state.memory)
        else:
            r, state.memory = gated_delta_chunked(q_hat, k_hat, v, g, beta, state.memory, self.chunk)
        r = head_rms_norm(r).reshape(B, T, self.num_heads * self.head_dim).to(x.dtype)
        return self.proj(r * torch.sigmoid(self.gate(x)))


class GlobalAttention(nn.Module):
    """q+gate / k / v projections, QK-norm, canon convs, GQA core (polar, nope, rope), output gate, memory."""

    def __init__(self, config: AtmaConfig):
        super().__init__()
        D, H, G, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.core, self.window, self.H, self.G, self.d = config.core, config.window, H, G, d
        self.q = nn.Linear(D, 2 * H * d)
        self.k = nn.Linear(D, G * d)
        self.v = nn.Linear(D, G * d)
        self.proj = nn.Linear(H * d, D)
        if config.core != "rope":
            K = config.attn_kernel_size
            self.canon_q = CausalDepthwiseConv(H * d, K)
            self.canon_k = CausalDepthwiseConv(G * d, K)
            self.canon_v = CausalDepthwiseConv(G * d, K)
        if config.core == "polar":
            self.mu_proj = nn.Linear(H, D)
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
        self.mem = GatedDeltaMemory(config) if config.memory else None

    def canon(self, name: str, x: torch.Tensor, state: BlockState) -> torch.Tensor:
        """x + canon conv `name` of x (B,T,heads,d), continued from the history in `state`."""
        B, T, heads, d = x.shape
        y, state.histories[name] = getattr(self, name)(x.reshape(B, T, heads * d), state.histories.get(name))
        return x + y.view(B, T, heads, d)

    def expand_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,G,d) -> (B,T,H,d): query head h reads key/value head h // (H // G)."""
        r = self.H // self.G
        return x.repeat_interleave(r, dim=2) if r > 1 else x

    def forward(self, x, state: BlockState, offset: int):
        B, T, _ = x.shape
        H, G, d = self.H, self.G, self.d
        qg = self.q(x).view(B, T, H, 2 * d)
        q, gate = head_rms_norm(qg[..., :d]), qg[..., d:]
        k, v = head_rms_norm(self.k(x).view(B, T, G, d)), self.v(x).view(B, T, G, d)
        if self.core != "rope":
            q, k, v = self.canon("canon_q", q, state), self.canon("canon_k", k, state), self.canon("canon_v", v, state)
        qc, kc = (self.rotary(q, offset), self.rotary(k, offset)) if self.core == "rope" else (q, k)
        num_cached = len(state.kv)
        keys, values = state.kv.append(kc, v)
        positions = dict(q_start=offset, k_start=offset - num_cached, window=self.window)
        if self.core == "polar":
            params = (self.v_null, self.null_base, self.null_slope_raw, self.len_gain_raw, self.mag_beta_raw)
            c, mu = polar_attention(q, keys, values, *params, **positions)
            out = self.proj((c * torch.sigmoid(gate)).reshape(B, T, -1)) + self.mu_proj(mu.to(x.dtype))
        else:
            o = softmax_attention(qc, keys, values, scale=self.scale, **positions)
            out = self.proj((o * torch.sigmoid(gate)).reshape(B, T, -1))
        if self.mem is not None:
            out = out + self.mem(x, q, self.expand_heads(k), self.expand_heads(v), state)
        return out


class AtmaBlock(nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + mlp(norm2(x)); the mixer is named `attn`."""

    def __init__(self, config: AtmaConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GlobalAttention(config) if config.is_global(layer) else LFM2Conv(config)
        self.mlp = MLP(config.hidden_size, config.mlp_ratio)

    def forward(self, x, state: BlockState, offset: int):
        x = x + self.attn(self.norm1(x), state, offset)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------- the transformers model
class AtmaPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the ATMA classes."""

    config_class = AtmaConfig
    base_model_prefix = "atma"
    main_input_name = "input_ids"
    _no_split_modules = ["AtmaBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default init for tensors a checkpoint does not provide."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, CausalDepthwiseConv):
            bound = 1.0 / math.sqrt(module.weight.shape[-1])
            module.weight.uniform_(-bound, bound)
        elif isinstance(module, GlobalAttention) and module.core == "polar":
            module.v_null.zero_()
            module.null_base.fill_(2.0)
            module.null_slope_raw.fill_(0.5)
            module.len_gain_raw.fill_(-1.0)
            module.mag_beta_raw.fill_(-1.5)
        elif isinstance(module, HalfTruncatedRotary):
            quarter = module.angular_freq.shape[0] // 2
            live = (1.0 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
            module.angular_freq.copy_(torch.cat([live, live.new_zeros(quarter)]))


class AtmaForCausalLM(AtmaPreTrainedModel, GenerationMixin):
    """ATMA decoder with a soft-capped LM head; `generate()` decodes with an `AtmaCache`."""

    def __init__(self, config: AtmaConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(AtmaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.proj

    def set_output_embeddings(self, value):
        self.proj = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoding state is an AtmaCache, which forward creates on the first call.
        return False

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen yet."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seq_len > 0:
            input_ids = input_ids[:, cache.seq_len :]
        return {"input_ids": input_ids, CACHE_FIELD: cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: AtmaCache | None = None,
        past_key_values: AtmaCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """Logits (B,T,V) (the last `logits_to_keep` positions when > 0) after the tokens in `cache`.

        With `use_cache` the returned cache holds the decoding state; pass it back to continue.
        `labels` (B,T) give the mean next-token cross-entropy (-100 ignored). Padding may only
        follow the tokens (right padding): the model counts positions from the first token.
        """
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("AtmaForCausalLM needs input_ids of shape (batch, seq_len) with seq_len >= 1")
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError(
                "AtmaForCausalLM takes padding only after a sequence's last token: a token after padding (left "
                "padding, or generate() on a batch of prompts of unequal length) is refused; generate unequal "
                "prompts one at a time or in batches of equal length"
            )
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = cache if cache is not None else AtmaCache(self.config)
        x = self.embed(input_ids)
        for block, block_state in zip(self.blocks, state.layers):
            x = block(x, block_state, state.seq_len)
        state.seq_len += input_ids.shape[1]
        hidden = self.norm(x)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = softcap(self.proj(hidden), self.config.logit_softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: state if use_cache else None})
        return output if return_dict is None or return_dict else output.to_tuple()
