"""What the kernel tests share: error measures, the SPEC §10 golden vectors and input makers.

The oracle tests (`test_reference.py`), the PyTorch-path tests and the Triton tests all read
the golden vectors from here, so each value of SPEC §10 is written once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

F64 = torch.float64
# Gradient names of the Polar core, in argument order.
POLAR_GRAD_NAMES = ("q", "k", "v", "v_null", "null_base", "null_slope_raw", "len_gain_raw", "mag_beta_raw")
# The golden vectors are printed with 10 decimals.
GOLD_TOL = 1e-9


# ------------------------------------------------------------------------------ error measures
def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected|, in fp64."""
    return (actual.double() - expected.double()).abs().max().item()


def rel_max_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-6) -> float:
    """max |actual - expected| relative to max |expected| (absolute below a scale of `floor`)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()


def rel_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| (Frobenius norms), in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_golden(actual: torch.Tensor, expected, atol: float = GOLD_TOL, rtol: float = 0.0) -> None:
    """Assert `actual` equals a golden value (nested lists) to `atol` / `rtol`."""
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual.detach().double().cpu(), expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------ SPEC §10.1 Polar
POLAR_GOLDEN_SHAPE = dict(B=1, T=5, H=2, d=4)

POLAR_GOLDEN_PARAMS = {
    # v_null (H, d), null_base, null_slope_raw, len_gain_raw, mag_beta_raw (H,)
    "init": ([[0.0] * 4, [0.0] * 4], [2.0, 2.0], [0.5, 0.5], [-1.0, -1.0], [-1.5, -1.5]),
    "trained": ([[0.1, 0.2, 0.3, 0.4], [-0.4, 0.3, -0.2, 0.1]], [0.5, -0.25], [0.0, 1.0], [0.3, -0.5], [0.2, -1.0]),
}

POLAR_GOLDEN = {
    "init": {
        # mu[h, t]
        "mu": [[0.0475199446, 0.0500505796, 0.0247077181, 0.0216400381, 0.0566294878],
               [0.0245761134, 0.0162149082, 0.0177022286, 0.0573772110, 0.0591427419]],
        # c[t=4, h, :]
        "c_t4": [[-0.6211095200, -0.1295870333, 0.5035491686, 0.5864029330],
                 [-0.5386235661, 0.1634525463, 0.6869064482, 0.4597036551]],
        # c[t=0, h=0, :]
        "c_t0_h0": [0.2327265097, 0.7760561580, 0.4713056168, -0.3484913584],
        # mu[h=0, t] with window 2
        "mu_h0_window2": [0.0475199446, 0.0500505796, 0.0157742878, 0.0283956104, 0.0756822373],
    },
    "trained": {
        "mu": [[0.3889823368, 0.4937076901, 0.3424161319, 0.2950060584, 0.6215444522],
               [0.1296521227, 0.1369706813, 0.1436915445, 0.2643887710, 0.2986011863]],
        "c_t4": [[-0.5483052139, -0.0873937820, 0.5241990211, 0.6457082201],
                 [-0.6389769576, 0.2488763209, 0.5618058489, 0.4627561049]],
        # L = sum c * G_c + sum mu * G_mu (polar_golden_upstream) and its gradients
        "loss": 9.0876503051,
        "grads": {
            "null_base": [0.7217345516, -1.8191355144],
            "null_slope_raw": [0.3912269260, -1.4692495109],
            "len_gain_raw": [-0.1160025688, -0.4094581763],
            "mag_beta_raw": [0.6422649429, 0.6964154007],
            "v_null": [[2.6709444686, 0.6220475717, 0.0874279854, 1.0376640432],
                       [3.3159903673, 1.5181306378, 2.1710300075, 2.2951443155]],
            # dq[t=4, h, :]
            "q_t4": [[0.0602186903, 0.0750956630, 0.0869788087, 0.0953943837],
                     [-0.0539001945, -0.0396750050, -0.0238680984, -0.0071096459]],
        },
    },
}


def _polar_golden_grid():
    """Index grids h (1, H, 1), t (T, 1, 1), j (1, 1, d) of SPEC §10.1, laid out (T, H, d)."""
    T, H, d = POLAR_GOLDEN_SHAPE["T"], POLAR_GOLDEN_SHAPE["H"], POLAR_GOLDEN_SHAPE["d"]
    h = torch.arange(H, dtype=F64)[None, :, None]
    t = torch.arange(T, dtype=F64)[:, None, None]
    j = torch.arange(d, dtype=F64)[None, None, :]
    return h, t, j


def polar_golden_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of SPEC §10.1 in (B=1, T=5, H=2, d=4) layout, fp64."""
    h, t, j = _polar_golden_grid()
    q = torch.sin(1 + h + 0.7 * t + 0.3 * j)
    k = torch.cos(0.5 + 0.4 * h + 0.9 * t - 0.2 * j)
    v = torch.sin(0.3 + 0.2 * h - 0.5 * t + 1.1 * j)
    return q[None], k[None], v[None]


