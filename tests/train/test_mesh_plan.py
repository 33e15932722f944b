"""The mesh section: its shape on a device count, what the plan makes of `mesh.sequence`, the FSDP rule."""

import ml_collections
import pytest
from jax.sharding import PartitionSpec

from longjax import run
from longjax.run.setup import fsdp_spec
from longjax.run.plan import MeshSection
from tests.train import tiny_config


def _config(**mesh):
    config = tiny_config.get_config()
    config.mesh.update(mesh)
    return config


def test_the_axes_multiply_to_the_device_count():
    assert MeshSection(data=-1, fsdp=2, sequence=2).shape(8) == (2, 2, 2)
    assert MeshSection().shape(4) == (4, 1, 1)
    assert MeshSection(data=1, fsdp=2, sequence=4).shape(8) == (1, 2, 4)
    with pytest.raises(ValueError, match=r"mesh.data \(2\) x mesh.fsdp \(2\) x mesh.sequence \(1\) must be the number of devices \(8\)"):
        MeshSection(data=2, fsdp=2).shape(8)
    with pytest.raises(ValueError, match=r"mesh.data \(-1\) x mesh.fsdp \(3\)"):
        MeshSection(fsdp=3).shape(8)


def test_a_sequence_axis_reaches_every_phase_model():
    plan = run.parse(_config(sequence=2))
    assert [p.model.sequence_axis for p in plan.phases] == ["sequence", "sequence"]
    assert [p.model.sequence_axis for p in run.parse(_config()).phases] == [None, None]


def test_a_length_the_sequence_axis_does_not_divide_is_refused():
    with pytest.raises(run.ConfigError, match=r"phases.seq_len\[0\] \(16\) must be a multiple of mesh.sequence \(3\)"):
        run.parse(_config(sequence=3))


def test_the_evaluation_length_must_shard_too():
    config = _config(sequence=2)
    config.eval.seq_len = 33
    with pytest.raises(run.ConfigError, match=r"eval.seq_len \(33\) must be a multiple of mesh.sequence \(2\)"):
        run.parse(config)


def test_block_sparse_lengths_must_be_whole_blocks_per_shard():
    config = _config(sequence=2)
    config.model.attention = ml_collections.ConfigDict(dict(type="block_sparse", block_size=4))
    del config.model["attention_per_layer"]
    config.phases.update(dict(seq_len=(16, 36), window_scale=(1, 1)))
    with pytest.raises(run.ConfigError, match=r"phases.seq_len\[1\] \(36\) must be a multiple of "
                                              r"mesh.sequence \(2\) x the block-sparse block_size \(4\)"):
        run.parse(config)
    config.phases.seq_len = (16, 32)
    assert [p.model.sequence_axis for p in run.parse(config).phases] == ["sequence", "sequence"]


def test_layers_that_do_not_shard_the_sequence_are_named():
    config = _config(sequence=2)
    config.model.attention = ml_collections.ConfigDict(dict(type="full"))
    del config.model["attention_per_layer"]
    config.phases.window_scale = (1, 1)
    with pytest.raises(run.ConfigError, match=r"mesh.sequence \(2\).*layer 0: FullAttention\(impl=None\)"):
        run.parse(config)
    config = _config(sequence=2)
    config.model.attention.impl = "reference"
    with pytest.raises(run.ConfigError, match=r"layer 0: SlidingWindowAttention\(impl='reference'\)"):
        run.parse(config)


def test_the_sequence_axis_is_not_an_experiment_field():
    config = _config()
    config.model.sequence_axis = "sequence"
    with pytest.raises(run.ConfigError, match=r"model: unknown field\(s\) \['sequence_axis'\]"):
        run.parse(config)


def test_an_explicit_coordinator_needs_all_three_settings():
    with pytest.raises(run.ConfigError, match="mesh.coordinator_address"):
        run.parse(_config(distributed=True, coordinator_address="localhost:1234"))
    with pytest.raises(run.ConfigError, match=r"mesh.process_id.*in \[0, mesh.num_processes = 2\)"):
        run.parse(_config(distributed=True, coordinator_address="localhost:1234", num_processes=2, process_id=2))
    run.parse(_config(distributed=True, coordinator_address="localhost:1234", num_processes=2, process_id=1))


@pytest.mark.parametrize(
    "shape, fsdp, spec",
    [
        ((512, 2048), 4, PartitionSpec(None, "fsdp")),  # the largest dimension
        ((2048, 512), 4, PartitionSpec("fsdp")),
        ((6, 512), 4, PartitionSpec(None, "fsdp")),
        ((512, 8, 64), 4, PartitionSpec("fsdp")),
        ((64, 64), 2, PartitionSpec(None, "fsdp")),  # equals: the last
        ((3, 5), 2, PartitionSpec()),  # nothing divides: replicated
        ((), 2, PartitionSpec()),  # scalars (the step, Adam's count)
        ((512, 2048), 1, PartitionSpec()),  # no fsdp axis
    ],
)
def test_fsdp_splits_the_largest_dimension_it_divides(shape, fsdp, spec):
    assert fsdp_spec(shape, fsdp) == spec
