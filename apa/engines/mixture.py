"""The stacked mixture of K shard LoRAs inside the base model's target linear layers.

For each target module (``q_proj``, ``v_proj``) the K adapters are concatenated along the rank::

    A: [K*r, in]      (lora_A of shard 0, then shard 1, ...)
    B: [out, K*r]     (lora_B * scaling, same order)

and the wrapped linear layer adds, for a sample with shard weights ``w`` ([K]):

* APA(ND), exact:  x A^T diag(w ⊗ 1_r) B^T  =  x (Σ_k w_k B_k A_k)^T
* APA(D):          x (Σ_k w_k A_k)^T (Σ_k w_k B_k)^T

The wrapped layers hold no adapter state: the stack and weights reach them through a context variable
(``MIXTURE``) set per batch, so outside it the model is exactly the base model.
"""

import json
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from apa.engines.base import AdapterRef, Mode
from apa.errors import AdapterMismatch

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Stack:
    adapters: tuple[AdapterRef, ...]  # shard order 0..K-1
    r: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A [K*r, in], B*scaling [out, K*r])


@dataclass(frozen=True)
class Mix:
    stack: Stack
    weights: torch.Tensor  # [batch, K]
    mode: Mode


MIXTURE: ContextVar[Mix | None] = ContextVar("apa_mixture", default=None)


class MixtureLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus the per-sample mixture of the stacked shard LoRAs (when one is set)."""

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        y = self.base(x)  # [batch, seq, out]
        mix = MIXTURE.get()
        if mix is None or self.name not in mix.stack.modules:
            return y
        a, b = mix.stack.modules[self.name]  # [K*r, in], [out, K*r]
        w = mix.weights.to(x.dtype)  # [batch, K]
        r = mix.stack.r
        if mix.mode == "nd":
            h = x @ a.T  # [batch, seq, K*r]
            h = h * w.repeat_interleave(r, dim=1)[:, None, :]  # scale each rank block by its shard weight
            return y + h @ b.T  # [batch, seq, out]
        k = w.shape[1]
        a_mix = torch.einsum("bk,kri->bri", w, a.view(k, r, -1))  # [batch, r, in]
        b_mix = torch.einsum("bk,okr->bor", w, b.view(b.shape[0], k, r))  # [batch, out, r]
        h = torch.einsum("bsi,bri->bsr", x, a_mix)  # [batch, seq, r]
        return y + torch.einsum("bsr,bor->bso", h, b_mix)  # [batch, seq, out]


def install_mixture(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Wrap every ``nn.Linear`` whose last name is a target (idempotent); returns the wrapped names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, MixtureLoRALinear):
            wrapped.append(module.name)
            continue
        if name.rsplit(".", 1)[-1] in target_modules and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MixtureLoRALinear(module, name))
            wrapped.append(name)
    return sorted(set(wrapped))


def strip_mixture(model: nn.Module) -> nn.Module:
    """Undo ``install_mixture`` in place (training wants plain linear layers for PEFT)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MixtureLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
    return model


def read_adapter(ref: AdapterRef) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter's config and, per module, (lora_A [r, in], lora_B * scaling [out, r])."""
    config = json.loads((ref.path / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterMismatch(f"{ref.path}: rsLoRA/DoRA adapters are not supported")
    scaling = float(config["lora_alpha"]) / int(config["r"])
    tensors = load_file(str(ref.path / "adapter_model.safetensors"))
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        modules[name] = (a, b * scaling)
    if not modules:
        raise AdapterMismatch(f"{ref.path}: no LoRA tensors found")
    return config, modules
