"""Dashboards after a resume: metrics.jsonl and TensorBoard hold one value per step (steps redone after a
crash replace what the first attempt logged), as TensorBoard's own readers see them."""

import json
import time

from pretrain.monitor import Monitor, truncate_metrics


def monitor(run_dir, start_step):
    return Monitor(str(run_dir), rank=0, name="t", config={}, total_steps=10, start_step=start_step,
                   tensorboard=True, wandb=False, wandb_project="atma", wandb_mode="offline", progress=False)


def test_a_resume_keeps_one_value_per_step(tmp_path):
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = monitor(tmp_path, 0)
    for step in range(1, 6):  # logged, then a crash: the last checkpoint was step 3
        first.log(step, {"loss/total": float(step)}, console=False)
    first.close()
    # TensorBoard orders event files by name, whose first field is the start time in whole seconds.
    time.sleep(1.1)
    resumed = monitor(tmp_path, 3)
    for step in range(4, 7):
        resumed.log(step, {"loss/total": 10.0 + step}, console=False)
    resumed.close()

    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss/total"]) for r in rows] == expected
    legacy = EventAccumulator(str(tmp_path / "tensorboard"))
    legacy.Reload()
    assert [(e.step, e.value) for e in legacy.Scalars("loss/total")] == expected
    current = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    current.Reload()
    assert [e.step for e in current.Tensors("loss/total")] == [s for s, _ in expected]


def test_truncate_metrics_drops_later_rows_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "x"')
    assert truncate_metrics(str(path), 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(str(path), 2) == 0 and truncate_metrics(str(tmp_path / "absent.jsonl"), 0) == 0
