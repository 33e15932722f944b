"""One multi-head attention layer for every attention pattern.

The pattern is chosen by the layer's attention config (see `config.py`); the
projections, position handling and dropout are shared, so swapping the pattern
keeps the parameter tree (global projections aside), which is what lets a
sliding-window model be compared with, or initialised from, a dense one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longjax import attention as ops
from longjax.models import positions as positions_lib
from longjax.models.config import (
    BlockSparseAttention,
    FullAttention,
    PerformerAttention,
    SlidingWindowAttention,
    TransformerConfig,
)

GLOBAL_PROJECTIONS = ("global_query", "global_key", "global_value")
_LOCAL_OF_GLOBAL = {"global_query": "query", "global_key": "key", "global_value": "value"}


def layer_seed(model_seed: int, layer: int) -> int:
    """A 31-bit seed for layer-fixed randomness (BigBird layouts), from (model seed, layer)."""
    return int(np.random.SeedSequence([model_seed, layer]).generate_state(1)[0] >> 1)


def performer_projection(model_seed: int, layer: int, step, attention: PerformerAttention, head_dim: int):
    """The FAVOR+ projection of `layer` at training `step`: `[num_features, head_dim]` float32.

    A pure function of (model seed, layer, step // redraw_interval), so
    training, evaluation and a resumed run agree on it without hidden state.
    With `attention.random_features=False` it is the identity: the features
    are `relu` of the head itself (the generalized attention's deterministic features).
    """
    if not attention.random_features:
        return jnp.eye(head_dim, dtype=jnp.float32)
    key = jax.random.fold_in(jax.random.key(model_seed), layer)
    if attention.redraw_interval is not None:
        key = jax.random.fold_in(key, jnp.asarray(step, jnp.int32) // attention.redraw_interval)
    return ops.favor_projection(key, attention.num_features, head_dim, orthogonal=attention.orthogonal)


def copy_local_to_global(params):
    """Initialises Longformer's global projections as copies of the local ones.

    Longformer's conversion from RoBERTa does this: a pre-trained model has no
    global projections, so they start equal to query/key/value. Works on any
    parameter tree (a whole model's or one layer's): every sub-tree holding
    'global_query'/'global_key'/'global_value' beside 'query'/'key'/'value'
    gets copies.

    Returns:
      A new parameter tree; the input is not modified.
    """
    if not hasattr(params, "items"):
        return params
    out = {name: copy_local_to_global(child) for name, child in params.items()}
    for global_name, local_name in _LOCAL_OF_GLOBAL.items():
        if global_name in out:
            if local_name not in out:
                raise ValueError(f"parameter tree has {global_name!r} but no {local_name!r} to copy")
            out[global_name] = jax.tree_util.tree_map(jnp.array, out[local_name])
    return out


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention whose pattern is the layer's attention config.

    Attributes:
      config: the model config (shapes, positions, dtypes, seed).
      layer: this layer's index (selects its attention config and seeds).
      causal: no query attends a later key.
      deterministic: disables dropout.
    """

    config: TransformerConfig
    layer: int
    causal: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, *, padding_mask=None, global_mask=None, step=None):
        """Attends x to itself.

        Args:
          x: `[batch, seq, d_model]`.
          padding_mask: optional bool `[batch, seq]`, True for real tokens.
          global_mask: optional bool `[batch, seq]`, True for global tokens
            (sliding-window and block-sparse layers; a dense layer already
            attends globally, so it ignores it).
          step: training step (int scalar), required by Performer layers that
            redraw their projection.

        Returns:
          `[batch, seq, d_model]` in the computation dtype.
        """
        cfg = self.config
        attention = cfg.attention[self.layer]
        dtype, param_dtype = cfg.compute_dtype, cfg.parameter_dtype
        heads, head_dim = cfg.num_heads, cfg.head_dim

        def projection(name):
            return nn.DenseGeneral(
                (heads, head_dim), dtype=dtype, param_dtype=param_dtype, name=name
            )

        x = x.astype(dtype)
        q, k, v = (projection(name)(x) for name in ("query", "key", "value"))
        seq = x.shape[1]
        positions = jnp.arange(seq)
        relative = None
        if cfg.native_relative(self.layer, global_tokens=global_mask is not None):
            q, relative = self._native_relative(q, attention)
            add_positions = lambda q, k, v: (q, k, v)
        else:
            add_positions = self._position_transform(positions)
            q, k, v = add_positions(q, k, v)

        global_qkv = None
        use_global_projections = (
            isinstance(attention, SlidingWindowAttention) and attention.global_projections
        )
        if use_global_projections and global_mask is not None:
            global_qkv = add_positions(*(projection(name)(x) for name in GLOBAL_PROJECTIONS))
        elif use_global_projections and self.is_initializing():
            # Create the global parameters even when init sees no global_mask.
            for name in GLOBAL_PROJECTIONS:
                projection(name)(x)

        out = self._attend(attention, q, k, v, padding_mask, global_mask, global_qkv, step, relative)
        out = out[..., :head_dim]
        out = nn.Dropout(rate=cfg.attention_dropout)(out, deterministic=self.deterministic)
        return nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype, name="out"
        )(out)

    def _txl_parameters(self):
        """Transformer-XL's content bias u, position bias v `[heads, head_dim]` and W_R `[d_model, heads, head_dim]`."""
        cfg = self.config
        init = nn.initializers.normal(0.02)
        shape = (cfg.num_heads, cfg.head_dim)
        content_bias = self.param("content_bias", init, shape, cfg.parameter_dtype)
        position_bias = self.param("position_bias", init, shape, cfg.parameter_dtype)
        relative_kernel = self.param(
            "relative_kernel",
            nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
            (cfg.d_model, cfg.num_heads, cfg.head_dim),
            cfg.parameter_dtype,
        )
        return content_bias, position_bias, relative_kernel

    def _native_relative(self, q, attention):
        """(q + u, the op's `RelativePositions`) for Transformer-XL positions computed in the op."""
        cfg = self.config
        content_bias, position_bias, relative_kernel = self._txl_parameters()
        seq = q.shape[1]
        if isinstance(attention, SlidingWindowAttention):
            spec = ops.arguments.parse_sliding_window(
                self._window(attention), attention.dilation, self.causal, cfg.num_heads
            )
            # Offsets i - j run from -after (keys after the query) to before; a causal window
            # attends no later key, so its negative offsets stay zero rows.
            widest = max(spec.dilation)
            before, after = min(seq - 1, widest * spec.left), min(seq - 1, widest * spec.right)
        else:
            before, after = seq - 1, 0 if self.causal else seq - 1
        embeddings = positions_lib.txl_relative_embeddings(
            relative_kernel, max_offset=max(before, after), first=-after, last=before
        )
        shift = lambda bias: (q.astype(jnp.float32) + bias.astype(jnp.float32)).astype(q.dtype)
        relative = ops.RelativePositions(shift(position_bias), embeddings.astype(q.dtype))
        return shift(content_bias), relative

    def _position_transform(self, positions):
        """A function (q, k, v) -> (q, k, v) applying the model's position scheme."""
        cfg = self.config
        if cfg.position == "txl_relative":
            content_bias, position_bias, relative_kernel = self._txl_parameters()

            def add(q, k, v):
                return positions_lib.txl_relative_qkv(
                    q, k, v,
                    content_bias=content_bias,
                    position_bias=position_bias,
                    relative_kernel=relative_kernel,
                    positions=positions,
                )

            return add
        if cfg.position == "rope":
            return lambda q, k, v: (
                positions_lib.rotary(q, positions), positions_lib.rotary(k, positions), v
            )
        # Learned absolute positions are added to the embeddings; 'none' has none.
        return lambda q, k, v: (q, k, v)

    def _window(self, attention: SlidingWindowAttention):
        """The layer's window; a causal layer keeps the left side of a (left, right) window."""
        if self.causal and isinstance(attention.window, tuple):
            return (attention.window[0], 0)
        return attention.window

    def _attend(self, attention, q, k, v, padding_mask, global_mask, global_qkv, step, relative):
        cfg = self.config
        # The score scale belongs to the content head_dim, not to the widened
        # features that relative positions add.
        scale = float(cfg.head_dim) ** -0.5
        if isinstance(attention, FullAttention):
            return _full_attention(q, k, v, attention.impl, self.causal, padding_mask, scale, relative)
        if isinstance(attention, SlidingWindowAttention):
            return ops.sliding_window_attention(
                q, k, v,
                window=self._window(attention),
                dilation=attention.dilation,
                causal=self.causal,
                global_mask=global_mask,
                global_qkv=global_qkv,
                padding_mask=padding_mask,
                scale=scale,
                max_global_tokens=attention.max_global_tokens,
                block_size=attention.block_size,
                impl=attention.impl,
                sequence_axis=cfg.sequence_axis,
                relative=relative,
            )
        if isinstance(attention, BlockSparseAttention):
            return ops.block_sparse_attention(
                q, k, v,
                block_size=attention.block_size,
                num_window_blocks=attention.num_window_blocks,
                global_blocks=attention.global_blocks,
                num_random_blocks=attention.num_random_blocks,
                seed=layer_seed(cfg.seed, self.layer),
                global_mask=global_mask,
                padding_mask=padding_mask,
                causal=self.causal,
                scale=scale,
                max_global_tokens=attention.max_global_tokens,
                impl=attention.impl,
                sequence_axis=cfg.sequence_axis,
                relative=relative,
            )
        if isinstance(attention, PerformerAttention):
            if global_mask is not None:
                raise ValueError(
                    f"layer {self.layer}: performer attention has no global tokens; pass global_mask=None"
                )
            if attention.redraw_interval is not None and step is None:
                raise ValueError(
                    f"layer {self.layer}: performer attention with redraw_interval="
                    f"{attention.redraw_interval} needs the training step (step=...)"
                )
            projection = performer_projection(cfg.seed, self.layer, step, attention, q.shape[-1])
            return ops.favor_attention(
                q, k, v,
                projection=projection,
                feature_map=attention.feature_map,
                causal=self.causal,
                padding_mask=padding_mask,
                scale=scale,
                chunk_size=attention.chunk_size,
                impl=attention.impl,
                sequence_axis=cfg.sequence_axis,
            )
        raise TypeError(f"unknown attention config {attention!r}")


def _full_attention(q, k, v, impl, causal, padding_mask, scale, relative):
    """Dense attention with the sparse ops' conventions: padded keys ignored, padded rows zero.

    relative: None or `RelativePositions`, whose dense `[batch, heads, seq, seq]` term
    enters as a score bias (dense attention is quadratic anyway).
    """
    if impl == "reference":
        seq = q.shape[1]
        mask = jnp.ones((1, 1, seq, seq), bool)
        if causal:
            mask = mask & ops.masks.causal_mask(seq)[None, None]
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, None, :] & padding_mask[:, None, :, None]
        return ops.dense_attention(q, k, v, mask, scale=scale, relative=relative)
    key_mask = None if padding_mask is None else padding_mask[:, None, None, :]
    bias = None
    if relative is not None:
        bias = (ops.relative.dense_scores(relative, q.shape[1]) * scale).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=key_mask, is_causal=causal, scale=scale, implementation=impl
    )
    if padding_mask is not None:
        out = jnp.where(padding_mask[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
