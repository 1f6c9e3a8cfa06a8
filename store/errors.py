"""Errors the store and workers raise for a caller to act on. Their messages are written for the user: the service
maps NotFound to NOT_FOUND, AlreadyExists to ALREADY_EXISTS and InvalidInput to INVALID_ARGUMENT, word for word."""


class NotFound(LookupError):
    """A collection, document or job that does not exist."""

    def __str__(self) -> str:  # LookupError (like KeyError) would quote the message
        return str(self.args[0]) if self.args else "not found"


class AlreadyExists(ValueError):
    """Creating something whose name is taken."""


class InvalidInput(ValueError):
    """A request the store cannot act on as sent (bad name, unknown index kind, wrong dimension, ...)."""
