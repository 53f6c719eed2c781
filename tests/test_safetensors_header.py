"""The one safetensors-header reader: every failure is typed, names the file and quotes nothing from it."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from portraitbooth_core.weights.family import read_safetensors_header, safetensors_expected_size
from portraitbooth_core.weights.safetensors_header import (
    NotSafetensorsError, SafetensorsHeaderError, TruncatedSafetensorsError, UnreadableFileError, read_header,
    read_range_header,
)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.float16)}, str(path), {"note": "hi"})
    return path


def _header_file(path, header: object, tail: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)


def test_reads_shapes_metadata_and_size_from_the_header(good):
    header = read_header(good)
    assert header.shapes == {"a": (3, 4), "b": (2,)} and header.metadata == {"note": "hi"}
    assert header.expected_size == os.path.getsize(good) == header.data_start + 48 + 4
    # The older names (warm start, stand-ins) still answer the same.
    assert read_safetensors_header(good) == (header.shapes, header.metadata)
    assert safetensors_expected_size(good) == header.expected_size
    data = good.read_bytes()
    assert read_range_header(good, lambda offset, size: data[offset:offset + size]) == header


def test_os_errors_become_a_typed_error_naming_the_file(tmp_path):
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(UnreadableFileError, match=rf"^{path.name} could not be read \(") as caught:
            read_header(path)
        assert isinstance(caught.value, SafetensorsHeaderError) and isinstance(caught.value, ValueError)


def test_implausible_length_never_echoes_the_number(tmp_path):
    path = tmp_path / "huge.safetensors"
    for length in (2**62, 10**9, 5000):  # too big for any header; past the end of this file
        path.write_bytes(struct.pack("<Q", length) + b"{}")
        with pytest.raises(NotSafetensorsError) as caught:
            read_header(path)
        assert str(caught.value) == ("huge.safetensors is corrupt or not a safetensors file "
                                     "(header length field is implausible)")
        assert str(length) not in str(caught.value)


@pytest.mark.parametrize("content, problem", [
    (b"", "shorter than 8 bytes"),
    (struct.pack("<Q", 4) + b"\xff\xfe\x00{", "header is not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    (struct.pack("<Q", 200_000) + b"[" * 200_000, "header is nested too deeply to be a safetensors header"),
])
def test_garbage_is_refused_without_quoting_it(tmp_path, content, problem):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(NotSafetensorsError, match=rf"^junk\.safetensors is corrupt or not a safetensors file \({problem}\)$"):
        read_header(path)


@pytest.mark.parametrize("entry", [
    "text", {"dtype": "F32", "shape": [2]}, {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}, {"dtype": 3, "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
])
def test_malformed_tensor_entries_are_one_typed_error(tmp_path, entry):
    path = tmp_path / "odd.safetensors"
    _header_file(path, {"x": entry}, b"\x00" * 16)
    with pytest.raises(NotSafetensorsError, match="lacks a valid dtype, shape or data_offsets"):
        read_header(path)


def test_metadata_must_be_texts(tmp_path):
    path = tmp_path / "meta.safetensors"
    _header_file(path, {"__metadata__": {"n": 1}})
    with pytest.raises(NotSafetensorsError, match="__metadata__ is not a table of texts"):
        read_header(path)


def test_truncated_file_is_told_apart(good, tmp_path):
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(TruncatedSafetensorsError, match=rf"^cut\.safetensors is truncated: {len(data) - 10} of "
                                                        rf"{len(data)} bytes$") as caught:
        read_header(cut)
    assert (caught.value.actual, caught.value.expected) == (len(data) - 10, len(data))
    assert read_header(cut, complete=False).expected_size == len(data)
