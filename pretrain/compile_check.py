"""Compile every Triton kernel of a training step for an NVIDIA GPU, on a machine without one.

    python -m pretrain.compile_check [--arch 90] [--preset atma-378m] [--first-candidate]
                                     [--fla-timing-only | --chunked-memory]
                                     [--json PATH]

One forward and backward of a two-block slice of the model (a conv block and a global block with
its memory) runs on the CPU in bf16, with the kernels' Triton paths and a stand-in for the GPU
driver. Every launch the step makes, and every autotuning candidate of each launch, is compiled
by the installed triton for the chosen architecture down to a cubin (triton's bundled ptxas), and
is checked against that GPU's shared-memory limit as triton checks it before a launch; nothing is
executed, so the kernels' outputs are garbage and only the launches matter. The memory takes the
path training takes on that GPU with the installed versions: flash-linear-attention's chunk
kernels where its guard accepts them, else the chunked path with its Triton state carry
(Hopper with triton < 3.7.1; `--fla-timing-only` compiles FLA's kernels there, as the
benchmarks' switch of that name launches them). The Polar backward runs three times, as the
two-pass default and the one-pass and split options; the last pass adds the distillation term, so
the LM head loss's kernels are compiled with and without it.

The exit status is 1 when a launch has no candidate that compiles and fits (the step would fail
there on that GPU), 0 otherwise. Candidates that fail or do not fit are listed; the autotuner
skips them on a GPU too. Registers and the stack frame per thread (where register spills go)
come from the cubin (`cuobjdump`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from kernels.common.stand_in_gpu import TARGETS, CompileRecord, stand_in_gpu, summarize, triton_paths
from kernels.gated_delta.fla_bridge import fla_guard_reason, fla_timing_only

__all__ = ["memory_path", "run_training_step", "main"]


def _slice_config(preset: str, memory: bool):
    """`preset` cut to one conv block and one global block with the same kernel launches.

    The heads, head dim and conv taps stay; the hidden size (the conv's channel count, a runtime
    argument of its kernels) and the vocabulary only size the dense layers, which launch no Triton
    kernel, so they shrink to keep the CPU's bf16 matrix products short.
    """
    from model.config import PRESETS, AtmaConfig

    hidden = min(PRESETS[preset]["hidden_size"], 256)
    return AtmaConfig.from_preset(preset, num_hidden_layers=2, global_every=2, global_offset=1, vocab_size=256,
                                  hidden_size=hidden, memory=memory)


def memory_path(arch: int, fla_version: str | None, triton_version: str, timing_only: bool,
                chunked: bool = False) -> tuple[str, str]:
    """The memory's path on `arch` ("fla", "fla_timing_only" or "chunked"), and why, in words."""
    if chunked:
        return "chunked", "the chunked path with its Triton state carry (--chunked-memory)"
    reason = fla_guard_reason(fla_version, triton_version, (arch // 10, arch % 10), backward=True)
    if reason is None:
        return "fla", "flash-linear-attention's chunk kernels, as training runs them there"
    if timing_only and fla_version is not None:
        return "fla_timing_only", (f"flash-linear-attention's chunk kernels, TIMING ONLY (training refuses them "
                                   f"there: {reason})")
    return "chunked", (f"the chunked path with its Triton state carry, as training takes it there: "
                       f"{reason} (--fla-timing-only compiles FLA's kernels)")


def run_training_step(preset: str, seq_len: int, micro_batch: int, *, memory: bool = True,
                      memory_fla: bool = True) -> None:
    """One bf16 forward and backward of `preset`'s two-block slice per Polar backward variant.

    `memory_fla` sends the memory to FLA's kernels, else to the chunked path (its Triton state carry).
    Meant to run under `stand_in_gpu`; raises what a launch raises.
    """
    from model.modeling import AtmaForCausalLM

    config = _slice_config(preset, memory)
    torch.manual_seed(0)
    model = AtmaForCausalLM(config).to(torch.bfloat16).train()
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    targets = torch.zeros(micro_batch * seq_len, config.vocab_size, dtype=torch.bfloat16)
    with triton_paths(memory_fla=memory_fla):
        for variant in ("two_pass", "one_pass", "split"):
            os.environ["ATMA_POLAR_BWD"] = variant
            model.zero_grad(set_to_none=True)
            # the last pass with a teacher's targets: the loss kernels' distillation variant
            kl = {"kl_targets": lambda start, end: targets[start:end]} if variant == "split" else {}
            out = model(ids, labels=ids, **kl)
            (out["loss"] + out["kl_loss"] if kl else out["loss"]).backward()


def _print_report(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'kernel':<52s} {'compiled':>8s} {'fit':>4s} {'registers':>9s} {'stack B':>9s}")
    for row in rows:
        regs, stack = (f"{min(v)}-{max(v)}" if v else "?" for v in (row["registers"], row["stack"]))
        print(f"{row['kernel']:<52s} {row['compiled']:>8d} {row['fit']:>4d} {regs:>9s} {stack:>9s}")
        for what, items in (("over the shared memory limit", row["too_big"]), ("failed to compile", row["failed"])):
            for item in items:
                print(f"    {what}: {item}")


def main(argv=None) -> int:
    """Compile a training step's kernels for one GPU architecture; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.compile_check", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    archs = ", ".join(f"{arch} {t.name}" for arch, t in sorted(TARGETS.items()))
    parser.add_argument("--arch", type=int, choices=sorted(TARGETS), default=90,
                        help=f"compute capability x 10: {archs} (default: 90)")
    parser.add_argument("--preset", default="atma-378m",
                        help="model preset whose block shapes are used (default: atma-378m)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="tokens per sequence (default: 128; the launches' configurations do not depend on it)")
    parser.add_argument("--micro-batch", type=int, default=2,
                        help="sequences per step (default: 2; triton specializes an argument equal to 1)")
    parser.add_argument("--no-memory", action="store_true", help="leave out the gated-delta memory (and FLA)")
    parser.add_argument("--first-candidate", action="store_true",
                        help="compile only each kernel's first autotuning candidate (faster)")
    parser.add_argument("--fla-timing-only", action="store_true",
                        help="compile FLA's kernels for the memory even where training refuses them "
                             "(Hopper with triton < 3.7.1), as the benchmarks' switch of that name launches them")
    parser.add_argument("--chunked-memory", action="store_true",
                        help="compile the memory's chunked path (its Triton state carry) instead of FLA's kernels, "
                             "as training runs it where FLA's guard refuses FLA")
    parser.add_argument("--max-shared", type=int, metavar="BYTES",
                        help="shared memory per block to check against instead of the architecture's")
    parser.add_argument("--json", metavar="PATH", help="also write every compile record and the summary as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    if args.seq_len < 16 or args.micro_batch < 1:
        parser.error("--seq-len must be at least 16 and --micro-batch at least 1")
    from model.config import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    fla = _fla_version()
    if fla is None and not args.no_memory and not args.chunked_memory:
        parser.error("the memory's kernels come from fla-core, which is not installed "
                     "(pip install -r requirements.txt), or pass --no-memory")
    import triton

    target = TARGETS[args.arch]
    if args.max_shared is not None:
        if args.max_shared < 1:
            parser.error("--max-shared must be a positive number of bytes")
        target = dataclasses.replace(target, max_shared=args.max_shared)
    if args.no_memory and (args.fla_timing_only or args.chunked_memory):
        parser.error("--fla-timing-only and --chunked-memory concern the memory, which --no-memory leaves out")
    if args.fla_timing_only and args.chunked_memory:
        parser.error("--fla-timing-only compiles FLA's kernels, --chunked-memory the chunked path: pick one")
    memory, memory_text = ("none", "left out") if args.no_memory else memory_path(
        target.arch, fla, triton.__version__, args.fla_timing_only, args.chunked_memory)
    records: list[CompileRecord] = []
    failure = None
    start = time.time()
    with tqdm(desc=f"compiling for sm_{target.arch}", unit=" kernel", file=sys.stderr,
              disable=None) as progress, stand_in_gpu(target, records, first_candidate=args.first_candidate,
                                                      on_compile=lambda record: progress.update()):
        try:
            # FLA is imported inside the stand-in: it reads the device at import.
            with fla_timing_only() if memory == "fla_timing_only" else contextlib.nullcontext():
                run_training_step(args.preset, args.seq_len, args.micro_batch, memory=not args.no_memory,
                                  memory_fla=memory.startswith("fla"))
        except Exception as exc:  # reported below in one line, exit status 1
            failure = _failure_text(exc, records, target.arch)
    rows = summarize(records)
    _print_report(rows, f"triton {triton.__version__}, torch {torch.__version__}, fla-core {fla}; "
                  f"sm_{target.arch} ({target.name}, {target.max_shared} bytes of shared memory per block); "
                  f"{args.preset}, bf16, {len(records)} compiles in {time.time() - start:.0f} s\n"
                  f"memory: {memory_text}")
    if failure:
        print(f"error: {failure}", file=sys.stderr)
    else:
        print(f"every launch of the step has a candidate that compiles and fits on sm_{target.arch}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": target.arch, "target": asdict(target), "triton": triton.__version__,
                       "torch": torch.__version__, "fla": fla, "preset": args.preset, "failure": failure,
                       "memory": {"path": memory, "text": memory_text},
                       "kernels": rows, "records": [asdict(r) for r in records]}, f, indent=1)
    return 1 if failure else 0


def _failure_text(exc: Exception, records: list[CompileRecord], arch: int) -> str:
    """One line for an exception out of the step: a launch that cannot run there, or another error."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if isinstance(exc, (OutOfResources, CompilationError, PTXASError)) and records:
        # The launch being compiled when it failed: its candidates were the last ones recorded.
        return f"the training step cannot launch {records[-1].kernel} on sm_{arch}: {text}"
    return f"the training step failed under the stand-in for sm_{arch}: {text}"


def _fla_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("fla-core")
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
