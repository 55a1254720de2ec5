"""The HTTP server's configuration: address, API key, CORS, limits and timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    timeout_keep_alive_s: float = 5.0
    max_connections: int = 2048
    shutdown_timeout_s: float = 30.0
    sse_ping_interval_s: float = 15.0
    max_header_bytes: int = 16 * 1024
    max_header_fields: int = 100
    max_request_line_bytes: int = 8 * 1024
    write_high_water_bytes: int = 64 * 1024
    # CORS (cors.py): "*" allows any origin / method / header, as vLLM and llama-server do.
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            values = getattr(self, name)
            if isinstance(values, str):
                raise ValueError(f"{name} must be a list of strings, got {values!r}")
            values = tuple(v.strip() for v in values if v.strip())
            if not values:
                raise ValueError(f"{name} must name at least one value (or '*')")
            setattr(self, name, values)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")
        for name in ("max_body_bytes", "max_connections", "max_header_bytes", "max_header_fields"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_line_bytes < 16:
            raise ValueError(
                f"max_request_line_bytes must be >= 16, got {self.max_request_line_bytes}"
            )
        if self.write_high_water_bytes < 1024:
            raise ValueError(
                f"write_high_water_bytes must be >= 1024, got {self.write_high_water_bytes}"
            )
        for name in ("header_timeout_s", "body_timeout_s", "timeout_keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.sse_ping_interval_s < 0:
            raise ValueError(
                f"sse_ping_interval_s must be >= 0 (0: off), got {self.sse_ping_interval_s}"
            )
