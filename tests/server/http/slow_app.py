"""A tiny app for the signal-drain tests: python -m tests.server.http.slow_app

GET /slow?n=10&delay=0.05 streams n SSE events, one every `delay` seconds.
GET /health answers {"ready": bool}: false until the (slow) startup hook finished.
With --fail-startup the startup hook raises (the server must exit with code 1).
Logs go to stderr; the port is in the "listening on http://127.0.0.1:PORT" line.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from server.http.config import ServerConfig
from server.http.messages import JSONResponse
from server.http.routing import Router
from server.http.server import run_server
from server.http.sse import EventSourceResponse


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    state = {"ready": False}
    router = Router()

    async def slow(request):
        num_events = int(request.query.get("n", "10"))
        delay_s = float(request.query.get("delay", "0.05"))

        async def events():
            for i in range(num_events):
                await asyncio.sleep(delay_s)
                yield {"i": i}
            yield "[DONE]"

        return EventSourceResponse(events())

    async def health(request):
        return JSONResponse({"ready": state["ready"], "draining": request.server.is_draining})

    async def on_startup():
        await asyncio.sleep(0.3)  # e.g. loading a model; connections are accepted meanwhile
        if "--fail-startup" in sys.argv:
            raise RuntimeError("model folder is missing")
        state["ready"] = True
        logging.getLogger("slow_app").info("startup hook done")

    async def on_shutdown():
        logging.getLogger("slow_app").info("shutdown hook ran")

    router.add("GET", "/slow", slow)
    router.add("GET", "/health", health)
    config = ServerConfig(port=0, shutdown_timeout_s=5.0, header_timeout_s=2.0)
    return run_server(router, config, on_startup=on_startup, on_shutdown=on_shutdown)


if __name__ == "__main__":
    sys.exit(main())
