"""The typed errors every front maps to a message (CLI) or an error body (server)."""

from __future__ import annotations


class EdgeMetastoneError(Exception):
    """Base class: a problem the user can act on, reported in one line."""


class BadModelFileError(EdgeMetastoneError):
    """A model file that is truncated, foreign, or not what it claims to be."""


class MissingHeadError(EdgeMetastoneError):
    """Scoring was asked of a model file that carries no SPRM head."""


class BadCheckpointError(EdgeMetastoneError):
    """A Hugging Face checkpoint (or SPRM head) that cannot be converted."""


class ContextExceededError(EdgeMetastoneError):
    """A prompt (plus what must be generated) that does not fit the context."""


class BudgetError(EdgeMetastoneError):
    """A latency or memory budget that no effort mode can meet."""


class InvalidRequestError(EdgeMetastoneError, ValueError):
    """A request whose settings make no sense (k=0, negative temperature, ...); `param` names the
    setting when one is to blame (the server reports it as the error's `param`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestCancelledError(EdgeMetastoneError):
    """A generation stopped because its consumer went away or its model was closed."""
