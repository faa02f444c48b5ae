"""`python -m kernels.bench`: argument parsing, the FLOP convention, the no-GPU exit and the JSON it keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--seq-lens", "0"], ["--heads", "8", "--kv-heads", "3"], ["--bogus"],
                                  ["--variants-up-to", "0"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2


def test_batch_and_flops_follow_the_stated_convention():
    assert [bench.batch_for(t) for t in (2048, 8192, 32768, 65536)] == [8, 2, 1, 1]
    fwd = bench.attention_flops(2, 8, 8192, 128, backward=False)
    assert fwd == 2 * 2 * 8 * 8192**2 * 128
    assert bench.attention_flops(2, 8, 8192, 128, backward=True) == pytest.approx(3.5 * fwd)


def test_no_gpu_returns_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err


def test_module_entry_point_without_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "kernels.bench", "--iters", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    help_proc = subprocess.run([sys.executable, "-m", "kernels.bench", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert help_proc.returncode == 0 and "--seq-lens" in help_proc.stdout and "--json" in help_proc.stdout


def test_a_refused_backward_keeps_the_forward_figures(monkeypatch):
    """A backend whose backward raises (FLA on Hopper with an old triton) still reports its forward."""
    monkeypatch.setattr(bench, "_time_ms", lambda fn, iters, warmup: fn() or 2.0)
    monkeypatch.setattr(bench, "_peak_extra_mib", lambda fn: 16.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def refused():
        raise RuntimeError("backward refused on this GPU\nsecond line")

    args = bench.parse_args(["--iters", "1"])
    rec = bench._measure("memory_fla", lambda: None, refused, args, 4e9, 14e9)
    assert rec["fwd_ms"] == 2.0 and rec["fwd_tflops"] == pytest.approx(2.0)
    assert "fwd_bwd_ms" not in rec and rec["fwd_bwd_error"] == "RuntimeError: backward refused on this GPU"
    line = bench._fmt(rec)
    assert "fwd    2.000 ms" in line and "fwd+bwd error: RuntimeError" in line
    rec = bench._measure("broken", refused, refused, args, None, None)
    assert set(rec) == {"name", "error"} and "error:" in bench._fmt(rec)
    ok = bench._measure("ok", lambda: None, lambda: None, args, None, None)
    assert ok["fwd_bwd_ms"] == 2.0 and "fwd+bwd    2.000 ms" in bench._fmt(ok)


def test_one_pass_record_and_speed_ratios(monkeypatch):
    """The one-pass Polar record is timed forward+backward only, printed without a forward time,
    and gets speed ratios against the SDPA records and the two-pass record."""
    monkeypatch.setattr(bench, "_time_ms", lambda fn, iters, warmup: fn() or 4.0)
    monkeypatch.setattr(bench, "_peak_extra_mib", lambda fn: 8.0)
    calls = []
    args = bench.parse_args(["--iters", "1"])
    one_pass = bench._measure("polar_triton_one_pass", None, lambda: calls.append("fb"), args, 1e9, 3.5e9)
    assert calls == ["fb"] and "fwd_ms" not in one_pass and one_pass["fwd_bwd_ms"] == 4.0
    two_pass = {"name": "polar_triton", "fwd_ms": 1.0, "fwd_bwd_ms": 5.0}
    sdpa = {"name": "sdpa_flash", "fwd_ms": 0.5, "fwd_bwd_ms": 2.0}
    bench.add_speed_ratios([two_pass, one_pass], [sdpa])
    bench.add_speed_ratios([one_pass], [two_pass])
    assert two_pass["fwd_speed_vs_sdpa_flash"] == 0.5 and two_pass["fwd_bwd_speed_vs_sdpa_flash"] == 0.4
    assert one_pass["fwd_bwd_speed_vs_sdpa_flash"] == 0.5 and one_pass["fwd_bwd_speed_vs_polar_triton"] == 1.25
    assert "fwd_speed_vs_sdpa_flash" not in one_pass
    line = bench._fmt(one_pass)
    assert "(as above)" in line and "fwd+bwd    4.000 ms" in line and "fwd_bwd vs polar_triton=1.25x" in line


def test_the_lengths_done_are_written_before_a_longer_one_is_cut_short(monkeypatch, tmp_path):
    """A run stopped at its third length (a time limit, Ctrl-C) keeps the JSON of the first two."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "environment", lambda: {"gpu": "test", "kernel_settings": {}})
    monkeypatch.setattr(bench, "_fmt", str)

    def attention(args, T, variants=True):
        if T == 4096:
            raise KeyboardInterrupt
        return [{"name": "polar_triton", "T": T, "fwd_ms": 1.0}]

    monkeypatch.setattr(bench, "bench_attention", attention)
    out = tmp_path / "k.json"
    argv = ["--seq-lens", "1024", "2048", "4096", "--skip-conv", "--skip-memory", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    record = json.loads(out.read_text())
    assert [r["T"] for r in record["results"]] == [1024, 2048] and record["complete"] is False
    monkeypatch.setattr(bench, "bench_attention", lambda args, T, variants: [{"name": "polar_triton", "T": T}])
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert [r["T"] for r in record["results"]] == [1024, 2048, 4096] and record["complete"] is True


def test_polar_variants_are_timed_only_up_to_the_length_asked(monkeypatch, capsys):
    """--variants-up-to leaves the longer lengths to Polar's default line against SDPA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "environment", lambda: {"gpu": "test", "kernel_settings": {}})
    monkeypatch.setattr(bench, "_fmt", str)
    asked = []
    monkeypatch.setattr(bench, "bench_attention", lambda args, T, variants: asked.append((T, variants)) or [])
    argv = ["--seq-lens", "2048", "8192", "32768", "--skip-conv", "--skip-memory"]
    assert bench.main(argv + ["--variants-up-to", "2048"]) == 0
    assert asked == [(2048, True), (8192, False), (32768, False)]
    assert capsys.readouterr().out.count("in-order line not timed here (--variants-up-to 2048)") == 2
    asked.clear()
    assert bench.main(argv) == 0 and asked == [(2048, True), (8192, True), (32768, True)]
    # What the variants are: each named backward, forward+backward only, then the default in order.
    monkeypatch.setattr(bench, "_measure", lambda name, fwd, fb, *a: {"name": name, "fwd_bwd_ms": 1.0,
                                                                      "fwd_ms": None if fwd is None else 1.0})
    monkeypatch.setattr(bench, "add_launches", lambda rec, fn, iters, **kw: None)
    records = bench.polar_variant_records(lambda: None, lambda: None, lambda: {"backward": "auto"},
                                          bench.parse_args([]), 1e9, 3.5e9, {"T": 2048})
    assert [(r["name"], r["fwd_ms"]) for r in records] == [
        ("polar_triton_two_pass", None), ("polar_triton_one_pass", None), ("polar_triton_split", None),
        ("polar_triton_in_order", 1.0)]
    assert records[-1]["schedule"] == "in_order" and all(r["T"] == 2048 for r in records)


def test_count_dispatch_counts_computing_ops_apart_from_views():
    x = torch.ones(4, 4)
    counts = bench.count_dispatch(lambda: (x.t() + 1).sum())
    assert counts == {"aten_computing": 2, "aten_all": 3, "custom_ops": 0}  # t is a view; add and sum compute


def test_count_ops_runs_on_the_cpu_and_says_what_it_could_not_count(tmp_path, capsys):
    """--count-ops needs no GPU; without the interpreter the Triton carry is named as skipped, not dropped."""
    from kernels.common import interpreting

    out = tmp_path / "counts.json"
    assert bench.main(["--count-ops", "--seq-lens", "128", "--heads", "2", "--head-dim", "16",
                       "--json", str(out)]) == 0
    loop, carry = json.loads(out.read_text())["results"]
    assert loop["name"] == "memory_torch" and loop["custom_ops"] == 0
    # 2 chunks: the loop runs its per-chunk body twice in each direction
    assert loop["aten_computing"] > 40
    if interpreting():
        assert carry["custom_ops"] == 2 and carry["aten_computing"] < loop["aten_computing"]
    else:
        assert carry["skipped"] == "the Triton carry needs a GPU or TRITON_INTERPRET=1"
    assert "memory_triton_carry" in capsys.readouterr().out


def test_polar_records_show_their_time_by_kernel_and_their_tiles(monkeypatch):
    """Where a Polar forward+backward spends its time, kernel by kernel (the six slowest printed, the rest summed),
    and the tiles each launch kind ran with; a profiler failure leaves the record's timings and tiles."""
    from kernels.polar import triton_impl

    times = {f"kernel_{i}": {"ms": 0.1 * i, "launches": 1.0} for i in range(1, 8)}
    times["polar_bwd_kernel_dq"] = {"ms": 0.9, "launches": 2.0}
    monkeypatch.setattr(bench, "kernel_ms", lambda fn, iters: fn() or times)
    monkeypatch.setattr(triton_impl, "_LAST_CONFIGS", {"stale": (1, 1, 1, 1)})
    launched = {"fwd": (128, 64, 8, 2), "dq": (64, 32, 8, 2)}
    rec = {"name": "polar_triton", "fwd_ms": 0.4, "fwd_bwd_ms": 2.4, "fwd_peak_mib": 32.0, "fwd_bwd_peak_mib": 181.0}
    bench.add_launches(rec, lambda: triton_impl._LAST_CONFIGS.update(launched), 3)
    assert rec["launch_ms"] == times and rec["configs"] == {"dq": [64, 32, 8, 2], "fwd": [128, 64, 8, 2]}
    lines = bench._fmt(rec).splitlines()
    assert lines[1].split("fwd+bwd by kernel: ")[1] == (
        "polar_bwd_kernel_dq 0.900 ms x2, kernel_7 0.700 ms, kernel_6 0.600 ms, kernel_5 0.500 ms, "
        "kernel_4 0.400 ms, kernel_3 0.300 ms, 2 more 0.300 ms; device busy 3.700 of 2.400 ms")
    assert lines[2].split("tiles (BM,BN,warps,stages): ")[1] == "dq (64,32,8,2), fwd (128,64,8,2)"
    # the conv and memory lines: device time by kernel, no Polar tiles
    conv = {"name": "conv_triton", "fwd_ms": 0.09, "fwd_bwd_ms": 0.45, "fwd_peak_mib": 1.0, "fwd_bwd_peak_mib": 2.0}
    monkeypatch.setattr(bench, "kernel_ms", lambda fn, iters: {"causal_conv1d_bwd_kernel": {"ms": 0.2, "launches": 1}})
    bench.add_launches(conv, lambda: None, 3, polar=False)
    assert "configs" not in conv and bench._fmt(conv).splitlines()[1].endswith(
        "fwd+bwd by kernel: causal_conv1d_bwd_kernel 0.200 ms; device busy 0.200 of 0.450 ms")
    conv["configs"] = {"bwd": [16, 128, 4, 1], "fwd": [32, 128, 8, 1]}
    assert bench._fmt(conv).splitlines()[2].endswith("tiles (BT,BC,warps,stages): bwd (16,128,4,1), fwd (32,128,8,1)")

    def broken(fn, iters):
        raise RuntimeError("CUPTI unavailable\nsecond line")

    monkeypatch.setattr(bench, "kernel_ms", broken)
    rec = {"name": "polar_triton", "fwd_ms": 0.4, "fwd_bwd_ms": 2.4, "fwd_peak_mib": 32.0, "fwd_bwd_peak_mib": 181.0}
    bench.add_launches(rec, lambda: None, 3)
    assert rec["launch_error"] == "RuntimeError: CUPTI unavailable" and rec["configs"] == {}
    assert "fwd+bwd by kernel: RuntimeError: CUPTI unavailable" in bench._fmt(rec)


@pytest.mark.gpu
def test_polar_time_by_kernel_on_a_gpu():
    """On a GPU each Polar variant's record names its own kernels, with their device time and tiles."""
    args = bench.parse_args(["--seq-lens", "256", "--iters", "2", "--warmup", "1"])
    records = {rec["name"]: rec for rec in bench.bench_attention(args, 256)}
    default = records["polar_triton"]
    assert default["schedule"] == "longest_first" and default["backward"] == "auto"
    kinds_of = {"two_pass": {"fwd", "dq", "dkdv"}, "split": {"fwd", "rows", "dkdv", "dq"}}
    chosen = default["backward_chosen"]
    assert chosen == min(default["backward_auto_ms"], key=default["backward_auto_ms"].get)
    expected = {"polar_triton": kinds_of[chosen], "polar_triton_two_pass": kinds_of["two_pass"],
                "polar_triton_one_pass": {"fwd", "rows", "onepass"}, "polar_triton_split": kinds_of["split"],
                "polar_triton_in_order": kinds_of[chosen]}
    assert records["polar_triton_in_order"]["schedule"] == "in_order" and "fwd_ms" in records["polar_triton_in_order"]
    assert f"backward auto: {chosen} (timed on first use: two_pass " in bench._fmt(default)
    for name, kinds in expected.items():
        rec = records[name]
        assert set(rec["configs"]) == kinds, rec
        ours = {kernel: t for kernel, t in rec["launch_ms"].items() if kernel.startswith("polar_")}
        assert any(k.startswith("polar_fwd_kernel") for k in ours) and any("dkdv" in k for k in ours), rec
        assert all(t["ms"] > 0 and t["launches"] >= 1 for t in ours.values()), rec
        # the kernels' device time is part of the call's time (the profiler's clock against CUDA events)
        assert sum(t["ms"] for t in rec["launch_ms"].values()) < 2 * rec["fwd_bwd_ms"], rec


def test_kernel_settings_name_every_kernel_choice_made_in_the_environment(monkeypatch):
    from kernels.common import describe_settings, kernel_settings

    for name in [k for k in os.environ if k.startswith("ATMA_") or k == "TRITON_INTERPRET"]:
        monkeypatch.delenv(name)
    assert kernel_settings() == {} and describe_settings({}) == "none"
    monkeypatch.setenv("ATMA_POLAR_SCHEDULE", "in_order")
    monkeypatch.setenv("ATMA_LOSS_ROWS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATMAX", "not ours")
    settings = kernel_settings()
    assert settings == {"ATMA_LOSS_ROWS": "torch", "ATMA_POLAR_SCHEDULE": "in_order", "TRITON_INTERPRET": "1"}
    assert describe_settings(settings) == "ATMA_LOSS_ROWS=torch ATMA_POLAR_SCHEDULE=in_order TRITON_INTERPRET=1"


@pytest.mark.gpu
def test_conv_time_by_kernel_and_tiles_on_a_gpu():
    """On a GPU the conv's Triton lines name their kernels' device time and the tiles the autotuner picked."""
    from kernels.causal_conv.triton_impl import CANDIDATES

    args = bench.parse_args(["--seq-lens", "256", "--iters", "2", "--warmup", "1", "--conv-channels", "256"])
    triton_lines = [r for r in bench.bench_conv(args, 256) if r["name"] == "conv_triton"]
    assert [r["K"] for r in triton_lines] == [3, 4]
    for rec in triton_lines:
        assert set(rec["configs"]) == {"fwd", "bwd"} and all(tuple(c) in CANDIDATES for c in rec["configs"].values())
        assert any(k.startswith("causal_conv1d_bwd_kernel") for k in rec["launch_ms"]), rec
