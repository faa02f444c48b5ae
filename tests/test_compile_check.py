"""`python -m pretrain.compile_check`: a training step's Triton kernels compiled for Hopper on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_KERNELS = {"causal_conv1d_fwd_kernel", "causal_conv1d_bwd_kernel", "polar_fwd_kernel", "polar_bwd_kernel_dq",
               "polar_bwd_kernel_dkdv", "polar_bwd_kernel_heads", "softcap_ce_fwd_kernel", "softcap_ce_bwd_kernel"}


def compile_check(*argv, env_extra=None):
    """Run the check in its own process (it patches triton's driver), compiling, not interpreting."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pretrain.compile_check", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_launch_of_a_training_step_compiles_and_fits_on_hopper(tmp_path):
    out = tmp_path / "check.json"
    # FLA's kernels whatever the installed triton (timing only where training refuses them).
    proc = compile_check("--first-candidate", "--fla-timing-only", "--json", str(out),
                         env_extra={"TRITON_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failure"] is None and report["target"]["arch"] == 90
    assert report["memory"]["path"] in ("fla", "fla_timing_only")
    kernels = {row["kernel"]: row for row in report["kernels"]}
    assert OUR_KERNELS <= set(kernels)
    # The LM head loss's kernels with and without the distillation term.
    assert kernels["softcap_ce_fwd_kernel"]["compiled"] == kernels["softcap_ce_bwd_kernel"]["compiled"] == 2
    # The memory ran flash-linear-attention's chunk kernels, forward and backward.
    fla = [name for name, row in kernels.items() if row["module"].startswith("fla.")]
    assert len(fla) >= 6, sorted(kernels)
    assert any("bwd" in name for name in fla)
    # The two Polar backward variants are two compiles of the key/value kernel.
    assert kernels["polar_bwd_kernel_dkdv"]["compiled"] == 2
    for rec in report["records"]:
        assert rec["error"] is None and rec["fits"], rec
        assert rec["registers"] is None or 0 < rec["registers"] <= 255
    assert "every launch of the step has a candidate that compiles and fits on sm_90" in proc.stdout


def test_a_launch_that_fits_nowhere_fails_the_check_and_is_named():
    proc = compile_check("--first-candidate", "--no-memory", "--max-shared", "8192")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "polar_fwd_kernel" in error[0] and "shared memory" in error[0] and "8192" in error[0]
    assert "over the shared memory limit" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, env, expected", [
    (["--arch", "75"], {}, "invalid choice"),
    (["--max-shared", "0"], {}, "--max-shared must be"),
    (["--preset", "nope"], {}, "unknown preset"),
    ([], {"TRITON_INTERPRET": "1"}, "unset TRITON_INTERPRET"),
    (["--no-memory", "--fla-timing-only"], {}, "which --no-memory leaves out"),
])
def test_bad_arguments_and_the_interpreter_are_refused_with_one_line(argv, env, expected, monkeypatch, capsys):
    from pretrain import compile_check as cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_the_stand_in_compiles_every_candidate_keeps_no_timings_and_restores_the_process(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET was set when the suite started")
    import triton
    import triton.language as tl

    from kernels.common.stand_in_gpu import TARGETS, stand_in_gpu

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)],
                     key=["n"], cache_results=True)
    @triton.jit
    def double(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    name_before, driver_before = torch.cuda.get_device_name, triton.runtime.driver._active
    records = []
    x = torch.ones(64)
    with stand_in_gpu(TARGETS[90], records):
        assert torch.cuda.get_device_capability() == (9, 0)
        double[(4,)](x, 64)
    assert [(r.kernel, r.config, r.fits, r.error) for r in records] == [
        ("double", "BLOCK=16 w1 s3", True, None), ("double", "BLOCK=32 w2 s3", True, None)]
    assert torch.equal(x, torch.ones(64))  # compiled, never run
    assert not list(tmp_path.rglob("*.autotune.json"))
    assert torch.cuda.get_device_name is name_before and triton.runtime.driver._active is driver_before


@pytest.mark.parametrize("arch, triton_version, timing_only, path", [
    (90, "3.6.0", False, "chunked"),  # the known-bad Hopper triton: training takes the chunked path
    (90, "3.6.0", True, "fla_timing_only"),
    (90, "3.9.0", False, "fla"),
    (80, "3.6.0", False, "fla"),  # the refusal is for Hopper only
])
def test_the_memory_takes_the_path_training_takes_on_the_target(arch, triton_version, timing_only, path,
                                                                 monkeypatch, capsys, tmp_path):
    """With FLA's kernels refused for training, the check compiles none unless asked for timing only."""
    import triton

    from kernels.gated_delta import fla_bridge
    from pretrain import compile_check as cli

    calls = []

    def step_stand_in(preset, seq_len, micro_batch, *, memory=True, memory_fla=True):
        calls.append((memory_fla, fla_bridge.fla_timing_only_active()))

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(cli, "_fla_version", lambda: "0.6.0")
    monkeypatch.setattr(cli, "run_training_step", step_stand_in)
    out = tmp_path / "check.json"
    argv = ["--arch", str(arch), "--json", str(out)] + (["--fla-timing-only"] if timing_only else [])
    assert cli.main(argv) == 0
    assert calls == [(path != "chunked", path == "fla_timing_only")]
    report = json.loads(out.read_text())
    assert report["memory"]["path"] == path and report["triton"] == triton_version
    printed = capsys.readouterr().out
    assert f"memory: {report['memory']['text']}" in printed
    assert ("#640" in printed) == (path != "fla")


def test_chunked_memory_switch_compiles_the_chunked_path_wherever_fla_would_run(monkeypatch, capsys, tmp_path):
    """--chunked-memory sends the memory to the chunked path (its Triton state carry) even where FLA is allowed."""
    import triton

    from pretrain import compile_check as cli

    calls = []
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(cli, "_fla_version", lambda: None)  # not needed for the chunked path
    monkeypatch.setattr(cli, "run_training_step", lambda *a, memory=True, memory_fla=True: calls.append(memory_fla))
    out = tmp_path / "check.json"
    assert cli.main(["--arch", "90", "--chunked-memory", "--json", str(out)]) == 0
    assert calls == [False]
    assert json.loads(out.read_text())["memory"]["path"] == "chunked"
    assert "--chunked-memory" in capsys.readouterr().out
    for bad in (["--chunked-memory", "--no-memory"], ["--chunked-memory", "--fla-timing-only"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(bad)
        assert stop.value.code == 2


def test_triton_paths_send_the_memory_to_fla_only_when_asked():
    import kernels
    from kernels.common.stand_in_gpu import triton_paths

    dispatch = kernels.gated_delta_rule
    with triton_paths(memory_fla=False):
        assert kernels.gated_delta_rule is dispatch and os.environ["ATMA_KERNELS"] == "triton"
    with triton_paths():
        assert kernels.gated_delta_rule is not dispatch
    assert kernels.gated_delta_rule is dispatch
