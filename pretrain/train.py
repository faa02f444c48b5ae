"""Pretrain an ATMA model with DeepSpeed.

    deepspeed pretrain/train.py --config pretrain/configs/tiny-cpu.yaml --data shards/
    python -m pretrain.train --config RUN.yaml --data DIR --set optim.lr=3e-4

Ctrl-C saves a checkpoint at the end of the current step and exits with code 130 (a second
Ctrl-C exits at once); SIGTERM and SIGUSR1 save and exit with code 0. A user error (config, data,
resume check) is one `error:` line, printed once: by rank 0 when every rank meets it (start-up,
config), by the rank that meets it otherwise; the exit code is 2 (1 when training itself fails).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Launched as a script (deepspeed pretrain/train.py): make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.signals import INTERRUPTED_EXIT_CODE, StopRequests  # noqa: E402  (light: os and signal only)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (the deepspeed launcher adds --local_rank)."""
    p = argparse.ArgumentParser(
        prog="pretrain.train",
        description="Pretrain ATMA on WebDataset shards with DeepSpeed (ZeRO-1/2/3, bf16, activation "
        "checkpointing, composite loss, automatic resume, TensorBoard/W&B). Launch with "
        "`deepspeed pretrain/train.py --config RUN.yaml` for several ranks or `python -m pretrain.train` "
        "for one process.",
    )
    p.add_argument("--config", help="run config YAML (see pretrain/configs/); defaults apply without it")
    p.add_argument("--data", help="shard directory written by `python -m data_pipeline prepare` (data.dir)")
    p.add_argument("--run-dir", help="where checkpoints, logs and dashboards go (run_dir)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for (train.max_steps)")
    p.add_argument("--resume", help="auto (newest complete checkpoint), none (start over; the earlier checkpoints and "
                                     "dashboards are moved aside), or a checkpoint PATH")
    p.add_argument("--allow-config-change", action="append", default=None, metavar="KEY",
                   help="on resume, accept a new value of this run-config key or section (e.g. optim.lr, "
                        "schedule); repeatable (checkpoint.allow_changes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=3e-4 --set model.overrides.core=nope")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def report_error(message: str, *, rank: int, world: int, every_rank: bool) -> None:
    """Print one `error:` line: from rank 0 when every rank has the same error, else from this rank."""
    if every_rank and rank != 0:
        return
    where = f"rank {rank}: " if world > 1 and not every_rank else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """Load the config, train, and return a process exit code."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    stop = StopRequests(rank=rank)
    stop.watch_startup()
    args = parse_args(argv)
    from pretrain.config import ConfigError, load_run_config

    cli = {"data.dir": args.data, "run_dir": args.run_dir, "train.max_steps": args.max_steps,
           "checkpoint.resume": args.resume, "checkpoint.allow_changes": args.allow_config_change}
    try:
        cfg = load_run_config(args.config, args.set, **cli)
    except ConfigError as err:
        report_error(str(err), rank=rank, world=world, every_rank=True)
        return 2
    from data_pipeline.errors import DataError
    from pretrain.trainer import Trainer, TrainingError

    trainer = None
    try:
        trainer = Trainer(cfg, stop)
        summary = trainer.train()
    except (ConfigError, DataError) as err:
        # Start-up errors come from inputs every rank reads alike; a data error while training
        # comes from the shard one rank was reading.
        report_error(str(err), rank=rank, world=world, every_rank=trainer is None or isinstance(err, ConfigError))
        return 2
    except TrainingError as err:
        report_error(str(err), rank=rank, world=world, every_rank=True)
        return 1
    # No barrier on the error paths above: the other ranks may be waiting in a collective of the
    # step this rank left, and the launcher stops them once this process exits.
    trainer.close()
    if trainer.stopped:
        return INTERRUPTED_EXIT_CODE if stop.interrupted else 0
    if summary and rank == 0:
        print(f"[atma] done: step {trainer.step}, loss {summary.get('loss/total', float('nan')):.4f}, "
              f"run dir {cfg.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    from pretrain.shutdown import exit_without_teardown

    exit_without_teardown(main())
