"""Training throughput benchmark: tokens/s and MFU of a preset under DeepSpeed ZeRO-3, Polar vs NoPE.

    python -m pretrain.bench                       # atma-378m, T=2048, one GPU, polar+mem vs nope+mem
    python -m pretrain.bench --preset tiny --seq-len 128 --device cpu   # a smoke run on the CPU
    # framework overhead of the atma-378m module structure (near-zero compute), ZeRO-0 vs ZeRO-3:
    python -m pretrain.bench --device cpu --cores polar --model-set hidden_size=64 --model-set head_dim=16 \
        --model-set vocab_size=256 --seq-len 64 --micro-batch 1 --zero-stage 3

Both cores are measured in the same process on the same device with identical settings; the
NoPE (SDPA softmax) run is the baseline of the printed ratio. Random tokens; no data loading.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from model import PRESETS, AtmaConfig, AtmaForCausalLM

from .flops import peak_flops_for, train_flops_per_token


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m pretrain.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="atma-378m", choices=sorted(PRESETS), help="model preset (default: atma-378m)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one model config field of the preset (repeatable), e.g. hidden_size=256")
    p.add_argument("--cores", default="polar,nope", help="comma-separated cores; the last is the baseline")
    p.add_argument("--no-memory", action="store_true", help="benchmark without the gated-delta memory")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per core")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel autotuning, allocator)")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default: 3)")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "global", "all"],
                   help="recompute block activations in backward (default: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when present) or cpu (tiny preset only)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


CPU_MAX_PARAMETERS = 50_000_000


def model_overrides(assignments: list[str]) -> dict:
    """Parse `--model-set KEY=VALUE` assignments (values read as YAML scalars) into a dict."""
    import yaml

    out = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-set expects KEY=VALUE, got {item!r}")
        if key.strip() in ("core", "memory"):
            raise ValueError(f"--model-set {key.strip()}: use --cores / --no-memory instead")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def count_parameters(config: AtmaConfig) -> int:
    """Parameter count of `config`, built on the meta device (no memory used)."""
    with torch.device("meta"):
        return sum(p.numel() for p in AtmaForCausalLM(config).parameters())


def bench_core(core: str, args, device: torch.device) -> dict:
    """Time forward+backward+step of one core; returns tokens/s, MFU, step times, peak memory."""
    import deepspeed

    from .optim import build_optimizer
    from .config import OptimSection

    bf16 = device.type == "cuda"
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": args.zero_stage}, "steps_per_print": 10**9,
    }
    config = AtmaConfig.from_preset(args.preset, **args.model_overrides, core=core, memory=not args.no_memory)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=args.zero_stage == 3):
        model = AtmaForCausalLM(config)
    model.set_activation_checkpointing(args.activation_checkpointing)
    optimizer = build_optimizer(model, OptimSection(), device_type=device.type, cpu_offload=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = engine(ids, ids).loss
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens_per_s = args.micro_batch * args.seq_len / step
    flops = train_flops_per_token(config, args.seq_len)
    peak = peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {
        "core": core, "memory": not args.no_memory, "step_s_median": step, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops, "tflops": flops * tokens_per_s / 1e12,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss.item()),
    }
    del engine, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    """Run the benchmark for each core and print the table and the ratios to the baseline."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        args.model_overrides = model_overrides(args.model_set)
        config = AtmaConfig.from_preset(args.preset, **args.model_overrides)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cpu" and count_parameters(config) > CPU_MAX_PARAMETERS:
        print(f"error: the {args.preset} preset ({count_parameters(config) / 1e6:.0f}M parameters) is too large "
              "to benchmark on the CPU; use --preset tiny for a smoke run, shrink it with --model-set, or run "
              "on a GPU", file=sys.stderr)
        return 2
    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    from .trainer import init_distributed

    init_distributed()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    changed = "".join(f", {k}={v}" for k, v in args.model_overrides.items())
    print(f"device: {name}; preset {args.preset}{changed}, T={args.seq_len}, micro-batch {args.micro_batch}, "
          f"ZeRO-{args.zero_stage}, memory={'off' if args.no_memory else 'on'}")
    results = [bench_core(core, args, device) for core in cores]
    base = results[-1]
    print(f"{'core':8} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9} {'vs ' + base['core']:>9}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        ratio = r["step_s_median"] / base["step_s_median"]
        r["step_time_ratio_to_baseline"] = ratio
        print(f"{r['core']:8} {1000 * r['step_s_median']:9.1f} {r['tokens_per_s']:11,.0f} {r['tflops']:9.2f} "
              f"{mfu:>7} {mem:>9} {ratio:8.3f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
