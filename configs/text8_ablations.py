"""The Longformer paper's Table 4 ablations on text8: window sizes across layers, and dilation.

Longformer (Beltagy et al., 2020), section 4.2.2 and Table 4: the small model
(`text8_small.py`) trained for 150K steps with the phase-1 configuration only
(length 2,048, batch 32, learning rate 2.5e-4), dev BPC reported. The variant
is the config argument:

    python -m longjax.train --config=configs/text8_ablations.py:increasing --workdir=runs/text8_ablations/increasing

    variant       windows, bottom layer to top          dilation                      paper's dev BPC
    decreasing    512 down to 32                        none                          1.24
    fixed         230 on every layer                    none                          1.23
    increasing    32 up to 512                          none                          1.21
    no_dilation   the same config as increasing         none                          1.21
    dilation      32 up to 512                          2 heads of the top 6 layers   1.20

`experiments/longformer_ablations.py` runs them and prints the table. Append
`,smoke` (`:fixed,smoke`) for the same schedules on a tiny model (the demo's
3 layers, narrower, RoPE, the dense reference op; windows 4 up to 64, length
128) trained 20 steps on the embedded corpus: what the tests run.

What the paper leaves open, and what this file assumes:

* The per-layer windows. Table 4 gives the ends (32, 512) and says the fixed
  window, 230, is "the average of window sizes of the other configuration",
  so that all three cost the same. A linear ramp from 32 to 512 would average
  272 and a geometric one 182; we take w(l) = 32 + 480 * (l / 11) ** p with p
  (about 1.48) solved so that the mean is 230, rounded to integers:
  32 46 71 102 140 182 228 278 332 389 449 512 (mean 230.1). Decreasing is the
  same list reversed.
* Phase-1 windows of 32 to 512 are Table 4's. Table 12's "32 (bottom layer) -
  8,192 (top layer)" for phase 1 cannot be (the length is 2,048); with the
  window doubling in each of 4 later phases, 32-512 in phase 1 gives 512-8,192
  in phase 5, which matches Table 12's phase-5 bottom window of 512.
* The table's top half is without dilation: its increasing row and "No
  Dilation" are both 1.21, one run.
* "Dilation on 2 heads" is the recipe's (Appendix B, Table 12: d = 1, 2, 3 on
  2 heads of layers 6-7, 8-9, 10-11; longjax's dilation is d + 1), on the
  increasing windows. Which 2 heads does not matter (heads are exchangeable at
  initialisation); we take the last 2, as `enwik8_small.py` does.
* Everything else is the small recipe's phase 1 (`enwik8_small.py`), the
  warmup included (10% of 150K capped at 10K: 10K steps). Dev BPC uses the
  recipe's evaluation (windows of 32,256 characters advancing 512) on text8's
  5M-character validation split.
"""

from configs import demo, enwik8_small, text8_small
from longjax.models import layer_schedule

VARIANTS = ("decreasing", "fixed", "increasing", "no_dilation", "dilation")
# The paper's windows (Table 4): the bottom and top of the increasing ramp, and its mean (the fixed window).
PAPER_WINDOWS = dict(first=32, last=512, mean=230)
# The smoke model's windows: the paper's divided by 8, so the schedules keep their shape.
SMOKE_WINDOWS = dict(first=4, last=64, mean=230 / 8)
# The recipe's dilation by layer of the 12-layer model (Appendix B; longjax's d + 1), on 2 heads.
PAPER_DILATION = {6: 2, 7: 2, 8: 3, 9: 3, 10: 4, 11: 4}
DILATED_HEADS = 2


def get_config(arg: str | None = None):
    """`arg`: a variant of `VARIANTS` (default 'increasing'), optionally followed by ',smoke'."""
    variant, smoke = parse_arg(arg)
    if smoke:
        config = demo.get_config()  # 3 layers, 4 heads, 128 wide, on the embedded pydoc topics
        windows = SMOKE_WINDOWS
    else:
        config = text8_small.get_config()  # 12 layers, 8 heads, 512 wide, on text8
        windows = PAPER_WINDOWS
    model = config.model
    num_layers, num_heads = model.num_layers, model.num_heads
    # Per layer, bottom to top: the variant's windows, and dilation only on the 'dilation' variant.
    model.attention_per_layer.window = layer_windows(variant, num_layers, **windows)
    model.attention_per_layer.dilation = (
        upper_layer_dilation(num_layers, num_heads) if variant == "dilation" else (1,) * num_layers
    )

    # One phase: the recipe's first (Table 4: "150K steps on phase1").
    recipe = enwik8_small.get_config().phases
    config.phases.seq_len = recipe.seq_len[:1]  # 2,048
    config.phases.batch_size = recipe.batch_size[:1]  # 32
    config.phases.steps = (150_000,)  # experiments/longformer_ablations.py --scale trains a fraction of it
    config.phases.learning_rate = recipe.learning_rate[:1]  # 2.5e-4, constant after the warmup
    config.phases.window_scale = (1,)  # the windows above, as they are
    if smoke:
        shrink_for_smoke(config)
    return config


