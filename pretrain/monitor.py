"""Training dashboards: TensorBoard, Weights & Biases (run id stable across resumes), console, JSONL.

After a resume at step S, metrics.jsonl and TensorBoard keep one value per step: rows and events
after S (logged before a crash or stop and then redone) are dropped when the run restarts.
"""

from __future__ import annotations

import json
import os
import uuid

from tqdm.auto import tqdm

# What the dashboards write into a run directory; `--resume none` moves them aside with the checkpoints.
OUTPUTS = ("metrics.jsonl", "tensorboard", "wandb", "wandb_id.txt")


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep only the rows of a metrics.jsonl with step <= last_step (rewritten atomically); return how many went."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A line cut short by a crash mid-write.
                dropped += 1
                continue
            if row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class Monitor:
    """Writes scalars from rank 0 to every enabled sink; a no-op on other ranks."""

    def __init__(self, run_dir: str, *, rank: int, name: str, config: dict, total_steps: int, start_step: int,
                 tensorboard: bool, wandb: bool, wandb_project: str, wandb_mode: str, progress: bool):
        self.active = rank == 0
        self.tb = self.wandb_run = self.bar = None
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        # Steps after the resumed one are redone: drop what a crashed or stopped run logged for them.
        truncate_metrics(self.metrics_path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Readers (TensorBoard, EventAccumulator) drop earlier events from this step on.
            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        if wandb and wandb_mode != "disabled":
            self.wandb_run = self._init_wandb(run_dir, name, config, wandb_project, wandb_mode)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def _init_wandb(run_dir, name, config, project, mode):
        import wandb

        id_file = os.path.join(run_dir, "wandb_id.txt")
        if os.path.isfile(id_file):
            run_id = open(id_file, encoding="utf-8").read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=run_dir, mode=mode,
                          config=config)

    def log(self, step: int, scalars: dict[str, float], *, console: bool = True) -> None:
        """Record `scalars` at optimizer step `step`."""
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)
        if console:
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in clean.items()
                     if k in ("loss/total", "lr", "perf/tokens_per_s", "perf/mfu", "grad_norm")}
            if self.bar is not None:
                self.bar.set_postfix(shown, refresh=False)
            elif shown:
                print(f"[atma] step {step}: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(n)

    def print(self, message: str) -> None:
        """Print a line from rank 0 without breaking the progress bar."""
        if self.active:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        """Flush and close every sink."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
