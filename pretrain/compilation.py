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

import functools
import warnings

from .config import ConfigError, TrainSection

__all__ = ["BLOCK_CLASS", "STACK_CLASS", "compile_engine", "compile_method", "configure_compile", "dynamo_summary",
           "memory_budget_backend"]

# The block class and the class of the stack of all blocks, as DeepSpeed's leaf_module config names them.
BLOCK_CLASS = "model.modeling.Block"
STACK_CLASS = "model.modeling.BlockStack"


def compile_method(train: TrainSection, device_type: str) -> str | None:
    """The compile method in effect on `device_type`: "blocks", "deepcompile", or None (eager)."""
    enabled = train.compile == "true" or (train.compile == "auto" and device_type == "cuda")
    return train.compile_method if enabled else None


def configure_compile(ds: dict, method: str | None, *, device_type: str, source: str, budget: float = 1.0) -> None:
    """Adjust the DeepSpeed config `ds` (read from `source`) for `method`; raise ConfigError on a conflict; warn
    when an activation memory `budget` below 1 cannot apply (nothing compiled)."""
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
    if method is None and budget < 1.0:
        warnings.warn(f"train.activation_memory_budget={budget:g} has no effect here: the blocks are not compiled on "
                      f"{device_type} (train.compile=auto compiles on CUDA only; set train.compile=true)", stacklevel=2)
    zero = ds.get("zero_optimization", {})
    leaves = zero.get("leaf_module", {}).get("classes", [])
    if method == "blocks" and zero.get("stage", 0) == 3 and not {BLOCK_CLASS, STACK_CLASS} & set(leaves):
        warnings.warn(f"{source}: zero_optimization.leaf_module.classes lacks {BLOCK_CLASS}; ZeRO-3's per-module "
                      "hooks will break every compiled block's graph at each submodule", stacklevel=2)


@functools.lru_cache(maxsize=None)
def memory_budget_backend(budget: float):
    """A torch.compile backend: inductor, with the partitioner keeping `budget` of each graph's activations
    for the backward and recomputing the cheapest of the rest (torch._functorch.config.activation_memory_budget).

    The budget is read when a graph is partitioned, and Dynamo shares a graph between models compiled with
    the same backend, so each budget gets a backend of its own (one per value: the blocks of every model with
    that budget share their graphs).
    """
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def inductor_with_budget(graph, example_inputs):
        with functorch_config.patch(activation_memory_budget=budget):
            return compile_fx(graph, example_inputs)

    inductor_with_budget.__name__ = f"inductor_activation_memory_budget_{budget:g}"
    return inductor_with_budget


def compile_engine(engine, method: str | None, *, activation_memory_budget: float = 1.0) -> None:
    """Compile the engine's model with `method` (None: leave it eager); blocks keep `activation_memory_budget`
    of their activations for the backward (1.0: inductor's default)."""
    if method == "blocks":
        if activation_memory_budget < 1.0:
            engine.module.compile_blocks(backend=memory_budget_backend(float(activation_memory_budget)))
        else:
            engine.module.compile_blocks()
    elif method == "deepcompile":
        engine.compile()


def dynamo_summary() -> dict[str, int]:
    """Graphs Dynamo has built and graph breaks it met so far in this process."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
