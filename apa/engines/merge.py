"""One weight vector over the shards, exported as one PEFT LoRA adapter (for servers that take one LoRA).

vLLM serves exactly one LoRA per request and merges none, so the APA mixture of a weight vector ``w``
([K], the effective weights: quarantined shards 0, the rest summing to 1) becomes one adapter folder:

* APA(ND), exact, rank K'·r (K' = shards with w_k > 0, at most K·r)::

      A = [A_0; A_1; ...]                      # [K'*r, in]   (shard order)
      B = [w_0 s_0 B_0, w_1 s_1 B_1, ...]      # [out, K'*r]  (s_k = alpha_k / r_k)
      B A = Σ_k w_k s_k B_k A_k

* APA(D), rank r::

      A = Σ_k w_k A_k                          # [r, in]
      B = Σ_k w_k s_k B_k                      # [out, r]

The scaling is folded into B and the config says ``lora_alpha = r`` (PEFT and vLLM scale by
``lora_alpha / r`` = 1), so the folder loads unchanged in both. A shard with zero weight is left out
entirely: an adapter built after a quarantine holds no tensor of the quarantined shard.

Names are content-addressed: the mode, each used shard's (shard, version, sha256 of its weights) and
the weights rounded to ``WEIGHT_DECIMALS``; the same name always means the same tensors. Weights may
first be snapped to a grid (``snap_weights``) to bound how many distinct adapters a server holds.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from apa.engines.base import AdapterRef, Mode
from apa.engines.mixture import read_adapter
from apa.errors import AdapterMismatch

WEIGHT_DECIMALS = 6  # weights in a name; two vectors closer than this share a name (and an adapter)
PROVENANCE = "apa_merge.json"  # beside the adapter: which shard versions (and weights) it holds
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ShardAdapter:
    """One shard version's tensors, read once: per module (lora_A [r, in], lora_B * scaling [out, r])."""

    ref: AdapterRef
    r: int
    config: dict
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sha256: str  # of adapter_model.safetensors

    @classmethod
    def read(cls, ref: AdapterRef) -> "ShardAdapter":
        config, modules = read_adapter(ref)
        digest = hashlib.sha256((ref.path / "adapter_model.safetensors").read_bytes()).hexdigest()
        return cls(ref=ref, r=int(config["r"]), config=config, modules=modules, sha256=digest)


def snap_weights(weights: np.ndarray, step: float) -> np.ndarray:
    """Round a weight vector ([K], summing to 1) to multiples of ``step`` that still sum to 1 (largest
    remainders round up), keeping zeros zero. Each weight moves by less than ``step``. ``step=0``: as is."""
    if step <= 0:
        return weights.astype(np.float64)
    units = round(1.0 / step)
    if not np.isclose(units * step, 1.0):
        raise AdapterMismatch(f"weight step {step} does not divide 1")
    scaled = weights.astype(np.float64) * units  # [K]
    floor = np.floor(scaled)
    short = units - int(floor.sum())
    order = np.argsort(-(scaled - floor), kind="stable")
    floor[order[:short]] += 1
    return floor / units


def provenance(adapters: Sequence[ShardAdapter], weights: np.ndarray, mode: Mode) -> dict:
    """What a merged adapter is made of: the mode and each used shard's identity and weight."""
    used = [{"shard": a.ref.shard, "version": a.ref.version, "sha256": a.sha256,
             "weight": round(float(w), WEIGHT_DECIMALS)}
            for a, w in zip(adapters, weights, strict=True) if round(float(w), WEIGHT_DECIMALS) > 0]
    return {"mode": mode, "shards": used}


def adapter_name(adapters: Sequence[ShardAdapter], weights: np.ndarray, mode: Mode) -> str:
    """``apa-<mode>-<digest>`` of the adapter's provenance (see module docstring)."""
    canonical = json.dumps(provenance(adapters, weights, mode), sort_keys=True, separators=(",", ":"))
    return f"apa-{mode}-{hashlib.sha256(canonical.encode()).hexdigest()[:24]}"


def purge_merged(root: Path, keep_sha256: set[str]) -> list[str]:
    """Delete every merged adapter under ``root`` made from a shard version whose tensors are not in
    ``keep_sha256`` (e.g. one left behind by a gateway that stopped before unloading it, holding a
    version since retrained after a deletion); returns the names deleted."""
    deleted = []
    for folder in sorted(root.glob("apa-*")) if root.is_dir() else []:
        try:
            made_of = json.loads((folder / PROVENANCE).read_text())["shards"]
            stale = any(shard["sha256"] not in keep_sha256 for shard in made_of)
        except (OSError, ValueError, KeyError, TypeError):
            stale = True  # unreadable: nothing vouches for it
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder.name)
    return deleted


def merged_tensors(adapters: Sequence[ShardAdapter], weights: np.ndarray,
                   mode: Mode) -> tuple[int, dict[str, torch.Tensor]]:
    """The merged adapter's rank and its PEFT state dict (fp32), shards with zero weight left out."""
    if len(adapters) != len(weights):
        raise AdapterMismatch(f"{len(weights)} weights for {len(adapters)} shards")
    used = [(a, float(w)) for a, w in zip(adapters, weights, strict=True) if round(float(w), WEIGHT_DECIMALS) > 0]
    if not used:
        raise AdapterMismatch("no shard has weight: nothing to merge")
    ranks = {a.r for a, _ in used}
    names = {frozenset(a.modules) for a, _ in used}
    if len(ranks) != 1 or len(names) != 1:
        raise AdapterMismatch("every shard adapter must have the same rank and target modules")
    r = ranks.pop()
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(names.pop()):
        a_blocks = [a.modules[name][0].float() for a, _ in used]  # each [r, in]
        b_blocks = [a.modules[name][1].float() * w for a, w in used]  # each [out, r], scaled by w_k s_k
        if mode == "nd":
            a_merged = torch.cat(a_blocks, dim=0)  # [K'*r, in]
            b_merged = torch.cat(b_blocks, dim=1)  # [out, K'*r]
        else:
            a_merged = sum((a_k * w for a_k, (_, w) in zip(a_blocks, used, strict=True)),
                           torch.zeros_like(a_blocks[0]))  # [r, in]
            b_merged = sum(b_blocks, torch.zeros_like(b_blocks[0]))  # [out, r]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a_merged.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b_merged.contiguous()
    return (len(used) * r if mode == "nd" else r), tensors


def write_merged(adapters: Sequence[ShardAdapter], weights: np.ndarray, mode: Mode, root: Path) -> Path:
    """Write (once) the merged adapter of ``weights`` under ``root/<name>`` and return its folder.

    Written to a temporary folder and renamed into place, so a reader never sees half an adapter; an
    existing folder of that name already holds exactly these tensors and is returned as is."""
    name = adapter_name(adapters, weights, mode)
    folder = root / name
    if (folder / "adapter_config.json").is_file():
        return folder
    rank, tensors = merged_tensors(adapters, weights, mode)
    config = {key: value for key, value in adapters[0].config.items()
              if key not in ("rank_pattern", "alpha_pattern")}
    config.update(r=rank, lora_alpha=rank, lora_dropout=0.0, use_rslora=False, use_dora=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / PROVENANCE).write_text(json.dumps(provenance(adapters, weights, mode), indent=1, sort_keys=True))
        os.chmod(tmp, 0o755)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "adapter_config.json").is_file():  # not a concurrent writer of the same name
            raise
    return folder
