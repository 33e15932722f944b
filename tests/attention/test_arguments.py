"""Every bad input to sliding_window_attention gets an error naming the argument."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.attention import sliding_window_attention

SHAPE = (2, 10, 3, 4)


def _qkv(dtype=jnp.float32):
    return tuple(jnp.ones(SHAPE, dtype) for _ in range(3))


def _call(**overrides):
    q, k, v = overrides.pop("qkv", _qkv())
    options = dict(window=2)
    options.update(overrides)
    return sliding_window_attention(q, k, v, **options)


@dataclasses.dataclass(frozen=True)
class _FakeBlockSizes:
    block_q: int = 8


BAD = {
    "mismatched_shapes": (dict(qkv=(jnp.ones(SHAPE), jnp.ones((2, 11, 3, 4)), jnp.ones(SHAPE))), "same shape"),
    "mismatched_dtypes": (
        dict(qkv=(jnp.ones(SHAPE), jnp.ones(SHAPE, jnp.bfloat16), jnp.ones(SHAPE))), "same dtype"
    ),
    "not_4d": (dict(qkv=(jnp.ones((10, 3, 4)),) * 3), "q must have shape"),
    "integer_inputs": (dict(qkv=(jnp.ones(SHAPE, jnp.int32),) * 3), "floating-point"),
    "negative_window": (dict(window=-1), "window must be non-negative"),
    "negative_window_side": (dict(window=(2, -3)), "window must be non-negative"),
    "window_wrong_type": (dict(window=2.5), "window must be"),
    "window_three_values": (dict(window=(1, 2, 3)), "window must be"),
    "causal_with_right_window": (dict(window=(2, 1), causal=True), "right == 0"),
    "dilation_zero": (dict(dilation=0), "dilation must be >= 1"),
    "dilation_per_head_zero": (dict(dilation=(1, 0, 2)), "dilation must be >= 1"),
    "dilation_wrong_length": (dict(dilation=(1, 2)), "one entry per head"),
    "global_qkv_without_mask": (dict(global_qkv=_qkv()), "global_qkv was given without global_mask"),
    "global_qkv_wrong_shape": (
        dict(global_mask=jnp.zeros((2, 10), bool), global_qkv=(jnp.ones((2, 10, 3, 5)),) * 3),
        "global_qkv q_g must match q",
    ),
    "global_mask_wrong_shape": (dict(global_mask=jnp.zeros((2, 9), bool)), "global_mask must have shape"),
    "global_mask_not_bool": (dict(global_mask=jnp.zeros((2, 10), jnp.int32)), "global_mask must be a boolean"),
    "padding_mask_wrong_shape": (dict(padding_mask=jnp.ones((10,), bool)), "padding_mask must have shape"),
    "padding_mask_not_bool": (dict(padding_mask=jnp.ones((2, 10))), "padding_mask must be a boolean"),
    "scale_nan": (dict(scale=float("nan")), "scale must be"),
    "unknown_impl": (dict(impl="cuda"), "impl must be"),
    "max_global_tokens_zero": (dict(global_mask=jnp.zeros((2, 10), bool), max_global_tokens=0), "max_global_tokens"),
    "block_size_zero": (dict(block_size=0), "block_size must be"),
    "interpret_not_bool": (dict(impl="pallas", interpret="yes"), "interpret must be None, True or False"),
    "block_sizes_not_dataclass": (dict(impl="pallas", block_sizes=(64, 64)), "block_sizes must be None or"),
    "block_sizes_wrong_family": (
        dict(impl="pallas", interpret=True, block_sizes=_FakeBlockSizes()),
        "block_sizes must be None, a kernels_pallas.block_sparse_flash.GpuBlockSizes or TpuBlockSizes",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    overrides, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        _call(**dict(overrides))


def test_traced_global_mask_needs_max_global_tokens():
    q, k, v = _qkv()
    fn = jax.jit(lambda g: sliding_window_attention(q, k, v, window=2, global_mask=g, impl="xla"))
    with pytest.raises(ValueError, match="max_global_tokens must be given"):
        fn(jnp.zeros((2, 10), bool))


def test_pallas_refuses_block_size():
    with pytest.raises(NotImplementedError, match="block_size is impl='xla''s"):
        _call(impl="pallas", block_size=4, interpret=True)


def test_kernel_options_are_refused_by_other_implementations():
    with pytest.raises(NotImplementedError, match="interpret: options of impl='pallas' only"):
        _call(impl="xla", interpret=True)
    with pytest.raises(NotImplementedError, match="interpret: options of impl='pallas' only"):
        _call(impl="reference", interpret=False)


def test_reference_refuses_block_size():
    with pytest.raises(NotImplementedError, match="block_size"):
        _call(impl="reference", block_size=4)


def test_causal_int_window_means_no_right_side():
    q, k, v = (jax.random.normal(key, SHAPE) for key in jax.random.split(jax.random.key(0), 3))
    a = sliding_window_attention(q, k, v, window=3, causal=True, impl="reference")
    b = sliding_window_attention(q, k, v, window=(3, 0), impl="reference")
    np.testing.assert_array_equal(a, b)
