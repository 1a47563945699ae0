"""User-facing errors: one line that says what went wrong and what to do."""


class SinkholeError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``str(err)`` on one line and exits with ``exit_code``; no traceback.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class UnsupportedArchitecture(SinkholeError):
    pass


class ModelLoadError(SinkholeError):
    pass


class NumericalError(SinkholeError):
    """NaN or inf appeared in activations (e.g. float16 overflow)."""

    exit_code = 3
