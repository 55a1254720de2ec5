"""Reading typed metadata fields out of a `gguf.GGUFReader`."""

from __future__ import annotations

from typing import Any

import numpy as np


def read_field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (str, int, float, bool or list of those)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]
