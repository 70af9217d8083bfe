"""Reading a GGUF file's header (metadata and tensor sizes) without loading any weights.

Walks the header with struct (GGUF v2/v3) instead of gguf's GGUFReader, which builds a numpy
view per token string: seconds per model for a vocabulary of 50k-260k tokens.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from actors.errors import ModelSourceError

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, int], list[int]]:
    """A GGUF's scalar metadata, its arrays' lengths and each tensor's element count.

    Walks the header with struct (GGUF v2/v3) instead of gguf's GGUFReader, which builds a numpy
    view per token string: seconds per model for a vocabulary of 50k-260k tokens.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelSourceError(f"{path.name} is not a GGUF file (no GGUF magic)")
        order = "<" if struct.unpack_from("<I", buf, 4)[0] < 2**16 else ">"
        pos = 4

        def take(fmt: str) -> Any:
            nonlocal pos
            (value,) = struct.unpack_from(order + fmt, buf, pos)
            pos += struct.calcsize(order + fmt)
            return value

        def text() -> str:
            nonlocal pos
            n = take("Q")
            pos += n
            return bytes(buf[pos - n : pos]).decode("utf-8", "replace")

        def skip(vtype: int, count: int) -> None:
            nonlocal pos
            if vtype in _GGUF_SCALARS:
                pos += count * struct.calcsize(order + _GGUF_SCALARS[vtype])
            elif vtype == _GGUF_STRING:
                for _ in range(count):
                    n = take("Q")  # not `pos += take(...)`: that adds to pos read before the call
                    pos += n
            elif vtype == _GGUF_ARRAY:
                for _ in range(count):
                    item = take("I")
                    skip(item, take("Q"))
            else:
                raise ModelSourceError(f"GGUF {path.name}: unknown metadata type {vtype}")

        version = take("I")
        if version not in (2, 3):
            raise ModelSourceError(f"GGUF {path.name}: version {version} is not supported (2 or 3)")
        n_tensors, n_kv = take("Q"), take("Q")
        meta: dict[str, Any] = {}
        arrays: dict[str, int] = {}
        for _ in range(n_kv):
            key, vtype = text(), take("I")
            if vtype == _GGUF_STRING:
                meta[key] = text()
            elif vtype == _GGUF_ARRAY:
                item, count = take("I"), take("Q")
                arrays[key] = count
                skip(item, count)
            elif vtype in _GGUF_SCALARS:
                meta[key] = take(_GGUF_SCALARS[vtype])
            else:
                raise ModelSourceError(f"GGUF {path.name}: unknown metadata type {vtype} of {key}")
        n_elements = []
        for _ in range(n_tensors):
            text()  # name
            n_dims = take("I")
            dims = struct.unpack_from(f"{order}{n_dims}Q", buf, pos)
            pos += 8 * n_dims + 4 + 8  # dims, ggml type, data offset
            n = 1
            for dim in dims:
                n *= dim
            n_elements.append(n)
    return meta, arrays, n_elements
