"""The access log: one line per request, with its request id, on the nanoserve.access logger."""

from __future__ import annotations

import logging
import time
from typing import Any

access_logger = logging.getLogger("nanoserve.access")


def log_access(client: tuple[str, int] | None, cycle: Any) -> None:
    """`cycle` is the request's Cycle (exchange.py): its request, status, bytes and start."""
    request = cycle.request
    if request is None or not access_logger.isEnabledFor(logging.INFO):
        return
    access_logger.info(
        '%s:%d - "%s %s" %d %d %.1fms %s',
        client[0] if client else "-",
        client[1] if client else 0,
        request.method,
        request.path,
        cycle.status,
        cycle.num_bytes_sent,
        (time.perf_counter() - cycle.started_at) * 1000.0,
        request.request_id,
    )
