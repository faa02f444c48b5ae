"""Frozen teachers for knowledge distillation: an exported ATMA model or a Hugging Face causal LM."""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import torch

from model import AtmaForCausalLM
from model.hf import MODEL_TYPE


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


def is_atma_dir(path: str) -> bool:
    """Whether `path` is an exported ATMA model: safetensors weights and a config.json that names no model type
    or "atma" (a Hugging Face model saved to a directory names its own)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config) or not (os.path.isfile(os.path.join(path, "model.safetensors"))
                                          or os.path.isfile(os.path.join(path, "model.safetensors.index.json"))):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type", MODEL_TYPE)
    except (OSError, ValueError, AttributeError):
        return True  # not readable as a Hugging Face config either: the ATMA loader names the problem
    return model_type == MODEL_TYPE


def _config_value(model: torch.nn.Module, name: str) -> float | None:
    """A positive number `name` in the model's config or its text config, else None."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    for source in (config, get_text() if callable(get_text) else None):
        value = getattr(source, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def logit_transforms(model: torch.nn.Module) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The transforms of the LM head's output that a Hugging Face causal LM's config names: a soft cap
    (`final_logit_softcapping`: Gemma 2-4), a scale (`logit_scale`: Cohere; `logits_scaling`, which Granite
    divides by and others multiply by). Which one, if any, the model applies is told by `split_head`'s probe."""
    found = []
    cap = _config_value(model, "final_logit_softcapping")
    if cap is not None:
        found.append((f"soft cap {cap:g}", lambda x: torch.tanh(x / cap) * cap))
    for name in ("logit_scale", "logits_scaling"):
        value = _config_value(model, name)
        if value is not None:
            found.append((f"x {name} {value:g}", lambda x, v=value: x * v))
            found.append((f"/ {name} {value:g}", lambda x, v=value: x / v))
    return found


class HeadSplit(NamedTuple):
    """A Hugging Face causal LM taken apart: logits = transform(head(decoder(ids).last_hidden_state))."""

    decoder: torch.nn.Module
    head: torch.nn.Module
    transform: Callable[[torch.Tensor], torch.Tensor] | None  # applied to the head's output in its dtype
    transform_name: str = "none"


def split_head(model: torch.nn.Module) -> HeadSplit | None:
    """A Hugging Face causal LM's decoder, LM head and the transform of the head's output that gives its logits,
    so the head can run chunk by chunk; None when the logits are none of these.

    Checked on an 8-token probe: the head's output is replaced by known values, which must come back as the
    logits either unchanged or changed by exactly one of `logit_transforms` (up to the model's rounding), and
    the decoder run alone must give the head's input.
    """
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings()
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(head, torch.nn.Module) or not isinstance(decoder, torch.nn.Module):
        return None
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    probe = (torch.arange(8, device=device) * 7 % vocab).unsqueeze(0)
    seen = {}

    def keep_input(module, args):
        seen["hidden"] = args[0]

    def replace_output(module, args, out):
        # Values from -20 to 20, where any cap, scale or shift of the logits shows.
        seen["marker"] = torch.linspace(-20, 20, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
        return seen["marker"]

    hooks = [head.register_forward_pre_hook(keep_input), head.register_forward_hook(replace_output)]
    try:
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    try:
        with torch.no_grad():
            hidden = decoder(input_ids=probe, use_cache=False).last_hidden_state
    except (AttributeError, TypeError):  # a decoder that is not called like the model, or returns a tuple
        return None
    if "marker" not in seen or logits.shape != seen["marker"].shape:
        return None
    if hidden.shape != seen["hidden"].shape or not torch.allclose(hidden.float(), seen["hidden"].float(),
                                                                   rtol=1e-2, atol=1e-2):
        return None
    marker = seen["marker"]
    if torch.equal(logits.to(marker.dtype), marker):
        return HeadSplit(decoder, head, None)
    # The model may round its transform in its own precision: allow two of its units in the last place.
    tol = 2 * torch.finfo(marker.dtype).eps
    for name, transform in logit_transforms(model):
        if torch.allclose(logits.float(), transform(marker).float(), rtol=tol, atol=tol):
            return HeadSplit(decoder, head, transform, name)
    return None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """A Hugging Face causal LM's decoder layers (the blocks to compile), or None where it has no such list."""
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


class Teacher:
    """A frozen model replicated on every rank (inference only, no optimizer state to shard).

    With `compile_blocks`, the teacher's blocks (an ATMA teacher's, or a Hugging Face teacher's decoder
    layers) are compiled as the student's are under `train.compile_method=blocks`. The head runs one
    chunk of rows at a time (`target_rows`), so the teacher's whole logits never exist at once, except for
    a Hugging Face model whose logits are neither its head's output nor a transform of it that its config
    names (`split_head`).
    """

    def __init__(self, spec: str, *, device: torch.device, dtype: torch.dtype, vocab_size: int,
                 compile_blocks: bool = False):
        self.spec = spec
        self.vocab_size = vocab_size
        self.is_atma = is_atma_dir(spec)
        if self.is_atma:
            self.model = AtmaForCausalLM.from_pretrained(spec)
        else:
            try:
                from transformers import AutoModelForCausalLM
            except ImportError:
                raise ValueError(
                    f"teacher {spec!r} is not an exported ATMA model directory, and loading a Hugging Face "
                    "model needs the `transformers` package (pip install -r requirements-eval.txt)"
                ) from None
            try:
                self.model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            except ImportError as err:  # e.g. a transformers release that imports a package shadowed here
                raise ValueError(f"transformers cannot load it here ({err}); requirements-eval.txt names the "
                                 "transformers versions this project works with") from None
        self.model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.split = None if self.is_atma else split_head(self.model)
        layers = None if self.is_atma else decoder_layers(self.model)
        self.compiled = compile_blocks and (self.is_atma or layers is not None)
        if self.compiled and self.is_atma:
            self.model.compile_blocks()
        elif self.compiled:
            for layer in layers:
                layer.compile()

    @property
    def whole_logits_note(self) -> str | None:
        """One line for the log when this teacher's whole logits are kept per micro-batch, else None."""
        if self.is_atma or self.split is not None:
            return None
        return (f"teacher {self.spec}: its logits are neither its LM head's output nor a soft cap or scale of it "
                "named by its config, so its whole logits (tokens x vocabulary) are kept per micro-batch")

    @torch.no_grad()
    def target_rows(self, input_ids: torch.Tensor):
        """Return a function (start, end) -> teacher logits for flattened token rows of `input_ids`."""
        if self.is_atma:
            hidden = self.model.trunk(input_ids)[0]
            flat = hidden.reshape(-1, hidden.shape[-1])

            def rows(start, end):
                return self._fit(self.model.logits(flat[start:end]))
        elif self.split is not None:
            decoder, head, transform = self.split.decoder, self.split.head, self.split.transform
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])

            def rows(start, end):
                logits = head(flat[start:end])
                return self._fit((logits if transform is None else transform(logits)).float())
        else:
            logits = self.model(input_ids=input_ids, use_cache=False).logits
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
