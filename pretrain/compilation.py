"""torch.compile for training: which method is in effect, its DeepSpeed settings, and what Dynamo built.

Two methods (`train.compile_method`):

- `blocks` (the default): torch.compile of each block's `compute` (torchtitan's per-block compile).
  Under ZeRO-3 every block is a ZeRO-3 leaf module (`zero_optimization.leaf_module` in the
  DeepSpeed JSON), so its parameters are gathered once by hooks on the block's module call,
  outside the compiled graph; inside, nothing breaks the graph.
- `deepcompile`: DeepSpeed's `engine.compile()` with DeepCompile (`"compile": {"deepcompile": true}`,
  set here), which compiles the whole model and schedules ZeRO's gathers inside the graph. CUDA only.

With either method a distillation teacher (`pretrain.teacher`, outside the engine) has its blocks (a
Hugging Face teacher's decoder layers) compiled as `blocks` does.
"""

from __future__ import annotations

import warnings

from .config import ConfigError, TrainSection

__all__ = ["BLOCK_CLASS", "STACK_CLASS", "compile_engine", "compile_method", "configure_compile", "dynamo_summary"]

# The block class and the class of the stack of all blocks, as DeepSpeed's leaf_module config names them.
BLOCK_CLASS = "model.modeling.Block"
STACK_CLASS = "model.modeling.BlockStack"


def compile_method(train: TrainSection, device_type: str) -> str | None:
    """The compile method in effect on `device_type`: "blocks", "deepcompile", or None (eager)."""
    enabled = train.compile == "true" or (train.compile == "auto" and device_type == "cuda")
    return train.compile_method if enabled else None


def configure_compile(ds: dict, method: str | None, *, device_type: str, source: str) -> None:
    """Adjust the DeepSpeed config `ds` (read from `source`) for `method`; raise ConfigError on a conflict."""
    wants_deepcompile = bool(ds.get("compile", {}).get("deepcompile", False))
    if method == "deepcompile":
        if device_type != "cuda":
            raise ConfigError("train.compile_method=deepcompile needs CUDA (DeepSpeed builds DeepCompile's op "
                              "for CUDA only); use train.compile_method=blocks on the CPU")
        from .opbuild import toolkit_missing

        missing = toolkit_missing("dc")
        if missing:
            raise ConfigError(f"train.compile_method=deepcompile needs DeepSpeed's DeepCompile op, which is not "
                              f"installed prebuilt, and there is {missing}; install the CUDA toolkit or set "
                              "CUDA_HOME, or use train.compile_method=blocks")
        ds["compile"] = {**ds.get("compile", {}), "deepcompile": True}
    elif wants_deepcompile:
        raise ConfigError(f"{source}: compile.deepcompile is set; choose it with train.compile_method=deepcompile "
                          "and train.compile=true instead")
    zero = ds.get("zero_optimization", {})
    leaves = zero.get("leaf_module", {}).get("classes", [])
    if method == "blocks" and zero.get("stage", 0) == 3 and not {BLOCK_CLASS, STACK_CLASS} & set(leaves):
        warnings.warn(f"{source}: zero_optimization.leaf_module.classes lacks {BLOCK_CLASS}; ZeRO-3's per-module "
                      "hooks will break every compiled block's graph at each submodule", stacklevel=2)


def compile_engine(engine, method: str | None) -> None:
    """Compile the engine's model with `method` (None: leave it eager)."""
    if method == "blocks":
        engine.module.compile_blocks()
    elif method == "deepcompile":
        engine.compile()


def dynamo_summary() -> dict[str, int]:
    """Graphs Dynamo has built and graph breaks it met so far in this process."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
