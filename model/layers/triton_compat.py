"""The optional triton import: CPU-only torch wheels ship without it, and the modules holding
kernels must still import (their kernels are then never launched).
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    HAS_TRITON = True
else:  # CPU-only torch wheels ship without triton: keep the module importable.
    HAS_TRITON = False

    class _NoTriton:
        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
