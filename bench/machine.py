"""What a benchmark ran on, recorded beside every result."""

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def describe(device: str = "cpu") -> dict[str, Any]:
    import torch

    from apa.training import cpu_identity

    info: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_identity()["name"],
                            "cores": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def command_line(script: str) -> str:
    """How this benchmark was started (``script`` as the docs run it: ``bench/x.py`` or ``-m bench.x``)."""
    return " ".join(["python", script, *sys.argv[1:]])


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """``report`` as indented JSON at ``out`` (its folder made), when the benchmark was given one."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
