"""User-facing error types.

Every error a user can trigger (bad path, bad checkpoint, bad config, bad request) is a
`LatticeError`. Its message names the value, the limit and the fix, so the CLI can print it
as one line and exit 2, and the server can turn it into a 4xx without a traceback.
"""


class LatticeError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(LatticeError):
    """The config file or an option is invalid."""


class CheckpointError(LatticeError):
    """A model checkpoint is missing, malformed, or refuses to load."""


class PluginError(LatticeError):
    """A plugin is missing, duplicated, or registered something invalid."""


class RequestError(LatticeError):
    """A generation request has invalid parameters."""
