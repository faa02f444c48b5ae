"""--json of the benchmarks: an output file that cannot be written is refused while the command line is
parsed (exit 2, one line), not after a run whose figures would then be lost."""

import importlib

import pytest

# (module whose main() takes argv, arguments before --json)
TOOLS = [
    ("kernels.bench", []),
    ("model.bench_loss", ["--device", "cpu"]),
    ("model.bench_decode", ["--device", "cpu"]),
    ("data_pipeline.cli", ["bench"]),
]


@pytest.mark.parametrize("module, argv", TOOLS, ids=[m for m, _ in TOOLS])
def test_an_unwritable_json_path_is_refused_before_any_work(module, argv, tmp_path, capsys):
    main = importlib.import_module(module).main
    refusals = {
        str(tmp_path / "missing" / "out.json"): f"{tmp_path}/missing/out.json: folder {tmp_path}/missing "
                                                "does not exist",
        str(tmp_path): f"{tmp_path}: not a file that can be written",
    }
    for path, reason in refusals.items():
        with pytest.raises(SystemExit) as info:
            main([*argv, "--json", path])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --json: {reason}" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "missing").exists()


def test_a_writable_json_path_is_accepted():
    from model.device import writable_file
    from data_pipeline.argtypes import writable_file as data_writable_file

    for check in (writable_file, data_writable_file):
        assert check("out.json") == "out.json"  # the working directory
