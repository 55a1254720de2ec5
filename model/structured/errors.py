"""The typed errors of the structured-output compiler.

Both carry ``param = "response_format"`` so the API layer can turn them into a 400 naming the
request field without knowing about schemas; ``keyword`` names the schema keyword (or regex
construct) at fault.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A structured-output spec is malformed (bad regex, dangling $ref, no finite instance)."""

    param = "response_format"

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword


class UnsupportedKeywordError(SpecError):
    """The spec uses a keyword (or regex construct) this compiler cannot enforce exactly."""

    def __init__(self, keyword: str, detail: str = "") -> None:
        message = f"unsupported in structured outputs: {keyword!r}"
        super().__init__(f"{message} ({detail})" if detail else message, keyword)
