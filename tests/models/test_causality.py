"""CharLM causality, bitwise: nothing after position t reaches the logits at positions <= t.

Every attention type, position scheme and implementation that runs on a CPU
(Pallas kernels interpreted) is probed three ways around a cut inside a
BigBird block and inside a FAVOR+ causal chunk: every later token changed, one
far-future token changed, and token t itself changed. Earlier logits must be
bitwise equal, not merely close: a FAVOR+ stabiliser that takes its maximum
over the whole sequence (Performer's reference behaviour) moves earlier logits
only by rounding, about 1e-7, which any tolerance would let through (issue #21).
Each probe also asserts that the logits it should move do move, so it can fail.

Each comparison is between two calls of one jitted function on arrays of one
shape, at the same batch row and position, so the compiled arithmetic is the
same and only what the row depends on can differ.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models
from longjax.attention import favor as favor_lib
from tests.models.helpers import ATTENTION, tiny_config

SEQ = 24
VOCAB = 32
# Inside block 3 (positions 12..15) of the block-sparse config's 4-token blocks,
# inside the one causal chunk of the default FAVOR+ chunk sizes, and inside
# chunk 2 (positions 10..14) of PERFORMER_CHUNK.
CUT = 13
# A FAVOR+ causal chunk that divides neither CUT + 1 nor SEQ: several chunks,
# the cut inside one, and a padded last chunk.
PERFORMER_CHUNK = 5
POSITIONS = ("txl_relative", "rope", "learned", "none")
# Implementations that run on a CPU. None is left out: on a CPU it resolves to
# 'xla' for every type (the ops' dispatch table; jax.nn.dot_product_attention
# for full attention), so it would rerun those cases. 'cudnn' needs a GPU.
IMPLS = {
    "full": ("xla", "reference"),
    "sliding_window": ("xla", "pallas", "reference"),
    "block_sparse": ("xla", "pallas", "reference"),
    "performer": ("xla", "pallas", "reference"),
}
# A logit that should move must move by more than this in every batch row:
# far above rounding, so an ulp-level difference does not count as moving.
MOVED = 1e-3


def _cases():
    for attention in sorted(IMPLS):
        for impl in IMPLS[attention]:
            # The reference FAVOR+ is the dense product and takes no chunk.
            chunks = (None, PERFORMER_CHUNK) if attention == "performer" and impl != "reference" else (None,)
            for chunk in chunks:
                for position in POSITIONS:
                    name = f"{attention}-{impl}-{position}" + (f"-chunk{chunk}" if chunk else "")
                    yield pytest.param(attention, impl, chunk, position, id=name)


def _tokens(seed, batch=2):
    return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)


def _changed(tokens, positions, seed):
    """tokens with every position in `positions` (a slice or index) set to a different token."""
    offset = jax.random.randint(jax.random.key(seed), tokens.shape, 1, VOCAB)
    return tokens.at[:, positions].set((tokens[:, positions] + offset[:, positions]) % VOCAB)


def _model(attention, impl, chunk, position):
    fields = dict(ATTENTION[attention], impl=impl)
    if chunk is not None:
        fields["chunk_size"] = chunk
    return models.CharLM(tiny_config(fields, position=position))


@functools.lru_cache(maxsize=None)
def _params(position):
    """Parameters shared by every attention type (they have one parameter tree), once per scheme."""
    return jax.jit(_model("full", "xla", None, position).init)(jax.random.key(1), _tokens(0))


@dataclasses.dataclass(frozen=True)
class Probe:
    """Tokens changed at `positions`: logits before `unchanged_upto` stay bitwise equal, those at `moves` move."""

    what: str
    positions: slice | int
    unchanged_upto: int
    moves: slice | int
    seed: int


PROBES = (
    Probe(f"every token after {CUT} changed", slice(CUT + 1, None), CUT + 1, slice(CUT + 1, None), seed=2),
    # The last block is a BigBird global block, and a far-future key can set a
    # whole-sequence FAVOR+ stabiliser.
    Probe(f"token {SEQ - 1} changed", SEQ - 1, SEQ - 1, SEQ - 1, seed=3),
    # Position CUT + 1 keeps its own token: its logits can move only through attention.
    Probe(f"token {CUT} changed", CUT, CUT, CUT + 1, seed=4),
)


def assert_bitwise_equal(changed, base, *, upto, what):
    """Logits at positions < upto are bitwise equal (no tolerance) in every batch row."""
    np.testing.assert_array_equal(
        changed[:, :upto], base[:, :upto], err_msg=f"{what}: logits at positions < {upto} changed", strict=True
    )


def assert_moved(changed, base, *, at, what):
    """Logits at `at` (a slice or index) move by more than MOVED in every batch row."""
    diff = np.abs(changed[:, at] - base[:, at]).reshape(base.shape[0], -1).max(axis=1)
    assert (diff > MOVED).all(), f"{what}: logits at {at} should move; largest change per row {diff}"


@pytest.mark.parametrize("attention, impl, chunk, position", list(_cases()))
def test_char_lm_is_bitwise_causal(attention, impl, chunk, position):
    # One test runs every probe, so each case compiles once whichever worker runs it;
    # every probe is checked and reported even when an earlier one fails.
    apply = jax.jit(_model(attention, impl, chunk, position).apply)
    params, tokens = _params(position), _tokens(0)
    base = np.asarray(apply(params, tokens))
    assert np.isfinite(base).all()
    failures = []
    for probe in PROBES:
        changed = np.asarray(apply(params, _changed(tokens, probe.positions, probe.seed)))
        try:
            assert_bitwise_equal(changed, base, upto=probe.unchanged_upto, what=probe.what)
            assert_moved(changed, base, at=probe.moves, what=probe.what)
        except AssertionError as e:
            failures.append(str(e))
    if failures:
        pytest.fail("\n\n".join(failures))


def test_the_cut_falls_inside_a_block_and_a_chunk():
    block = ATTENTION["block_sparse"]["block_size"]
    assert (CUT + 1) % block and (CUT + 1) % PERFORMER_CHUNK and SEQ % PERFORMER_CHUNK
    assert favor_lib.DEFAULT_CHUNK_SIZE >= SEQ  # the default XLA chunk holds the whole sequence


def test_the_bitwise_check_catches_a_whole_sequence_stabiliser(monkeypatch):
    """A FAVOR+ key stabiliser taken over the whole sequence (the leak the XLA
    implementation avoids) fails the bitwise check, while the tolerance of the
    old causality test (atol=rtol=1e-6) lets it through: here it moves earlier
    logits by up to 6e-7, half that tolerance."""
    running_max = favor_lib._key_logit_max

    def whole_sequence_max(keys, valid, projection, scale):
        # Every position gets the maximum over all keys, which cummax leaves as it is.
        per_key = running_max(keys, valid, projection, scale)
        return jnp.broadcast_to(jnp.max(per_key, axis=(0, 3), keepdims=True), per_key.shape)

    monkeypatch.setattr(favor_lib, "_key_logit_max", whole_sequence_max)
    model = _model("performer", "xla", None, "rope")
    # A fresh function, so its trace sees the patched stabiliser.
    apply = jax.jit(lambda p, t: model.apply(p, t))
    params, tokens = _params("rope"), _tokens(0)
    probe = PROBES[0]
    base = np.asarray(apply(params, tokens))
    changed = np.asarray(apply(params, _changed(tokens, probe.positions, probe.seed)))
    upto = probe.unchanged_upto
    np.testing.assert_allclose(changed[:, :upto], base[:, :upto], atol=1e-6, rtol=1e-6)
    with pytest.raises(AssertionError, match="logits at positions"):
        assert_bitwise_equal(changed, base, upto=upto, what=probe.what)
