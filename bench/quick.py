"""The small run every benchmark's ``--quick`` trains first: K=2, 64 / 32 / 64 samples, 1 epoch."""

import subprocess
import sys
from pathlib import Path

SHARDS, N_TRAIN, N_VALID, N_TEST, EPOCHS = 2, 64, 32, 64, 1


def train_quick_run(out: Path) -> Path:
    """Train it (shards only, no ledger) into ``out``; returns ``out``."""
    subprocess.run([sys.executable, "-m", "cli", "train", "--shards", str(SHARDS), "--train-samples",
                    str(N_TRAIN), "--valid-samples", str(N_VALID), "--test-samples", str(N_TEST), "--max-epochs",
                    str(EPOCHS), "--no-single", "--no-sisa", "--no-ledger", "--out", str(out)], check=True)
    return out
