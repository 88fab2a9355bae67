"""What can go wrong in the core, as domain errors; the service maps each to an HTTP status."""


class APAError(Exception):
    """Base class of every error the core raises on purpose."""


class AssetError(APAError):
    """An asset could not be fetched, failed its checksum, or is missing."""


class DatasetError(APAError):
    """A dataset to import is malformed or missing."""


class ConfigError(APAError):
    """A run or command was configured with values that cannot work."""


class RunNotFound(APAError):
    """No run folder where one was expected."""


class AllShardsQuarantined(APAError):
    """Every shard is quarantined: no model may answer (callers fall back to popularity)."""


class AdapterMismatch(APAError):
    """An adapter does not fit the engine (rank, target modules or shapes differ)."""


class LedgerError(APAError):
    """The ledger is missing, not migrated, or holds another run."""


class UserNotFound(APAError):
    """No such user, or a user with no live (non-deleted) interactions."""


class ItemsNotFound(APAError):
    """Some requested items are not in the catalogue."""

    def __init__(self, item_ids: list[str]) -> None:
        super().__init__(f"unknown item(s): {item_ids}")
        self.item_ids = item_ids


class DeletionNotFound(APAError):
    """No deletion request with that id."""


class ShardNotFound(APAError):
    """No shard with that number."""


class NothingToRetrain(APAError):
    """A retrain was asked for a shard that holds no deleted data."""


class GateFailed(APAError):
    """A retrained version failed its validation gate; it is not served."""


class IdempotencyConflict(APAError):
    """An Idempotency-Key already named another request (another user, or other items)."""


class EngineUnavailable(APAError):
    """The scoring engine cannot answer (the vLLM server is unreachable or refused a request)."""


class InteractionKeyTooLong(APAError):
    """An interaction's key (``<user_id>:<item_id>:<timestamp>``) would not fit the ledger's id columns."""
