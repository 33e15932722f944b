"""Sequence-parallel attention equals the unsharded op, on 8 simulated CPU devices.

The cases run once, in a child process (`sequence_parallel_cases.py`: the device count must be set
before JAX starts); each test here checks one case's output and gradients, sharded against
unsharded, at the battery's float32 tolerance, or what the compiled program communicates.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.attention import api
from tests.attention import battery
from tests.attention import sequence_parallel_cases as cases

REPO = Path(__file__).resolve().parents[2]
TOL = battery.tolerance(jnp.float32)
CASE_NAMES = (
    "window_inside_shard", "window_two_shards", "asymmetric_dilated", "window_beyond_sequence", "window_zero",
    "relative_dilated_padding", "relative_causal_two_shards",
    "padding", "globals_padding", "causal_globals_padding", "causal_globals_padding_chunked",
    "global_projections", "pallas_globals", "pallas_relative_dilated_padding", "pallas_tpu_relative_causal", "bigbird", "bigbird_causal_padding", "bigbird_globals",
    "bigbird_globals_chunked",
    "favor_bidirectional", "favor_bidirectional_relu_heads", "favor_causal_short_chunks",
    "favor_causal_long_chunks", "favor_causal_relu",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sequence_parallel")
    done = subprocess.run(
        [sys.executable, "-m", "tests.attention.sequence_parallel_cases", str(out)],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_the_case_list_is_the_childs():
    assert set(CASE_NAMES) == set(cases._cases())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sharded_equals_unsharded(results, name):
    saved = np.load(results / f"{name}.npz")
    for part in ("out", "dq", "dk", "dv"):
        got, want = saved[f"got_{part}"], saved[f"want_{part}"]
        assert np.all(np.isfinite(got)), f"{part} has NaN or Inf"
        chex.assert_trees_all_close(got, want, **TOL, custom_message=f"{name}: {part}")


@pytest.mark.parametrize(
    "name", ["causal_globals_padding", "bigbird_causal_padding", "favor_causal_short_chunks", "favor_causal_relu"]
)
def test_sharded_causal_ops_do_not_leak_the_last_shard(results, name):
    saved = np.load(results / "future.npz")
    before, after = saved[f"{name}_before"], saved[f"{name}_after"]
    last_shard = cases.SEQ - 8
    np.testing.assert_array_equal(before[:, :last_shard], after[:, :last_shard])
    assert not np.array_equal(before[:, last_shard:], after[:, last_shard:])  # the change did reach the op


def _gathers(hlo: str) -> list[str]:
    """Every HLO line with an all-gather (synchronous, or the start of an asynchronous one)."""
    return [line.strip() for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)]


def test_the_window_moves_keys_by_collective_permute_and_gathers_nothing(results):
    hlo = (results / "hlo_window_two_shards.txt").read_text()
    assert "collective-permute" in hlo
    assert _gathers(hlo) == []


def test_bigbird_moves_key_blocks_by_collective_permute_and_gathers_nothing(results):
    hlo = (results / "hlo_bigbird.txt").read_text()
    assert "collective-permute" in hlo
    assert _gathers(hlo) == []


def test_a_bigbird_shard_fetches_exactly_the_blocks_its_rows_attend_elsewhere():
    from longjax.attention import block_sparse, sequence_parallel
    from longjax.attention.specs import BlockSparseSpec

    num_blocks, shards, local = 16, 4, 4
    layout = block_sparse.bigbird_random_layout(num_blocks, 2, 2, seed=3)
    spec = BlockSparseSpec(block_size=4, num_blocks=num_blocks, window_radius=1, global_blocks=(0, 15),
                           random_layout=layout, causal=False)
    fetch = sequence_parallel._block_fetch(spec, shards)
    query_blocks, key_blocks, key_used = block_sparse.key_block_lists(spec)
    for s in range(shards):
        rows = query_blocks // local == s
        attended = set(key_blocks[:, rows][key_used[:, rows]].tolist())
        fetched = set()
        for hop, table in zip(fetch.hops, fetch.send):
            sender = s - hop
            if 0 <= sender < shards:
                fetched |= {sender * local + int(b) for b in table[sender]}
        # Padding slots repeat a sender's block 0, which may not be attended; every other one is.
        wanted_elsewhere = {b for b in attended if b // local != s}
        assert wanted_elsewhere <= fetched
        assert fetched - wanted_elsewhere <= {t * local for t in range(shards)}


def test_with_globals_only_the_token_masks_are_gathered(results):
    hlo = (results / "hlo_globals_padding.txt").read_text()
    assert "collective-permute" in hlo
    gathered = _gathers(hlo)
    assert gathered, "the global positions are expected to be gathered"
    # [batch, seq] booleans; never a [batch, seq, heads, head_dim] array.
    assert all(re.search(rf"= \(?pred\[{cases.BATCH},{cases.SEQ}\]", line) for line in gathered), gathered


def test_sequence_axis_outside_a_mesh_is_an_error_naming_it():
    q = jnp.zeros((1, 16, 1, 4))
    with pytest.raises(ValueError, match="sequence_axis='sequence' needs a mesh"):
        api.sliding_window_attention(q, q, q, window=2, sequence_axis="sequence")


def test_the_reference_does_not_shard():
    mesh = jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    q = jnp.zeros((1, 16, 1, 4))
    with jax.set_mesh(mesh):
        with pytest.raises(NotImplementedError, match="impl='reference' does not shard"):
            api.sliding_window_attention(q, q, q, window=2, impl="reference", sequence_axis="sequence")
        with pytest.raises(ValueError, match="not an axis of the mesh"):
            api.favor_attention(
                q, q, q, projection=jnp.ones((4, 4)), impl="xla", sequence_axis="seq"
            )
