"""Start a run from the weights of an exported model (continued pretraining on other data).

The optimizer state, schedule and step counter start fresh; only the weights carry over. The
weights are written before DeepSpeed builds its optimizer, so its fp32 master copies start from
them too. Under ZeRO-3 each parameter is gathered, written on rank 0 and re-partitioned.
"""

from __future__ import annotations

import os

import torch

from model import AtmaConfig
from model.persistence import CONFIG_NAME, CheckpointError, check_state_dict, load_state_dict

from .config import ConfigError


def load_initial_weights(model: torch.nn.Module, directory: str, model_config: AtmaConfig) -> None:
    """Copy the weights of the exported model in `directory` into `model` (ZeRO-3 partitioned or not)."""
    import deepspeed

    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ConfigError(f"train.init_from: {config_path} not found (export a run with python -m pretrain.export)")
    saved = {k: v for k, v in AtmaConfig.load(config_path).to_dict().items() if k != "preset"}
    wanted = {k: v for k, v in model_config.to_dict().items() if k != "preset"}
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differ)
        raise ConfigError(f"train.init_from: {directory} holds another model ({shown}); set the run's model "
                          "config to match it")
    try:
        state = load_state_dict(directory)
        params = dict(model.named_parameters())
        # The exported state holds the persistent buffers too (e.g. RoPE's frequencies).
        buffers = {name: b for name, b in model.state_dict().items() if name not in params}
        expected = {name: torch.empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta")
                    for name, p in {**params, **buffers}.items()}
        check_state_dict(expected, state, directory)
    except CheckpointError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with torch.no_grad():
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0 or not hasattr(param, "ds_id"):
                    param.copy_(state[name].to(param.dtype))
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(state[name].to(buffer.dtype))
