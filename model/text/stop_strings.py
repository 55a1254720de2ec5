"""Stop strings over a stream of text deltas: hold back what may begin a stop string."""

from __future__ import annotations


class StopStringMatcher:
    """Finds stop strings in streamed text, across chunk boundaries.

    Text that could be the start of a stop string is held back until it is known not to be.
    The first stop string to complete in the stream wins (earliest end, then longest).
    """

    def __init__(self, stops: list[str], include_stop_str: bool = False) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]  # empty stops would match everywhere
        self.include_stop_str = include_stop_str
        self._held = ""
        self._is_done = False

    def push(self, text: str) -> tuple[str, str | None]:
        """Feed new text; returns (text safe to emit now, matched stop or None).

        After a match the stream is over: later pushes return ("", None).
        """
        if self._is_done:
            return "", None
        if not self.stops:
            return text, None
        buffer = self._held + text
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None or candidate < best else best
        if best is not None:
            end, neg_len, stop = best
            self._is_done = True
            self._held = ""
            return buffer[: end if self.include_stop_str else end + neg_len], stop
        hold = self._partial_match_len(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], None

    def flush(self) -> str:
        """The held-back text, at the end of a stream that matched no stop."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