def polar_golden_params(case: str) -> list[torch.Tensor]:
    """The five per-head parameter tensors of a SPEC §10.1 case ("init" or "trained"), fp64."""
    return [torch.tensor(x, dtype=F64) for x in POLAR_GOLDEN_PARAMS[case]]


def polar_golden_upstream() -> tuple[torch.Tensor, torch.Tensor]:
    """G_c (1, T, H, d) = cos(0.3h + 0.2t + 0.1j) and G_mu (1, T, H) = sin(0.5h + 0.3t) (SPEC §10.1)."""
    h, t, j = _polar_golden_grid()
    return torch.cos(0.3 * h + 0.2 * t + 0.1 * j)[None], torch.sin(0.5 * h[..., 0] + 0.3 * t[..., 0])[None]


# ------------------------------------------------------------------------------ SPEC §10.2 gated delta
GATED_DELTA_GOLDEN = {
    # readout r_t (T=6, d_v=3)
    "o": [[0.2335716233, 0.2703161204, 0.1430904861],
          [0.4658632056, 0.6579463627, 0.4509280850],
          [0.4283928797, 0.6874753242, 0.5295444620],
          [-0.2811447225, -0.8784890886, -0.9429537618],
          [-0.3214221031, -0.2294248702, 0.0017384104],
          [-0.4174883555, 0.3346564205, 0.8838031024]],
    # final M: rows = v index, columns = k index (the transpose of the FLA state)
    "final_M": [[0.1944628669, 0.2874660396, 0.2800490541],
                [-0.5845059445, -0.1230060974, 0.3814633184],
                [-1.0089212933, -0.4588643862, 0.2514870525]],
}


def gated_delta_golden_inputs() -> tuple[torch.Tensor, ...]:
    """q, k (unit), v, g = log gamma, beta of SPEC §10.2 in (B=1, T=6, H=1, d=3) layout, fp64."""
    t = torch.arange(6, dtype=F64)[:, None]
    j = torch.arange(3, dtype=F64)[None, :]
    q = F.normalize(torch.sin(0.2 + 0.9 * t + 0.5 * j), dim=-1)
    k = F.normalize(torch.cos(0.1 + 0.7 * t - 0.6 * j), dim=-1)
    v = torch.sin(1.0 - 0.3 * t + 0.8 * j)
    g = F.logsigmoid(3.9 - 0.5 * t[:, 0])
    beta = torch.sigmoid(-0.5 + 0.4 * t[:, 0])
    return q[None, :, None], k[None, :, None], v[None, :, None], g[None, :, None], beta[None, :, None]


# ------------------------------------------------------------------------------ input makers
def polar_case(B, T, H, G, D, *, seed=0, device="cpu", qk_scale=1.0, scalar_scale=1.0, v_null_scale=0.5,
               null_base=None):
    """Random fp64 Polar inputs [q, k, v, v_null, null_base, null_slope_raw, len_gain_raw, mag_beta_raw]
    and upstream gradients (g_dir (B,T,H,D), g_mag (B,T,H)), all from one seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, device=device, dtype=F64)

    base = rnd(H, scale=scalar_scale) if null_base is None else torch.full((H,), float(null_base), device=device,
                                                                          dtype=F64)
    inputs = [rnd(B, T, H, D, scale=qk_scale), rnd(B, T, G, D, scale=qk_scale), rnd(B, T, G, D),
              rnd(H, D, scale=v_null_scale), base, rnd(H, scale=scalar_scale), rnd(H, scale=scalar_scale),
              rnd(H, scale=scalar_scale)]
    return inputs, rnd(B, T, H, D), rnd(B, T, H)


def polar_forward_backward(fn, inputs, g_dir, g_mag, *, dtype=F64, param_dtype=None, **kw):
    """Run fn on leaf copies of `inputs` (q, k, v in `dtype`, the parameters in `param_dtype`, by
    default fp64 for fp64 and fp32 otherwise) and backpropagate sum(c g_dir) + sum(mu g_mag).

    Returns (direction, magnitude, gradients in argument order), in the dtypes fn produced.
    """
    if param_dtype is None:
        param_dtype = F64 if dtype == F64 else torch.float32
    leaves = [x.detach().to(dtype if i < 3 else param_dtype).requires_grad_() for i, x in enumerate(inputs)]
    direction, magnitude = fn(*leaves, **kw)
    loss = (direction.double() * g_dir).sum() + (magnitude.double() * g_mag).sum()
    grads = torch.autograd.grad(loss, leaves)
    return direction.detach(), magnitude.detach(), list(grads)


def gated_delta_case(B, T, H, dk, dv, *, dtype=F64, seed=0, with_state=True):
    """Random (q, k, v, g, beta, initial_state or None) with unit q, k and log-decays g <= 0."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q = F.normalize(rnd(B, T, H, dk), dim=-1)
    k = F.normalize(rnd(B, T, H, dk), dim=-1)
    v = rnd(B, T, H, dv)
    g = F.logsigmoid(rnd(B, T, H) + 2.5)
    beta = torch.sigmoid(rnd(B, T, H))
    h0 = rnd(B, H, dk, dv) * 0.5 if with_state else None
    cast = [x.to(dtype) for x in (q, k, v, g, beta)]
    return (*cast, None if h0 is None else h0.to(dtype))


