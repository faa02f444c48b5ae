"""Reports at toy scale: retrieval at chance is labelled as such, and plots do not magnify noise."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from evaluation.report import CHANCE_MARK, at_chance, percent_limits, relative_change, write_markdown
from launch import compare


def _cell(length, digit_acc, trials=8, depth=0.5):
    return {"task": "passkey", "haystack": "synthetic", "length": length, "depth": depth, "trials": trials,
            "token_acc": digit_acc, "digit_acc": digit_acc, "exact_acc": digit_acc**5, "nll": 2.3,
            "scored_tokens": 5 * trials, "seconds": 0.1, "peak_memory_bytes": None}


def _results(cells):
    meta = {"model_dir": "m", "num_parameters": 1000, "config": {"preset": "tiny"}, "device": "cpu",
            "device_name": "cpu", "dtype": "fp32", "lengths": sorted({c["length"] for c in cells}), "seed": 0,
            "training_seq_len": 256, "export": {"tokens_seen": 1000}, "trials": 8, "target_tokens": 64,
            "tokenizer": {"digit_tokens": {str(d): 1 for d in range(10)}}, "total_seconds": 1.0}
    return {"metadata": meta, "retrieval": cells, "perplexity": []}


def test_chance_is_two_standard_errors_above_ten_percent():
    # 8 trials = 40 digits: the bound is 10% + 2 * sqrt(0.09 / 40) = 19.5%.
    assert at_chance(_cell(256, 0.10)) and at_chance(_cell(256, 0.19)) and at_chance(_cell(256, 0.0))
    assert not at_chance(_cell(256, 0.20)) and not at_chance(_cell(256, 0.95))
    # More trials tighten the bound: 15% over 400 digits is above chance (bound 13%).
    assert not at_chance(_cell(256, 0.15, trials=80))
    assert not at_chance({"digit_acc": None, "trials": 8}) and not at_chance({"digit_acc": 0.0, "trials": 0})


def test_report_labels_cells_at_chance_and_says_when_nothing_is_learned(tmp_path):
    path = tmp_path / "report.md"
    write_markdown(_results([_cell(256, 0.1), _cell(512, 0.05)]), str(path))
    text = path.read_text()
    assert "Every cell is at chance" in text and f"10.0{CHANCE_MARK}" in text and f"5.0{CHANCE_MARK}" in text
    write_markdown(_results([_cell(256, 0.96), _cell(512, 0.1)]), str(path))
    text = path.read_text()
    assert "Every cell is at chance" not in text and "1 of 2 cells are at chance" in text
    assert "96.0 |" in text and f"96.0{CHANCE_MARK}" not in text


def test_perplexity_axis_keeps_a_fraction_of_a_percent_flat():
    change = relative_change([10.0, 10.016, 10.008])
    assert change == pytest.approx([0.0, 0.16, 0.08])
    low, high = percent_limits([change])
    assert low <= -2.0 and high >= 2.0  # 0.16% drawn within +-2%, not across the whole plot
    low, high = percent_limits([relative_change([10.0, 13.0])])
    assert (low, high) == pytest.approx((-3.0, 33.0))  # a real change keeps its own scale (10% margins)


def test_comparison_marks_chance_and_plots_relative_change(tmp_path):
    cells = [_cell(256, 0.1), _cell(1024, 0.08)]
    table = {"polar+mem": {str(k): v for k, v in compare.summarise({"retrieval": cells, "perplexity": [
        {"length": 256, "ppl": 10.0, "bpb": 1.0}, {"length": 1024, "ppl": 10.016, "bpb": 1.001}]}).items()}}
    args = type("Args", (), {"seq_len": 256, "preset": "tiny", "steps": 10, "batch_tokens": 4096, "trials": 8,
                                 "lm_weight": 1.0, "copy_weight": 2.0, "copy_context": 3})()
    compare.write_report(str(tmp_path), table, args, [256, 1024], 60.0)
    text = (tmp_path / "comparison.md").read_text()
    assert f"10.0{CHANCE_MARK}" in text and "Every model is at chance" in text
    assert "copy targets x 2.0 (context 3)" in text
    assert json.loads((tmp_path / "comparison.json").read_text())["loss"]["copy_weight"] == 2.0
    assert json.loads((tmp_path / "comparison.json").read_text())["table"]["polar+mem"]["256"]["at_chance"]
    assert (tmp_path / "comparison_perplexity.png").stat().st_size > 0
    table["polar+mem"]["256"].update(digit_acc=0.9, token_acc=0.9, at_chance=False)
    compare.write_report(str(tmp_path), table, args, [256, 1024], 60.0)
    text = (tmp_path / "comparison.md").read_text()
    assert "90.0 |" in text and "Every model is at chance" not in text


def test_comparison_aggregates_seeds_into_mean_and_spread():
    per_seed = {0: {"256": {"ppl": 10.0, "digit_acc": 0.9, "token_acc": 0.9, "trials": 8}},
                1: {"256": {"ppl": 12.0, "digit_acc": 0.5, "token_acc": 0.5, "trials": 8}},
                2: {"256": {"ppl": 11.0, "digit_acc": 0.7, "token_acc": 0.7, "trials": 8}}}
    row = compare.aggregate(per_seed)["256"]
    assert row["seeds"] == 3 and row["ppl"] == pytest.approx(11.0) and row["ppl_sd"] == pytest.approx(1.0)
    assert (row["token_acc_min"], row["token_acc_max"]) == (0.5, 0.9) and row["trials"] == 24
    assert not row["at_chance"]
    assert compare._cell(row, "token_acc", "{:.1f}") == "70.0 ± 20.0"
    low = compare.aggregate({s: {"256": {"digit_acc": 0.1, "token_acc": 0.1, "trials": 8}} for s in range(3)})
    assert low["256"]["at_chance"] and compare._cell(low["256"], "token_acc", "{:.1f}").endswith(CHANCE_MARK)


def test_perplexity_plot_spreads_the_change_over_seeds_not_the_level():
    def run(level, change):
        return {str(k): v for k, v in compare.summarise({"retrieval": [], "perplexity": [
            {"length": 256, "ppl": level, "bpb": 1.0},
            {"length": 1024, "ppl": level * (1 + change / 100), "bpb": 1.0}]}).items()}

    # Seeds with very different levels (one trained longer) and the same +10% change at 4x.
    table = compare.aggregate({0: run(150.0, 10.0), 1: run(280.0, 10.0)})
    xs, mean, low, high = compare.plot_series(table, "ppl", [256, 1024])
    assert xs == [256, 1024]
    assert mean == pytest.approx([0.0, 10.0]) and low == pytest.approx([0.0, 10.0])
    assert high == pytest.approx([0.0, 10.0])
    table = compare.aggregate({0: run(150.0, 5.0), 1: run(280.0, 15.0)})
    _, _, low, high = compare.plot_series(table, "ppl", [256, 1024])
    assert low == pytest.approx([0.0, 5.0]) and high == pytest.approx([0.0, 15.0])
    _, acc, _, _ = compare.plot_series({"256": {"token_acc": 0.5}}, "token_acc", [256])
    assert acc == [50.0]


def test_comparison_seeds_are_checked_and_finished_runs_are_reused(tmp_path, capsys):
    assert compare.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,0", "a,b"):
        with pytest.raises(ValueError, match="--seeds"):
            compare.parse_seeds(bad)
    assert compare.main(["--out", str(tmp_path), "--seeds", "1,1"]) == 2
    assert "error: --seeds needs at least one seed and no repeats" in capsys.readouterr().err
    base = tmp_path / "polar+mem" / "seed0"
    (base / "eval").mkdir(parents=True)
    shards = str(tmp_path / "no-shards")
    results = _results([_cell(256, 0.8)])
    results["metadata"]["data"] = {"no-shards-eval": {"path": shards + "-eval", "kind": "shards", "split": "val"}}
    (base / "eval" / "results.json").write_text(json.dumps(results))
    (base / "done").write_text("")
    # Finished: read back without training (no shards, no launcher needed).
    args = compare.parse_args([])
    results = compare.run_one(args, shards, str(base), "polar", True, 0, [256], "[1/1]")
    assert results["retrieval"][0]["digit_acc"] == 0.8
    assert "finished earlier" in capsys.readouterr().out


def test_a_run_evaluated_on_the_training_mix_is_evaluated_again_without_training(tmp_path, monkeypatch, capsys):
    import evaluation.long_context

    base, shards = tmp_path / "nope+mem" / "seed1", str(tmp_path / "shards")
    (base / "eval").mkdir(parents=True)
    stale = _results([_cell(256, 0.3)])
    stale["metadata"]["data"] = {"shards": {"path": shards, "kind": "shards"}}  # the training mix's held-out split
    (base / "eval" / "results.json").write_text(json.dumps(stale))
    (base / "done").write_text("")
    (base / compare.TIMING_FILE).write_text(json.dumps({"stage1": 300.0, "main": 600.0, "eval": 500.0}))
    seen = {}

    def fake_evaluation(model_dir, lengths, out_dir, *, data, seed, **_):
        seen.update(model_dir=model_dir, data=data, seed=seed)
        results = _results([_cell(256, 0.9)])
        # As evaluation.long_context writes it: each data source under its directory's name.
        results["metadata"]["data"] = {os.path.basename(data): {"path": data, "kind": "shards", "split": "val"}}
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
        return results

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(evaluation.long_context, "run_evaluation", fake_evaluation)
    monkeypatch.setattr(compare, "run_pretrain", must_not_train)
    args = compare.parse_args([])
    results = compare.run_one(args, shards, str(base), "nope", True, 1, [256], "label")
    assert results["retrieval"][0]["digit_acc"] == 0.9
    assert seen == {"model_dir": str(base / "exported"), "data": shards + "-eval", "seed": 1}
    assert "evaluated on " + shards + "; evaluating it again (no training)" in capsys.readouterr().out
    timing = compare.read_timing(str(base))
    assert timing["stage1"] == 300.0 and timing["eval"] < 60, "the new evaluation's time replaces the old one's"
    # Evaluated on the held-out corpus now: the next invocation reuses it.
    seen.clear()
    assert compare.run_one(args, shards, str(base), "nope", True, 1, [256], "label")["retrieval"][0]["digit_acc"] == 0.9
    assert seen == {} and "finished earlier" in capsys.readouterr().out
    # Without recall episodes in the training data, its own held-out split is clean.
    assert compare.eval_shards(compare.parse_args(["--recall-weight", "0"]), shards) == shards


def test_the_evaluation_reads_the_held_out_documents_without_recall_episodes(tmp_path):
    from data_pipeline.recall import CUES
    from evaluation.heldout import open_source, read_shard_stream
    from tokenizers import Tokenizer

    args = compare.parse_args(["--max-docs", "40", "--vocab-size", "512", "--stage1-steps", "0", "--no-progress"])
    shards = str(tmp_path / "shards")
    compare.prepare_shards(args, shards)
    tokenizer = Tokenizer.from_file(os.path.join(shards, "tokenizer.json"))

    def held_out_text(path):
        stream, info = read_shard_stream(open_source(path))
        assert info["split"] == "val"
        return tokenizer.decode([int(t) for t in stream])

    mixed, clean = held_out_text(shards), held_out_text(compare.eval_shards(args, shards))
    # A fact of an episode: one of the cues with a made-up name, then digits.
    fact = re.compile("|".join(re.escape(cue).replace(re.escape("{key}"), "[A-Z][a-z]+") + r" \d" for cue in CUES))
    assert fact.search(mixed), "the training mix's held-out split has recall episodes"
    assert not fact.search(clean), "the evaluation's held-out text must have none"
    # The same held-out documents: the clean text's opening lines are in the mixed split too.
    assert clean.splitlines()[0] in mixed and clean.splitlines()[1] in mixed


def test_comparison_trains_a_first_stage_then_starts_the_main_run_from_it(tmp_path, monkeypatch):
    import evaluation.long_context
    import pretrain.export

    calls, clock = [], [0.0]  # a fake clock: training takes a second per step, an evaluation 7

    def fake_pretrain(args, shards, run_dir, sets, **_):
        calls.append(("pretrain", args.steps, args.batch_tokens, shards, run_dir, list(sets)))
        clock[0] += args.steps
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": args.steps, "loss/copy": 0.4}) + "\n")

    def fake_export(run_dir, out):
        calls.append(("export", run_dir))
        os.makedirs(out, exist_ok=True)

    def fake_evaluation(model_dir, lengths, out, **_):
        calls.append(("evaluate", model_dir))
        clock[0] += 7
        return {"retrieval": [], "perplexity": []}

    monkeypatch.setattr(compare.time, "time", lambda: clock[0])

    monkeypatch.setattr(compare, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(pretrain.export, "export", fake_export)
    monkeypatch.setattr(evaluation.long_context, "run_evaluation", fake_evaluation)
    args = compare.parse_args(["--steps", "40", "--stage1-steps", "30", "--copy-weight", "2"])
    base, shards = str(tmp_path / "nope+mem" / "seed0"), str(tmp_path / "shards")
    compare.run_one(args, shards, base, "nope", True, 0, [256], "label")
    (_, s1_steps, s1_tokens, s1_shards, s1_dir, s1_sets), export1, (_, steps, _, main_shards, _, sets), *_ = calls
    assert (s1_steps, s1_tokens, s1_shards) == (30, 2048, shards + "-stage1") and s1_dir.endswith("stage1/run")
    assert "schedule.kind=constant" in s1_sets and not any(s.startswith("train.init_from") for s in s1_sets)
    assert "loss.copy_weight=2.0" in s1_sets and "loss.copy_targets=numbers" in s1_sets
    assert export1 == ("export", s1_dir)
    assert (steps, main_shards) == (40, shards) and f"train.init_from={base}/stage1/exported" in sets
    assert "model.overrides.hidden_size=64" in sets and "schedule.kind=wsd" in sets
    # Each part's wall time is kept: the main stage's includes its retrieval check.
    assert compare.read_timing(base) == {"stage1": 30, "main": 47, "eval": 7}
    # A rerun after an interruption between the stages trains the main stage only.
    os.remove(os.path.join(base, "done"))
    calls.clear()
    compare.run_one(args, shards, base, "nope", True, 0, [256], "label")
    # The main stage's retrieval check (an export and evaluation of its own) precedes the final ones.
    assert [c[0] for c in calls] == ["pretrain", "export", "evaluate", "export", "evaluate"] and calls[0][3] == shards
    assert calls[2][1] == os.path.join(base, "check", "exported") and calls[4][1] == os.path.join(base, "exported")
    # Time spent by every invocation adds up.
    assert compare.read_timing(base) == {"stage1": 30, "main": 94, "eval": 14}


def test_rope_models_keep_the_papers_logit_range_at_the_miniature_head_dim(tmp_path, monkeypatch):
    import evaluation.long_context
    import pretrain.export

    # q, k RMS-normed: |logit| <= head_dim x scale, 15.36 in the paper (0.12 at head dim 128).
    assert compare.rope_scale_for(compare.parse_args([])) == pytest.approx(0.48)  # tiny: head dim 32
    assert compare.rope_scale_for(compare.parse_args(["--model-set", "head_dim=64"])) == pytest.approx(0.24)
    assert compare.rope_scale_for(compare.parse_args(["--rope-scale", "0.3"])) == 0.3
    sets_by_core = {}

    def fake_pretrain(args, shards, run_dir, sets, **_):
        os.makedirs(run_dir, exist_ok=True)
        sets_by_core.setdefault(run_dir.split(os.sep)[-3], list(sets))

    monkeypatch.setattr(compare, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(pretrain.export, "export", lambda run_dir, out: None)
    monkeypatch.setattr(evaluation.long_context, "run_evaluation", lambda *a, **k: {"retrieval": [], "perplexity": []})
    args = compare.parse_args(["--steps", "40", "--stage1-steps", "0"])
    for core in ("rope", "polar"):
        compare.run_one(args, "shards", str(tmp_path / core / "seed0"), core, True, 0, [256], core)
    assert "model.overrides.rope_scale=0.48" in sets_by_core["rope"]
    assert not any("rope_scale" in s for s in sets_by_core["polar"])


def test_parallel_runs_keep_at_most_n_at_once_and_report_failures(tmp_path):
    spans = tmp_path / "spans"

    def start(job):
        code = 3 if job[0] == "bad" else 0
        script = (f"import sys, time\nopen({str(spans)!r}, 'a').write(f'{{time.time()}} 1\\n')\ntime.sleep(0.5)\n"
                  f"open({str(spans)!r}, 'a').write(f'{{time.time()}} -1\\n')\nsys.exit({code})\n")
        return subprocess.Popen([sys.executable, "-c", script])

    succeeded = []
    jobs = [("a", 0), ("bad", 0), ("b", 0), ("c", 0), ("d", 0)]
    failed = compare.run_parallel(jobs, 2, start, succeeded.append, poll_s=0.05)
    assert failed == [("bad", 0)] and sorted(succeeded) == [("a", 0), ("b", 0), ("c", 0), ("d", 0)]
    events = sorted((float(t), int(d)) for t, d in (line.split() for line in spans.read_text().splitlines()))
    running, most = 0, 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    assert most == 2


def test_parallel_comparison_reports_every_model_in_the_order_asked(tmp_path, monkeypatch, capsys):
    accuracy = {"nope": 0.9, "polar+mem": 0.5}

    def fake_child(argv, out, name, seed, parallel):
        base = os.path.join(out, name, f"seed{seed}")
        os.makedirs(os.path.join(base, "eval"), exist_ok=True)
        with open(os.path.join(base, "eval", "results.json"), "w") as f:
            json.dump(_results([_cell(256, accuracy[name] - 0.1 * seed)]), f)
        os.makedirs(os.path.join(base, "stage1"), exist_ok=True)
        with open(os.path.join(base, "stage1", "steps"), "w") as f:
            f.write(f"{600 + 300 * seed}\n")
        with open(os.path.join(base, "main_steps"), "w") as f:
            f.write(f"{500 + 250 * seed}\n")
        with open(os.path.join(base, compare.TIMING_FILE), "w") as f:
            json.dump({"stage1": 240.0, "main": 480.0 + 300 * seed, "eval": 120.0}, f)
        # polar+mem finishes last: the report keeps the order asked for, not the order of finishing.
        return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({1.5 if name == 'polar+mem' else 0})"])

    monkeypatch.setattr(compare, "_child", fake_child)
    monkeypatch.setattr(compare, "prepare_shards", lambda args, shards: None)
    argv = ["--out", str(tmp_path), "--variants", "polar+mem,nope", "--seeds", "0,1", "--parallel", "2",
            "--eval-multiples", "1"]
    assert compare.main(argv) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert list(report["table"]) == ["polar+mem", "nope"]
    assert report["table"]["nope"]["256"]["seeds"] == 2
    assert report["table"]["nope"]["256"]["token_acc"] == pytest.approx(0.85)
    out = capsys.readouterr().out
    assert out.count("started") == 4 and out.count("finished") == 4
    assert report["stage1_steps"] == {"polar+mem": {"0": 600, "1": 900}, "nope": {"0": 600, "1": 900}}
    text = (tmp_path / "comparison.md").read_text()
    assert report["main_steps"]["nope"] == {"0": 500, "1": 750}
    assert "seeds 0, 1 (mean" in text and "| polar+mem | 600 / 500, 14 min | 900 / 750, 19 min |" in text
    assert report["run_seconds"]["nope"]["1"] == {"stage1": 240.0, "main": 780.0, "eval": 120.0}
    assert "Wall time of the 4 timed runs" in text and "66 min in all; 2 at a time, about 0.6 h." in text


def test_report_only_reports_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    def finished_run(name, seed, accuracy):
        base = tmp_path / name / f"seed{seed}"
        (base / "eval").mkdir(parents=True)
        (base / "eval" / "results.json").write_text(json.dumps(_results([_cell(256, accuracy)])))
        (base / "done").write_text("done\n")
        (base / "main_steps").write_text("750\n")

    finished_run("polar+mem", 0, 0.9)
    finished_run("polar+mem", 1, 0.7)
    (tmp_path / "nope" / "seed0" / "run").mkdir(parents=True)  # started, not finished

    def must_not_run(*args, **kwargs):
        raise AssertionError("--report-only trained something")

    monkeypatch.setattr(compare, "_child", must_not_run)
    monkeypatch.setattr(compare, "run_one", must_not_run)
    monkeypatch.setattr(compare, "prepare_shards", must_not_run)
    argv = ["--out", str(tmp_path), "--variants", "polar+mem,nope", "--seeds", "0,1", "--eval-multiples", "1",
            "--report-only"]
    assert compare.main(argv) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert list(report["table"]) == ["polar+mem"]
    assert report["table"]["polar+mem"]["256"]["token_acc"] == pytest.approx(0.8)
    assert report["main_steps"] == {"polar+mem": {"0": 750, "1": 750}}
    assert "not finished (left out of the report): nope seed 0, nope seed 1" in capsys.readouterr().out
    assert compare.main(["--out", str(tmp_path / "empty"), "--report-only"]) == 1


def _finished_run(out, name, seed, accuracy, main_steps=750, seconds=None):
    base = out / name / f"seed{seed}"
    (base / "eval").mkdir(parents=True)
    (base / "eval" / "results.json").write_text(json.dumps(_results([_cell(256, accuracy)])))
    (base / "done").write_text("done\n")
    (base / "main_steps").write_text(f"{main_steps}\n")
    if seconds is not None:
        (base / compare.TIMING_FILE).write_text(json.dumps(seconds))


def test_runs_an_earlier_report_recorded_are_included_without_training(tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "earlier"
    _finished_run(earlier, "polar+mem", 0, 0.9, 500, {"stage1": 60.0, "main": 540.0, "eval": 60.0})
    _finished_run(earlier, "polar+mem", 1, 0.7, 1000, {"stage1": 60.0, "main": 1140.0, "eval": 60.0})
    _finished_run(earlier, "nope", 0, 0.6)
    common = ["--variants", "polar+mem", "--eval-multiples", "1"]
    assert compare.main(["--out", str(earlier), "--seeds", "0,1", "--report-only", *common]) == 0
    included = str(earlier / "comparison.json")
    here = tmp_path / "here"
    started = []

    def fake_child(argv, out, name, seed, parallel):
        started.append((name, seed))
        _finished_run(here, name, seed, 0.5, 1500, {"stage1": 60.0, "main": 1740.0, "eval": 60.0})
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(compare, "_child", fake_child)
    monkeypatch.setattr(compare, "prepare_shards", lambda args, shards: None)
    argv = ["--out", str(here), "--seeds", "0,1,2", "--parallel", "2", "--include", included, *common]
    assert compare.main(argv) == 0
    assert started == [("polar+mem", 2)]  # seeds 0 and 1 come from the earlier report; nope was not asked for
    report = json.loads((here / "comparison.json").read_text())
    assert report["table"]["polar+mem"]["256"]["seeds"] == 3
    assert report["table"]["polar+mem"]["256"]["token_acc"] == pytest.approx(0.7)
    assert report["main_steps"] == {"polar+mem": {"0": 500, "1": 1000, "2": 1500}}
    assert report["included"] == {included: ["polar+mem:0", "polar+mem:1"]}
    text = (here / "comparison.md").read_text()
    assert f"- `{included}`: polar+mem seeds 0, 1" in text
    assert "| polar+mem | - / 500, 11 min | - / 1000, 21 min | - / 1500, 31 min |" in text
    assert "Wall time of the 3 timed runs" in text and "63 min in all" in text
    # The same report again, from what is on disk: nothing is trained.
    monkeypatch.setattr(compare, "_child", None)
    assert compare.main(["--out", str(here), "--seeds", "0,1,2", "--include", included, "--report-only", *common]) == 0
    assert json.loads((here / "comparison.json").read_text())["table"] == report["table"]
    capsys.readouterr()


def test_an_earlier_report_with_other_settings_or_the_same_run_twice_is_refused(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    _finished_run(earlier, "polar+mem", 0, 0.9)
    assert compare.main(["--out", str(earlier), "--seeds", "0", "--report-only", "--eval-multiples", "1"]) == 0
    included = str(earlier / "comparison.json")
    argv = ["--out", str(tmp_path / "here"), "--seeds", "0", "--report-only", "--include", included]
    assert compare.main(argv + ["--eval-multiples", "1", "--seq-len", "128"]) == 2
    assert "made with train_len 256, this comparison has 128" in capsys.readouterr().err
    assert compare.main(argv + ["--eval-multiples", "1,2"]) == 2
    assert "made with lengths [256], this comparison has [256, 512]" in capsys.readouterr().err
    assert compare.main(argv + ["--eval-multiples", "1", "--include", included]) == 2
    assert f"polar+mem seed 0 is recorded in both {included} and {included}" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("[]")
    assert compare.main(argv[:-1] + [str(tmp_path / "junk.json"), "--eval-multiples", "1"]) == 2
    assert "not a comparison.json" in capsys.readouterr().err


def test_the_first_stage_goes_on_until_its_copy_loss_shows_the_lookup(tmp_path, monkeypatch, capsys):
    import pretrain.export

    losses, calls = [2.3, 2.2, 0.5], []  # the copy loss each stage-1 call ends with

    def fake_pretrain(args, shards, run_dir, sets, **_):
        loss = losses[min(len(calls), len(losses) - 1)]
        calls.append(args.steps)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            for _ in range(20):  # the mean of the last 20 logged values decides
                f.write(json.dumps({"step": args.steps, "loss/copy": loss}) + "\n")

    monkeypatch.setattr(compare, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(pretrain.export, "export", lambda run_dir, out: os.makedirs(out, exist_ok=True))
    shards = str(tmp_path / "shards")
    args = compare.parse_args(["--stage1-steps", "30", "--stage1-max-steps", "100"])
    assert compare.train_stage1(args, shards, str(tmp_path / "a"), [], "label") == 60
    assert calls == [30, 45, 60]
    assert "copy loss 2.30 after 30 steps, above 1.0 (the lookup is not found yet): 15 steps more" in capsys.readouterr().out
    # The step limit ends it whatever the loss; an interrupted stage resumes towards its last target.
    losses[:], calls[:] = [2.3], []
    args = compare.parse_args(["--stage1-steps", "30", "--stage1-max-steps", "50"])
    assert compare.train_stage1(args, shards, str(tmp_path / "b"), [], "label") == 50
    assert calls == [30, 45, 50]
    calls.clear()
    (tmp_path / "b" / "steps").write_text("45\n")
    assert compare.train_stage1(args, shards, str(tmp_path / "b"), [], "label") == 50
    assert calls == [45, 50]


def test_the_first_stage_trains_at_its_own_learning_rate(tmp_path, monkeypatch):
    seen = []

    def fake_pretrain(args, shards, run_dir, sets, **_):
        seen.append([s for s in sets if s.startswith("optim.lr=")])
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": args.steps, "loss/copy": 0.1}) + "\n")

    monkeypatch.setattr(compare, "run_pretrain", fake_pretrain)
    args = compare.parse_args(["--stage1-steps", "30", "--lr", "0.004"])
    compare.train_stage1(args, "shards", str(tmp_path / "a"), ["model.preset=tiny", "optim.lr=0.004"], "label")
    assert seen == [["optim.lr=0.0015"]], "one rate, the first stage's default, replacing the main stage's"
    args = compare.parse_args(["--stage1-steps", "30", "--stage1-lr", "0.002"])
    compare.train_stage1(args, "shards", str(tmp_path / "b"), [], "label")
    assert seen[-1] == ["optim.lr=0.002"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--stage1-lr", "0"])


def test_the_main_stage_goes_on_while_its_copy_loss_is_high_then_stops_at_its_limit(tmp_path, monkeypatch, capsys):
    losses, calls = [1.8, 0.6], []  # the copy loss each main-stage call ends with

    def fake_pretrain(args, shards, run_dir, sets, **_):
        loss = losses[min(len(calls), len(losses) - 1)]
        calls.append((args.steps, run_dir, "schedule.kind=wsd" in sets))
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            for _ in range(20):
                f.write(json.dumps({"step": args.steps, "loss/copy": loss}) + "\n")

    monkeypatch.setattr(compare, "run_pretrain", fake_pretrain)
    args = compare.parse_args(["--steps", "40", "--max-steps", "100", "--retrieval-goal", "0"])
    base = str(tmp_path / "a")
    assert compare.train_main(args, "shards", base, [], "label", 0) == 60
    assert calls == [(40, os.path.join(base, "run"), True), (60, os.path.join(base, "run"), True)]
    assert "copy loss 1.80 after 40 steps, above 1.0 (the lookup is not found yet): 20 steps more" in capsys.readouterr().out
    assert (tmp_path / "a" / "main_steps").read_text() == "60\n"
    losses[:], calls[:] = [1.8], []
    args = compare.parse_args(["--steps", "40", "--max-steps", "50", "--retrieval-goal", "0"])
    assert compare.train_main(args, "shards", str(tmp_path / "b"), [], "label", 0) == 50
    assert [c[0] for c in calls] == [40, 50]


def test_the_main_stage_goes_on_until_its_check_retrieval_reaches_the_goal(tmp_path, monkeypatch, capsys):
    calls, checks = [], [0.5, 0.91, 0.95]  # check accuracy after each main-stage call (goal: 0.92)

    def fake_pretrain(args, shards, run_dir, sets, **_):
        calls.append(args.steps)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            # A copy loss far above --copy-loss: with a check, the check alone decides.
            f.write(json.dumps({"step": args.steps, "loss/copy": 1.8}) + "\n")

    monkeypatch.setattr(compare, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(compare, "retrieval_check", lambda args, shards, base, seed: checks[len(calls) - 1])
    args = compare.parse_args(["--steps", "40", "--max-steps", "200"])
    assert compare.train_main(args, "shards", str(tmp_path / "a"), [], "label", 0) == 80
    assert calls == [40, 60, 80]
    out = capsys.readouterr().out
    assert "retrieval 50.0% at 256 tokens after 40 steps (check trials), below 92%: 20 steps more" in out
    assert "retrieval check after 80 steps: 95.0% at 256 tokens" in out


def test_the_retrieval_check_uses_trials_of_its_own_at_the_training_length(tmp_path, monkeypatch):
    import evaluation.long_context
    import pretrain.export

    seen = {}

    def fake_evaluation(model_dir, lengths, out_dir, *, data, seed, tasks, trials, **_):
        seen.update(model_dir=model_dir, lengths=lengths, data=data, seed=seed, tasks=tasks, trials=trials)
        cells = [{"length": 256, "token_acc": a, "digit_acc": a, "exact_acc": 0.0, "trials": 8} for a in (0.5, 1.0)]
        return {"retrieval": cells, "perplexity": []}

    monkeypatch.setattr(pretrain.export, "export", lambda run_dir, out_dir: seen.update(run_dir=run_dir))
    monkeypatch.setattr(evaluation.long_context, "run_evaluation", fake_evaluation)
    args = compare.parse_args(["--check-trials", "12"])
    assert compare.retrieval_check(args, "shards", str(tmp_path), 2) == 0.75
    assert seen["run_dir"] == str(tmp_path / "run") and seen["model_dir"].startswith(str(tmp_path / "check"))
    assert seen["lengths"] == [256] and "perplexity" not in seen["tasks"] and seen["trials"] == 12
    assert seen["data"] == "shards-eval", "the check reads the held-out corpus without recall episodes"
    assert seen["seed"] != 2, "the check must not draw the final evaluation's trials"


def test_a_run_stopped_by_ctrl_c_stops_the_parallel_comparison(tmp_path):
    started = []

    def start(job):
        started.append(job)
        # "stopped" exits as an interrupted run does; "long" would run for a minute unless interrupted.
        script = "raise SystemExit(130)" if job[0] == "stopped" else "import time; time.sleep(60)"
        return subprocess.Popen([sys.executable, "-c", script])

    jobs = [("stopped", 0), ("long", 0), ("never", 0)]
    t0 = time.time()
    with pytest.raises(SystemExit) as stop:
        compare.run_parallel(jobs, 2, start, lambda job: None, poll_s=0.05)
    assert stop.value.code == 130
    assert started == [("stopped", 0), ("long", 0)]  # nothing new once a run was interrupted
    assert time.time() - t0 < 30  # the other run got the Ctrl-C too


_COUNTS_CTRL_C = """
import signal, sys, time
seen = []
signal.signal(signal.SIGINT, lambda *_: seen.append(time.time()) or print("ctrl-c", flush=True))
print("ready", flush=True)
while not seen:
    time.sleep(0.02)
