"""What the paths of every operation share: numerics (compute dtype, clamp constants, Polar length
terms) and the host side of the Triton kernels."""

from .numerics import (
    POLAR_EPS,
    Q2_FLOOR,
    compute_dtype,
    polar_length_features,
    polar_length_terms,
    polar_visible_counts,
)
from .triton_host import (
    TRITON_DTYPES,
    autotune_enabled,
    check_launch_device,
    cuda_median_ms,
    describe_settings,
    device_class,
    forced_launch_configs,
    interpreting,
    kernel_settings,
    patch_interpreter_index,
    tile_launcher,
)

__all__ = [
    "POLAR_EPS",
    "Q2_FLOOR",
    "TRITON_DTYPES",
    "autotune_enabled",
    "check_launch_device",
    "compute_dtype",
    "cuda_median_ms",
    "describe_settings",
    "device_class",
    "forced_launch_configs",
    "interpreting",
    "kernel_settings",
    "patch_interpreter_index",
    "polar_length_features",
    "polar_length_terms",
    "polar_visible_counts",
    "tile_launcher",
]
