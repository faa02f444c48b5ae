"""Configs of the model, the run and the data pipeline: checks at construction, YAML loading, `--set`, errors."""

import ast
import dataclasses
import glob
import inspect
import json
import re

import pytest
import yaml

import data_pipeline.config
import model.config
import pretrain.config
from data_pipeline.errors import DataError
from model import AtmaConfig
from pretrain import train
from pretrain.config import (
    BatchSection, CheckpointSection, ConfigError, DataSection, LoggingSection, LossSection, ModelSection,
    OptimSection, ProfileSection, RunConfig, ScheduleSection, TrainSection, load_run_config,
)

ATMA_FIELDS = ("vocab_size, hidden_size, num_hidden_layers, head_dim, num_attention_heads, num_key_value_heads, "
               "global_every, global_offset, mlp_ratio, conv_kernel_size, attn_kernel_size, core, memory, window, "
               "mem_gamma_bias, mem_beta_bias, mem_chunk, num_random_keys, rms_norm_eps, logit_softcap, rope_scale, "
               "init_scheme")
OPTIM_FIELDS = ("name, lr, betas, eps, weight_decay, grad_clip, muon_lr, muon_momentum, muon_weight_decay, "
                "embed_lr, head_lr, scalar_lr")
TOP_FIELDS = ("name, run_dir, deepspeed_config, model, data, batch, optim, schedule, loss, train, checkpoint, logging, "
              "profile")


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def config_error(*args, **kwargs) -> str:
    """The one-line message load_run_config raises for these arguments."""
    with pytest.raises(ConfigError) as err:
        load_run_config(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------- shipped YAML
@pytest.mark.parametrize("path", sorted(glob.glob("pretrain/configs/*.yaml")))
def test_every_shipped_run_yaml_loads_and_round_trips(path, tmp_path):
    cfg = load_run_config(path, ["data.dir=/tmp/shards"])
    assert cfg.data.dir == "/tmp/shards"
    # The run directory stores to_dict() as config.yaml (plain YAML) and in checkpoints; it reloads equal.
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_run_config(str(saved)) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_shipped_yamls_are_found():
    assert {"pretrain/configs/tiny-cpu.yaml", "pretrain/configs/atma-378m.yaml"} <= set(
        glob.glob("pretrain/configs/*.yaml"))


def test_yaml_values_reach_the_config():
    paper = load_run_config("pretrain/configs/atma-378m.yaml", [], **{"data.dir": "x"})
    assert paper.optim.name == "muon" and paper.schedule.kind == "paper"
    assert paper.optim.betas == (0.8, 0.95) and paper.optim.eps == 1e-10
    assert paper.model.overrides == {"core": "polar", "memory": True, "window": None}
    assert paper.batch.tokens == 524_288 and paper.train.max_steps == 18_722


# ---------------------------------------------------------------------- --set and CLI values
def test_set_overrides_parse_yaml_values():
    cfg = load_run_config(None, ["data.dir=d", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]",
                                 "model.overrides.core=nope", "model.overrides.window=null",
                                 "model.overrides.rope_scale=1e-1", "logging.wandb=true", "name=my run"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.overrides == {"core": "nope", "window": None, "rope_scale": 0.1}
    assert cfg.logging.wandb is True and cfg.name == "my run"


def test_yaml_1_1_exponents_are_numbers(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string; float fields and AtmaConfig overrides still get numbers.
    cfg = load_run_config(write(tmp_path, "data: {dir: d}\noptim: {lr: 3e-4, eps: 1e-10}\n"
                                          "model: {overrides: {logit_softcap: 2e1}}"))
    assert cfg.optim.lr == 3e-4 and cfg.optim.eps == 1e-10
    assert cfg.model.overrides == {"logit_softcap": 20.0}


def test_set_merges_over_yaml_and_cli_values_win(tmp_path):
    path = write(tmp_path, "data: {dir: from-yaml, num_workers: 2}\nmodel: {overrides: {core: nope, window: 64}}\n"
                           "train: {max_steps: 9}\n")
    cfg = load_run_config(path, ["model.overrides.window=null", "train.max_steps=5", "data.dir=from-set"],
                          **{"data.dir": "from-cli", "train.max_steps": 7, "run_dir": None})
    assert cfg.data.dir == "from-cli" and cfg.data.num_workers == 2
    assert cfg.model.overrides == {"core": "nope", "window": None}
    assert cfg.train.max_steps == 7 and cfg.run_dir == "runs/atma"


def test_set_fills_a_section_the_yaml_leaves_out():
    # data has no default (data.dir is required), so a dotted --set must create the section.
    cfg = load_run_config(None, ["data.num_workers=3", "data.dir=d"])
    assert cfg.data.num_workers == 3 and cfg.data.dir == "d"


@pytest.mark.parametrize("assignment,message", [
    ("optim.lr.x=1", "optim.lr.x: optim.lr is a value, not a section"),
    ("data.dir.x=1", "data.dir.x: data.dir is a value, not a section"),
    ("optim.lr", "--set expects key=value, got 'optim.lr'"),
    ("optim..lr=1", "--set has an empty key: 'optim..lr=1'"),
])
def test_bad_set_assignments(assignment, message):
    assert config_error(None, [assignment, "data.dir=d"]) == message


def test_empty_section_keeps_its_defaults(tmp_path):
    cfg = load_run_config(write(tmp_path, "data: {dir: d}\noptim:\nloss:\n"))
    assert cfg.optim == OptimSection() and cfg.loss == LossSection()


# ---------------------------------------------------------------------- unknown keys and types
@pytest.mark.parametrize("text,message", [
    ("optimizer: {}\nfoo: 1\ndata: {dir: d}", f"unknown key(s): foo, optimizer (known: {TOP_FIELDS})"),
    ("optim: {lrr: 1, lx: 2}\ndata: {dir: d}", f"unknown key(s) in optim: lrr, lx (known: {OPTIM_FIELDS})"),
    ("model: {overrides: {hidden: 3}}\ndata: {dir: d}",
     f"unknown key(s) in model.overrides: hidden (known: {ATMA_FIELDS})"),
    ("model: {overrides: {preset: tiny}}\ndata: {dir: d}",
     f"unknown key(s) in model.overrides: preset (known: {ATMA_FIELDS})"),
])
def test_unknown_keys_are_named_with_the_known_ones(tmp_path, text, message):
    assert config_error(write(tmp_path, text)) == message


def test_unknown_key_from_set():
    assert config_error(None, ["data.dir=d", "optim.lrr=1"]) == f"unknown key(s) in optim: lrr (known: {OPTIM_FIELDS})"


@pytest.mark.parametrize("assignment,message", [
    ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
    ("optim.lr=true", "optim.lr must be a number, got True"),
    ("train.max_steps=ten", "train.max_steps must be an integer, got 'ten'"),
    ("train.max_steps=2.5", "train.max_steps must be an integer, got 2.5"),
    ("logging.wandb=maybe", "logging.wandb must be true or false, got 'maybe'"),
    ("optim.betas=0.8", "optim.betas must be a list of numbers, got 0.8"),
    ("optim.betas=[0.8, abc]", "optim.betas must be a list of numbers, got [0.8, 'abc']"),
    ("name=[1]", "name must be a string, got [1]"),
    ("name=null", "name must be a string, got None"),
    ("optim=3", "optim must be a mapping (a section), got 3"),
    ("model.overrides=3", "model.overrides must be a mapping, got 3"),
    ("model.overrides.window=wide", "model.overrides.window must be an integer or null, got 'wide'"),
    ("model.overrides.memory=maybe", "model.overrides.memory must be true or false, got 'maybe'"),
    ("run_dir=${nothing}/x", "run_dir: Interpolation key 'nothing' not found"),
])
def test_wrong_types_are_one_line(assignment, message):
    assert config_error(None, ["data.dir=d", assignment]) == message


def test_wrong_section_type_in_yaml(tmp_path):
    assert config_error(write(tmp_path, "data: 5")) == "data must be a mapping (a section), got 5"


@pytest.mark.parametrize("text,message", [
    ("[1, 2", "not valid YAML"),
    ("- 1\n- 2", "expected a mapping at the top level"),
])
def test_unreadable_yaml(tmp_path, text, message):
    assert message in config_error(write(tmp_path, text))


def test_missing_config_file():
    assert config_error("/nonexistent/run.yaml") == "/nonexistent/run.yaml: run config not found"


@pytest.mark.parametrize("sets", [[], ["data.dir="], ["data.num_workers=1"]])
def test_data_dir_is_required(sets):
    assert config_error(None, sets) == pretrain.config.DATA_DIR_UNSET


def test_train_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "optim: {lrr: 1}\n")
    assert train.main(["--config", path, "--data", "d"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown key(s) in optim: lrr (known: {OPTIM_FIELDS})\n"
    assert train.main(["--config", "pretrain/configs/tiny-cpu.yaml", "--max-steps", "0", "--data", "d"]) == 2
    assert capsys.readouterr().err == "error: train.max_steps must be positive, got 0\n"


# ---------------------------------------------------------------------- checks at construction
SECTION_CHECKS = [
    (ModelSection, dict(preset="huge"), "model.preset must be one of ('tiny', 'atma-155m', 'atma-378m'), got 'huge'"),
    (ModelSection, dict(vocab_multiple=0), "model.vocab_multiple must be positive, got 0"),
    (ModelSection, dict(overrides={"core": "softmax"}),
     "model.overrides: AtmaConfig.core must be one of ('polar', 'nope', 'rope'), got 'softmax'"),
    (ModelSection, dict(overrides={"num_key_value_heads": 3}), "model.overrides: AtmaConfig.num_attention_heads"),
    (DataSection, dict(dir=""), pretrain.config.DATA_DIR_UNSET),
    (DataSection, dict(dir="d", num_workers=-1), "data.num_workers must be >= 0, got -1"),
    (BatchSection, dict(tokens=0), "batch.tokens must be positive, got 0"),
    (BatchSection, dict(micro_batch_size=0), "batch.micro_batch_size must be positive, got 0"),
    (OptimSection, dict(name="sgd"), "optim.name must be one of adamw, muon; got 'sgd'"),
    (OptimSection, dict(lr=-1.0), "optim.lr must be positive, got -1.0"),
    (OptimSection, dict(betas=(0.9,)), "optim.betas must be a pair [beta1, beta2] in [0, 1), got [0.9]"),
    (OptimSection, dict(betas=(0.9, 1.0)), "optim.betas must be a pair [beta1, beta2] in [0, 1), got [0.9, 1.0]"),
    (OptimSection, dict(grad_clip=-1.0), "optim.grad_clip must be >= 0, got -1.0"),
    (OptimSection, dict(muon_momentum=1.0), "optim.muon_momentum must be in [0, 1), got 1.0"),
    (ScheduleSection, dict(kind="step"), "schedule.kind must be one of cosine, wsd, paper, constant; got 'step'"),
    (ScheduleSection, dict(warmup_steps=-1), "schedule.warmup_steps must be >= 0, got -1"),
    (ScheduleSection, dict(flat_fraction=1.5), "schedule.flat_fraction must be in [0, 1], got 1.5"),
    (LossSection, dict(sig_mode="loud"),
     "loss.sig_mode must be one of baseline, weak, discrete, strong, zipfian; got 'loud'"),
    (LossSection, dict(lm_weight=-1.0), "loss.lm_weight must be >= 0, got -1.0"),
    (LossSection, dict(distill_temperature=0.0), "loss.distill_temperature must be positive, got 0.0"),
    (LossSection, dict(distill_weight=0.5), "loss.distill_weight > 0 needs loss.teacher (an exported model dir or HF model)"),
    (LossSection, dict(distractor_weight=0.1), "loss.distractor_weight > 0 needs loss.num_random_keys > 0"),
    (LossSection, dict(sig_weight=0.1), "loss.sig_weight > 0 needs loss.sig_mode other than baseline"),
    (TrainSection, dict(max_steps=0), "train.max_steps must be positive, got 0"),
    (TrainSection, dict(activation_checkpointing="some"),
     "train.activation_checkpointing must be one of none, global, all; got 'some'"),
    (TrainSection, dict(nan_policy="ignore"), "train.nan_policy must be one of stop, skip; got 'ignore'"),
    (TrainSection, dict(activation_memory_budget=1.5), "train.activation_memory_budget must be a number from 0 to 1"),
    (TrainSection, dict(activation_memory_budget=-0.1), "train.activation_memory_budget must be a number from 0 to 1"),
    (TrainSection, dict(activation_memory_budget=0.5, activation_checkpointing="global"),
     "train.activation_memory_budget=0.5 and train.activation_checkpointing=global: choose one"),
    (TrainSection, dict(activation_memory_budget=0.5, compile="false"),
     "train.activation_memory_budget=0.5 needs compiled blocks"),
    (TrainSection, dict(activation_memory_budget=0.0, compile="true", compile_method="deepcompile"),
     "train.activation_memory_budget=0.0 needs compiled blocks"),
    (TrainSection, dict(precision="fp16"), "train.precision must be one of auto, bf16, fp32; got 'fp16'"),
    (CheckpointSection, dict(every=0), "checkpoint.every must be positive, got 0"),
    (CheckpointSection, dict(keep_last=0), "checkpoint.keep_last must be positive, got 0"),
    (CheckpointSection, dict(resume=""), "checkpoint.resume must be auto, none or a checkpoint path, got ''"),
    (LoggingSection, dict(every=0), "logging.every must be positive, got 0"),
    (LoggingSection, dict(wandb_mode="cloud"), "logging.wandb_mode must be one of online, offline, disabled; got 'cloud'"),
    (LoggingSection, dict(val_every=-1), "logging.val_every must be >= 0 (0 disables validation), got -1"),
    (LoggingSection, dict(val_batches=0), "logging.val_batches must be positive, got 0"),
]


@pytest.mark.parametrize("cls,kwargs,message", SECTION_CHECKS, ids=lambda v: getattr(v, "__name__", None))
def test_each_section_checks_its_values_at_construction(cls, kwargs, message):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("cls,kwargs,message", SECTION_CHECKS, ids=lambda v: getattr(v, "__name__", None))
def test_section_checks_apply_to_yaml(tmp_path, cls, kwargs, message):
    section = next(f.name for f in dataclasses.fields(RunConfig) if f.type == cls.__name__)
    values = {"data": {"dir": "d"}, section: {**({"dir": "d"} if cls is DataSection else {}), **kwargs}}
    values = json.loads(json.dumps(values))  # tuples as YAML lists
    assert config_error(write(tmp_path, yaml.safe_dump(values))).startswith(message)


def test_run_config_checks_across_sections():
    data = DataSection(dir="d")
    assert RunConfig(data=data).data.dir == "d"
    with pytest.raises(ConfigError, match=r"^model.overrides.num_random_keys \(4\) differs from loss.num_random_keys "
                                          r"\(8\); set loss.num_random_keys only$"):
        RunConfig(data=data, model=ModelSection(overrides={"num_random_keys": 4}), loss=LossSection(num_random_keys=8))
    with pytest.raises(ConfigError, match="^run_dir must not be empty$"):
        RunConfig(data=data, run_dir="")


# ---------------------------------------------------------------------- AtmaConfig
@pytest.mark.parametrize("overrides,message", [
    (dict(rope_scale="big"), "AtmaConfig.rope_scale must be a number, got 'big'"),
    (dict(mem_chunk=True), "AtmaConfig.mem_chunk must be a positive integer, got True"),
    (dict(global_offset=4), "AtmaConfig.global_offset must be in [0, global_every=4), got 4"),
    (dict(num_random_keys=-1), "AtmaConfig.num_random_keys must be an integer >= 0, got -1"),
    (dict(logit_softcap=0.0), "AtmaConfig.logit_softcap must be > 0, got 0.0"),
    (dict(rms_norm_eps=0.0), "AtmaConfig.rms_norm_eps must be > 0, got 0.0"),
    (dict(window=True), "AtmaConfig.window must be a positive integer or null, got True"),
])
def test_atma_config_checks_at_construction(overrides, message):
    with pytest.raises(ValueError) as err:
        AtmaConfig.from_preset("tiny", **overrides)
    assert str(err.value) == message


def test_atma_config_unknown_field_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as err:
        AtmaConfig.from_dict({"hidden": 3})
    assert str(err.value) == f"unknown AtmaConfig field(s): hidden (known: {', '.join(sorted(ATMA_FIELDS.split(', ') + ['preset']))})"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**AtmaConfig.from_preset("tiny").to_dict(), "core": "softmax"}))
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: AtmaConfig.core must be one of")):
        AtmaConfig.load(str(path))


# ---------------------------------------------------------------------- PrepareConfig
@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_len=0), "--seq-len must be at least 1, got 0"),
    (dict(tokenizer="t.json", vocab_size=300), "give either --tokenizer or --vocab-size, not both"),
    (dict(vocab_size=100), "--vocab-size must be at least 260 (256 bytes + specials)"),
    (dict(val_fraction=1.0), "--val-fraction must be in [0, 1), got 1.0"),
    (dict(workers=0), "--workers must be at least 1, got 0"),
    (dict(shard_mb=0.0), "--shard-mb must be positive, got 0.0"),
    (dict(max_docs=0), "--max-docs must be at least 1, got 0"),
    (dict(tokenizer_train_docs=0), "--tokenizer-train-docs must be at least 1, got 0"),
    (dict(text_field=""), "--text-field must name a field, got ''"),
    (dict(inputs=["a", "b"], weights=[1.0]), "--weights has 1 values for 2 inputs"),
    (dict(inputs=["a"], weights=[0.0]), "--weights must all be positive, got [0.0]"),
])
def test_prepare_config_checks_at_construction(kwargs, message):
    with pytest.raises(DataError) as err:
        data_pipeline.config.PrepareConfig(**{"output": "o", "seq_len": 8, **kwargs})
    assert str(err.value) == message


# ---------------------------------------------------------------------- one style
CONFIG_CLASSES = [AtmaConfig, data_pipeline.config.PrepareConfig, RunConfig, ModelSection, DataSection, BatchSection,
                  OptimSection, ScheduleSection, LossSection, TrainSection, CheckpointSection, LoggingSection,
                  ProfileSection]


def field_docstrings(cls) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated field in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = after.value.value
    return docs


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_configs_share_one_style(cls):
    assert "__slots__" in vars(cls) and "__post_init__" in vars(cls)
    assert all(f.kw_only for f in dataclasses.fields(cls))
    docs = field_docstrings(cls)
    assert [f.name for f in dataclasses.fields(cls) if len(docs.get(f.name, "").strip()) < 10] == []


def test_every_config_module_is_covered():
    found = {obj for module in (model.config, pretrain.config, data_pipeline.config)
             for obj in vars(module).values() if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__}
    assert found == set(CONFIG_CLASSES)
