"""The enwik8 small LM sized for one Colab TPU chip (v5e-1 or v6e-1): bfloat16, the Pallas kernels, two short phases.

The model is `enwik8_small.py`'s unchanged (12 layers, d_model 512, 8 heads,
TXL relative positions, the recipe's windows from 32 to 8,192, clipped to
the sequence, and dilated heads), computed in bfloat16 with float32 parameters, and its sliding-window
layers run the Pallas kernels (`impl='pallas'`: Mosaic on TPU). What changes
is how long it trains and on how much at once, for a session of about half an
hour on one chip. The sizes are estimates from the shapes below, not
measurements: no TPU has run this config yet.

* Relative positions stay, as head features (`model.relative_positions='features'`).
  The Mosaic kernels can compute the term themselves (`'native'`: a float32 banded
  bias, `[batch, seq, heads, left + right + 1]` rounded up to whole lanes, per
  layer), but the recipe's top windows, clipped to the sequence, make that
  bias 16 x 2,048 x 8 x 2,176 x 4 bytes = 2.3 GB a layer in phase 1 and
  4.4 GB in phase 2 (with its by-key copy and gradient, three such arrays in a
  layer's backward pass): more than this chip's 16 GB allows beside the rest.
  The features widen every head from 64 to 64 + 512 = 576
  query/key features (`longjax/models/positions.py`) instead. The TPU kernels take
  that width: the forward and gradient programs of phases 1 and 2 lower for
  TPU from a CPU host, each kernel's VMEM footprint at most 2.7 MiB of a v5e's
  16 MiB scoped limit. The GPU (Triton) kernels take heads of at most 256 features
  and refuse the 576-wide ones (NotImplementedError naming the width): on a GPU run
  it with `--config.model.relative_positions=native` (the same model, its position
  term computed in the Triton kernels on 64-wide heads; the banded bias is
  recomputed in the backward pass, so a layer holds it only while it runs).
* One device only for Pallas. The run's data-parallel step is partitioned by
  the compiler, and JAX refuses to partition a Mosaic kernel ("Mosaic kernels
  cannot be automatically partitioned"), so on a multi-device runtime such as
  Colab's v2-8 (8 TPU v2 cores, on which Pallas's TPU kernels are not known
  to run either) pass `--config.model.attention.impl=xla`.
* Memory (v5e-1: 16 GB of HBM). Without remat, each layer keeps its
  576-wide q, k and v for the backward pass, 16 x 2,048 x 8 x 576 x 2 bytes =
  0.3 GB each, with the MLP's activations about 1.5 GB a layer, 18 GB for
  12: more than the chip. With `remat` a layer keeps only its input
  (16 x 2,048 x 512 float32 = 67 MB) and recomputes the rest once, for a
  third more compute; parameters and AdamW state are 0.7 GB.
* Batch and length. Phase 1: 16 sequences of 2,048 characters, 32,768 per step
  (the paper: 32 x 2,048); phase 2 doubles the length and every window and
  halves the batch, so a step holds as many characters and the widest
  activations stay the same size. A phase-1 step is about 0.8 GFLOP per
  character with remat (the 576-wide attention more than half of it), some
  26 TFLOP a step: about 0.45 s on a v5e chip (197 bf16 TFLOP/s) at 30% of its
  peak; phase 2's doubled windows make it about 0.7 s. Phases of 2,000 and 500
  steps then take roughly 20 minutes, 25 with evaluations. Both batches
  are multiples of 8, so they also split over a v2-8's cores (with impl='xla').
* Learning rates are the recipe's first two (2.5e-4, 1.25e-4), with warmup
  10% of each phase. 2,500 steps are 0.6% of the recipe's first phase: expect
  a test BPC well above the paper's 1.00.
* Evaluation: the Transformer-XL protocol with 8,192-character windows
  advancing 512 (the paper: 32,256), each scored character seeing up to
  7,680 to its left, more than the widest trained window (4,096); the whole
  test split is ~10,000 windows, so `longjax.evaluate --limit` samples it.
  During training, validation BPC on its first 100,000 characters every 500
  steps.

Data: enwik8, downloaded by the run from mattmahoney.net when missing (see the
README); `--config.data.dir` points at a copy instead.
"""

from configs import enwik8_small


def get_config():
    config = enwik8_small.get_config()
    config.model.dtype = "bfloat16"  # MXU-native computation; parameters, LayerNorm, softmax and loss stay float32
    config.model.remat = True  # recompute each block in the backward pass: 576-wide q, k, v do not all fit 16 GB
    config.model.attention.impl = "pallas"  # the Mosaic kernels; 'xla' on GPU (576-wide heads) or several devices
    config.model.relative_positions = "features"  # 'native' would hold GB-sized banded biases (docstring)
    config.phases.seq_len = (2048, 4096)
    config.phases.batch_size = (16, 8)  # 32,768 characters a step in both phases; multiples of 8 (a v2-8's cores)
    config.phases.steps = (2000, 500)  # about 25 minutes on one v5e chip (an estimate; see the docstring)
    config.phases.learning_rate = (2.5e-4, 1.25e-4)  # the recipe's first two phases
    config.phases.window_scale = (1, 2)  # phase 2 doubles every window, as the recipe
    config.eval.seq_len = 8192  # Transformer-XL protocol, shortened: windows of 8,192 characters ...
    config.eval.step = 512  # ... advancing 512, each scoring its last 512
    config.eval.batch_size = 8  # windows per evaluation call (a multiple of 8: splits over a v2-8 too)
    config.eval.every_steps = 500  # validation BPC during training, and at each phase's end
    config.eval.max_chars = 100_000  # validation characters scored then
    config.checkpoint.every_steps = 500
    config.log_every_steps = 50
    return config
