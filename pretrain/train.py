"""Pretrain an ATMA model with DeepSpeed.

    deepspeed pretrain/train.py --config pretrain/configs/tiny-cpu.yaml --data shards/
    python -m pretrain.train --config RUN.yaml --data DIR --set optim.lr=3e-4
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Launched as a script (deepspeed pretrain/train.py): make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    p.add_argument("--resume", help="auto (newest complete checkpoint), none, or a checkpoint PATH")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=3e-4 --set model.overrides.core=nope")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Load the config, train, and return a process exit code."""
    args = parse_args(argv)
    from pretrain.config import ConfigError, load_run_config

    cli = {"data.dir": args.data, "run_dir": args.run_dir, "train.max_steps": args.max_steps,
           "checkpoint.resume": args.resume}
    try:
        cfg = load_run_config(args.config, args.set, **cli)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from data_pipeline.errors import DataError
    from pretrain.trainer import Trainer, TrainingError

    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(f"[atma] done: step {trainer.step}, loss {summary.get('loss/total', float('nan')):.4f}, "
              f"run dir {cfg.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: gloo worker threads can otherwise release their last
    # collective while Python finalizes and abort the process after training has finished.
    os._exit(code)
