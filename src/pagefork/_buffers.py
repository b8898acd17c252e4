"""Bytes-like arguments as flat views of their bytes."""

from __future__ import annotations

from typing import Any


def byte_view(data: Any) -> memoryview:
    """``data`` (any buffer: bytes, bytearray, numpy array, memoryview) as a
    flat view of its bytes. No copy when it is contiguous; a strided one
    (``array[::2]``) is copied, as numpy would, instead of refused."""
    view = memoryview(data)
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
