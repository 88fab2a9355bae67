"""``python -m tests.support.slow_worker``: ``apa worker`` whose version writes stop half-way, for fault tests.

Each adapter version's files are written into its temp folder, then the worker touches
``$APA_FAULT_MARKER`` and sleeps ``$APA_FAULT_SLEEP_S`` before the atomic rename: a SIGKILL then
lands mid-retrain with a temp folder on disk and the shard lock held.
"""

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apa import artifacts
from cli.main import main

_write_version = artifacts.write_version


def slow_write_version(run_dir: Path, shard: int | str, fill: Callable[[Path], None], manifest_doc: dict[str, Any],
                       ) -> tuple[int, Path]:
    def slow_fill(tmp: Path) -> None:
        fill(tmp)
        Path(os.environ["APA_FAULT_MARKER"]).write_text(str(tmp))
        time.sleep(float(os.environ.get("APA_FAULT_SLEEP_S", "600")))

    return _write_version(run_dir, shard, slow_fill, manifest_doc)


if __name__ == "__main__":
    artifacts.write_version = slow_write_version  # type: ignore[assignment]
    main()
