"""Every error a request path can raise answers with a status chosen by its kind."""

import ast
from pathlib import Path

import pytest

import ledger.errors
import service.errors
from apa import errors
from service.errors import STATUS, status_of

ROOT = Path(__file__).resolve().parents[2]
# Errors of no kind: on a request path they mean a bug or a misconfiguration, and answer 500.
INTERNAL = {
    errors.AssetError: "the base model or the dataset is missing: the gateway does not start",
    errors.DatasetError: "`apa data import` only",
    errors.ConfigError: "settings and run configuration, checked at start",
    errors.AdapterMismatch: "adapters that do not fit the engine: checked when a version is loaded",
    errors.GateFailed: "the worker's validation gate; never raised in the gateway",
}


def every_error() -> set[type[errors.APAError]]:
    found, todo = set(), [errors.APAError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    served = ("apa.", "ledger.", "service.", "worker.", "jobs.")  # not the benchmarks' own errors
    return {e for e in found - set(STATUS) if e.__module__.startswith(served)}  # nor the kinds themselves


STARTUP = {"service/app.py"}  # builds the app: what it raises stops the gateway before any request


def raised(folder: Path) -> set[tuple[str, str]]:
    """(error name, file) of every ``raise Name(...)`` under ``folder``."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                found.add((node.exc.func.id, str(path.relative_to(ROOT))))
    return found


def test_every_error_has_a_kind_or_is_internal_on_purpose() -> None:
    assert ledger.errors.LedgerError and service.errors.ItemsNotFound  # both modules' errors are loaded
    unclassified = {e.__name__ for e in every_error() if status_of(e) is None and e not in INTERNAL}
    assert not unclassified, f"give these errors a kind (apa.errors) or list them as INTERNAL: {unclassified}"
    assert not {e.__name__ for e in INTERNAL if status_of(e) is not None}


@pytest.mark.parametrize("package", ["service", "ledger"])
def test_every_error_the_gateway_and_the_ledger_raise_has_a_status(package: str) -> None:
    by_name = {e.__name__: e for e in every_error()}
    domain = {(name, path) for name, path in raised(ROOT / package) if name in by_name}
    assert domain, "the scan found the domain errors raised"
    without = {(name, path) for name, path in domain if status_of(by_name[name]) is None and path not in STARTUP}
    assert not without, f"raised on a request path with no status: {without}"


@pytest.mark.parametrize(("error", "status"), [
    (ledger.errors.UserNotFound, 404), (ledger.errors.DeletionNotFound, 404), (ledger.errors.ShardNotFound, 404),
    (errors.RunNotFound, 404), (service.errors.ItemsNotFound, 422), (service.errors.InteractionKeyTooLong, 422),
    (ledger.errors.NothingToRetrain, 409), (ledger.errors.IdempotencyConflict, 409),
    (ledger.errors.LedgerError, 503), (errors.EngineUnavailable, 503), (errors.AllShardsQuarantined, 503),
])
def test_the_statuses_of_the_kinds(error: type[errors.APAError], status: int) -> None:
    assert status_of(error) == status
