#!/usr/bin/env bash
# One GPU check of the whole stack, writing every result under OUT_DIR. The gpu-marked tests run
# first (kernels vs fp64 oracles at realistic shapes, every autotuning candidate of the Polar
# kernels forced one at a time, model with vs without kernels, the custom ops' registrations, the
# training profiler's CUDA memory snapshot);
# the measurements follow only when they pass: the kernel benchmark (Polar vs SDPA flash/cuDNN,
# same run), the training benchmark and a 64K-token evaluation of a randomly initialised
# atma-378m. When the tests fail, no figures are written: the measurement steps are skipped,
# gpu.txt says so, and the exit status is 1. Except where every failing test is one of a kernel that
# has a PyTorch path to fall back on (the LM head loss's rows: tests/test_triton_softcap_ce.py,
# tests/test_lm_loss.py; the memory's Triton state carry: tests/test_triton_gated_delta.py): then the
# measurements run with that kernel off (ATMA_LOSS_ROWS=torch, ATMA_DELTA_TRITON_PROFILE=small), gpu.txt
# names the failed files and the setting, and the exit status is still 1. Likewise where the only other
# failures are of tests/test_pretrain_upload.py (a micro-batch's copy to the GPU waits for the work
# queued before it): that costs throughput, which the figures then show as it is; of the kernel
# benchmark's or the profiler's own tests (the figures do not depend on them); or of
# tests/test_pretrain_throughput.py (the trainer's one-GPU step against DeepSpeed's: timed as it is).
# The training benchmark (atma-378m, T=2048, micro-batch 8, bf16) runs the trainer's own step with
# the memory path this machine trains with (flash-linear-attention where its guard allows it, the
# chunked path with its Triton state carry elsewhere; each case's breakdown names it), each case's
# startup (engine build, the first step with its compilation and autotuning) timed apart, and each
# ZeRO-2/3 case's gradient norm timed both ways on the same gradients (DeepSpeed's, one tensor at a time,
# and the trainer's, in one reduction), and each ZeRO-0/2 case's DeepSpeed overflow check of every gradient,
# which the trainer leaves to the norm's check:
# bench_training: Polar vs NoPE under ZeRO-3 with per-block compile, then Polar with the ZeRO-3 JSON as
# written (none of what the trainer changes on one GPU; see bench_zero3_settings), with activation
# checkpointing, and under ZeRO-2 and ZeRO-0 (in that order, so a time limit keeps the goals' figures
# first); bench_training_fla_timing_only: the headline case with FLA's memory
# kernels, what a fresh install trains with (see below); bench_loss and bench_kernels (the loss
# and the kernels alone); bench_training_loop_carry: the headline case with the chunked path's state
# carried by its PyTorch loop (ATMA_DELTA_TRITON_PROFILE=small), the baseline of the Triton carry
# where FLA is refused; bench_training_mb16: Polar and NoPE at micro-batch 16, the paper's own
# loop's (its tokens/s on the same GPU were measured so), then Polar with an activation memory
# budget of 0 (train.activation_memory_budget: the compiler recomputes inside each block what
# it can; its peak memory and step against the first case's); bench_recipe: the shipped paper recipe
# (pretrain/configs/atma-378m.yaml: Muon under its own ZeRO-3 JSON, micro-batch 16) under ZeRO-3
# and ZeRO-2, 2 micro-batches per optimizer step instead of the recipe's 16 (so the optimizer's
# share is 8x what a run sees), and under ZeRO-3 with the gradients accumulated in bf16 (DeepSpeed's
# default; the JSON's fp32 is the baseline in the same run);
# bench_training_deepcompile: DeepSpeed's DeepCompile under ZeRO-3;
# bench_zero3_settings: the shipped ZeRO-3 JSON as the trainer uses it on one GPU (every parameter
# kept whole, the stack of blocks one leaf module, gradients moved straight into their partitions and
# the parameters left gathered through the optimizer step: one rank has nothing to shard) against seven
# settings changed, one after another in one run: the JSON as written (persistence threshold 1e7: the
# embedding and the LM head sharded, so the head is fetched in every micro-batch, and on one GPU each
# fetch waits for the device; with parameters sharded, DeepSpeed's own optimizer step, which releases
# every parameter and gathers the whole ones back, waiting for the device; each block a leaf module;
# gradients through DeepSpeed's reduce-scatter path, which copies them into a bucket, concatenates
# them, divides and reduces them over the one rank, copies them into their partitions and waits for the
# device after each backward; DeepSpeed's throughput timer on), each block a leaf module alone,
# stage3_module_granularity_threshold (which also switches on DeepSpeed's fast leaf-module path),
# persistence thresholds of 1e5 (DeepSpeed's default: every matrix sharded) and 1.1e6 (only the
# 1024 x 1024 and smaller matrices whole), DeepSpeed's own gradient path alone (reduce_scatter true),
# and DeepSpeed's throughput timer alone (on by default in DeepSpeed: it synchronises the device as
# each micro-batch's forward starts and as its step ends; the trainer switches it off);
# bench_zero2_settings: ZeRO-2 as the trainer runs it on one GPU (contiguous_gradients and
# overlap_comm off) against its JSON as written, whose epilogue synchronises the device after each
# backward. Each writes its JSON after every case, so a time limit keeps what was measured.
# Where the guard refuses flash-linear-attention's backward (Hopper with triton < 3.7.1), two steps
# time it anyway, labelled "timing only", each in a process of its own, so that a fault inside
# FLA's kernels (it would leave the process's GPU unusable) cannot take the other figures with it:
# bench_training_fla_timing_only (the headline case) and bench_kernels_fla_timing_only (the
# gated-delta kernels alone). Where the guard allows FLA (or FLA is not installed) they would repeat
# what the other steps measure, and are not run (gpu.txt says so).
# Time plan (limits in seconds; measured on an H200: the tests take about 70 s with pytest-xdist,
# the six training cases about 170 s without the profiled step): tests 240, training 240, FLA
# training 180 (FLA compiles and autotunes its kernels in the warm-up steps), loss benchmark 45,
# kernel benchmark 180, loop carry 90, micro-batch 16 150, recipe 150, DeepCompile 60, ZeRO-3
# settings 150, ZeRO-2 settings 75, FLA kernels 60, evaluation 60, decode 60 (bench_decode: batch-1
# decoding of atma-378m with the cache against recomputation and NoPE), then distillation 120
# (bench_distill: a same-size teacher, compiled and eager), then the loss with the distillation term 45
# (bench_loss_distill: its rows in the Triton kernels against PyTorch's); at most 32 minutes in
# all. The steps run in that order, the goals' figures first. Under a 10-minute limit per call,
# run it as calls with GPU_CHECK_STEPS, each with GPU_CHECK_BUDGET a little under that limit (a
# call without gpu_tests says its figures are ungated): first "gpu_tests bench_training
# bench_training_fla_timing_only bench_loss bench_kernels" (where GPU time is short,
# GPU_CHECK_BUDGET=540 keeps it to 9 minutes and still yields the goals' figures; the kernel
# benchmark gets what is left, its 2K row first), then
# "bench_training_loop_carry bench_training_mb16 bench_recipe bench_training_deepcompile
# bench_zero3_settings", then "bench_zero2_settings bench_kernels_fla_timing_only eval_64k bench_decode
# bench_distill bench_loss_distill".
# The same settings can be given by hand, with GPU_CHECK_STEPS without gpu_tests, to measure with a
# kernel on its PyTorch path.
# Each step has its own time limit (seconds; override with the variables below) so that one slow
# step cannot starve the others; the exit status is 1 when any step failed or ran out of time.
# GPU_CHECK_BUDGET=SECONDS bounds the whole check (e.g. a device call's time limit less a minute for
# copying the results): each step's limit is cut to what is left, and a step with less than 20 s left
# is not started (gpu.txt names it; the exit status is then 1). The kernel, training and decode
# benchmarks write their JSON after every length or case, so a step cut short keeps what it measured.
# The steps run with $PYTHON (default: python3); when it sees no CUDA device, or cannot import a
# module a step needs, the check stops at once with exit status 1, before it writes anything.
# Usage: bash scripts/gpu_check.sh OUT_DIR [--quick]
set -uo pipefail
usage="usage: bash scripts/gpu_check.sh OUT_DIR [--quick]"
case "${1:-}" in
    -h|--help) sed -n '2,/^# Usage:/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "") echo "$usage" >&2; exit 2 ;;
    -*) echo "error: unknown option $1 ($usage)" >&2; exit 2 ;;
