"""The fp64 oracles reproduce the golden vectors of SPEC §10 (the ground truth for every fast path)."""

import torch

from model.reference import gated_delta_reference, polar_attention_reference


def polar_golden_inputs():
    H, T, d = 2, 5, 4
    h = torch.arange(H, dtype=torch.float64)[:, None, None]
    t = torch.arange(T, dtype=torch.float64)[None, :, None]
    j = torch.arange(d, dtype=torch.float64)[None, None, :]
    q = torch.sin(1 + h + 0.7 * t + 0.3 * j).permute(1, 0, 2)[None]
    k = torch.cos(0.5 + 0.4 * h + 0.9 * t - 0.2 * j).permute(1, 0, 2)[None]
    v = torch.sin(0.3 + 0.2 * h - 0.5 * t + 1.1 * j).permute(1, 0, 2)[None]
    return q, k, v


def init_params(H=2, d=4):
    f = lambda x: torch.full((H,), x, dtype=torch.float64)  # noqa: E731
    return torch.zeros(H, d, dtype=torch.float64), f(2.0), f(0.5), f(-1.0), f(-1.5)


def test_polar_oracle_init_case():
    q, k, v = polar_golden_inputs()
    c, mu = polar_attention_reference(q, k, v, *init_params())
    want_mu0 = [0.0475199446, 0.0500505796, 0.0247077181, 0.0216400381, 0.0566294878]
    want_mu1 = [0.0245761134, 0.0162149082, 0.0177022286, 0.0573772110, 0.0591427419]
    torch.testing.assert_close(mu[0, :, 0], torch.tensor(want_mu0, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(mu[0, :, 1], torch.tensor(want_mu1, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        c[0, 4, 0], torch.tensor([-0.6211095200, -0.1295870333, 0.5035491686, 0.5864029330], dtype=torch.float64),
        atol=1e-9, rtol=0,
    )
    torch.testing.assert_close(
        c[0, 0, 0], torch.tensor([0.2327265097, 0.7760561580, 0.4713056168, -0.3484913584], dtype=torch.float64),
        atol=1e-9, rtol=0,
    )
    _, mu_w = polar_attention_reference(q, k, v, *init_params(), window=2)
    want_w = [0.0475199446, 0.0500505796, 0.0157742878, 0.0283956104, 0.0756822373]
    torch.testing.assert_close(mu_w[0, :, 0], torch.tensor(want_w, dtype=torch.float64), atol=1e-9, rtol=0)


def test_polar_oracle_trained_case_with_gradients():
    q, k, v = polar_golden_inputs()
    q.requires_grad_(True)
    params = [
        torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.4, 0.3, -0.2, 0.1]], dtype=torch.float64),
        torch.tensor([0.5, -0.25], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
        torch.tensor([0.3, -0.5], dtype=torch.float64),
        torch.tensor([0.2, -1.0], dtype=torch.float64),
    ]
    for p in params:
        p.requires_grad_(True)
    c, mu = polar_attention_reference(q, k, v, *params)
    torch.testing.assert_close(
        mu[0, :, 0], torch.tensor([0.3889823368, 0.4937076901, 0.3424161319, 0.2950060584, 0.6215444522],
                                  dtype=torch.float64), atol=1e-9, rtol=0,
    )
    hh, tt, jj = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (2, 5, 4)), indexing="ij")
    g_c = torch.cos(0.3 * hh + 0.2 * tt + 0.1 * jj).double().permute(1, 0, 2)[None]
    g_mu = torch.sin(0.5 * hh[..., 0] + 0.3 * tt[..., 0]).double().T[None]
    loss = (c * g_c).sum() + (mu * g_mu).sum()
    assert abs(loss.item() - 9.0876503051) < 1e-9
    loss.backward()
    v_null, null_base, null_slope, len_gain, mag_beta = params
    close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float64), atol=1e-9, rtol=0)  # noqa
    close(null_base.grad, [0.7217345516, -1.8191355144])
    close(null_slope.grad, [0.3912269260, -1.4692495109])
    close(len_gain.grad, [-0.1160025688, -0.4094581763])
    close(mag_beta.grad, [0.6422649429, 0.6964154007])
    close(v_null.grad[1], [3.3159903673, 1.5181306378, 2.1710300075, 2.2951443155])
    close(q.grad[0, 4, 0], [0.0602186903, 0.0750956630, 0.0869788087, 0.0953943837])


def test_gated_delta_oracle_golden():
    T = 6
    t = torch.arange(T, dtype=torch.float64)[:, None]
    j = torch.arange(3, dtype=torch.float64)[None, :]
    q = torch.sin(0.2 + 0.9 * t + 0.5 * j)
    k = torch.cos(0.1 + 0.7 * t - 0.6 * j)
    v = torch.sin(1.0 - 0.3 * t + 0.8 * j)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    steps = torch.arange(T, dtype=torch.float64)
    g = torch.log(torch.sigmoid(3.9 - 0.5 * steps))
    beta = torch.sigmoid(-0.5 + 0.4 * steps)
    o, state = gated_delta_reference(
        q[None, :, None], k[None, :, None], v[None, :, None], g[None, :, None], beta[None, :, None],
        output_final_state=True,
    )
    torch.testing.assert_close(o[0, 3, 0], torch.tensor([-0.2811447225, -0.8784890886, -0.9429537618],
                                                        dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(o[0, 5, 0], torch.tensor([-0.4174883555, 0.3346564205, 0.8838031024],
                                                        dtype=torch.float64), atol=1e-9, rtol=0)
    final_m = torch.tensor([[0.1944628669, 0.2874660396, 0.2800490541],
                            [-0.5845059445, -0.1230060974, 0.3814633184],
                            [-1.0089212933, -0.4588643862, 0.2514870525]], dtype=torch.float64)
    torch.testing.assert_close(state[0, 0].T, final_m, atol=1e-9, rtol=0)
