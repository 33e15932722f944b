"""The 'pallas' implementation of `favor_attention`: the FAVOR+ kernels of `kernels_pallas/favor.py`.

`favor_attention` has checked the arrays and the options before it dispatches
here (`arguments.check_qkv`, `check_favor`, `check_token_mask`, `check_scale`,
`check_kernel_options`); what is left is the family of `block_sizes`, which
only this implementation takes. The kernels check what they impose
themselves (chunk lengths of the compiled lowerings, the widest Triton head).

Layout: `[batch, seq, heads, head_dim]`, as the public ops.
"""

from __future__ import annotations

from kernels_pallas import favor as favor_kernels


def favor_pallas(
    q, k, v, *, projection, feature_map, causal, padding_mask, scale, chunk_size, interpret, block_sizes,
):
    """FAVOR+ attention on the Pallas kernels; arguments as `longjax.attention.favor_attention`."""
    families = (favor_kernels.GpuBlockSizes, favor_kernels.TpuBlockSizes)
    if block_sizes is not None and not isinstance(block_sizes, families):
        raise ValueError(
            "block_sizes must be None, a kernels_pallas.favor.GpuBlockSizes or TpuBlockSizes, "
            f"got {type(block_sizes).__module__}.{type(block_sizes).__qualname__}"
        )
    return favor_kernels.favor_attention_pallas(
        q, k, v, projection=projection, feature_map=feature_map, causal=causal, padding_mask=padding_mask,
        scale=scale, chunk_size=chunk_size, block_sizes=block_sizes, interpret=interpret,
    )
