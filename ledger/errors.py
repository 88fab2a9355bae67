"""The ledger's errors, each of one kind of ``apa.errors`` (the service maps kinds to statuses)."""

from apa.errors import Conflict, NotFound, Unavailable


class LedgerError(Unavailable):
    """The ledger is missing, not migrated, or holds another run."""


class UserNotFound(NotFound):
    """No such user, or a user with no live (non-deleted) interactions."""


class DeletionNotFound(NotFound):
    """No deletion request with that id."""


class ShardNotFound(NotFound):
    """No shard with that number."""


class NothingToRetrain(Conflict):
    """A retrain was asked for a shard that holds no deleted data."""


class IdempotencyConflict(Conflict):
    """An Idempotency-Key already named another request (another user, or other items)."""
