"""Errors raised by marrowcount. Each carries a message fit to show a user as one line."""


class MarrowError(Exception):
    """Base class: anything marrowcount reports as a clear one-line error."""


class ImageError(MarrowError):
    """An image that cannot be read or is unfit for analysis (corrupt, grayscale, too small)."""


class ConfigError(MarrowError):
    """A configuration file or value that fails validation; the message names the key."""


class CheckpointError(MarrowError):
    """A model checkpoint that is missing, corrupt, from another architecture or taxonomy."""
