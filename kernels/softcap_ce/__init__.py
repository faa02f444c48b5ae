"""Row passes of the soft-capped LM head's cross-entropy (SPEC §2.1, §5.1) as Triton kernels, which
read each chunk's logits once per pass; the PyTorch rows stay in `model.lm_loss`.

The oracle is `naive` (`softcap_ce_rows_naive`, `softcap_ce_grad_naive` and their `_kl_` versions with
the distillation term), imported from its module
by the tests. The Triton path is imported on first use: importing Triton fixes its interpreter mode.
"""

__all__ = ["softcap_ce_rows_triton", "softcap_ce_grad_triton", "softcap_ce_kl_rows_triton", "softcap_ce_kl_grad_triton"]


def __getattr__(name):
    if name in __all__:
        from . import triton_impl

        return getattr(triton_impl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