esac
out=$1
quick=${2:-}
budget=${GPU_CHECK_BUDGET:-}
if [ -n "$budget" ] && ! [[ "$budget" =~ ^[0-9]+$ ]]; then
    echo "error: GPU_CHECK_BUDGET must be a whole number of seconds, got '$budget'" >&2
    exit 2
fi
deadline=${budget:-0}  # seconds since this script started ($SECONDS)
PY=${PYTHON:-$(command -v python3 || command -v python)}
# Stop before anything is written when the python the steps run with sees no GPU.
if ! cuda=$("$PY" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null); then
    echo "error: $PY cannot import torch (set PYTHON to the python of the environment to check)" >&2
    exit 1
elif [ "$cuda" != "True" ]; then
    echo "error: no usable CUDA device: torch.cuda.is_available() is False for $PY; this check needs a GPU" >&2
    exit 1
fi
# Every module the steps import, before any step runs: a package missing from that environment
# (an offline GPU machine with only part of requirements.txt) is named here, not minutes later.
root=$(cd "$(dirname "$0")/.." && pwd)
if ! err=$(cd "$root" && PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        "import pretrain.bench, model.bench_loss, model.bench_decode, kernels.bench, evaluation.long_context" 2>&1); then
    reason=$(echo "$err" | grep -E '^[A-Za-z_.]*(Error|Exception)\b' | tail -1)
    echo "error: the steps cannot import what they need with $PY (${reason:-$(echo "$err" | tail -1)});" \
        "install requirements.txt into that environment" >&2
    exit 1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