def conv_case(B, T, C, K, *, dtype=F64, device="cpu", seed=0, channel_stride=1):
    """Random x (B, T, C) in `dtype` (channel stride `channel_stride`: a view, not a copy), fp64
    weight (C, K) and fp64 upstream gradient dy (B, T, C)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, channel_stride * C, generator=gen, device=device, dtype=F64).to(dtype)[..., ::channel_stride]
    w = torch.randn(C, K, generator=gen, device=device, dtype=F64)
    dy = torch.randn(B, T, C, generator=gen, device=device, dtype=F64)
    return x, w, dy


def fenced(x: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """x's values as a dense view into the middle of a larger buffer filled with NaN (integers: 2**30), so that
    a kernel that reads past either end of x reads the fence (NaN results, or a wild index) instead of whatever
    memory happens to lie there."""
    fill = float("nan") if x.is_floating_point() else 2**30
    buffer = torch.full((pad + x.numel() + pad,), fill, dtype=x.dtype, device=x.device)
    view = buffer[pad:pad + x.numel()].view(x.shape)
    view.copy_(x.detach())
    return view


def assert_same_results(got, want, what: str) -> None:
    """Every tensor of `got` equals the one of `want` bit for bit (NaN where it is NaN)."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=f"{what}: result {i}")


class _KeptLangPatch:
    """Stands in for the interpreter's patch scope when the running kernel's patches are reused."""

    def restore(self) -> None:
        """Leave the kernel's patches for the kernel's own scope to undo."""


def reuse_interpreter_patches() -> None:
    """Under TRITON_INTERPRET=1, let a @triton.jit helper called from a running kernel reuse the
    kernel's patched `triton.language` instead of re-patching it on every call (idempotent).

    The interpreter patches the language modules before each launch and undoes it after; it also
    re-patches them, with the same values, on every device-function call inside the kernel (and
    never undoes that), which is most of the time the Polar kernels take on the CPU. A helper that
    sees a language module not yet patched during this launch still gets its own patch. Does
    nothing on a Triton without these internals.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original_patch is None or executor is None or getattr(original_patch, "_reuses_kernel_patch", False):
        return
    original_call = executor.__call__
    state = {"depth": 0, "langs": None}  # kernels being run; language modules their patch covers

    def langs_of(fn) -> set:
        return {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}

    def patch_lang(fn):
        langs = langs_of(fn)
        if state["langs"] is not None and langs <= state["langs"]:
            return _KeptLangPatch()
        scope = original_patch(fn)
        if state["depth"]:  # the launch's own patch, or a helper's that stays until the launch ends
            state["langs"] = langs | (state["langs"] or set())
        return scope

    def call(self, *args, **kwargs):
        outer = state["langs"]
        state["depth"] += 1
        state["langs"] = None
        try:
            return original_call(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
            state["langs"] = outer

    patch_lang._reuses_kernel_patch = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call


def interpret_fla_kernels() -> None:
    """Under TRITON_INTERPRET=1, let flash-linear-attention's Triton kernels run on the CPU (idempotent).

    Three things stop them in the interpreter: its autotuner times the candidates with a GPU
    benchmarker (here every candidate gets the same time, so the first one runs); a `for i in
    range(n)` index is a plain Python int there, while FLA's kernels call `i.to(tl.int64)` on it as
    on the tensor a compiled kernel has (in FLA's kernels the index becomes such a tensor at the top
    of the loop body; other kernels are rewritten as before); and triton 3.6's interpreter cannot
    take a tensor as a runtime loop bound under numpy >= 2.4 (`patch_interpreter_index`, as our
    kernels do). bf16 stays out of reach: the interpreter keeps it as raw uint16 bits, which its
    `tl.dot` and arithmetic take for numbers (the Polar kernels upcast for it), so these runs use
    fp16, FLA's other input dtype.
    """
    import ast

    from triton.runtime import autotuner, interpreter

    from kernels.common import patch_interpreter_index

    if getattr(interpreter.FunctionRewriter, "_fla_loop_index", False):
        return

    def equal_times(self, *args, config=None, **kwargs):
        return [0.0, 0.0, 0.0]

    class LoopIndexAsTensor(ast.NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            plain_range = (isinstance(node.iter, ast.Call) and isinstance(node.iter.func, ast.Name)
                           and node.iter.func.id == "range")
            if plain_range and isinstance(node.target, ast.Name):
                name = node.target.id
                # `i = i`: the interpreter's rewrite of assignments turns the value into a tensor.
                rebind = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())],
                                    value=ast.Name(id=name, ctx=ast.Load()))
                node.body.insert(0, ast.copy_location(rebind, node))
            return node

    transform = interpreter.FunctionRewriter._transform_ast

    def transform_fla(self, src):
        if getattr(self.fn, "__module__", "").startswith("fla."):
            src = LoopIndexAsTensor().visit(ast.parse(src))  # ast.parse returns a tree it is given
        return transform(self, src)

    autotuner.Autotuner._bench = equal_times
    patch_interpreter_index()
    interpreter.FunctionRewriter._transform_ast = transform_fla
    interpreter.FunctionRewriter._fla_loop_index = True


def with_live_weights(model, std: float = 0.05):
    """Give every all-zero tensor of `model` (the zero-initialised projections and head) N(0, std) weights."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, std)
    return model


