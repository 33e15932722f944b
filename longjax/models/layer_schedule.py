"""Per-layer attention settings of the Longformer recipe, for configs' `attention_per_layer` lists."""

from __future__ import annotations

from collections.abc import Mapping


def geometric_windows(num_layers: int, *, bottom: int, top: int) -> tuple[int, ...]:
    """Windows growing geometrically from `bottom` (layer 0) to `top` (the last layer), rounded.

    The Longformer paper gives the two ends ("small windows for the lower
    layers, increasing in the higher ones"); a constant ratio per layer is our
    reading of the rest.
    """
    if num_layers < 1 or bottom < 1 or top < bottom:
        raise ValueError(f"need num_layers >= 1 and 1 <= bottom <= top, got {num_layers}, {bottom}, {top}")
    ratio = (top / bottom) ** (1.0 / max(num_layers - 1, 1))
    return tuple(int(round(bottom * ratio**layer)) for layer in range(num_layers))


def dilate_last_heads(num_layers: int, num_heads: int, *, heads: int, dilations: Mapping[int, int]) -> tuple:
    """Per layer: 1 (undilated), or for the layers in `dilations` a per-head tuple dilating the last `heads` heads.

    Args:
      num_layers, num_heads: the model's shape.
      heads: how many heads (the last ones) of a dilated layer are dilated.
      dilations: layer index -> the dilation of those heads (longjax's: 1 is
        an undilated window, so the paper's dilation d is d + 1 here).
    """
    if not 1 <= heads <= num_heads:
        raise ValueError(f"heads must be in [1, num_heads={num_heads}], got {heads}")
    if any(not 0 <= layer < num_layers for layer in dilations):
        raise ValueError(f"dilations must name layers in [0, {num_layers}), got {sorted(dilations)}")
    return tuple(
        (1,) * (num_heads - heads) + (dilations[layer],) * heads if layer in dilations else 1
        for layer in range(num_layers)
    )
