"""Frozen teachers for knowledge distillation: an exported ATMA model or a Hugging Face causal LM."""

from __future__ import annotations

import os

import torch

from model import AtmaForCausalLM


def check_teacher(spec: str) -> None:
    """Raise ValueError when `spec` is neither a directory nor a Hugging Face model name that is cached or
    can be downloaded (the hub answers)."""
    if os.path.isdir(spec):
        return
    if os.path.exists(spec):
        raise ValueError(f"loss.teacher {spec!r} is a file; give an exported model directory or a Hugging Face "
                         "model name")
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return
    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ValueError(f"loss.teacher {spec!r}: no such directory, and not a Hugging Face model name "
                         "(NAME or ORG/NAME); give an exported model directory (python -m pretrain.export) "
                         "or a Hugging Face causal LM") from None
    why = _hub_model_unavailable(spec)
    if why:
        raise ValueError(f"loss.teacher {spec!r}: no such directory, and {why}")


OFFLINE_HINT = ("give an exported model directory (python -m pretrain.export), or download the model once "
                "with the network on")


def _hub_model_unavailable(name: str) -> str | None:
    """Why the Hugging Face model `name` cannot be loaded here (neither cached nor downloadable), or None."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None  # cached: loads without the network
    if constants.is_offline_mode():
        return f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; {OFFLINE_HINT}"
    from data_pipeline.sources import hub_unreachable

    unreachable = hub_unreachable(offline_hint=OFFLINE_HINT)
    return f"not in the Hugging Face cache, and {unreachable}" if unreachable else None


def load_teacher(spec: str, *, device: torch.device, bf16: bool, vocab_size: int,
                 compile_blocks: bool = False) -> "Teacher":
    """The frozen teacher `spec` in the run's precision; ConfigError with a one-line reason when it cannot load."""
    from .config import ConfigError

    try:
        return Teacher(spec, device=device, dtype=torch.bfloat16 if bf16 else torch.float32, vocab_size=vocab_size,
                       compile_blocks=compile_blocks)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"loss.teacher {spec!r} could not be loaded: {reason}") from None


class Teacher:
    """A frozen model replicated on every rank (inference only, no optimizer state to shard).

    With `compile_blocks`, an ATMA teacher's blocks are compiled as the student's are under
    `train.compile_method=blocks`; a Hugging Face teacher stays eager.
    """

    def __init__(self, spec: str, *, device: torch.device, dtype: torch.dtype, vocab_size: int,
                 compile_blocks: bool = False):
        self.spec = spec
        self.vocab_size = vocab_size
        self.is_atma = os.path.isfile(os.path.join(spec, "config.json")) and (
            os.path.isfile(os.path.join(spec, "model.safetensors"))
            or os.path.isfile(os.path.join(spec, "model.safetensors.index.json"))
        )
        if self.is_atma:
            self.model = AtmaForCausalLM.from_pretrained(spec)
        else:
            try:
                from transformers import AutoModelForCausalLM
            except ImportError:
                raise ValueError(
                    f"teacher {spec!r} is not an exported ATMA model directory, and loading a Hugging Face "
                    "model needs the `transformers` package (pip install transformers)"
                ) from None
            self.model = AutoModelForCausalLM.from_pretrained(spec, torch_dtype=dtype)
        self.model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.compiled = compile_blocks and self.is_atma
        if self.compiled:
            self.model.compile_blocks()

    @torch.no_grad()
    def target_rows(self, input_ids: torch.Tensor):
        """Return a function (start, end) -> teacher logits for flattened token rows of `input_ids`."""
        if self.is_atma:
            hidden = self.model.trunk(input_ids)[0]
            flat = hidden.reshape(-1, hidden.shape[-1])

            def rows(start, end):
                return self._fit(self.model.logits(flat[start:end]))
        else:
            logits = self.model(input_ids=input_ids).logits
            flat = logits.reshape(-1, logits.shape[-1])

            def rows(start, end):
                return self._fit(flat[start:end].float())

        return rows

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """Match the student's vocabulary width: drop extra columns, give missing ones ~zero mass."""
        width = logits.shape[-1]
        if width >= self.vocab_size:
            return logits[:, : self.vocab_size]
        pad = logits.new_full((logits.shape[0], self.vocab_size - width), -1e4)
        return torch.cat([logits, pad], dim=-1)
