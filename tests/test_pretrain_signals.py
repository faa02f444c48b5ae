"""Ctrl-C as a terminal sends it: the first one saves a checkpoint at the step boundary and exits
with 130, a second one (or one before training starts) stops at once; the rerun resumes there."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import os, signal, sys, time
from pretrain.signals import StopRequests

mode, rank = sys.argv[1], int(sys.argv[2])
stop = StopRequests(rank=rank)
stop.watch_startup()
if mode == "startup":
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
    print("still running")
stop.watch_training()
os.kill(os.getpid(), signal.SIGTERM if mode == "term" else signal.SIGINT)
time.sleep(0.2)
print(f"requested={stop.requested} interrupted={stop.interrupted} signal={stop.signal_name}", flush=True)
if mode == "twice":
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
    print("still running")
"""


def child(mode: str, rank: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(rank)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_first_ctrl_c_requests_a_stop_and_says_so_once():
    proc = child("once")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "requested=True interrupted=True signal=SIGINT"
    assert proc.stderr.strip().splitlines() == [
        "[atma] Ctrl-C: saving a checkpoint when this step ends, then stopping (Ctrl-C again stops at once, "
        "without saving)"]


def test_second_ctrl_c_and_ctrl_c_before_training_stop_at_once():
    twice = child("twice")
    assert twice.returncode == 130 and "still running" not in twice.stdout
    assert twice.stderr.strip().splitlines()[-1].startswith("[atma] Ctrl-C again: stopped at once without saving")
    early = child("startup")
    assert early.returncode == 130 and "still running" not in early.stdout
    assert early.stderr.strip() == "[atma] Ctrl-C before training started: stopped; nothing to save yet"
    assert "Traceback" not in twice.stderr + early.stderr


def test_sigterm_stops_quietly_and_other_ranks_print_nothing():
    term = child("term")
    assert term.returncode == 0 and term.stdout.strip() == "requested=True interrupted=False signal=SIGTERM"
    assert term.stderr == ""
    quiet = child("twice", rank=1)
    assert quiet.returncode == 130 and quiet.stderr == ""


# ---------------------------------------------------------------------- through the launcher
RUN_ARGS = ["pretrain/configs/tiny-cpu.yaml", "--max-steps", "200", "--set", "batch.tokens=512",
            "--set", "logging.val_every=0", "--set", "logging.progress=false", "--set", "checkpoint.every=3",
            "--set", "train.precision=fp32", "--set", "data.shuffle=false"]


def start_in_terminal_group(data, run_dir, log_path):
    """`launch/pretrain.sh` as the README runs it, leading its own process group like a terminal's job."""
    env = dict(os.environ, PYTHON=sys.executable, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("MASTER_PORT", None)
    log = open(log_path, "w")

    def as_a_terminal_job():
        # A job a shell starts in the background inherits SIGINT ignored; a terminal's foreground job does not.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(["launch/pretrain.sh", *RUN_ARGS, "--data", data, "--run-dir", str(run_dir)], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=as_a_terminal_job)


def wait_for(predicate, proc, what, timeout=400):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def complete_steps(run_dir):
    root = run_dir / "checkpoints"
    return sorted(int(t.split("_")[1]) for t in os.listdir(root) if (root / t / "COMPLETE").exists())


@pytest.mark.slow
def test_ctrl_c_through_the_launcher_saves_and_the_rerun_resumes_there(tiny_shards, tmp_path):
    run = tmp_path / "run"
    log1 = tmp_path / "first.log"
    with socket.socket() as busy:
        # DeepSpeed's default rendezvous port is taken, as by another run on this machine.
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # already taken by another process: the same situation
        proc = start_in_terminal_group(tiny_shards, run, log1)
        wait_for(lambda: (run / "checkpoints" / "step_00000003" / "COMPLETE").exists(), proc, "checkpoint of step 3")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every process of the terminal's foreground group
        code = proc.wait(timeout=300)
    text = log1.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.count("[atma] Ctrl-C: saving a checkpoint when this step ends") == 1
    stopped = complete_steps(run)[-1]
    assert stopped >= 4, "the Ctrl-C checkpoint is the step after the signal, not the periodic one"
    assert f"[atma] stopped by Ctrl-C after step {stopped}: checkpoint step_{stopped:08d} saved" in text
    metrics = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert metrics == list(range(1, stopped + 1))

    # The same command again resumes at that step; a double Ctrl-C then stops everything at once.
    log2 = tmp_path / "second.log"
    proc = start_in_terminal_group(tiny_shards, run, log2)
    resumed = f"[atma] resumed from {run}/checkpoints/step_{stopped:08d} at step {stopped} "
    wait_for(lambda: f"[atma] step {stopped + 1}:" in log2.read_text(), proc, f"step {stopped + 1}")
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: "[atma] Ctrl-C: saving" in log2.read_text(), proc, "the first Ctrl-C's notice", timeout=60)
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=120)
    text = log2.read_text()
    assert code == 130, text[-3000:]
    assert resumed in text
    assert "[launch] Ctrl-C again: stopped every rank at once, without saving" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    time.sleep(1)
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]


BUILDS_AN_OP = r"""
import os, sys, time
build = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "py311_cpu", "some_op")
os.makedirs(build, exist_ok=True)
open(os.path.join(build, "lock"), "w").close()  # what torch does before it builds an op
# A file system with coarse timestamps can date the new lock before the supervisor's start.
os.utime(os.path.join(build, "lock"), (time.time() - 2,) * 2)
print("building", flush=True)
time.sleep(60)
"""

SUPERVISES = "import sys; from launch import supervise; sys.exit(supervise.run([sys.executable, '-c', sys.argv[1]]))"


def test_a_build_stopped_by_ctrl_c_does_not_leave_its_lock_behind(tmp_path):
    # Killed mid-build, a rank leaves torch's build lock, on which every later load of the op waits forever.
    ext = tmp_path / "ext"
    older = ext / "py311_cpu" / "other_op" / "lock"
    older.parent.mkdir(parents=True)
    older.touch()
    os.utime(older, (time.time() - 3600,) * 2)  # not this run's: kept
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(ext))
    runner = subprocess.Popen([sys.executable, "-c", SUPERVISES, BUILDS_AN_OP], cwd=ROOT, env=env,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert runner.stdout.readline().strip() == "building"
    os.killpg(runner.pid, signal.SIGINT)  # a terminal's Ctrl-C, before any training rank started
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 130, err
    assert not (ext / "py311_cpu" / "some_op" / "lock").exists()
    assert older.exists()
    assert "removed" in err and "some_op" in err


def test_a_run_stopped_by_sigterm_is_not_taken_for_a_finished_one(tmp_path, monkeypatch, capsys):
    # SIGTERM makes the ranks save and exit with 0; the next step (export, evaluation) must not run on
    # a half-trained model.
    import argparse

    from launch import quickstart

    run_dir = tmp_path / "run"
    reached = {"step": 4}

    def fake_launch(cmd, cwd=None, env=None):
        tag = run_dir / "checkpoints" / f"step_{reached['step']:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").touch()
        return 0

    monkeypatch.setattr(quickstart, "run_supervised", fake_launch)
    args = argparse.Namespace(ranks=1, steps=6, batch_tokens=64, micro_batch=1, no_progress=True)
    with pytest.raises(SystemExit) as stop:
        quickstart.run_pretrain(args, "shards", str(run_dir))
    assert stop.value.code == 130
    assert "Stopped at step 4 of 6; rerun the same command" in capsys.readouterr().err
    reached["step"] = 6
    quickstart.run_pretrain(args, "shards", str(run_dir))  # finished: returns
