"""Row statistics of the soft-capped LM head's cross-entropy (SPEC §2.1, §5.1): the fp64 reference
(`naive`) and the fused Triton kernels (`triton_impl`) that read each chunk's logits once per pass."""
