"""torch.profiler traces of a window of training steps (the run config's `profile` section)."""

import gzip
import json
import os
import re

import pytest
import torch

from pretrain.config import ConfigError, ProfileSection, load_run_config
from pretrain.profiling import StepProfiler, check_profile
from test_pretrain_distributed import train


def step_marks(trace_path) -> list[int]:
    """The optimizer steps the trace marks, in order."""
    with gzip.open(trace_path, "rt", encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    return [int(m.group(1)) for e in events if (m := re.fullmatch(r"optimizer_step#(\d+)", e.get("name", "")))]


def test_a_run_traces_its_window_and_leaves_it_out_of_tokens_per_s(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = train(tiny_shards, run, "--max-steps", "5", "--set", "profile.steps=2", "--set", "profile.start_step=2",
                 "--set", "logging.every=1", "--set", "logging.throughput_warmup_steps=0",
                 "--set", "checkpoint.every=100")
    trace, table = run / "profile" / "steps2-3-rank0.pt.trace.json.gz", run / "profile" / "steps2-3-rank0-ops.txt"
    assert f"[atma] rank 0: profiled steps 2-3: {trace} (open it in https://ui.perfetto.dev); top ops: {table}" \
        in proc.stdout.splitlines()
    assert sorted(os.listdir(run / "profile")) == [table.name, trace.name]
    assert step_marks(trace) == [2, 3]  # step 1 ran as the profiler's warm-up and is not in the trace
    lines = table.read_text().splitlines()
    assert lines[0] == "self CPU time per optimizer step, mean over 2 traced step(s) on rank 0"
    ops = [line.split(maxsplit=2)[2] for line in lines[2:]]
    assert len(ops) == 30 and "aten::mm" in ops
    assert not any(op.startswith(("optimizer_step#", "ProfilerStep#")) for op in ops)  # whole steps, not ops
    rows = {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl")) if "loss/total" in r}
    # The warm-up step and the window are left out of tokens/s; the steps after them are counted.
    assert [s for s in sorted(rows) if "perf/tokens_per_s" in rows[s]] == [4, 5]


def _work():
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()


def test_a_run_that_ends_inside_the_window_keeps_the_steps_it_traced(tmp_path):
    profiler = StepProfiler(ProfileSection(steps=3, start_step=2), run_dir=str(tmp_path), rank=0,
                            device=torch.device("cpu"))
    for step in (1, 2):  # the warm-up step, then the window's first step
        profiler.before_step(step)
        _work()
        profiler.after_step()
    assert profiler.take_report() is None and not (tmp_path / "profile").exists()
    profiler.before_step(3)
    _work()  # the run stops (or fails) during step 3
    profiler.close()
    trace = tmp_path / "profile" / "steps2-3-rank0.pt.trace.json.gz"
    assert step_marks(trace) == [2, 3]
    assert profiler.take_report().startswith(f"[atma] rank 0: profiled steps 2-3: {trace} ")
    assert (tmp_path / "profile" / "steps2-3-rank0-ops.txt").read_text().splitlines()[0] == (
        "self CPU time per optimizer step, mean over 2 traced step(s) on rank 0, the last one cut short by the end "
        "of the run")
    assert profiler.take_report() is None  # said once


def test_a_trace_that_cannot_be_written_is_a_warning_not_the_end_of_the_run(tmp_path):
    (tmp_path / "profile").write_text("a file where the folder would go\n")
    profiler = StepProfiler(ProfileSection(steps=1, start_step=1, ranks=[3]), run_dir=str(tmp_path), rank=3,
                            device=torch.device("cpu"))
    profiler.before_step(1)
    _work()
    profiler.after_step()
    assert profiler.take_report().startswith("[atma] rank 3: warning: the profile of step 1 was not written (")
    assert profiler.paths == [] and profiler.prof is None  # stopped: the next steps run untraced


def test_only_the_chosen_ranks_trace_and_only_inside_the_window(tmp_path):
    cpu = torch.device("cpu")
    other_rank = StepProfiler(ProfileSection(steps=1, start_step=1, ranks=[1]), run_dir=str(tmp_path), rank=0,
                              device=cpu)
    resumed = StepProfiler(ProfileSection(steps=2, start_step=3), run_dir=str(tmp_path), rank=0, device=cpu)
    for step in (1, 2):
        other_rank.before_step(step)
        resumed.before_step(step + 5)  # a run resumed after the window
        _work()
        other_rank.after_step()
        resumed.after_step()
    other_rank.close()
    resumed.close()
    assert not (tmp_path / "profile").exists()
    # Every rank leaves the window out of its throughput, traced there or not.
    assert other_rank.in_window(1) and not other_rank.in_window(2)
    assert [s for s in range(1, 7) if resumed.in_window(s)] == [2, 3, 4]  # warm-up step 2, window 3-4
    assert not StepProfiler(ProfileSection(), run_dir=str(tmp_path), rank=0, device=cpu).in_window(10)


def test_device_time_counts_each_kernel_once_and_the_bench_gives_its_share_of_the_step():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from pretrain.bench import device_busy
    from pretrain.profiling import device_ms_per_step

    events = [SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=6000.0),
              SimpleNamespace(key="gemm_kernel", device_type=DeviceType.CUDA, self_device_time_total=6000.0),
              SimpleNamespace(key="triton_poi_fused", device_type=DeviceType.CUDA, self_device_time_total=2000.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert device_ms_per_step(prof, steps=2) == pytest.approx(4.0)  # (6 + 2) ms over 2 steps; aten::mm not again
    assert device_busy({"device_ms_per_step": 4.0, "step_s_median": 0.008}) == pytest.approx(0.5)
    assert device_busy({"step_s_median": 0.008}) is None  # the CPU: no device time


def test_device_time_is_split_by_kind_of_kernel_from_the_kernel_names():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from pretrain.profiling import OTHER_KERNELS, device_ms_by_kind, kernel_kind

    def kernel(name, us, count=1):
        return SimpleNamespace(key=name, device_type=DeviceType.CUDA, self_device_time_total=us, count=count)

    # Names as CUDA traces spell them: cuBLAS on Hopper, CUTLASS, inductor, the project's and FLA's Triton kernels.
    named = {
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matmuls (cuBLAS, CUTLASS, inductor templates)",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmuls (cuBLAS, CUTLASS, inductor templates)",
        "triton_tem_fused_mm_0": "matmuls (cuBLAS, CUTLASS, inductor templates)",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "compiled elementwise and reductions (inductor)",
        "polar_bwd_kernel_dkdv": "Polar attention (Triton)",
        "chunk_gated_delta_rule_fwd_kernel_h_blockdim64": "gated-delta memory (Triton, FLA)",
        "gated_delta_state_bwd_kernel": "gated-delta memory (Triton, FLA)",
        "causal_conv1d_bwd_kernel": "causal conv (Triton)",
        "softcap_ce_fwd_kernel": "LM head loss rows (Triton)",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "SDPA attention (flash, cuDNN, efficient)",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>":
            "SDPA attention (flash, cuDNN, efficient)",
        "void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>, float, float>":
            "multi-tensor (optimizer, gradient norm and copies)",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "communication (NCCL)",
        "Memcpy DtoD (Device -> Device)": "copies and fills",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 2, 128, 1>":
            "copies and fills",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": OTHER_KERNELS,
    }
    assert {name: kernel_kind(name) for name in named} == named
    events = [kernel("nvjet_tst_192x192", 30000.0, 40), kernel("triton_tem_fused_mm_0", 10000.0, 8),
              kernel("polar_fwd_kernel", 6000.0, 8), kernel("triton_poi_fused_add_0", 2000.0, 100),
              SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=40000.0, count=48)]
    by_kind = device_ms_by_kind(SimpleNamespace(key_averages=lambda: events), steps=2)
    assert [(k["kind"], k["ms_per_step"], k["kernels_per_step"]) for k in by_kind] == [
        ("matmuls (cuBLAS, CUTLASS, inductor templates)", 20.0, 24.0),  # the CPU op's share is not counted again
        ("Polar attention (Triton)", 3.0, 4.0),
        ("compiled elementwise and reductions (inductor)", 1.0, 50.0)]
    assert [k["share"] for k in by_kind] == pytest.approx([40 / 48, 6 / 48, 2 / 48])  # of the device's 48 ms
    assert device_ms_by_kind(SimpleNamespace(key_averages=lambda: events[-1:]), steps=1) == []  # the CPU: none


def test_profile_settings_are_checked():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"profile.ranks names rank 2, but the run has 2 rank\(s\) \(0-1\)"):
        check_profile(ProfileSection(steps=1, ranks=[0, 2]), world=2, device=cpu)
    with pytest.raises(ConfigError) as info:
        check_profile(ProfileSection(steps=1, memory_snapshot=True), world=1, device=cpu)
    assert str(info.value) == ("profile.memory_snapshot records CUDA's caching allocator; this run is on cpu: "
                               "set it to false")
    # tracing nothing: the other settings do not matter
    check_profile(ProfileSection(steps=0, ranks=[5], memory_snapshot=True), world=1, device=cpu)
    refusals = {"profile.steps=-1": "profile.steps must be >= 0 (0 traces nothing), got -1",
                "profile.start_step=0": "profile.start_step must be >= 1, got 0",
                "profile.ranks=[-1]": "profile.ranks must be ranks >= 0, got [-1]",
                "profile.ranks=1": "profile.ranks must be a list of integers, got 1"}
    for setting, message in refusals.items():
        with pytest.raises(ConfigError) as info:
            load_run_config(None, ["data.dir=d", setting])
        assert str(info.value) == message


@pytest.mark.gpu
def test_gpu_a_memory_snapshot_of_the_window(tmp_path):
    import pickle

    device = torch.device("cuda")
    profiler = StepProfiler(ProfileSection(steps=1, start_step=2, memory_snapshot=True), run_dir=str(tmp_path),
                            rank=0, device=device)
    for step in (1, 2):
        profiler.before_step(step)
        x = torch.randn(1024, 1024, device=device, requires_grad=True)
        (x @ x).sum().backward()
        profiler.after_step()
    memory = tmp_path / "profile" / "steps2-2-rank0-memory.pickle"
    assert profiler.take_report().endswith(f"; memory snapshot: {memory} (open it in https://pytorch.org/memory_viz)")
    with open(memory, "rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["segments"]  # the allocator's state at the end of the window, with the history before it


@pytest.mark.gpu
def test_gpu_device_time_of_a_profile_is_its_kernels(tmp_path):
    import time

    from pretrain.profiling import device_ms_by_kind, device_ms_per_step

    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(4):
            x = (x @ x) / 64
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - start)
    busy = device_ms_per_step(prof, steps=1)
    assert 0 < busy <= wall_ms  # each kernel once: never more than the wall time of one stream's work
    by_kind = {k["kind"]: k for k in device_ms_by_kind(prof, steps=1)}
    assert sum(k["ms_per_step"] for k in by_kind.values()) == pytest.approx(busy)
    matmuls = by_kind["matmuls (cuBLAS, CUTLASS, inductor templates)"]  # this GPU's cuBLAS kernels are named so
    assert matmuls["kernels_per_step"] >= 4 and matmuls["share"] > 0.5  # a 4096^3 matmul outweighs a division
