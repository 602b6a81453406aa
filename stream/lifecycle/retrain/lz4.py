"""LZ4 for Faust's Kafka client (aiokafka), which decodes LZ4 only with `cramjam`, a package
kvrec does not install; `kvrec replay` (and many producers) send LZ4-compressed batches.

`install()` gives aiokafka an LZ4 frame decoder on the system's liblz4 (ctypes; the library is
on every Debian or Ubuntu system, apt itself links it). Without liblz4 it does nothing, and an
LZ4 batch stops the app with aiokafka's own error (`Libraries for lz4 compression codec not
found`): then send uncompressed, gzip, or install cramjam. Snappy and zstd stay unsupported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from types import SimpleNamespace

LZ4F_VERSION = 100
CHUNK = 1 << 20


def _library() -> ctypes.CDLL | None:
    for name in (ctypes.util.find_library("lz4"), "liblz4.so.1"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.LZ4F_decompress  # noqa: B018 (the frame API must be there)
        except (OSError, AttributeError):
            continue
        lib.LZ4F_createDecompressionContext.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.LZ4F_createDecompressionContext.restype = ctypes.c_size_t
        lib.LZ4F_freeDecompressionContext.argtypes = [ctypes.c_void_p]
        lib.LZ4F_freeDecompressionContext.restype = ctypes.c_size_t
        lib.LZ4F_decompress.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
        ]
        lib.LZ4F_decompress.restype = ctypes.c_size_t
        lib.LZ4F_isError.argtypes = [ctypes.c_size_t]
        lib.LZ4F_isError.restype = ctypes.c_uint
        lib.LZ4F_getErrorName.argtypes = [ctypes.c_size_t]
        lib.LZ4F_getErrorName.restype = ctypes.c_char_p
        return lib
    return None


_LIB = _library()


def available() -> bool:
    return _LIB is not None


def decompress(payload: bytes | bytearray | memoryview) -> bytes:
    """Decode one LZ4 frame (what Kafka's LZ4 codec writes)."""
    if _LIB is None:
        raise RuntimeError("liblz4 is not available")
    source = bytes(payload)
    context = ctypes.c_void_p()
    code = _LIB.LZ4F_createDecompressionContext(ctypes.byref(context), LZ4F_VERSION)
    if _LIB.LZ4F_isError(code):
        raise ValueError(f"lz4: {_LIB.LZ4F_getErrorName(code).decode()}")
    out = bytearray()
    buffer = ctypes.create_string_buffer(CHUNK)
    source_buffer = ctypes.create_string_buffer(source, len(source))
    offset = 0
    try:
        while True:
            written = ctypes.c_size_t(CHUNK)
            consumed = ctypes.c_size_t(len(source) - offset)
            hint = _LIB.LZ4F_decompress(
                context, buffer, ctypes.byref(written),
                ctypes.byref(source_buffer, offset), ctypes.byref(consumed), None,
            )
            if _LIB.LZ4F_isError(hint):
                raise ValueError(f"lz4: {_LIB.LZ4F_getErrorName(hint).decode()}")
            out += buffer.raw[: written.value]
            offset += consumed.value
            if hint == 0:  # the frame is complete
                return bytes(out)
            if offset >= len(source) and written.value == 0:
                raise ValueError("lz4: truncated frame")
    finally:
        _LIB.LZ4F_freeDecompressionContext(context)


def _unsupported(name: str) -> SimpleNamespace:
    def fail(*args: object, **kwargs: object) -> bytes:
        raise NotImplementedError(f"{name}: install cramjam to read {name}-compressed batches")

    return SimpleNamespace(compress=fail, decompress=fail, compress_raw=fail, decompress_raw=fail)


def install() -> bool:
    """Give aiokafka the LZ4 decoder unless it has one; True if it can read LZ4 now."""
    import aiokafka.codec as codec

    if codec.cramjam is not None:
        return True
    if _LIB is None:
        return False
    codec.cramjam = SimpleNamespace(  # the part of cramjam aiokafka calls for LZ4
        lz4=SimpleNamespace(decompress=decompress, compress=_unsupported("lz4 (encoding)").compress),
        snappy=_unsupported("snappy"),
        zstd=_unsupported("zstd"),
    )
    return True