time.sleep(1.0)  # long enough for a second Ctrl-C to arrive
sys.exit(130)
"""

_RUNS_TWO = """
import os, sys
from launch import compare
out = sys.argv[1]
child = [sys.executable, "-c", sys.argv[2]]
start = lambda job: compare.spawn(child, dict(os.environ), os.path.join(out, job[0] + ".log"))
compare.run_parallel([("a", 0), ("b", 0)], 2, start, lambda job: None, poll_s=0.05)
"""


def _two_parallel_runs(tmp_path, child: str):
    """A comparison (in a session of its own) running two `child` scripts; returns it once both are ready."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    runner = subprocess.Popen([sys.executable, "-c", _RUNS_TWO, str(tmp_path), child], cwd=root, env=env,
                              start_new_session=True, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    deadline = time.time() + 60
    while not all(log.exists() and "ready" in log.read_text() for log in logs):
        assert time.time() < deadline and runner.poll() is None, "the runs did not start"
        time.sleep(0.05)
    return runner, logs


def test_a_terminals_ctrl_c_reaches_each_parallel_run_exactly_once(tmp_path):
    # A terminal sends Ctrl-C to its whole foreground process group; a run that got it from there and
    # again from the comparison would stop without saving its checkpoint.
    runner, logs = _two_parallel_runs(tmp_path, _COUNTS_CTRL_C)
    os.killpg(runner.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 130, err
    assert [log.read_text().count("ctrl-c") for log in logs] == [1, 1]
    assert "rerun the same command" in err


_COUNTS_SIGTERM = _COUNTS_CTRL_C.replace("SIGINT", "SIGTERM").replace("ctrl-c", "sigterm")


def test_sigterm_reaches_each_parallel_run_once_and_the_comparison_waits_for_them(tmp_path):
    runner, logs = _two_parallel_runs(tmp_path, _COUNTS_SIGTERM)
    runner.send_signal(signal.SIGTERM)  # a scheduler's stop, to the comparison only
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 143, err
    assert [log.read_text().count("sigterm") for log in logs] == [1, 1]  # each saved before it exited
    assert "Stopped by SIGTERM" in err


def _must_not_prepare(*args, **kwargs):
    raise AssertionError("prepared shards")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--seq-len", "-1"], "argument --seq-len: must be at least 1, got -1"),
    (["--stage1-steps", "-1"], "argument --stage1-steps: must be at least 0, got -1"),
    (["--copy-context", "0"], "argument --copy-context: must be at least 1, got 0"),
    (["--parallel", "0"], "argument --parallel: must be at least 1, got 0"),
    (["--eval-multiples", "1,,2"], "argument --eval-multiples: expected comma-separated positive integers"),
    (["--recall-episodes", "5", "2"], "--recall-episodes takes LO HI with 1 <= LO <= HI, got 5 2"),
    (["--lm-weight", "-1"], "--lm-weight must be >= 0, got -1.0"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
])
def test_comparison_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(compare, "prepare_shards", _must_not_prepare)
    with pytest.raises(SystemExit) as stop:
        compare.main(["--out", str(tmp_path / "c"), *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert compare.parse_args(["--stage1-steps", "0"]).stage1_steps == 0


def test_a_comparison_batch_that_does_not_split_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "prepare_shards", _must_not_prepare)
    argv = ["--out", str(tmp_path / "c"), "--parallel", "1", "--ranks", "2"]
    assert compare.main(argv + ["--batch-tokens", "1024"]) == 2
    assert "error: --batch-tokens 1024 is not a multiple of --micro-batch (8) x --seq-len (256) x ranks (2)" in \
        capsys.readouterr().err
    assert compare.main(argv + ["--stage1-batch-tokens", "1000"]) == 2
    assert "error: --stage1-batch-tokens 1000 is not a multiple of --micro-batch (8) x --stage1-seq-len (64)" in \
        capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_comparison_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--vocab-size", 2048), ("--copy-context", 3), ("--micro-batch", 8),
                          ("--eval-multiples", "1,2,4,8,16"), ("--batch-tokens", 4096)):
        assert re.search(rf"{flag} [A-Z_]+ ((?! --[a-z0-9-]+ [A-Z_]+ ).)*default: {default}\)", text), flag


