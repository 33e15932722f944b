"""Transformer-XL relative attention through every pattern, against the direct relative-shift form."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models
from longjax.models import positions
from tests.models.helpers import WIDE_ATTENTION, tiny_config

SEQ = 12
REPO = Path(__file__).resolve().parents[2]


def _rel_shift(x):
    """Transformer-XL's relative shift of `[heads, q, k]` scores whose key axis runs over
    distances k-1, ..., 0: afterwards entry (i, j) holds distance i - j (for j <= i)."""
    heads, q, k = x.shape
    padded = jnp.concatenate([jnp.zeros((heads, q, 1), x.dtype), x], axis=-1)
    return padded.reshape(heads, k + 1, q)[:, 1:].reshape(heads, q, k)


def _direct_txl_attention(params, x, *, causal, d_model):
    """Transformer-XL relative attention written out densely (its own formula, not the layer's)."""
    p = params["params"]
    proj = lambda name: jnp.einsum("bsd,dhe->bshe", x, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = proj("query"), proj("key"), proj("value")
    u, vb, w_r = p["content_bias"], p["position_bias"], p["relative_kernel"]
    seq = x.shape[1]
    if causal:
        distances = jnp.arange(seq - 1, -1, -1)
    else:
        distances = jnp.arange(seq - 1, -seq, -1)
    r = jnp.einsum("md,dhe->mhe", positions.relative_sinusoid(distances, d_model), w_r)
    content = jnp.einsum("bihd,bjhd->bhij", q + u, k)
    by_distance = jnp.einsum("bihd,mhd->bhim", q + vb, r)
    if causal:
        position = jax.vmap(_rel_shift)(by_distance)
    else:
        i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
        position = by_distance[:, :, i, seq - 1 - i + j]
    scores = (content + position) / np.sqrt(q.shape[-1])
    if causal:
        scores = jnp.where(np.tril(np.ones((seq, seq), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(scores, axis=-1), v)
    return jnp.einsum("bihd,hde->bie", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "attention, relative_positions",
    [
        ("full", "native"), ("sliding_window", "native"), ("block_sparse", "native"),
        ("full", "features"), ("sliding_window", "features"), ("block_sparse", "features"),
        # 'auto': native where the op computes the term (each of these; Performer takes the features).
        ("sliding_window", "auto"), ("block_sparse", "auto"),
    ],
)
def test_txl_relative_attention_matches_the_relative_shift_form(attention, relative_positions, causal):
    spec = {"full": dict(type="full")} | WIDE_ATTENTION
    cfg = tiny_config(spec[attention], num_layers=1, relative_positions=relative_positions)
    layer = models.MultiHeadAttention(cfg, layer=0, causal=causal)
    x = jax.random.normal(jax.random.key(0), (2, SEQ, cfg.d_model))
    params = layer.init(jax.random.key(1), x)
    # O(1) biases (init draws them at 0.02), so the u and v terms visibly matter.
    inner = dict(params["params"])
    for i, name in enumerate(("content_bias", "position_bias")):
        inner[name] = jax.random.normal(jax.random.key(10 + i), inner[name].shape)
    params = {"params": inner}
    expected = _direct_txl_attention(params, x, causal=causal, d_model=cfg.d_model)
    chex.assert_trees_all_close(jax.jit(layer.apply)(params, x), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_native_relative_matches_features_in_a_narrow_dilated_window(causal):
    # A window narrower than the sequence, dilated per head: the table covers only the reach.
    attention = dict(type="sliding_window", window=(3, 2), dilation=(1, 3))
    x = jax.random.normal(jax.random.key(2), (2, 23, 16))
    outs = []
    for relative_positions in ("native", "features"):
        cfg = tiny_config(attention, num_layers=1, relative_positions=relative_positions)
        layer = models.MultiHeadAttention(cfg, layer=0, causal=causal)
        params = layer.init(jax.random.key(1), x)
        outs.append(jax.jit(layer.apply)(params, x))
    chex.assert_trees_all_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_native_relative_matches_features_in_sparse_bigbird(causal):
    # Blocks of 4 in 29 tokens (the last one part padding), 3 random blocks a row and two global
    # blocks: offsets from anywhere in the sequence, gathered per key block.
    attention = dict(type="block_sparse", block_size=4, num_random_blocks=3, impl="xla")
    x = jax.random.normal(jax.random.key(3), (2, 29, 16))
    outs = []
    for relative_positions in ("native", "features"):
        cfg = tiny_config(attention, num_layers=1, relative_positions=relative_positions)
        assert cfg.native_relative(0) == (relative_positions == "native")
        layer = models.MultiHeadAttention(cfg, layer=0, causal=causal)
        params = layer.init(jax.random.key(1), x)
        outs.append(jax.jit(layer.apply)(params, x))
    chex.assert_trees_all_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)


def test_native_relative_in_pallas_bigbird_matches_xla():
    # The Triton kernels (interpreted) take the term as a per-visit bias; their float32 matmuls
    # have bfloat16 operands (as on a GPU), so agreement is to a few bfloat16 roundings.
    x = jax.random.normal(jax.random.key(4), (2, 29, 16))
    outs = []
    for impl in ("xla", "pallas"):
        attention = dict(type="block_sparse", block_size=4, num_random_blocks=3, impl=impl)
        cfg = tiny_config(attention, num_layers=1, relative_positions="native")
        assert cfg.native_relative(0)
        layer = models.MultiHeadAttention(cfg, layer=0, causal=True)
        params = layer.init(jax.random.key(1), x)
        outs.append(jax.jit(layer.apply)(params, x))
    chex.assert_trees_all_close(outs[1], outs[0], atol=1e-2, rtol=1e-2)
    assert float(jnp.abs(outs[0]).max()) > 0.1


def test_native_relative_with_the_sequence_sharded_is_the_sliding_window_only():
    # sequence_axis is the run's (mesh.sequence), set on the built config.
    sharded = lambda attention, **fields: dataclasses.replace(
        tiny_config(attention, num_layers=1, **fields), sequence_axis="sequence"
    )
    bigbird = dict(type="block_sparse", block_size=4, impl="xla")
    assert tiny_config(bigbird, num_layers=1).native_relative(0)
    assert not sharded(bigbird).native_relative(0)  # 'auto': the sharded BigBird op takes no position term
    assert sharded(dict(type="sliding_window", window=4, impl="xla")).native_relative(0)
    assert sharded(dict(type="sliding_window", window=4, impl="pallas")).native_relative(0)
    with pytest.raises(ValueError, match=r"layer 0 is BlockSparseAttention.*with the sequence sharded"):
        sharded(bigbird, relative_positions="native")


def test_native_relative_is_refused_for_performer_layers_naming_the_field():
    assert not tiny_config(dict(type="performer", num_features=16), num_layers=1).native_relative(0)
    with pytest.raises(ValueError, match=r"model.relative_positions='native': layer 0 is PerformerAttention"):
        tiny_config(dict(type="performer", num_features=16), num_layers=1, relative_positions="native")


def test_relative_features_depend_only_on_the_offset():
    cfg = tiny_config(dict(type="full"), num_layers=1)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(3))
    kwargs = dict(
        content_bias=jnp.zeros((2, 8)), position_bias=jnp.asarray(rng.normal(size=(2, 8)), jnp.float32),
        relative_kernel=jnp.asarray(rng.normal(size=(cfg.d_model, 2, 8)), jnp.float32),
    )
    scores = lambda pos: jnp.einsum(
        "bihd,bjhd->bhij", *positions.txl_relative_qkv(q, k, v, positions=pos, **kwargs)[:2]
    )
    # Shifting every absolute position leaves every score unchanged.
    chex.assert_trees_all_close(scores(jnp.arange(6)), scores(jnp.arange(6) + 1000), atol=2e-4, rtol=2e-4)


def test_rotary_scores_depend_only_on_the_offset():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32) for _ in range(2))
    scores = lambda pos: jnp.einsum(
        "bihd,bjhd->bhij", positions.rotary(q, pos), positions.rotary(k, pos)
    )
    chex.assert_trees_all_close(scores(jnp.arange(5)), scores(jnp.arange(5) + 77), atol=1e-4, rtol=1e-4)
    # ...and they do depend on it: rotary is not the identity.
    assert not np.allclose(scores(jnp.arange(5)), jnp.einsum("bihd,bjhd->bhij", q, k), atol=1e-2)


def test_roberta_position_ids_skip_padding():
    mask = jnp.array([[True, True, True, False], [True, False, False, False]])
    np.testing.assert_array_equal(
        positions.roberta_position_ids(mask, 1), [[2, 3, 4, 1], [2, 1, 1, 1]]
    )


def test_validating_relative_positions_starts_no_backend():
    # A run parses its config before `jax.distributed.initialize`, which refuses a started backend:
    # checking 'native' and 'auto' layers must not ask which backend there is.
    code = (
        "from jax._src import xla_bridge\n"
        "from tests.models.helpers import tiny_config\n"
        "for impl in ('pallas', 'xla', None):\n"
        "    for mode in ('native', 'auto'):\n"
        "        tiny_config(dict(type='block_sparse', block_size=4, impl=impl), relative_positions=mode)\n"
        "        tiny_config(dict(type='sliding_window', window=4, impl=impl), relative_positions=mode)\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
