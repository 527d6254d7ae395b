"""Rows of several fields: how a tuple or dict of arrays is packed in one row of bytes, and read back.

A pipeline stage may return a tuple or a dict of arrays. Each item's fields
are laid out in one row of bytes, each field on a 64-byte boundary, so a
batch of rows keeps every field of every row aligned; whoever reads the rows
(the next stage, the sink, a program of the user's) gets the same tuple/dict
as views of them, no copy. The layout travels with the slot as a
``protocol.Layout``; the broker's tables never look inside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .protocol import Layout, storage_dtype

__all__ = ["pack_fields", "field_views", "unpack"]

ALIGN = 64


def pack_fields(kind: str, specs: list[tuple[Any, str, tuple[int, ...]]]) -> tuple[Layout, int]:
    """Lay out fields ``(key, dtype, shape)`` in one row; returns ``(layout, rowbytes)``.

    ``rowbytes`` is a multiple of 64, so every field of every row of a batch stays aligned.
    """
    fields, offset = [], 0
    for key, dtype, shape in specs:
        nbytes = storage_dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        fields.append((key, dtype, list(shape), offset))
        offset += -(-max(nbytes, 1) // ALIGN) * ALIGN
    return Layout(kind=kind, fields=fields), max(offset, ALIGN)  # type: ignore[arg-type]


def field_views(rows: np.ndarray, layout: Layout) -> list[np.ndarray]:
    """Each field of byte rows ``[..., rowbytes]`` as an array ``[..., *shape]``: views, no copy."""
    lead = rows.shape[:-1]
    out = []
    for _key, dtype, shape, offset in layout.fields:
        dt = storage_dtype(dtype)
        nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        out.append(rows[..., offset: offset + nbytes].view(dt).reshape(tuple(lead) + tuple(shape)))
    return out


def unpack(rows: np.ndarray, layout: Layout | None) -> Any:
    """What a consumer receives: the array itself, or the tuple/dict of field views."""
    if layout is None:
        return rows
    views = field_views(rows, layout)
    if layout.kind == "dict":
        return {f[0]: v for f, v in zip(layout.fields, views, strict=True)}
    return tuple(views)
