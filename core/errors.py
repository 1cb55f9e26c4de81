"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits non-zero."""


class FacefuseError(Exception):
    """A bad input the user can fix (file, line or option named in the message)."""


class BadImageError(FacefuseError):
    """An image that is missing, truncated, corrupt or not an image at all."""

    def __init__(self, path, reason: str | None = None):
        # one-argument form too, so DataLoader workers can re-raise it from its message
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)
