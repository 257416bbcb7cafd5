"""Every exception FrameCast raises on purpose.

    FrameCastError
    ├── ConfigError (ValueError)        a config value outside its allowed range, an unknown preset
    ├── ShapeError (ValueError)         a tensor (prompt embedding, latents, actions) of the wrong shape
    ├── CheckpointError                 a checkpoint that cannot be loaded; lists every bad key at once
    ├── CacheFull (RuntimeError)        a bounded full cache asked to hold more frames than it has room for
    ├── BadMessage (ValueError)         a malformed control message from a client
    ├── MissingDependency (ImportError) an optional package a feature needs is not installed; says how to install it
    └── SessionClosed                   use of a closed session, sink or stream

This module imports nothing, so every layer (kernels, models, stream) may import it.
"""


class FrameCastError(Exception):
    """Base of every error FrameCast raises on purpose."""


class ConfigError(FrameCastError, ValueError):
    """A configuration value is invalid; the message names the value and its allowed range."""


class ShapeError(FrameCastError, ValueError):
    """A tensor argument has the wrong shape or dtype; the message names expected and actual."""


class CheckpointError(FrameCastError):
    """A checkpoint cannot be loaded; the message lists every missing, unexpected or mis-shaped key."""


class CacheFull(FrameCastError, RuntimeError):
    """A bounded full cache has no room for the next chunk."""


class BadMessage(FrameCastError, ValueError):
    """A client message is malformed; the message names the field."""


class MissingDependency(FrameCastError, ImportError):
    """An optional package is not installed; the message names it and how to install it."""


class SessionClosed(FrameCastError):
    """The session, sink or stream is closed."""