T_BENCH=${T_BENCH:-180} T_TESTS=${T_TESTS:-240} T_TRAIN=${T_TRAIN:-240} T_EVAL=${T_EVAL:-60}
T_DEEPCOMPILE=${T_DEEPCOMPILE:-60} T_DECODE=${T_DECODE:-60} T_LOSS=${T_LOSS:-45}
T_FLA_KERNELS=${T_FLA_KERNELS:-60} T_FLA_TRAIN=${T_FLA_TRAIN:-180} T_LOOP=${T_LOOP:-90} T_MB16=${T_MB16:-150}
T_ZERO3=${T_ZERO3:-150} T_ZERO2=${T_ZERO2:-75} T_RECIPE=${T_RECIPE:-210} T_DISTILL=${T_DISTILL:-120}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed's JIT op builder rejects arch suffixes such as 9.0a (images often preset that value).
export TORCH_CUDA_ARCH_LIST=$(echo "${TORCH_CUDA_ARCH_LIST:-9.0}" | sed -E 's/([0-9]+\.[0-9]+)[a-z]+/\1/g')
# Steps to run (all by default), e.g. GPU_CHECK_STEPS="gpu_tests bench_training".
steps=" ${GPU_CHECK_STEPS:-gpu_tests bench_training bench_training_fla_timing_only bench_loss bench_kernels bench_training_loop_carry bench_training_mb16 bench_recipe bench_training_deepcompile bench_zero3_settings bench_zero2_settings bench_kernels_fla_timing_only eval_64k bench_decode bench_distill bench_loss_distill} "
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$out/gpu.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1

