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
