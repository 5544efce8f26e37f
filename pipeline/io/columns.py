"""Arrow column helpers shared by the codec, the scorer and the table writers (no torch: the scoring
driver imports them)."""

from __future__ import annotations

import pyarrow as pa


def plain_type(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded type's value type; any other type itself."""
    return t.value_type if pa.types.is_dictionary(t) else t


def as_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One contiguous array, dictionary-encoded values decoded."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column
