"""The README's quick start as a new user copies it: the CPU build of PyTorch as its own block before
the main-job command, the main-job and test commands exactly as CI runs them, and the documented
W&B mode matching the config's default."""

import dataclasses
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_quick_start_installs_cpu_torch_first_then_runs_the_main_job_and_the_tests():
    quick_start = read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick_start, re.S)]
    assert blocks == ["pip install torch==2.13.0",
                      "pip install -r requirements.txt && python -m launch.quickstart",
                      "python -m pytest tests -q"]
    ci = read(".ci/run")
    assert ci.index("pip install -q torch==2.13.0") < ci.index("pip install -q -r requirements.txt")
    assert "\npython -m pytest tests -q\n" in ci


def test_wandb_mode_is_documented_with_the_config_default():
    from pretrain.config import LoggingSection

    default = {f.name: f.default for f in dataclasses.fields(LoggingSection)}["wandb_mode"]
    assert f"`logging.wandb_mode` is `{default}` by default" in read("README.md")


def test_the_run_config_section_names_every_deepspeed_config_and_sig_mode():
    from pretrain.config import SIG_MODES

    readme = read("README.md")
    for name in sorted(os.listdir(os.path.join(ROOT, "ds_configs"))):
        if name.endswith(".json"):
            assert f"`{name}`" in readme.split("DeepSpeed configs:", 1)[1].split("\n\n", 1)[0]
    loss_bullet = readme.split("\n- `loss`:", 1)[1].split("\n- ", 1)[0]
    assert all(f"`{mode}`" in loss_bullet for mode in SIG_MODES)


def test_every_module_the_docs_run_exists():
    import importlib.util

    docs = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if n.endswith(".md")]
    ours = {"data_pipeline", "evaluation", "kernels", "launch", "model", "pretrain"}
    named = {m for doc in docs for m in re.findall(r"python -m ([A-Za-z_][\w.]*\w)", read(doc))}
    checked = sorted(m for m in named if m.split(".")[0] in ours)
    assert "pretrain.compile_check" in checked and "data_pipeline" in checked
    for module in checked:
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"the docs run `python -m {module}`, which does not exist"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(module + ".__main__") is not None, f"`{module}` has no __main__"