status=0
tests_failed=0
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT/NAME.log
    local name=$1 limit=$2; shift 2
    [[ "$steps" == *" $name "* ]] || return 0
    if [ -n "$budget" ]; then
        local left=$((deadline - SECONDS))
        if [ "$left" -lt 20 ]; then
            echo "step $name: not run (GPU_CHECK_BUDGET=$budget s spent, $left s left)" | tee -a "$out/gpu.txt"
            status=1
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    local t0=$SECONDS rc
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    echo "step $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/gpu.txt"
    return "$rc"
}
measure() {  # measure NAME SECONDS CMD...: a step that writes figures, run only after passing tests
    if [ "$tests_failed" -ne 0 ]; then
        [[ "$steps" == *" $1 "* ]] && echo "step $1: skipped (the gpu tests failed)" | tee -a "$out/gpu.txt"
        return 0
    fi
    step "$@"
}

# Kernel tests first. Each kernel runs its default launch configuration (ATMA_POLAR_AUTOTUNE=0:
# autotuning would compile every candidate for every new shape, dtype and window setting), and
# test_gpu_every_launch_candidate_matches_oracle forces each candidate in turn.
# The tests run in 8 processes side by side where pytest-xdist is installed (their Triton compiles
# dominate: about 70 s on an H200 instead of several minutes); GPU_TESTS_ARGS replaces that choice
# with pytest options of its own ("" for one process).
if [ -z "${GPU_TESTS_ARGS+set}" ] && [[ "$steps" == *" gpu_tests "* ]]; then
    GPU_TESTS_ARGS=""
    "$PY" -c "import xdist" 2>/dev/null && GPU_TESTS_ARGS="-n 8"
fi
# shellcheck disable=SC2086
ATMA_POLAR_AUTOTUNE=0 step gpu_tests "$T_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs --durations=15 \
    ${GPU_TESTS_ARGS:-} tests/test_triton_polar.py tests/test_triton_conv.py tests/test_triton_gated_delta.py \
    tests/test_fla_bridge.py tests/test_model_gpu.py tests/test_custom_ops.py tests/test_lm_loss.py \
    tests/test_triton_softcap_ce.py tests/test_pretrain_profiling.py tests/test_pretrain_upload.py \
    tests/test_kernels_bench.py tests/test_pretrain_throughput.py || tests_failed=1
