"""Reading and writing the IDX format used by MNIST.

Layout (all multi-byte integers big-endian)::

    bytes 0-1   0x00 0x00                 magic
    byte  2     dtype code                0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     ndim >= 1
    4 * ndim    dims, each a uint32
    rest        prod(dims) * itemsize bytes of data, C order, big-endian

A file may be gzipped as a whole; that is detected from the gzip magic bytes (0x1f 0x8b), not from
the file name, so a misnamed file still reads.
"""
from __future__ import annotations

import errno
import gzip
import os
import zlib

import numpy as np

__all__ = ["read_idx", "write_idx"]

# dtype code -> big-endian numpy dtype (the format's byte order)
_CODE_TO_DTYPE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (kind, itemsize) -> code, for writing any byte order
_KIND_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIM = 2**32 - 1


def _read_bytes(path) -> bytes:
    """The file's payload, decompressed when it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "IDX file not found", os.fspath(path)) from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
        # EOFError: stream cut short; zlib.error / BadGzipFile: corrupt bytes or CRC mismatch
        raise ValueError(f"{os.fspath(path)}: corrupt or truncated gzip stream ({type(e).__name__}: {e})") from e


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian numpy array of shape ``dims``.

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` naming the file for any
    malformed content: short header, bad magic, unknown dtype code, zero dims, truncated data, trailing
    bytes or a corrupt gzip stream.
    """
    name = os.fspath(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{name}: too short for an IDX header ({len(buf)} bytes, need at least 4)")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(f"{name}: bad IDX magic: first two bytes are {buf[:2].hex()}, expected 0000")
    code, ndim = buf[2], buf[3]
    if code not in _CODE_TO_DTYPE:
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02X} "
                         f"(known: {', '.join(f'0x{c:02X}' for c in _CODE_TO_DTYPE)})")
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise ValueError(f"{name}: too short for an IDX header with {ndim} dims "
                         f"({len(buf)} bytes, need {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _CODE_TO_DTYPE[code]
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize  # object: no overflow for huge dims
    got = len(buf) - header_len
    if got < expected:
        raise ValueError(f"{name}: truncated IDX data: dims {dims} of {dtype.name} need {expected} bytes, "
                         f"file has {got}")
    if got > expected:
        raise ValueError(f"{name}: {got - expected} trailing bytes after the IDX data (dims {dims})")
    data = np.frombuffer(buf, dtype=dtype, offset=header_len).reshape(dims)
    # astype copies: native byte order and a writable array not tied to the bytes object
    return data.astype(dtype.newbyteorder("="))


def write_idx(path, array, *, compress: bool = False) -> None:
    """Write ``array`` (any shape with 1 to 255 dims) as an IDX file, gzipped when ``compress``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64 (any byte order; written big-endian).
    """
    arr = np.asarray(array)
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if arr.dtype.kind not in "uif" or key not in _KIND_TO_CODE:
        raise TypeError(f"array: dtype {arr.dtype} has no IDX code; use one of "
                        f"{', '.join(dt.name for dt in _CODE_TO_DTYPE.values())}")
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"array: IDX needs 1 to 255 dimensions, got {arr.ndim}")
    if any(d > _MAX_DIM for d in arr.shape):
        raise ValueError(f"array: every dimension must fit in a uint32, got shape {arr.shape}")
    code = _KIND_TO_CODE[key]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(arr, dtype=_CODE_TO_DTYPE[code]).tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)  # mtime=0: identical arrays give identical files
    with open(path, "wb") as f:
        f.write(payload)
