"""What can go wrong in the core, as domain errors. Each error is of one *kind* (``NotFound``,
``Conflict``, ``Invalid``, ``Unavailable``), and the service maps kinds, not errors, to HTTP statuses
(``service/errors.py``); an error of no kind reaching a request is a bug or a misconfiguration (500).
The ledger's errors are in ``ledger/errors.py``, the service's own in ``service/errors.py``.
"""


class APAError(Exception):
    """Base class of every error the core, the ledger and the service raise on purpose."""


class NotFound(APAError):
    """Something named by id does not exist (404)."""


class Conflict(APAError):
    """The request contradicts what is recorded (409)."""


class Invalid(APAError):
    """The request is well-formed but names what cannot be used (422)."""


class Unavailable(APAError):
    """Something the answer needs cannot answer now; try again later (503 with Retry-After)."""


class AssetError(APAError):
    """An asset could not be fetched, failed its checksum, or is missing."""


class DatasetError(APAError):
    """A dataset to import is malformed or missing."""


class ConfigError(APAError):
    """A run or command was configured with values that cannot work."""


class RunNotFound(NotFound):
    """No run folder where one was expected."""


class AllShardsQuarantined(Unavailable):
    """Every shard is quarantined: no model may answer (callers fall back to popularity)."""


class AdapterMismatch(APAError):
    """An adapter does not fit the engine (rank, target modules or shapes differ)."""


class GateFailed(APAError):
    """A retrained version failed its validation gate; it is not served."""


class EngineUnavailable(Unavailable):
    """The scoring engine cannot answer (the vLLM server is unreachable or refused a request)."""
