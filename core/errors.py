"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits non-zero.

Library code speaks in Python parameters: a bad argument is a :class:`ParameterError` naming the
argument and its value (``far=0: a false accept rate must be in (0, 1)``), and a hint that points at
another argument writes it as ``name=value`` (``skip_missing=True goes on without them``). The CLI
(``facefuse.cli``) rewrites both into its own options (``--far 0: ...``, ``--skip-missing``), so a
Python caller is never told about options it never passed.
"""


class FacefuseError(Exception):
    """A bad input the user can fix (file, line or argument named in the message)."""


class ParameterError(FacefuseError, ValueError):
    """A bad argument: ``param=value: reason``. ``param`` is the Python argument's name (a trainer
    setting's dotted name, e.g. ``data.root``); the CLI words it as its option."""

    def __init__(self, param: str, value, reason: str):
        self.param, self.value, self.reason = param, value, reason
        super().__init__(f"{param}={show_value(value)}: {reason}")


def show_value(value) -> str:
    """How a value is written in a message: paths and strings bare, numbers in ``%g``-like form."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(show_value(v) for v in value)
    return str(value)


class BadImageError(FacefuseError):
    """An image that is missing, truncated, corrupt or not an image at all."""

    def __init__(self, path, reason: str | None = None):
        # one-argument form too, so DataLoader workers can re-raise it from its message
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)
