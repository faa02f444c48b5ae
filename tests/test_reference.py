"""The fp64 oracles reproduce the golden vectors of SPEC §10 (the ground truth for every fast path),
and only tests import them."""

import os

import pytest
import torch

from helpers import (
    GATED_DELTA_GOLDEN,
    POLAR_GOLDEN,
    ROOT,
    assert_golden,
    gated_delta_golden_inputs,
    polar_golden_inputs,
    polar_golden_params,
    polar_golden_upstream,
    project_sources,
)
from kernels.causal_conv.naive import causal_conv1d_naive
from kernels.gated_delta.naive import gated_delta_rule_naive
from kernels.polar.naive import polar_attention_naive

pytestmark = pytest.mark.nan_poison


def test_polar_oracle_init_case():
    gold = POLAR_GOLDEN["init"]
    q, k, v = polar_golden_inputs()
    c, mu = polar_attention_naive(q, k, v, *polar_golden_params("init"))
    assert_golden(mu[0].T, gold["mu"])
    assert_golden(c[0, 4], gold["c_t4"])
    assert_golden(c[0, 0, 0], gold["c_t0_h0"])
    _, mu_w = polar_attention_naive(q, k, v, *polar_golden_params("init"), window=2)
    assert_golden(mu_w[0, :, 0], gold["mu_h0_window2"])


def test_polar_oracle_trained_case_with_gradients():
    gold = POLAR_GOLDEN["trained"]
    q, k, v = polar_golden_inputs()
    q.requires_grad_(True)
    params = [p.requires_grad_(True) for p in polar_golden_params("trained")]
    c, mu = polar_attention_naive(q, k, v, *params)
    assert_golden(mu[0].T, gold["mu"])
    assert_golden(c[0, 4], gold["c_t4"])
    g_c, g_mu = polar_golden_upstream()
    loss = (c * g_c).sum() + (mu * g_mu).sum()
    assert abs(loss.item() - gold["loss"]) < 1e-9
    loss.backward()
    v_null, null_base, null_slope, len_gain, mag_beta = params
    assert_golden(null_base.grad, gold["grads"]["null_base"])
    assert_golden(null_slope.grad, gold["grads"]["null_slope_raw"])
    assert_golden(len_gain.grad, gold["grads"]["len_gain_raw"])
    assert_golden(mag_beta.grad, gold["grads"]["mag_beta_raw"])
    assert_golden(v_null.grad, gold["grads"]["v_null"])
    assert_golden(q.grad[0, 4], gold["grads"]["q_t4"])


def test_gated_delta_oracle_golden():
    o, state = gated_delta_rule_naive(*gated_delta_golden_inputs(), output_final_state=True)
    assert_golden(o[0, :, 0], GATED_DELTA_GOLDEN["o"])
    assert_golden(state[0, 0].T, GATED_DELTA_GOLDEN["final_M"])


def test_causal_conv_oracle_by_hand():
    """y[t] = sum_k w[k] x[t - (K - 1) + k] with zeros before the start: checked on a ramp."""
    x = torch.arange(1.0, 6.0, dtype=torch.float64)[None, :, None]  # (1, 5, 1): 1..5
    w = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)  # weight[:, 2] hits the current token
    y = causal_conv1d_naive(x, w)
    expected = [2 * 1, 2 * 2 - 1, 2 * 3 - 2 + 0.5 * 1, 2 * 4 - 3 + 0.5 * 2, 2 * 5 - 4 + 0.5 * 3]
    assert_golden(y[0, :, 0], expected, atol=0.0)


def _imports(path: str):
    """Yield (module, names) for every import statement of a Python file (relative modules resolved)."""
    import ast

    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [alias.name for alias in node.names]


def test_no_module_outside_tests_imports_an_oracle():
    offenders = []
    for path in project_sources():
        for module, names in _imports(path):
            if module.split(".")[-1] == "naive" or "naive" in names:
                offenders.append(f"{os.path.relpath(path, ROOT)}: {module} {names}")
    assert not offenders


def test_model_uses_only_the_public_kernel_api():
    import kernels

    offenders = []
    for path in project_sources():
        if os.path.relpath(path, ROOT).split(os.sep)[0] != "model":
            continue
        for module, names in _imports(path):
            private = module.startswith("kernels.") or (module == "kernels" and set(names) - set(kernels.__all__))
            if private:
                offenders.append(f"{os.path.relpath(path, ROOT)}: {module} {names}")
    assert not offenders