def test_comparison_shards_prepared_with_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    from helpers import write_finished_manifest

    monkeypatch.setattr("data_pipeline.prepare.prepare", _must_not_prepare)
    out = tmp_path / "c"
    recall = dict(recall_episodes=[4, 8], recall_gap_chars=[0, 700])
    write_finished_manifest(str(out / "shards"), 256, vocab_size=512, max_docs=400, weights=[1.0, 2.0], **recall)
    argv = ["--out", str(out), "--parallel", "1", "--ranks", "1"]
    assert compare.main(argv) == 2
    shards = out / "shards"
    assert capsys.readouterr().err.strip() == (
        f"error: {shards} was prepared with --vocab-size 512, --recall-weight 2.0, not --vocab-size 2048, "
        f"--recall-weight 4.0; use another --out or remove {shards}")
    argv += ["--vocab-size", "512", "--recall-weight", "2"]
    write_finished_manifest(str(out / "shards-eval"), 256, max_docs=400, tokenizer_sha256="1" * 64)
    assert compare.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out}/shards-eval was prepared with another tokenizer than {shards}; use another --out or "
        f"remove {out}/shards-eval")
    write_finished_manifest(str(out / "shards-eval"), 256, max_docs=400)
    write_finished_manifest(str(out / "shards-stage1"), 64, max_docs=400, recall_episodes=[4, 8],
                            recall_gap_chars=[0, 100])
    assert compare.main(argv + ["--stage1-seq-len", "32"]) == 2
    assert "shards-stage1 was prepared with --stage1-seq-len 64, not --stage1-seq-len 32;" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["shards", "shards-eval", "shards-stage1"]
