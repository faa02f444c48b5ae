"""Make an exported model directory loadable by Hugging Face `transformers` and lm-evaluation-harness.

    python -m pretrain.hf_export MODEL_DIR

`python -m pretrain.export` runs this itself; run it by hand on a directory exported earlier or
written by `model.AtmaForCausalLM.save_pretrained`. It adds, without needing transformers:

- `configuration_atma.py`, `modeling_atma.py`: the model code (copied from `model/hf/`), loaded with
  `AutoModelForCausalLM.from_pretrained(MODEL_DIR, trust_remote_code=True)`;
- to `config.json`: `model_type`, `architectures`, `auto_map`, the token ids, `dtype`, `use_cache`,
  `tie_word_embeddings` (`model.AtmaForCausalLM.from_pretrained` skips these keys);
- `tokenizer_config.json` (for `AutoTokenizer`) and `generation_config.json` (end-of-text token),
  when the directory holds a `tokenizer.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from safetensors import safe_open
from tokenizers import Tokenizer

from data_pipeline import find_eos
from model import AtmaConfig
from model.hf import ARCHITECTURES, AUTO_MAP, MODEL_TYPE, SHIPPED_FILES, TRANSFORMERS_CONFIG_KEYS, shipped_path
from model.persistence import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class HFExportError(ValueError):
    """The directory cannot be described to transformers."""


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def weights_dtype(model_dir: str) -> str:
    """The torch dtype name ("float32", "bfloat16", ...) of the embedding in the directory's safetensors."""
    path = os.path.join(model_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        index = os.path.join(model_dir, INDEX_NAME)
        if not os.path.isfile(index):
            raise HFExportError(f"{path}: missing (no weights file and no {INDEX_NAME})")
        with open(index, encoding="utf-8") as f:
            path = os.path.join(model_dir, json.load(f)["weight_map"]["embed.weight"])
    with safe_open(path, framework="pt") as f:
        dtype = f.get_slice("embed.weight").get_dtype()
    return _DTYPE_NAMES.get(dtype, "float32")


def end_of_text(model_dir: str) -> tuple[str, int] | None:
    """The tokenizer's end-of-document token and id (the data pipeline's lookup), or None without tokenizer.json."""
    path = os.path.join(model_dir, TOKENIZER_NAME)
    if not os.path.isfile(path):
        return None
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # the tokenizers library raises a bare Exception for bad files
        raise HFExportError(f"{path}: not a readable tokenizers file ({str(err).splitlines()[0]})") from None
    return find_eos(tokenizer)


def transformers_config(config: AtmaConfig, *, dtype: str, eos: tuple[str, int] | None) -> dict:
    """config.json for both loaders: every AtmaConfig field plus the keys transformers reads."""
    extra = {
        "model_type": MODEL_TYPE,
        "architectures": list(ARCHITECTURES),
        "auto_map": dict(AUTO_MAP),
        "dtype": dtype,
        "use_cache": True,
        "tie_word_embeddings": False,
    }
    if eos is not None:
        extra.update(bos_token_id=eos[1], eos_token_id=eos[1], pad_token_id=eos[1])
    assert set(extra) <= TRANSFORMERS_CONFIG_KEYS, sorted(set(extra) - TRANSFORMERS_CONFIG_KEYS)
    return {**config.to_dict(), **extra}


def write_transformers_files(model_dir: str) -> list[str]:
    """Add the transformers files to an exported model directory; returns the names written."""
    config_path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise HFExportError(f"{config_path}: missing (not an exported model directory)")
    config = AtmaConfig.load(config_path)
    eos = end_of_text(model_dir)
    _write_json(config_path, transformers_config(config, dtype=weights_dtype(model_dir), eos=eos))
    written = [CONFIG_NAME]
    for name in SHIPPED_FILES:
        shutil.copyfile(shipped_path(name), os.path.join(model_dir, name))
        written.append(name)
    if os.path.isfile(os.path.join(model_dir, TOKENIZER_NAME)):
        token = eos[0] if eos is not None else None
        _write_json(os.path.join(model_dir, TOKENIZER_CONFIG_NAME), {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token,
            "eos_token": token,
            "pad_token": token,
            "clean_up_tokenization_spaces": False,
        })
        written.append(TOKENIZER_CONFIG_NAME)
        if eos is not None:
            _write_json(os.path.join(model_dir, GENERATION_CONFIG_NAME),
                        {"bos_token_id": eos[1], "eos_token_id": eos[1], "pad_token_id": eos[1]})
            written.append(GENERATION_CONFIG_NAME)
    return written


def main(argv=None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m pretrain.hf_export",
        description="Add the files Hugging Face transformers needs (model code, config keys, tokenizer_config.json, "
        "generation_config.json) to an exported model directory, in place. pretrain.export does this itself.",
    )
    p.add_argument("model_dir", help="exported model directory (model.safetensors, config.json, tokenizer.json)")
    args = p.parse_args(argv)
    try:
        written = write_transformers_files(args.model_dir)
    except (HFExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.model_dir}: wrote {', '.join(written)}; load it with "
          f"AutoModelForCausalLM.from_pretrained({args.model_dir!r}, trust_remote_code=True)")
    if not os.path.isfile(os.path.join(args.model_dir, TOKENIZER_NAME)):
        print(f"note: {args.model_dir} has no {TOKENIZER_NAME}, so AutoTokenizer cannot load from it; copy the "
              f"shards' {TOKENIZER_NAME} there and rerun this command", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
