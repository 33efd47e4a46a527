"""The single exception type raised for any frame that cannot be trusted."""


class FrameError(ValueError):
    """A frame is corrupt, truncated, of an unknown version/codec, fails a checksum,
    or needs a reference that is missing or wrong. ``damaged`` names the streams whose
    checksum failed (when known), so a caller may retry with a lower ``fidelity``."""

    def __init__(self, message: str, damaged: tuple[str, ...] = ()):
        super().__init__(message)
        self.damaged = tuple(damaged)
