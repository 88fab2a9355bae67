"""Check that a ``--quick`` report has the same JSON keys as the full one (issue 4's acceptance).

Compares the key paths of two reports: dicts by key, lists by the union of their items' keys (list
lengths and values differ by design; keys that are numbers, like ``per_k``'s K, are one wildcard).

    python bench/same_keys.py docs/results/engine-quick.json docs/results/engine-cpu.json
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def key_paths(value: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            name = "<n>" if str(key).isdigit() else str(key)
            paths.add(f"{prefix}.{name}")
            paths |= key_paths(item, f"{prefix}.{name}")
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, f"{prefix}[]")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quick", type=Path)
    parser.add_argument("full", type=Path)
    args = parser.parse_args()
    quick, full = (key_paths(json.loads(p.read_text())) for p in (args.quick, args.full))
    for label, missing in (("only in the quick report", quick - full), ("only in the full report", full - quick)):
        for path in sorted(missing):
            print(f"{label}: {path}")
    same = quick == full
    print(f"{args.quick} vs {args.full}: {'same keys' if same else 'keys differ'} ({len(full)} key paths)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
