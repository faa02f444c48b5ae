"""On a GPU: the model with the Triton kernels equals the model on the PyTorch paths."""

import pytest
import torch

from model import AtmaConfig, AtmaForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.nan_poison]


def run(model, ids, backend, monkeypatch):
    monkeypatch.setenv("ATMA_KERNELS", backend)
    model.zero_grad()
    out = model(ids, ids, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("window", [None, 256])
def test_model_with_kernels_equals_without(monkeypatch, dtype, tol, window):
    torch.manual_seed(0)
    config = AtmaConfig.from_preset("tiny", head_dim=64, num_attention_heads=4, num_key_value_heads=1,
                                    window=window)
    model = AtmaForCausalLM(config).cuda().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    ids = torch.randint(0, config.vocab_size, (2, 1024), device="cuda")
    logits_t, grads_t = run(model, ids, "triton", monkeypatch)
    logits_p, grads_p = run(model, ids, "torch", monkeypatch)
    scale = logits_p.abs().max().item()
    assert (logits_t - logits_p).abs().max().item() <= tol * scale
    for name, g in grads_p.items():
        err = (grads_t[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err.item() <= 5 * tol, (name, err.item())
