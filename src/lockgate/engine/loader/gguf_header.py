"""A fast reader of a GGUF file's header: metadata key/values as plain Python values, the
tensor-info table, and memory-mapped tensor data.

`gguf.GGUFReader` builds a numpy view per metadata string, which for a ~100k-entry
vocabulary costs seconds; this reads the same section with `struct` in tens of
milliseconds. Only little-endian GGUF versions 2 and 3 are read. Every length and count
is checked against the bytes left in the file before it is used, so a truncated or
corrupt file raises `ValueError` instead of hanging or allocating a bogus size.

Values match what `lockgate.engine.loader.gguf_meta.meta` makes of `GGUFReader.fields`:
strings are decoded as UTF-8 (invalid bytes replaced), arrays become lists, numbers
Python ints/floats, bools bools. GGUFReader's synthetic `GGUF.*` fields are not included
(see `GGUFHeader.version`, `.tensors`).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value type id -> struct format of one item.
_STRING, _ARRAY = 8, 9
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Tensor types GGUFReader exposes as typed arrays; the rest are raw bytes (rows of blocks).
_TYPED = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
          Q.I32: np.int32, Q.I64: np.int64}


class _TensorFile:
    """The file, memory-mapped read-only on first use and shared by its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: np.memmap | None = None

    def bytes(self, offset: int, n: int) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[offset:offset + n]


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor-info entry. `shape` is in GGUF order (innermost dim first, like ggml's ne),
    as `ReaderTensor.shape`; `data_offset` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Q
    data_offset: int
    n_bytes: int
    _file: _TensorFile = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """Memory-mapped data laid out as `ReaderTensor.data`: float/int types as typed arrays in
        numpy dim order; block-quantized (and BF16) ones as uint8 rows of `n_bytes / rows` bytes."""
        raw = self._file.bytes(self.data_offset, self.n_bytes)
        dims = tuple(reversed(self.shape))
        dtype = _TYPED.get(self.tensor_type)
        if dtype is not None:
            return raw.view(dtype).reshape(dims)
        rows = int(np.prod(dims[:-1], dtype=np.int64)) if len(dims) > 1 else 1
        return raw.reshape(*dims[:-1], self.n_bytes // max(rows, 1))


@dataclass(slots=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    alignment: int
    data_offset: int  # start of the tensor data section


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: Any, size: int, where: str) -> None:
        self.buf, self.size, self.off, self.where = buf, size, 0, where

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.size:
            raise ValueError(f"{self.where}: truncated or corrupt GGUF file: {what} needs {n} bytes at offset "
                             f"{self.off}, but the file has {self.size} bytes")

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += n
        return out

    def count(self, min_item_bytes: int, what: str) -> int:
        """A uint64 item count, rejected when that many items could not fit in the rest of the file."""
        (n,) = self.unpack("Q", what)
        if n * min_item_bytes > self.size - self.off:
            raise ValueError(f"{self.where}: corrupt GGUF file: {what} is {n}, more than the "
                             f"{self.size - self.off} bytes left can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(1, f"{what} length")
        raw = self.buf[self.off:self.off + n]
        self.off += n
        return bytes(raw).decode("utf-8", errors="replace")

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row (a vocabulary: ~100k of them), the same checks as `string` in one tight
        loop (0.5 s of the default model's start-up went to per-string bookkeeping)."""
        buf, off, size, out = self.buf, self.off, self.size, []
        length = _U64.unpack_from
        for _ in range(n):
            if off + 8 > size:
                self.off = off
                self.need(8, f"{what} length")
            (m,) = length(buf, off)
            off += 8
            if m > size - off:
                self.off = off
                raise ValueError(f"{self.where}: corrupt GGUF file: {what} length is {m}, more than the "
                                 f"{size - off} bytes left can hold")
            out.append(buf[off:off + m].decode("utf-8", errors="replace"))
            off += m
        self.off = off
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            (etype,) = self.unpack("I", f"{what} element type")
            if etype == _STRING:
                return self.strings(self.count(8, f"{what} array length"), what)
            if etype == _ARRAY:
                return [self.value(_ARRAY, what) for _ in range(self.count(12, f"{what} array length"))]
            fmt = _scalar_format(etype, what)
            n = self.count(struct.calcsize(fmt), f"{what} array length")
            return list(self.unpack(f"{n}{fmt}", what))
        return self.unpack(_scalar_format(vtype, what), what)[0]


def _scalar_format(vtype: int, what: str) -> str:
    fmt = _SCALAR.get(vtype)
    if fmt is None:
        raise ValueError(f"corrupt GGUF file: {what} has unknown value type {vtype}")
    return fmt


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse `path`'s header, metadata and tensor-info table (tensor data is mapped lazily)."""
    path = Path(path)
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ValueError(f"{path}: not a GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size, path)


def _parse(buf: Any, size: int, path: Path) -> GGUFHeader:
    cur = _Cursor(buf, size, str(path))
    magic, version = cur.unpack("4sI", "header")
    if magic != MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version:
            raise ValueError(f"{path}: big-endian GGUF files are not supported")
        raise ValueError(f"{path}: unsupported GGUF version {version}; supported: 2, 3")
    (n_tensors,) = cur.unpack("Q", "tensor count")
    n_kv = cur.count(12, "metadata key count")  # a key is at least a length and a type
    if n_tensors * 24 > size:
        raise ValueError(f"{path}: corrupt GGUF file: tensor count {n_tensors} cannot fit in {size} bytes")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        (vtype,) = cur.unpack("I", f"type of {key!r}")
        if key in metadata:
            raise ValueError(f"{path}: corrupt GGUF file: duplicate metadata key {key!r}")
        metadata[key] = cur.value(vtype, repr(key))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise ValueError(f"{path}: bad general.alignment {alignment!r}")

    infos: list[tuple[str, tuple[int, ...], Q, int]] = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        (n_dims,) = cur.unpack("I", f"dim count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise ValueError(f"{path}: corrupt GGUF file: tensor {name!r} has {n_dims} dims (max {MAX_DIMS})")
        dims = cur.unpack(f"{n_dims}Q", f"dims of tensor {name!r}")
        raw_type, offset = cur.unpack("IQ", f"type of tensor {name!r}")
        try:
            qtype = Q(raw_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {raw_type}") from None
        infos.append((name, tuple(int(d) for d in dims), qtype, int(offset)))

    data_offset = -(-cur.off // alignment) * alignment
    file = _TensorFile(path)
    tensors: list[GGUFTensor] = []
    seen: set[str] = set()
    for name, dims, qtype, offset in infos:
        if name in seen:
            raise ValueError(f"{path}: corrupt GGUF file: duplicate tensor {name!r}")
        seen.add(name)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims, dtype=object)) if dims else 1
        if dims and n_elems and dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r}: row of {dims[0]} is not whole {qtype.name} blocks")
        n_bytes = n_elems // block * type_size
        start = data_offset + offset
        if start + n_bytes > size:
            raise ValueError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + n_bytes}, "
                             f"but the file has {size} bytes")
        tensors.append(GGUFTensor(name, dims, qtype, start, n_bytes, file))
    return GGUFHeader(version, metadata, tensors, alignment, data_offset)
