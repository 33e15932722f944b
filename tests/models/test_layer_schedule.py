"""The Longformer recipe's per-layer windows and dilations."""

import pytest

from longjax.models import layer_schedule


def test_geometric_windows_run_from_bottom_to_top_at_a_constant_ratio():
    windows = layer_schedule.geometric_windows(12, bottom=32, top=8192)
    assert windows[0] == 32 and windows[-1] == 8192 and len(windows) == 12
    ratios = [b / a for a, b in zip(windows, windows[1:])]
    assert max(ratios) - min(ratios) < 0.02  # constant up to rounding to ints
    assert layer_schedule.geometric_windows(1, bottom=16, top=64) == (16,)


def test_dilate_last_heads_dilates_only_the_named_layers_last_heads():
    dilations = layer_schedule.dilate_last_heads(4, 4, heads=2, dilations={1: 2, 3: 4})
    assert dilations == (1, (1, 1, 2, 2), 1, (1, 1, 4, 4))


@pytest.mark.parametrize("call, message", [
    (lambda: layer_schedule.geometric_windows(0, bottom=32, top=64), "num_layers >= 1"),
    (lambda: layer_schedule.geometric_windows(3, bottom=64, top=32), "bottom <= top"),
    (lambda: layer_schedule.dilate_last_heads(4, 4, heads=5, dilations={}), r"heads must be in \[1, num_heads=4\]"),
    (lambda: layer_schedule.dilate_last_heads(4, 4, heads=2, dilations={4: 2}), r"layers in \[0, 4\)"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