def live_model(core: str = "polar", memory: bool = True, window: int | None = None):
    """The tiny preset (vocab 512, memory chunks of 8, so a position can fall inside a chunk, at its start or
    in a later one) with every zero-initialised tensor given weights, in eval mode."""
    from model import AtmaConfig, AtmaForCausalLM

    torch.manual_seed(0)
    config = AtmaConfig.from_preset("tiny", core=core, memory=memory, window=window, mem_chunk=8, vocab_size=512)
    return with_live_weights(AtmaForCausalLM(config).eval(), std=0.1)


def induction_next(ids: list[int], t: int, max_match: int = 16) -> int:
    """The token that followed the longest earlier match (up to ``max_match``) of ``ids[: t + 1]``'s suffix."""
    best_len, best_next = 0, 0
    for j in range(t - 1, -1, -1):
        m = 0
        while m < max_match and j - m >= 0 and ids[j - m] == ids[t - m]:
            m += 1
        if m > best_len:
            best_len, best_next = m, ids[j + 1]
    return best_next


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_sources() -> list[str]:
    """Paths of the .py files of the project's packages (top-level folders with an __init__.py, tests
    excluded), so that a virtual environment or other folder inside the checkout is never read."""
    paths = []
    for package in sorted(os.listdir(ROOT)):
        top = os.path.join(ROOT, package)
        if package == "tests" or not os.path.isfile(os.path.join(top, "__init__.py")):
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            paths += [os.path.join(folder, name) for name in sorted(files) if name.endswith(".py")]
    return paths



def write_finished_manifest(directory: str, seq_len: int, tokenizer_sha256: str = "0" * 64, **settings) -> str:
    """Write the manifest.json of a finished (empty) dataset made with `settings`, as prepare records them."""
    import numpy as np

    from data_pipeline.manifest import MANIFEST_FILE, Manifest, SplitInfo, write_json_atomic
    from data_pipeline.shard_format import SampleLayout

    layout = SampleLayout(seq_len, np.dtype("uint16"), checksums=True)
    manifest = Manifest(seq_len=seq_len, dtype="uint16", vocab_size=settings.get("vocab_size") or 512, eos_id=0,
                        eos_token="<|endoftext|>", tokenizer_file="tokenizer.json", tokenizer_sha256=tokenizer_sha256,
                        tokenizer_origin="test", samples_per_shard=1, record_bytes=layout.record_bytes,
                        splits={"train": SplitInfo(0, 0, 0, 0, 0)}, settings={"seq_len": seq_len, **settings})
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(os.path.join(directory, MANIFEST_FILE), manifest.to_dict())
    return directory


# ------------------------------------------------------------------------------ interpreter children
def run_interpreter_tests(test_file: str, *, shards: int = 2, timeout: int = 900) -> None:
    """Run `test_file`'s interpreter tests in `shards` child pytest processes with TRITON_INTERPRET=1, side by
    side (tests/conftest.py gives child i every shards-th test from the i-th); assert every child passes.

    Interpreted kernels are single-threaded Python, so two children keep two cores busy.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    children = []
    for i in range(shards):
        env = dict(os.environ, TRITON_INTERPRET="1", ATMA_TEST_SHARD=f"{i}/{shards}")
        log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-m", "not gpu", "-p",
               "no:cacheprovider"]
        children.append((subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for i, (proc, log) in enumerate(children):
            proc.wait(timeout=timeout)
            log.seek(0)
            assert proc.returncode == 0, f"child {i}/{shards}:\n" + log.read()[-10000:]
    finally:
        for proc, log in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