def shrink_for_smoke(config) -> None:
    """The ',smoke' settings on the demo config: seconds per variant on a CPU, the schedules unchanged."""
    config.model.position = "rope"  # not what the ablation varies, and compiles in about half TXL's time
    config.model.d_model = 64  # half the demo's width: the steps and the evaluation cost less
    config.model.d_ff = 256
    config.model.attention.impl = "reference"  # the dense masked oracle: the same masks, the fastest to compile here
    config.phases.seq_len = (128,)  # the demo's phase 1
    config.phases.batch_size = (8,)
    config.phases.steps = (20,)
    config.phases.learning_rate = (2e-3,)  # the demo's phase 1
    config.optimizer.max_warmup_steps = 2  # of the 20 steps
    config.eval.seq_len = 128  # windows of the training length ...
    config.eval.step = 64  # ... advancing 64, each scoring its last 64
    config.eval.max_chars = 4096  # the first 4,096 validation characters
    config.checkpoint.every_steps = 1_000  # only at the end (and on SIGTERM)
    config.log_every_steps = 10


def parse_arg(arg: str | None) -> tuple[str, bool]:
    """('variant', smoke) of a config argument 'variant' or 'variant,smoke'."""
    parts = [p.strip() for p in (arg or "increasing").split(",")]
    variant, options = parts[0], parts[1:]
    if variant not in VARIANTS or options not in ([], ["smoke"]):
        raise ValueError(
            f"configs/text8_ablations.py: the config argument must be one of {list(VARIANTS)}, "
            f"optionally followed by ',smoke'; got {arg!r}"
        )
    return variant, bool(options)


def layer_windows(variant: str, num_layers: int, *, first: int, last: int, mean: float) -> tuple[int, ...]:
    """The variant's window per layer, bottom to top: a ramp from `first` to `last` averaging `mean`, or its reverse, or its mean."""
    ramp = increasing_windows(num_layers, first=first, last=last, mean=mean)
    if variant == "decreasing":
        return ramp[::-1]
    if variant == "fixed":
        return (round(mean),) * num_layers
    return ramp


def increasing_windows(num_layers: int, *, first: int, last: int, mean: float) -> tuple[int, ...]:
    """first + (last - first) * (l / (num_layers - 1)) ** p for layer l, rounded, with p such that the mean is `mean`.

    The mean falls as p grows (p = 1 is linear, the mean halfway), so p is
    found by bisection; `mean` must lie strictly between `first` and the
    halfway point (`first` < `mean` < (first + last) / 2 gives p > 1).
    """
    if num_layers < 2 or not first < mean < last:
        raise ValueError(f"need num_layers >= 2 and first < mean < last, got {num_layers}, {first}, {mean}, {last}")
    fractions = [layer / (num_layers - 1) for layer in range(num_layers)]

    def ramp_mean(p):
        return sum(first + (last - first) * f**p for f in fractions) / num_layers

    low, high = 1e-3, 1e3  # ramp_mean(low) > mean > ramp_mean(high) for any mean strictly inside (first, last)
    for _ in range(200):
        p = (low * high) ** 0.5
        low, high = (p, high) if ramp_mean(p) > mean else (low, p)
    return tuple(int(round(first + (last - first) * f**p)) for f in fractions)


def upper_layer_dilation(num_layers: int, num_heads: int) -> tuple:
    """The recipe's dilation on the last 2 heads; layer l takes that of the 12-layer model's layer at the same depth."""
    depth = {layer: round(layer * 11 / (num_layers - 1)) for layer in range(num_layers)}
    dilations = {layer: PAPER_DILATION[d] for layer, d in depth.items() if d in PAPER_DILATION}
    return layer_schedule.dilate_last_heads(num_layers, num_heads, heads=DILATED_HEADS, dilations=dilations)
