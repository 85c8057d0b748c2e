"""The safetensors reader: a file's header (bounded in size, checked entry by entry) and its bytes through one open
handle, before any tensor is created; nothing is ever unpickled."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors_from_bytes

from modellego.errors import ModellegoError
from modellego.io.fields import Invalid, mapping, parse_json, show

MAX_HEADER_BYTES = 16 << 20      # the safetensors JSON header (tensor index + metadata)
MAX_TENSORS = 100_000

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class RawFile:
    """A safetensors file read through one open handle: its metadata, the index of its tensors (dtype name and
    shape, from the header) and, when asked for, all its bytes, so that header and tensors come from the same
    version of the file even while another process replaces it."""

    source: Path
    metadata: dict[str, str]
    entries: dict[str, tuple[str, tuple[int, ...]]]
    data: bytes | None = None

    def shapes(self) -> dict[str, torch.Size]:
        return {key: torch.Size(shape) for key, (_, shape) in self.entries.items()}

    def tensors(self, what: str) -> dict[str, torch.Tensor]:
        """Materialise the tensors from the bytes read with the header."""
        if self.data is None:
            raise ValueError("the file was read without its data")
        try:
            return load_tensors_from_bytes(self.data)
        except Exception as error:  # safetensors raises several types for damaged bytes
            raise ModellegoError(f"{self.source} is not a readable {what} (not a valid safetensors file: "
                                 f"{first_line(error)})") from None


def first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def _refusal(source: Path, what: str):
    def refuse(reason: str) -> ModellegoError:
        return ModellegoError(f"{source} is not a readable {what} (not a valid safetensors file: {reason})")
    return refuse


def _read_header(handle, source: Path, what: str
                 ) -> tuple[bytes, dict[str, str], dict[str, tuple[str, tuple[int, ...]]], dict[str, tuple[int, int]], int]:
    """The header of the safetensors file open as `handle` (bounded in size, checked entry by entry): its raw
    bytes, metadata, tensor index (dtype, shape), each tensor's byte range in the data, and the data's size."""
    refuse = _refusal(source, what)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise refuse("shorter than a header")
    size = int.from_bytes(prefix, "little")
    if size > MAX_HEADER_BYTES:
        raise refuse(f"its header claims {size:,} bytes; modellego reads headers of at most {MAX_HEADER_BYTES:,}")
    header_bytes = handle.read(size)
    if len(header_bytes) < size:
        raise refuse("truncated header")
    data_size = os.fstat(handle.fileno()).st_size - 8 - size
    try:
        header = mapping(parse_json(header_bytes.decode("utf-8"), "the header", MAX_HEADER_BYTES, 3), "the header")
    except (Invalid, UnicodeDecodeError) as error:
        raise refuse(first_line(error)) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("its metadata is not a map of strings")
    if len(header) > MAX_TENSORS:
        raise refuse(f"it indexes {len(header):,} tensors")
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    end = 0
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES or not isinstance(entry.get("shape"), list) \
                or len(entry["shape"]) > 8 or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40
                                                      for n in entry["shape"]):
            raise refuse(f"tensor {show(key)} has a damaged index entry")
        entries[key] = (entry["dtype"], tuple(entry["shape"]))
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            raise refuse(f"tensor {show(key)} has a damaged index entry")
        ranges[key] = (offsets[0], offsets[1])
        end = max(end, offsets[1])
    if end != data_size:
        raise refuse(f"the header indexes {end:,} bytes of tensors but the file holds {data_size:,} (truncated or damaged)")
    return prefix + header_bytes, metadata, entries, ranges, data_size


def read_raw(path: str | os.PathLike, what: str, with_data: bool = True) -> RawFile:
    """Read a safetensors file's header (bounded in size) and, with `with_data`, the rest of its bytes, all
    through one open handle. Nothing is unpickled and no tensor is created. `what` names the expected kind of
    file in error messages."""
    source = Path(path)
    if not source.is_file():
        raise ModellegoError(f"no such file: {source}")
    with open(source, "rb") as handle:
        head, metadata, entries, _, _ = _read_header(handle, source, what)
        rest = handle.read() if with_data else None
    return RawFile(source, metadata, entries, head + rest if rest is not None else None)


class OpenFile:
    """A safetensors file held open: its header, checked, and single tensors read on demand through the same
    handle (a large file is never read whole); `bytes_read` counts what was read. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.source = Path(path)
        if not self.source.is_file():
            raise ModellegoError(f"no such file: {self.source}")
        self.what = what
        self.handle = open(self.source, "rb")
        try:
            head, self.metadata, self.entries, self.ranges, self.data_size = _read_header(self.handle, self.source, what)
        except BaseException:
            self.handle.close()
            raise
        self.data_start = len(head)
        self.bytes_read = len(head)

    def __enter__(self) -> "OpenFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.handle.close()

    def raw(self, key: str) -> bytes:
        """The bytes of tensor `key`, exactly as stored."""
        begin, end = self.ranges[key]
        dtype, shape = self.entries[key]
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0 or end > self.data_size:
            raise _refusal(self.source, self.what)(f"tensor {show(key)} spans {end - begin:,} bytes for {expected:,}")
        self.handle.seek(self.data_start + begin)
        data = self.handle.read(end - begin)
        self.bytes_read += len(data)
        if len(data) != end - begin:
            raise _refusal(self.source, self.what)("truncated data")
        return data

    def tensor(self, key: str, data: bytes | None = None) -> torch.Tensor:
        """Tensor `key` (from `data`, its bytes read already, or read now)."""
        dtype, shape = self.entries[key]
        data = self.raw(key) if data is None else data
        if not data:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        return torch.frombuffer(bytearray(data), dtype=_DTYPES[dtype]).reshape(shape)


def read_safetensors(path: str | os.PathLike, what: str, with_tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and (optionally) tensors of a safetensors file, read through one open handle; anything
    else is refused, never unpickled. `what` names the expected kind of file in the error message."""
    raw = read_raw(path, what, with_data=with_tensors)
    return raw.metadata, raw.tensors(what) if with_tensors else {}


