"""safetensors, torch's zip pickles and checkpoint directories, read and written without torch."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from longjax.hf import checkpoint_files, read_safetensors, read_torch_state_dict, write_safetensors
from tests.hf.fixture_paths import HF, copy_checkpoint

ALL_DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8,
              np.uint8, np.bool_]


def test_safetensors_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": (rng.normal(size=(3, 5)) * 10).astype(d) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = np.array(1.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    back, metadata = read_safetensors(tmp_path / "a.safetensors")
    assert metadata == {"format": "pt"}
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)
    # The data section starts 8-byte aligned, as the reference writer leaves it.
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0


def test_reads_bfloat16_written_by_torch():
    """The bf16 checkpoint holds exactly the bf16 rounding of the recorded float32 model's weights."""
    tensors, _ = read_safetensors(HF / "roberta_base_bf16" / "model.safetensors")
    assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
    table = tensors["embeddings.word_embeddings.weight"].astype(np.float32)
    assert table.shape == (320, 32) and np.isfinite(table).all() and np.abs(table).max() > 0.1


def _write_raw(path, header: dict, data: bytes):
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, "'w'.*data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "'w'.*data_offsets"),
        ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "'w' has dtype 'C64'"),
        ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "'w' lacks \\['data_offsets'\\]"),
    ],
)
def test_safetensors_errors_name_file_and_tensor(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(ValueError, match=match) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_safetensors_not_json_or_truncated(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(ValueError, match="short.safetensors: not a safetensors file"):
        read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 3) + b"{{{")
    with pytest.raises(ValueError, match="junk.safetensors: safetensors header is not JSON"):
        read_safetensors(tmp_path / "junk.safetensors")


def test_torch_zip_pickle_layouts():
    """Transposed, offset, shared-storage, every dtype, scalar and empty tensors read as torch wrote them."""
    tensors = read_torch_state_dict(HF / "torch_pickle" / "layouts.bin")
    with np.load(HF / "torch_pickle" / "layouts_expected.npz") as expected:
        assert set(tensors) == set(expected.files)
        for name in expected.files:
            want = expected[name]
            got = tensors[name]
            if name == "bfloat16":
                assert got.dtype == ml_dtypes.bfloat16
                got = got.astype(np.float32)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)
    tensors["tied_a"][0, 0] = 99.0  # copies, not views of one storage
    assert tensors["tied_b"][0, 0] != 99.0


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


def test_torch_pickle_refuses_other_globals(tmp_path):
    path = tmp_path / "evil.bin"
    # Protocol-0 pickle of os.system("echo pwned"): must be refused before anything runs.
    _zip_with_pickle(path, b"cos\nsystem\n(S'echo pwned > " + str(tmp_path / "ran").encode() + b"'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global os.system") as info:
        read_torch_state_dict(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "ran").exists()


def test_torch_pickle_errors(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="legacy.bin: not a zip-format torch checkpoint"):
        read_torch_state_dict(legacy)
    not_dict = tmp_path / "list.bin"
    _zip_with_pickle(not_dict, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="list.bin: expected a state dict"):
        read_torch_state_dict(not_dict)
    no_tensor = tmp_path / "int.bin"
    _zip_with_pickle(no_tensor, pickle.dumps({"step": 3}, protocol=2))
    with pytest.raises(ValueError, match="int.bin: entry 'step' is a int, expected a tensor"):
        read_torch_state_dict(no_tensor)
    big = tmp_path / "big.bin"
    with zipfile.ZipFile(big, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/byteorder", "big")
    with pytest.raises(ValueError, match="big-endian"):
        read_torch_state_dict(big)


def test_checkpoint_directory_preference_and_shards(tmp_path):
    sharded, source = checkpoint_files.read_checkpoint_tensors(HF / "longformer_mlm")
    assert source.name == "model.safetensors.index.json"
    index = json.loads(source.read_text())
    assert len(set(index["weight_map"].values())) == 3 and set(sharded) == set(index["weight_map"])
    # Written back sharded, it reads the same and has Hugging Face's index layout.
    written = checkpoint_files.write_checkpoint_tensors(tmp_path / "out", sharded, max_shard_bytes=60_000)
    assert written[-1].name == "model.safetensors.index.json" and len(written) > 2
    again, _ = checkpoint_files.read_checkpoint_tensors(tmp_path / "out")
    assert set(again) == set(sharded)
    for name in sharded:
        np.testing.assert_array_equal(again[name], sharded[name])
    new_index = json.loads(written[-1].read_text())
    assert new_index["metadata"]["total_size"] == sum(t.nbytes for t in sharded.values())
    for f in written[:-1]:
        assert read_safetensors(f)[1] == {"format": "pt"}
    # safetensors is preferred over pytorch_model.bin in the same directory.
    both = copy_checkpoint("roberta_cls_bin", tmp_path)
    from_bin, source = checkpoint_files.read_checkpoint_tensors(both)
    assert source.name == "pytorch_model.bin"
    write_safetensors(both / "model.safetensors", {"only": np.zeros(1, np.float32)})
    preferred, source = checkpoint_files.read_checkpoint_tensors(both)
    assert source.name == "model.safetensors" and set(preferred) == {"only"}


def test_checkpoint_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file; expected one of"):
        checkpoint_files.read_checkpoint_tensors(tmp_path)
    lost = copy_checkpoint("longformer_mlm", tmp_path)
    (lost / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard 'model-00002-of-00003.safetensors'"):
        checkpoint_files.read_checkpoint_tensors(lost)
