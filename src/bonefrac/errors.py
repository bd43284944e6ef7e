"""Exceptions that end a command with a clear one-line message instead of a traceback."""


class BonefracError(Exception):
    """A problem the user can fix (bad input, bad config, missing file); the CLI prints it and exits 2."""


class ImageReadError(BonefracError):
    """An image file could not be read; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(BonefracError):
    """A config file or override is invalid (unknown key, wrong type)."""
