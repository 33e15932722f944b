"""Public attention ops: one function per pattern, dispatching to an implementation.

Every op takes `impl=None | 'xla' | 'pallas' | 'reference'`. An explicit
implementation either serves the call or raises `NotImplementedError` saying
what it cannot do; it never falls back. `impl=None` tries the backend's
preferred implementations in order and takes the first that does not raise.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import jax

from longjax.attention import arguments
from longjax.attention import block_sparse as block_sparse_lib
from longjax.attention import favor as favor_lib
from longjax.attention import global_tokens
from longjax.attention import pallas_block_sparse
from longjax.attention import pallas_favor
from longjax.attention import reference
from longjax.attention import relative as relative_lib
from longjax.attention import sequence_parallel
from longjax.attention import sliding_window as sliding_window_lib
from longjax.attention.arguments import Implementation
from longjax.attention.specs import BlockSparseSpec

# Interpret-mode Pallas on CPU is a correctness tool, not a fast path, so the
# CPU prefers XLA; accelerators prefer the kernels.
_PREFERENCE: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {"cpu": ("xla",), "gpu": ("pallas", "xla"), "tpu": ("pallas", "xla")}
)


def _dispatch(op_name: str, table: Mapping[str, Callable], impl, *args, **kwargs):
    if impl is not None:
        arguments.check_impl(impl)
        return table[impl](*args, **kwargs)
    errors = []
    for name in _PREFERENCE.get(jax.default_backend(), ("xla",)):
        try:
            return table[name](*args, **kwargs)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError(f"no implementation of {op_name} serves this call: " + "; ".join(errors))


def _sliding_window_reference(q, k, v, *, block_size, max_global_tokens, **kwargs):
    del max_global_tokens  # the dense oracle needs no bound on the global count
    if block_size is not None:
        raise NotImplementedError("impl='reference' is dense and takes no block_size")
    return reference.sliding_window_reference(q, k, v, **kwargs)


def _without_kernel_options(impl: Callable) -> Callable:
    """An implementation that is not a Pallas kernel: it refuses the kernel options rather than ignore them."""

    def wrapped(q, k, v, *, interpret, block_sizes, **kwargs):
        given = [name for name, x in (("interpret", interpret), ("block_sizes", block_sizes)) if x is not None]
        if given:
            raise NotImplementedError(f"{' and '.join(given)}: options of impl='pallas' only")
        return impl(q, k, v, **kwargs)

    return wrapped


def _with_global_slots(xla_impl):
    """Resolves max_global_tokens (static slots for token-level globals) before an XLA implementation."""

    def impl(q, k, v, *, global_mask, padding_mask, max_global_tokens, **kwargs):
        if global_mask is not None:
            max_global_tokens = global_tokens.resolve_max_global_tokens(
                global_mask, padding_mask, max_global_tokens
            )
        return xla_impl(
            q, k, v, global_mask=global_mask, padding_mask=padding_mask,
            max_global_tokens=max_global_tokens, **kwargs,
        )

    return impl


_SLIDING_WINDOW_IMPLS: Mapping[str, Callable] = types.MappingProxyType(
    {
        "xla": _without_kernel_options(_with_global_slots(sliding_window_lib.sliding_window_xla)),
        "pallas": _with_global_slots(pallas_block_sparse.sliding_window_pallas),
        "reference": _without_kernel_options(_sliding_window_reference),
    }
)


def _not_sharded(message: str):
    """An implementation that refuses `sequence_axis`, saying `message`."""

    def refuse(*args, **kwargs):
        raise NotImplementedError(message)

    return refuse


def _sliding_window_xla_sharded(q, k, v, *, block_size, **kwargs):
    def band(*xs, spec, scale, relative):
        return sliding_window_lib.band_part(*xs, spec=spec, scale=scale, block_size=block_size, relative=relative)

    return sequence_parallel.sliding_window_sharded(q, k, v, band=band, **kwargs)


def _sliding_window_pallas_sharded(q, k, v, *, block_size, interpret, block_sizes, relative, **kwargs):
    pallas_block_sparse.refuse_block_size(block_size)

    def band(*xs, spec, scale, relative):
        return pallas_block_sparse.band_part(
            *xs, spec=spec, scale=scale, block_sizes=block_sizes, interpret=interpret, relative=relative
        )

    # The kernels' pallas_calls declare no per-axis variance of their outputs, which shard_map's
    # check needs; see sliding_window_sharded on why the collectives stay exact without it.
    return sequence_parallel.sliding_window_sharded(q, k, v, band=band, check_vma=False, relative=relative, **kwargs)


# With sequence_axis: the sequence sharded over a mesh axis, each shard's band by one implementation.
_SLIDING_WINDOW_SHARDED_IMPLS: Mapping[str, Callable] = types.MappingProxyType(
    {
        "xla": _without_kernel_options(_with_global_slots(_sliding_window_xla_sharded)),
        "pallas": _with_global_slots(_sliding_window_pallas_sharded),
        "reference": _not_sharded("impl='reference' does not shard the sequence (sequence_axis)"),
    }
)


def _sequence_table(table, sharded_table, sequence_axis, seq: int):
    """The implementations and their extra arguments for a call with or without sequence_axis."""
    if sequence_axis is None:
        return table, {}
    if not isinstance(sequence_axis, str):
        raise ValueError(f"sequence_axis must be None or a mesh axis name (str), got {sequence_axis!r}")
    sequence_parallel.check_sequence_axis(sequence_axis, seq)
    return sharded_table, {"sequence_axis": sequence_axis}


def sliding_window_attention(
    q,
    k,
    v,
    *,
    window,
    dilation=1,
    causal: bool = False,
    global_mask=None,
    global_qkv=None,
    padding_mask=None,
    scale=None,
    max_global_tokens: int | None = None,
    block_size: int | None = None,
    interpret: bool | None = None,
    block_sizes=None,
    impl: Implementation | None = None,
    sequence_axis: str | None = None,
    relative: relative_lib.RelativePositions | None = None,
):
    """Longformer attention: a (dilated) sliding window plus global tokens.

    Query i of head h attends key j when `j - i = dilation[h] * t` for an
    integer t in `[-left, right]`. A global query attends every key; every
    query attends every global key; each key is counted once.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one shape and dtype.
      window: `w` (w keys each side) or `(left, right)`, in dilated steps; any
        size, 0 and beyond the sequence length included.
      dilation: an int, or one int per head; >= 1.
      causal: no key after the query is attended, global keys included; an int
        window then means `(w, 0)`, and a tuple window must have right == 0.
      global_mask: optional bool `[batch, seq]`, True for global tokens;
        positions and counts may differ per row.
      global_qkv: optional `(q_g, k_g, v_g)`, each shaped like q: Longformer's
        separate projections, used by global queries (queries from q_g at the
        global positions, keys and values from k_g, v_g everywhere). Needs
        global_mask.
      padding_mask: optional bool `[batch, seq]`, True for real tokens. Padded
        keys are never attended; outputs at padded queries are zero.
      scale: score multiplier, default `1 / sqrt(head_dim)`.
      max_global_tokens: static bound on the global tokens per row, which the
        linear-time implementation needs to give its global passes a fixed
        shape. When None it is read from a concrete global_mask; under jit or
        vmap (a traced global_mask) it must be given. A row with more global
        tokens than this comes out as NaN rather than silently wrong.
      block_size: query-block length of the blocked implementation; None picks
        one per shape. impl='xla' only.
      interpret: impl='pallas' only: run the kernels in the Pallas interpreter.
        None: interpret on a CPU backend (slow; for tests), compile elsewhere;
        False forces the compiled lowering, which `jax.export` to another
        platform needs.
      block_sizes: impl='pallas' only: `kernels_pallas.block_sparse_flash.GpuBlockSizes`
        (Triton lowering) or `TpuBlockSizes` (Mosaic lowering); the type
        selects the lowering. None: each platform's defaults, chosen when
        lowering (so `jax.export` from a CPU host works for 'cuda' and 'tpu');
        interpreted, the TPU kernels on a TPU host and the GPU kernels elsewhere.
      impl: None (best for the backend), 'xla', 'pallas' or 'reference'.
      sequence_axis: None, or the name of an axis of the mesh in context
        (`jax.set_mesh`) that shards the sequence: every array is split along
        seq over it (seq a multiple of its size), and each device exchanges
        only the keys and values the window reaches with its neighbours
        (`sequence_parallel.py`). 'xla' and 'pallas' shard; 'reference' does not.
      relative: None, or `RelativePositions(queries, embeddings)`: Transformer-XL
        relative positions computed in the op, the score of (i, j) gaining
        `scale * queries_i . r_{i-j}` (see `longjax.attention.relative`); the
        embeddings must cover `relative.sliding_window_reach(...)`. Not with
        global_mask (global tokens reach every offset).

    Returns:
      `[batch, seq, heads, head_dim]`, q's dtype.
    """
    arguments.check_qkv(q, k, v)
    batch, seq, heads, _ = q.shape
    table, extra = _sequence_table(_SLIDING_WINDOW_IMPLS, _SLIDING_WINDOW_SHARDED_IMPLS, sequence_axis, seq)
    spec = arguments.parse_sliding_window(window, dilation, causal, heads)
    arguments.check_token_mask("global_mask", global_mask, batch, seq)
    arguments.check_token_mask("padding_mask", padding_mask, batch, seq)
    arguments.check_global_qkv(global_qkv, global_mask, q)
    arguments.check_scale(scale)
    arguments.check_max_global_tokens(max_global_tokens, seq)
    arguments.check_int(block_size, name="block_size", optional=True)
    arguments.check_kernel_options(interpret, block_sizes)
    relative_lib.check_relative(
        relative, q, reach=relative_lib.sliding_window_reach(spec.left, spec.right, spec.dilation, seq)
    )
    if relative is not None and global_mask is not None:
        raise NotImplementedError(
            "relative with global_mask: global tokens reach every offset, which the ops compute only "
            "within the window; add the positions as head features instead (model.relative_positions="
            "'features', longjax.models.positions.txl_relative_qkv)"
        )
    return _dispatch(
        "sliding_window_attention",
        table,
        impl,
        q, k, v,
        spec=spec,
        global_mask=global_mask,
        global_qkv=global_qkv,
        padding_mask=padding_mask,
        scale=scale,
        max_global_tokens=max_global_tokens,
        block_size=block_size,
        interpret=interpret,
        block_sizes=block_sizes,
        relative=relative,
        **extra,
    )


def _block_sparse_reference(q, k, v, *, max_global_tokens, **kwargs):
    del max_global_tokens  # the dense oracle needs no bound on the global count
    return reference.block_sparse_reference(q, k, v, **kwargs)


_BLOCK_SPARSE_IMPLS: Mapping[str, Callable] = types.MappingProxyType(
    {
        "xla": _without_kernel_options(_with_global_slots(block_sparse_lib.block_sparse_xla)),
        "pallas": _with_global_slots(pallas_block_sparse.block_sparse_pallas),
        "reference": _without_kernel_options(_block_sparse_reference),
    }
)


def _block_sparse_xla_sharded(q, k, v, *, relative, **kwargs):
    if relative is not None:
        raise NotImplementedError(
            "block_sparse_attention computes relative positions (relative=) only unsharded; with "
            "sequence_axis, add them as head features (model.relative_positions='features')"
        )
    return sequence_parallel.block_sparse_sharded(q, k, v, **kwargs)


_BLOCK_SPARSE_SHARDED_IMPLS: Mapping[str, Callable] = types.MappingProxyType(
    {
        "xla": _without_kernel_options(_with_global_slots(_block_sparse_xla_sharded)),
        "pallas": _not_sharded("impl='pallas' BigBird does not shard the sequence (sequence_axis); impl='xla' does"),
        "reference": _not_sharded("impl='reference' does not shard the sequence (sequence_axis)"),
    }
)


def block_sparse_attention(
    q,
    k,
    v,
    *,
    block_size: int,
    num_window_blocks: int = 3,
    global_blocks=(0, -1),
    num_random_blocks: int = 3,
    random_layout=None,
    seed: int = 0,
    global_mask=None,
    padding_mask=None,
    causal: bool = False,
    scale=None,
    max_global_tokens: int | None = None,
    interpret: bool | None = None,
    block_sizes=None,
    impl: Implementation | None = None,
    sequence_axis: str | None = None,
    relative: relative_lib.RelativePositions | None = None,
):
    """BigBird attention: window, global and random key blocks.

    The sequence is cut into blocks of `block_size` (padded internally to a
    whole number of blocks). Query block a of head h attends every key if a is
    a global block; otherwise the union, each key once, of the window blocks
    `a - s .. a + s` (`num_window_blocks = 2s + 1`), the global blocks and the
    random blocks `random_layout[h, a]`. The pattern applies as defined at every
    length; a short input simply has every block in its window.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one shape and dtype.
      block_size: tokens per block, >= 1.
      num_window_blocks: odd, >= 1.
      global_blocks: block indices, negative ones from the end; the default is
        BigBird's ITC layout (first and last block).
      num_random_blocks: random key blocks per query block (r).
      random_layout: optional int `[heads, blocks, r]` of block indices, -1 for
        none; rows of global blocks are ignored. None draws one with
        `bigbird_random_layout(..., seed=seed)`; a model passes a seed derived
        from the layer, so the layout is fixed for training and evaluation.
      seed: seed of the drawn layout.
      global_mask: optional bool `[batch, seq]`: extra token-level global tokens
        (ETC-style) that attend every key and that every query attends.
      padding_mask: optional bool `[batch, seq]`, True for real tokens.
      causal: no key after the query; the drawn random blocks come from earlier
        blocks only.
      scale: score multiplier, default `1 / sqrt(head_dim)`.
      max_global_tokens: static bound on global_mask tokens per row, as for
        `sliding_window_attention`; needed when global_mask is traced.
      interpret: impl='pallas' only, as for `sliding_window_attention`.
      block_sizes: impl='pallas' only, as for `sliding_window_attention`. The
        kernel places each BigBird block in a slot of the next length its
        blocks allow (power of two on GPU, multiple of 8 on TPU); its block
        lengths must divide that slot.
      impl: None (best for the backend), 'xla', 'pallas' or 'reference'.
      sequence_axis: None, or the name of an axis of the mesh in context
        (`jax.set_mesh`) that shards the sequence (seq a multiple of
        block_size times its size): each device fetches only the key blocks
        its rows attend that others hold (window, random and global blocks).
        impl='xla' only.
      relative: None, or `RelativePositions(queries, embeddings)`: Transformer-XL
        relative positions computed in the op, the score of (i, j) gaining
        `scale * queries_i . r_{i-j}` (see `longjax.attention.relative`). Random
        and global blocks reach any offset, so the embeddings must cover
        offsets up to seq - 1. impl='xla', 'reference' and 'pallas' (the Triton and
        Mosaic kernels); not with global_mask or sequence_axis.

    Returns:
      `[batch, seq, heads, head_dim]`, q's dtype.
    """
    arguments.check_qkv(q, k, v)
    batch, seq, heads, _ = q.shape
    table, extra = _sequence_table(_BLOCK_SPARSE_IMPLS, _BLOCK_SPARSE_SHARDED_IMPLS, sequence_axis, seq)
    arguments.check_int(block_size, name="block_size")
    arguments.check_num_window_blocks(num_window_blocks)
    arguments.check_int(num_random_blocks, name="num_random_blocks", minimum=0)
    num_blocks = -(-seq // block_size)
    normalized_globals = arguments.normalize_global_blocks(global_blocks, num_blocks)
    if random_layout is None:
        random_layout = block_sparse_lib.bigbird_random_layout(
            num_blocks, heads, num_random_blocks, num_window_blocks=num_window_blocks,
            global_blocks=global_blocks, causal=causal, seed=seed,
        )
    spec = BlockSparseSpec(
        block_size=block_size,
        num_blocks=num_blocks,
        window_radius=num_window_blocks // 2,
        global_blocks=normalized_globals,
        random_layout=arguments.check_random_layout(random_layout, heads, num_blocks, num_random_blocks),
        causal=bool(causal),
    )
    arguments.check_token_mask("global_mask", global_mask, batch, seq)
    arguments.check_token_mask("padding_mask", padding_mask, batch, seq)
    arguments.check_scale(scale)
    arguments.check_max_global_tokens(max_global_tokens, seq)
    arguments.check_kernel_options(interpret, block_sizes)
    relative_lib.check_relative(relative, q, reach=max(seq - 1, 0))
    if relative is not None and global_mask is not None:
        raise NotImplementedError(
            "relative with global_mask: token-level global tokens are attended outside the block "
            "layout, where the op computes no position term; add the positions as head features "
            "instead (model.relative_positions='features', longjax.models.positions.txl_relative_qkv)"
        )
    return _dispatch(
        "block_sparse_attention",
        table,
        impl,
        q, k, v,
        spec=spec,
        global_mask=global_mask,
        padding_mask=padding_mask,
        scale=scale,
        max_global_tokens=max_global_tokens,
        interpret=interpret,
        block_sizes=block_sizes,
        relative=relative,
        **extra,
    )


def _favor_reference(q, k, v, *, chunk_size, **kwargs):
    del chunk_size  # the dense form has no chunks; the result does not depend on them
    return reference.favor_reference(q, k, v, **kwargs)


_FAVOR_IMPLS: Mapping[str, Callable] = types.MappingProxyType(
    {
        "xla": _without_kernel_options(favor_lib.favor_xla),
        "pallas": pallas_favor.favor_pallas,
        "reference": _without_kernel_options(_favor_reference),
    }
)


def _favor_xla_sharded(q, k, v, **kwargs):
    return sequence_parallel.favor_sharded(q, k, v, **kwargs)


_FAVOR_SHARDED_IMPLS: Mapping[str, Callable] = types.MappingProxyType(
    {
        "xla": _without_kernel_options(_favor_xla_sharded),
        "pallas": _not_sharded("impl='pallas' FAVOR+ does not shard the sequence (sequence_axis); impl='xla' does"),
        "reference": _not_sharded("impl='reference' does not shard the sequence (sequence_axis)"),
    }
)


def favor_attention(
    q,
    k,
    v,
    *,
    projection,
    feature_map: str = "softmax",
    causal: bool = False,
    padding_mask=None,
    scale=None,
    chunk_size: int | None = None,
    interpret: bool | None = None,
    block_sizes=None,
    impl: Implementation | None = None,
    sequence_axis: str | None = None,
):
    """Performer FAVOR+ attention, linear in sequence length.

    `out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)` over allowed j.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one shape and dtype.
      projection: `[features, head_dim]` (shared by heads) or
        `[heads, features, head_dim]`, e.g. from `favor_projection`.
      feature_map: 'softmax': positive random features whose inner product is
        an unbiased estimate of `exp(scale * q.k)`; 'relu': the generalised
        ReLU kernel `relu(x' W^T) + 1e-3`, with `x' = sqrt(scale) x`.
      causal: position i attends positions <= i only, and nothing at a later
        position enters its computation (the stabiliser included).
      padding_mask: optional bool `[batch, seq]`, True for real tokens; padded
        keys enter neither numerator nor denominator, padded rows are zero.
      scale: default `1 / sqrt(head_dim)`.
      chunk_size: causal chunk length; None picks a fast default. With
        impl='pallas' it replaces the block sizes' causal chunk.
      interpret: impl='pallas' only, as for `sliding_window_attention`.
      block_sizes: impl='pallas' only: `kernels_pallas.favor.GpuBlockSizes`
        (Triton lowering) or `TpuBlockSizes` (Mosaic lowering); the type
        selects the lowering. None: each platform's defaults, the platform
        choosing when compiled (so a CPU host can export for either), the
        default backend's (GPU's on CPU) when interpreted.
      impl: None (best for the backend), 'xla', 'pallas' or 'reference'
        (the dense product of the same features).
      sequence_axis: None, or the name of an axis of the mesh in context
        (`jax.set_mesh`) that shards the sequence: bidirectional attention sums
        the `[features, head_dim]` states over it, causal attention takes the
        exclusive prefix of the shards' states. impl='xla' only.

    Returns:
      `[batch, seq, heads, head_dim]`, q's dtype; computed in float32.
    """
    arguments.check_qkv(q, k, v)
    batch, seq, heads, head_dim = q.shape
    table, extra = _sequence_table(_FAVOR_IMPLS, _FAVOR_SHARDED_IMPLS, sequence_axis, seq)
    arguments.check_favor(projection, feature_map, chunk_size, heads, head_dim)
    arguments.check_token_mask("padding_mask", padding_mask, batch, seq)
    arguments.check_scale(scale)
    arguments.check_kernel_options(interpret, block_sizes)
    return _dispatch(
        "favor_attention",
        table,
        impl,
        q, k, v,
        projection=projection,
        feature_map=feature_map,
        causal=bool(causal),
        padding_mask=padding_mask,
        scale=scale,
        chunk_size=chunk_size,
        interpret=interpret,
        block_sizes=block_sizes,
        **extra,
    )
