"""Named crash points, for tests: where ``APA_FAULT_POINT`` names one, the process dies there at once,
as a SIGKILL would leave it (no cleanup, no ``finally``, no atexit).

``APA_FAULT_POINT=<name>`` dies at the first pass through ``<name>``, ``<name>@<n>`` at the n-th. The
variable is read at each call, so a test sets it in the environment of the process it starts.
"""

import os

EXIT_CODE = 137  # what a shell reports for a SIGKILLed process
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("APA_FAULT_POINT")
    if not spec:
        return
    point, _, count = spec.partition("@")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] >= int(count or 1):
        os._exit(EXIT_CODE)
