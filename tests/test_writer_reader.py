"""The streaming shard writer, the validating safetensors reader, model references and atomic output.

Files written by fusekit are read back with the ``safetensors`` library itself, and files written by
``safetensors`` are read with fusekit's reader, so each side is checked against an independent
implementation of the format.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import load_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusekit.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    OutputExistsError,
    TensorMismatchError,
)
from fusekit.io.files import PARTIAL_MARKER
from fusekit.io.layout import TensorSpec
from fusekit.io.reader import CheckpointReader, read_safetensors_header
from fusekit.io.refs import resolve_model
from fusekit.io.writer import ShardWriter, atomic_output


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.float32": torch.randn(5, 3, generator=gen),
        "b.bfloat16": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "c.float16": torch.randn(7, generator=gen).to(torch.float16),
        "d.float64": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "e.int64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "f.empty": torch.zeros(0, 4),
        "g.int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "h.bool": torch.tensor([True, False, True]),
        "i.scalar": torch.tensor(2.5),
        "j.uint8": torch.tensor([0, 255, 7], dtype=torch.uint8),
    }


def specs_for(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


# -- ShardWriter -------------------------------------------------------------------------------------


def test_single_shard_round_trips_through_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    writer = ShardWriter(tmp_path, specs_for(tensors), max_shard_bytes=None)
    for name in reversed(list(tensors)):  # written in the opposite order to the layout
        writer.write(name, tensors[name])
    files = writer.finish()
    assert files == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no index for one shard
    assert_same_tensors(load_file(tmp_path / "model.safetensors"), tensors)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.metadata()["format"] == "pt"  # transformers checks this


def test_sharded_output_names_index_and_contents(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10, generator=gen) for i in range(5)}  # 400 B each
    tensors["ids"] = torch.arange(6, dtype=torch.int64)
    tensors["half"] = torch.randn(8, generator=gen).to(torch.bfloat16)
    order = ["half", "layer.3.weight", "ids", "layer.0.weight", "layer.4.weight", "layer.2.weight",
             "layer.1.weight"]
    writer = ShardWriter(tmp_path, specs_for(tensors), max_shard_bytes=900,
                         index_metadata={"tool": "test"})
    for name in order:
        writer.write(name, tensors[name])
    files = writer.finish()
    count = len(files)
    assert count == 3  # 400+400 | 400+400 | 400+48+16
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.safetensors"
                                       for i in range(1, count + 1)]
    assert sorted(tmp_path.glob("*.safetensors")) == files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["tool"] == "test"
    assert sorted(index["weight_map"]) == sorted(tensors)
    read: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_file(file)
        assert set(part) == {n for n, f in index["weight_map"].items() if f == file.name}
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 900
        read.update(part)
    assert_same_tensors(read, tensors)


def test_tensor_larger_than_the_shard_limit_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {"small": torch.ones(2), "big": torch.arange(100, dtype=torch.float32), "tail": torch.zeros(3)}
    writer = ShardWriter(tmp_path, specs_for(tensors), max_shard_bytes=64)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    files = writer.finish()
    assert [sorted(load_file(f)) for f in files] == [["small"], ["big"], ["tail"]]
    assert_same_tensors(load_weights(tmp_path), tensors)


def test_writer_accepts_non_contiguous_tensors(tmp_path: Path) -> None:
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    writer = ShardWriter(tmp_path, [TensorSpec("t", (4, 3), torch.float32)], max_shard_bytes=None)
    writer.write("t", source.t())
    writer.finish()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], source.t().contiguous())


def test_writer_rejects_unplanned_shapes_and_missing_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("x", (2, 2), torch.float32), TensorSpec("y", (3,), torch.float32)]
    writer = ShardWriter(tmp_path, specs, max_shard_bytes=None)
    with pytest.raises(RuntimeError, match="x"):
        writer.write("x", torch.zeros(4))
    with pytest.raises(RuntimeError, match="x"):
        writer.write("x", torch.zeros(2, 2, dtype=torch.float64))
    writer.write("x", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="written") as caught:
        writer.finish()
    assert "y" in str(caught.value)
    writer.close()


def test_writer_accepts_row_blocks_in_any_order(tmp_path: Path) -> None:
    tensor = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    other = torch.arange(4, dtype=torch.int64)
    writer = ShardWriter(tmp_path, specs_for({"t": tensor, "o": other}), max_shard_bytes=None)
    writer.write("t", tensor[6:10], first_row=6)
    writer.write("o", other)
    writer.write("t", tensor[0:2], first_row=0)
    with pytest.raises(RuntimeError, match="written"):
        writer.finish()  # rows 2..6 are still missing
    writer.write("t", tensor[2:6], first_row=2)
    writer.finish()
    assert_same_tensors(load_file(tmp_path / "model.safetensors"), {"t": tensor, "o": other})


# -- read_safetensors_header -------------------------------------------------------------------------


def craft(path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_header_of_a_valid_file(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt", "note": "x"})
    infos, metadata = read_safetensors_header(tmp_path / "ok.safetensors")
    assert metadata == {"format": "pt", "note": "x"}
    assert sorted(infos) == sorted(tensors)
    for name, tensor in tensors.items():
        assert infos[name].shape == tuple(tensor.shape)
        assert infos[name].dtype == tensor.dtype
        assert infos[name].nbytes == tensor.numel() * tensor.element_size()


def _valid_file(path: Path) -> Path:
    save_file({"w": torch.arange(8, dtype=torch.float32)}, path)
    return path


@pytest.mark.parametrize("case", ["empty", "short_prefix", "header_longer_than_file", "huge_header_length",
                                  "invalid_json", "not_an_object", "offsets_past_end", "truncated_data",
                                  "byte_count_mismatch", "reversed_offsets", "unknown_dtype",
                                  "negative_shape", "entry_not_object"])
def test_corrupt_headers_are_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    f32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if case == "empty":
        path.write_bytes(b"")
    elif case == "short_prefix":
        path.write_bytes(b"\x10\x00\x00")
    elif case == "header_longer_than_file":
        craft(path, {"w": f32}, b"\0" * 16, length=10_000)
    elif case == "huge_header_length":
        craft(path, {"w": f32}, b"\0" * 16, length=2**63)
    elif case == "invalid_json":
        craft(path, b'{"w": {"dtype": "F32", ', b"\0" * 16)
    elif case == "not_an_object":
        craft(path, b"[1, 2, 3]", b"\0" * 16)
    elif case == "offsets_past_end":
        craft(path, {"w": f32}, b"\0" * 8)
    elif case == "truncated_data":
        _valid_file(path)
        path.write_bytes(path.read_bytes()[:-4])
    elif case == "byte_count_mismatch":
        craft(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "reversed_offsets":
        craft(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16)
    elif case == "unknown_dtype":
        craft(path, {"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "negative_shape":
        craft(path, {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "entry_not_object":
        craft(path, {"w": [0, 16]}, b"\0" * 16)
    with pytest.raises(CheckpointError) as caught:
        read_safetensors_header(path)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message


def test_crafted_valid_header_is_accepted(tmp_path: Path) -> None:
    # the same helper as the corrupt cases, with a consistent header, reads fine (the cases above fail
    # for the reason they name, not because the helper writes broken files)
    data = struct.pack("<4f", 1.0, -2.0, 0.5, 8.0)
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = craft(tmp_path / "ok.safetensors", header, data)
    assert torch.equal(load_file(path)["w"], torch.tensor([[1.0, -2.0], [0.5, 8.0]]))
    infos, _ = read_safetensors_header(path)
    assert infos["w"].shape == (2, 2)


# -- CheckpointReader --------------------------------------------------------------------------------


def test_reader_returns_what_safetensors_loads(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = sample_tensors()
    save_file(tensors, folder / "model.safetensors")
    expected = load_file(folder / "model.safetensors")
    with CheckpointReader(resolve_model(str(folder))) as reader:
        assert sorted(reader.names()) == sorted(expected)
        got = {name: reader.get(name) for name in reversed(sorted(expected))}
        again = reader.get("a.float32")
        rows = reader.get("e.int64", rows=(1, 3))
    assert torch.equal(rows, expected["e.int64"][1:3])
    assert_same_tensors(got, expected)
    assert torch.equal(again, expected["a.float32"])


def test_reader_over_sharded_checkpoint(sharded_models: dict[str, Path]) -> None:
    folder = sharded_models["code"]
    expected = load_weights(folder)
    with CheckpointReader(resolve_model(str(folder))) as reader:
        got = {name: reader.get(name) for name in reader.names()}
        with pytest.raises(TensorMismatchError, match="no.such.tensor"):
            reader.info("no.such.tensor")
    assert_same_tensors(got, expected)


def test_index_naming_a_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'b'"):
        CheckpointReader(resolve_model(str(folder))).infos  # noqa: B018


# -- model references --------------------------------------------------------------------------------


def _sharded_folder(tmp_path: Path, weight_map: dict[str, object]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_index_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2)}, tmp_path / "x.safetensors")  # exists, but outside the model
    folder = _sharded_folder(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "../x.safetensors"})
    with pytest.raises(CheckpointError, match="outside") as caught:
        resolve_model(str(folder))
    assert not isinstance(caught.value, CheckpointNotFoundError)


def test_index_with_absolute_shard_path_is_refused(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2)}, tmp_path / "x.safetensors")
    folder = _sharded_folder(tmp_path, {"a": "model-00001-of-00002.safetensors",
                                        "b": str(tmp_path / "x.safetensors")})
    with pytest.raises(CheckpointError) as caught:
        resolve_model(str(folder))
    assert not isinstance(caught.value, CheckpointNotFoundError)
    assert "x.safetensors" in str(caught.value)


def test_index_listing_a_missing_shard(tmp_path: Path) -> None:
    folder = _sharded_folder(tmp_path, {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002.safetensors"):
        resolve_model(str(folder))


@pytest.mark.parametrize("content", ["not json", "[]", '{"weight_map": [1]}', '{"metadata": {}}'])
def test_malformed_index_is_refused(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match="index"):
        resolve_model(str(folder))


def test_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        resolve_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no .safetensors"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError):
        resolve_model(str(tmp_path / "notes.txt"))


def test_single_file_reference(tiny_models: dict[str, Path]) -> None:
    file = tiny_models["base"] / "model.safetensors"
    resolved = resolve_model(str(file))
    assert resolved.weight_files == (file,)
    assert resolved.folder == tiny_models["base"]
    assert resolved.revision is None and resolved.hub_id is None


# -- atomic_output -----------------------------------------------------------------------------------


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_output_appears_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output(out) as temp:
        assert temp.parent == tmp_path and temp != out and PARTIAL_MARKER in temp.name
        (temp / "file.txt").write_text("done")
        assert not out.exists()
    assert (out / "file.txt").read_text() == "done"
    assert _entries(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_removes_everything_on_error(tmp_path: Path, error: type[BaseException]) -> None:
    out = tmp_path / "out"
    with pytest.raises(error), atomic_output(out) as temp:
        (temp / "sub").mkdir()
        (temp / "sub" / "partial.bin").write_bytes(b"x" * 100)
        raise error("boom")
    assert not out.exists()
    assert _entries(tmp_path) == []


def test_atomic_output_refuses_non_empty_folder_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"), atomic_output(out):
        pytest.fail("the block must not run")
    assert _entries(out) == ["old.txt"]
    assert _entries(tmp_path) == ["out"]


def test_atomic_output_accepts_an_existing_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output(out) as temp:
        (temp / "new.txt").write_text("new")
    assert _entries(out) == ["new.txt"]
    assert _entries(tmp_path) == ["out"]


def test_atomic_output_overwrite_replaces_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output(out, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the block succeeds
    assert _entries(out) == ["new.txt"]
    assert _entries(tmp_path) == ["out"]


def test_atomic_output_overwrite_keeps_the_old_folder_on_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_output(out, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
        raise ValueError("boom")
    assert _entries(out) == ["old.txt"]
    assert _entries(tmp_path) == ["out"]


def test_atomic_output_refuses_a_file_in_its_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is a file"), atomic_output(out, overwrite=overwrite):
            pytest.fail("the block must not run")
    assert out.read_text() == "a file"
    assert _entries(tmp_path) == ["out"]


def test_atomic_output_creates_missing_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with atomic_output(out) as temp:
        (temp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    assert _entries(out.parent) == ["out"]