fallback_for() {  # fallback_for TEST_FILE: the setting that takes its kernel off the measured path; "as-is"
    # where a failure leaves the figures right (they measure the code as it is); exit 1 where they would be wrong
    case "$1" in
        tests/test_triton_softcap_ce.py|tests/test_lm_loss.py) echo ATMA_LOSS_ROWS=torch ;;
        tests/test_triton_gated_delta.py) echo ATMA_DELTA_TRITON_PROFILE=small ;;
        tests/test_pretrain_upload.py|tests/test_kernels_bench.py|tests/test_pretrain_profiling.py) echo as-is ;;
        tests/test_pretrain_throughput.py) echo as-is ;;  # the one-rank step against DeepSpeed's: timed as it is
        *) return 1 ;;
    esac
}
if [ "$tests_failed" -ne 0 ]; then
    # pytest's summary names each failed (or erroring) test; with none named (a collection error, a
    # time limit) nothing is known to be confined to one kernel.
    failed_files=$(grep -oE '^(FAILED|ERROR) tests/[A-Za-z0-9_]+\.py' "$out/gpu_tests.log" 2>/dev/null \
        | awk '{print $2}' | sort -u)
    fallbacks=""
    confined=0
    [ -n "$failed_files" ] && confined=1
    for file in $failed_files; do
        setting=$(fallback_for "$file") || { confined=0; break; }
        [ "$setting" = "as-is" ] || fallbacks="$fallbacks $setting"
    done
    fallbacks=$(echo $fallbacks | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/ $//')
    if [ "$confined" -eq 1 ] && [ -n "$fallbacks" ]; then
        for setting in $fallbacks; do export "${setting?}"; done
        tests_failed=0
        echo "gpu tests failed in $(echo $failed_files): the benchmarks below run with $fallbacks" \
            "(that kernel on its PyTorch path), so their figures leave it out" | tee -a "$out/gpu.txt"
    elif [ "$confined" -eq 1 ]; then
        tests_failed=0
        echo "gpu tests failed in $(echo $failed_files): no kernel's results are in question, so the figures" \
            "below are written; they measure the code as it is" | tee -a "$out/gpu.txt"
    else
        echo "gpu tests failed: the benchmark and evaluation steps are skipped and no figures are written" \
            | tee -a "$out/gpu.txt"
    fi
elif [[ "$steps" != *" gpu_tests "* ]]; then
    echo "gpu tests not selected (GPU_CHECK_STEPS): the figures below are not gated by them" | tee -a "$out/gpu.txt"
fi

# What the guard says of flash-linear-attention's backward on this machine: "refused" (Hopper with triton
# < 3.7.1 and no TileLang fix: the two timing-only steps time it anyway), "allowed" (the training and
# kernel steps already run FLA's kernels, so the timing-only steps would repeat them), "absent" (not
# installed), or "unknown".
fla_backward=$("$PY" -c "
import torch
from kernels.gated_delta import fla_bridge as b
version = b._installed_fla_version()
refused = b.fla_refusal(tuple(torch.cuda.get_device_capability()))
print('absent' if version is None else 'refused' if refused else 'allowed')" 2>/dev/null) || fla_backward=unknown
fla_timing() {  # fla_timing NAME SECONDS CMD...: a timing-only step of FLA's refused backward
    if [ "$fla_backward" = "allowed" ] || [ "$fla_backward" = "absent" ]; then
        [[ "$steps" == *" $1 "* ]] && echo "step $1: not needed (flash-linear-attention's backward is" \
            "$fla_backward here; the other steps time the memory path training takes)" | tee -a "$out/gpu.txt"
        return 0
    fi
    measure "$@"
}

# Every step of the training benchmark: 2 warm-up (the first compiles), 5 timed, 1 phase by phase, 1 profiled
# (its timeline per case in OUT/traces: where the GPU waits for the host).
train_steps=(--steps 5 --warmup 2 --breakdown-steps 1 --profile-steps 1)
# The ZeRO-3 JSON as written, without what the trainer changes on one rank, and with DeepSpeed's throughput timer,
# which synchronises the device twice per micro-batch (v1 here and in bench_zero3_settings).
block_leaves='zero_optimization.leaf_module={"classes":["model.modeling.Block"]}'
deepspeed_timer="timers.throughput.enabled=true"
as_written="zero_optimization.stage3_param_persistence_threshold=10000000,zero_optimization.reduce_scatter=true,$deepspeed_timer,$block_leaves"
measure bench_training "$T_TRAIN" "$PY" -m pretrain.bench "${train_steps[@]}" \
    --cases polar:3:none:blocks,nope:3:none:blocks,polar:3:none:blocks:v1,polar:3:all:blocks,polar:2:none:blocks,polar:0:none:blocks \
    --ds-variant "$as_written" --trace-dir "$out/traces" --json "$out/bench_training.json"
# The headline case with flash-linear-attention's memory kernels, what a fresh install trains with (where
# the guard refuses FLA's backward, as a timing only; in a process of its own, see above).
fla_timing bench_training_fla_timing_only "$T_FLA_TRAIN" "$PY" -m pretrain.bench --steps 5 --warmup 2 --breakdown-steps 1 \
    --profile-steps 0 --fla-timing-only --cases polar:3:none:blocks --json "$out/bench_training_fla_timing_only.json"
# The LM head's fused soft-capped cross-entropy (its rows in the Triton kernels, and in PyTorch)
# against the checkpointed naive path, at atma-378m's head (hidden 1024, vocabulary 50,304) over one
# micro-batch (8 x 2048 tokens), bf16.
measure bench_loss "$T_LOSS" "$PY" -m model.bench_loss --tokens 16384 --hidden 1024 --vocab 50304 \
    --json "$out/bench_loss.json"
# The kernels per length (2K first; JSON after each): Polar vs SDPA flash/cuDNN, the conv, the memory.
# Polar's backward variants and its in-order program order at 2K only, so that the time left reaches the
# longer lengths, whose goals compare Polar's default line with SDPA.
seq_lens="2048 8192 32768"
iters=10
[ "$quick" = "--quick" ] && seq_lens="2048 8192"
measure bench_kernels "$T_BENCH" "$PY" -m kernels.bench --seq-lens $seq_lens --iters "$iters" --variants-up-to 2048 \
    --json "$out/bench_kernels.json"
# The same headline case with the memory's state carried by the PyTorch loop (the "small" launch
# class keeps it), for the Triton carry's effect on tokens/s where FLA is refused.
ATMA_DELTA_TRITON_PROFILE=small measure bench_training_loop_carry "$T_LOOP" "$PY" -m pretrain.bench \
    --steps 5 --warmup 2 --breakdown-steps 1 --profile-steps 0 --cases polar:3:none:blocks \
    --json "$out/bench_training_loop_carry.json"
# Polar and NoPE at the paper's own loop's micro-batch (16 x 2048 tokens per optimizer step, as its
# 83,973 tokens/s on an H200 were measured), so that comparison is made at equal tokens per step.
measure bench_training_mb16 "$T_MB16" "$PY" -m pretrain.bench --micro-batch 16 --steps 5 --warmup 2 \
    --breakdown-steps 1 --profile-steps 0 --cases polar:3:none:blocks,nope:3:none:blocks,polar:3:budget0:blocks \
    --json "$out/bench_training_mb16.json"
measure bench_recipe "$T_RECIPE" "$PY" -m pretrain.bench --config pretrain/configs/atma-378m.yaml --grad-accum 2 \
    --steps 3 --warmup 2 --breakdown-steps 1 --profile-steps 0 \
    --cases polar:3:none:auto,polar:2:none:auto,polar:3:none:auto:v1 --ds-variant data_types.grad_accum_dtype=bf16 \
    --json "$out/bench_recipe.json"
measure bench_training_deepcompile "$T_DEEPCOMPILE" "$PY" -m pretrain.bench "${train_steps[@]}" \
    --cases polar:3:none:deepcompile --json "$out/bench_training_deepcompile.json"
z3=polar:3:none:blocks
measure bench_zero3_settings "$T_ZERO3" "$PY" -m pretrain.bench --steps 5 --warmup 2 --breakdown-steps 0 \
    --profile-steps 0 --cases "$z3,$z3:v1,$z3:v2,$z3:v3,$z3:v4,$z3:v5,$z3:v6,$z3:v7" \
    --ds-variant "$as_written" \
    --ds-variant "$block_leaves" \
    --ds-variant zero_optimization.stage3_module_granularity_threshold=1 \
    --ds-variant zero_optimization.stage3_param_persistence_threshold=100000 \
    --ds-variant zero_optimization.stage3_param_persistence_threshold=1100000 \
    --ds-variant zero_optimization.reduce_scatter=true --ds-variant "$deepspeed_timer" \
    --json "$out/bench_zero3_settings.json"
# ZeRO-2 as the trainer runs it on one GPU (gradients in their own tensors, reduced on the compute stream)
# against its JSON as written (contiguous buffers, and an overlapped stream that the device is synchronised
# with after each backward).
z2=polar:2:none:blocks
measure bench_zero2_settings "$T_ZERO2" "$PY" -m pretrain.bench --steps 5 --warmup 2 --breakdown-steps 1 \
    --profile-steps 0 --cases "$z2,$z2:v1" \
    --ds-variant zero_optimization.contiguous_gradients=true,zero_optimization.overlap_comm=true \
    --json "$out/bench_zero2_settings.json"
# flash-linear-attention's backward where its guard refuses it, the kernels alone (see above).
fla_timing bench_kernels_fla_timing_only "$T_FLA_KERNELS" "$PY" -m kernels.bench --seq-lens $seq_lens --iters "$iters" \
    --skip-attention --skip-conv --fla-timing-only --json "$out/bench_kernels_fla_timing_only.json"

# 64K evaluation of the paper-size model (random init): peak memory and seconds per cell.
cat > "$out/eval_64k.py" <<'PY'
import json, os, sys
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from model import AtmaConfig, AtmaForCausalLM
from evaluation.long_context import run_evaluation
out = sys.argv[1]
mdir = os.path.join(out, "model-378m")
tok = tokenizers.Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
src = os.path.dirname(os.__file__)
text = [open(os.path.join(src, f), encoding="utf-8", errors="ignore").read()
        for f in sorted(os.listdir(src)) if f.endswith(".py")][:200]
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
AtmaForCausalLM(AtmaConfig.from_preset("atma-378m", vocab_size=4096)).save_pretrained(mdir)
tok.save(os.path.join(mdir, "tokenizer.json"))
res = run_evaluation(mdir, "2k,8k,32k,64k", os.path.join(out, "eval_64k"), tasks=["passkey"],
                     haystacks=["synthetic"], depths=(0.5,), trials=1, progress=False)
with open(os.path.join(out, "eval_64k", "results.json"), encoding="utf-8") as f:
    results = json.load(f)
for key, cells in results.items():
    if isinstance(cells, list):
        for c in cells:
            print(key, {k: v for k, v in c.items() if k in ("length", "task", "seconds", "peak_memory_bytes", "error")})
PY
measure eval_64k "$T_EVAL" "$PY" "$out/eval_64k.py" "$out"
rm -rf "$out/model-378m"

# Batch-1 decoding of atma-378m (bf16) with the cache: prefill s and decode ms/token, against full
# recomputation and NoPE with its SDPA KV cache in the same run; it first checks cached greedy
# decoding against recomputation on the GPU and prints no figure when they differ.
decode_lens="2k,8k,32k,64k"
[ "$quick" = "--quick" ] && decode_lens="2k,8k"
ATMA_POLAR_AUTOTUNE=0 measure bench_decode "$T_DECODE" "$PY" -m model.bench_decode --lengths "$decode_lens" \
    --decode-tokens 32 --recompute-steps 2 --json "$out/bench_decode.json"
# Distillation from a same-size teacher (a randomly initialised atma-378m, exported here first): the
# step with the student's and the teacher's blocks compiled against both eager.
if [[ "$steps" == *" bench_distill"* ]] && [ "$tests_failed" -eq 0 ] \
        && { [ -z "$budget" ] || [ $((deadline - SECONDS)) -ge 20 ]; }; then
    cat > "$out/export_teacher.py" <<'PY'
import sys
from model import AtmaConfig, AtmaForCausalLM
AtmaForCausalLM(AtmaConfig.from_preset("atma-378m")).save_pretrained(sys.argv[1])
PY
    timeout 120 "$PY" "$out/export_teacher.py" "$out/teacher-378m" > "$out/export_teacher.log" 2>&1 \
        || echo "the teacher's export failed (export_teacher.log)" | tee -a "$out/gpu.txt"
fi
distill=(--steps 3 --warmup 2 --breakdown-steps 1 --profile-steps 0
         --set loss.distill_weight=0.5 --set "loss.teacher=$out/teacher-378m")
measure bench_distill "$T_DISTILL" "$PY" -m pretrain.bench "${distill[@]}" \
    --cases polar:3:none:blocks,polar:3:none:off --json "$out/bench_distill.json"
rm -rf "$out/teacher-378m"
# The LM head loss with the distillation KL (random bf16 targets), its rows in the kernels and in PyTorch.
measure bench_loss_distill "$T_LOSS" "$PY" -m model.bench_loss --tokens 16384 --hidden 1024 --vocab 50304 \
    --distill --json "$out/bench_loss_distill.json"
echo "gpu check finished with status $status" | tee -a "$out/gpu.txt"
exit $status
