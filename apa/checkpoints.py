"""The state of an unfinished adapter after an epoch, so a stopped training resumes with the same result
as one that never stopped: ``state.safetensors`` (current and best LoRA tensors, AdamW moments, both
random generators) and ``state.json`` (the epoch and the trainer's statistics). Safetensors and JSON, no
pickle. Written with ``artifacts.replace_dir``, so a crash leaves one whole state.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from apa import artifacts


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the trainable (LoRA) tensors, by parameter name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_lora_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


class Checkpoint:
    """The state after an epoch, in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, *, model: Any, optimiser: torch.optim.Optimizer, generator: torch.Generator,
             best_state: dict[str, torch.Tensor] | None, doc: dict[str, Any]) -> None:
        """``doc``: what the trainer needs back (JSON), beside the tensors."""
        tensors = {f"lora.{n}": t.contiguous() for n, t in lora_state(model).items()}
        tensors.update({f"best.{n}": t.contiguous() for n, t in (best_state or {}).items()})
        opt = optimiser.state_dict()
        for index, slots in opt["state"].items():
            tensors.update({f"adam.{index}.{slot}": value.detach().clone().reshape(value.shape)
                            for slot, value in slots.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batches"] = generator.get_state()

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps({**doc, "param_groups": opt["param_groups"]}))

        artifacts.replace_dir(self.folder, fill)

    def restore(self, *, model: Any, optimiser: torch.optim.Optimizer,
                generator: torch.Generator) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor] | None]:
        """Load the saved state into the given objects; returns (the saved ``doc``, the best LoRA state),
        (None, None) when nothing was saved."""
        if not (artifacts.recover_dir(self.folder) / "state.json").is_file():
            return None, None
        doc: dict[str, Any] = json.loads((self.folder / "state.json").read_text())
        tensors = load_file(str(self.folder / "state.safetensors"))
        load_lora_state(model, {n[len("lora."):]: t for n, t in tensors.items() if n.startswith("lora.")})
        best = {n[len("best."):]: t for n, t in tensors.items() if n.startswith("best.")} or None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, index, slot = name.split(".", 2)
                state.setdefault(int(index), {})[slot] = value
        optimiser.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        generator.set_state(tensors["rng.batches"])
        return doc, best

    def discard(self) -> None:
        shutil.rmtree(artifacts.recover_dir(self.folder), ignore_errors=True)  # an old folder aside too
