"""LoRA training of one adapter from scratch (a shard's, or the single baseline on all data).

PEFT's LoRA (r=8, alpha=16, dropout 0.05 on q_proj and v_proj by default, B zero-initialised) on a
fresh copy of the frozen base model. The loss is the causal-LM loss of the answer token: cross-entropy
over the whole vocabulary at the position after ``### Response:\\n``, target "Yes" or "No" — the same
token the score is read from. Every random choice (LoRA init, dropout, batch order) is seeded from
(seed, shard), so a retrain of a shard on the same samples reproduces its adapter.
"""

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apa.engines.torch import strip_mixture
from apa.errors import ConfigError
from apa.hashing import sha256_text
from apa.model import BaseModel, encode, forward_last_hidden, last_hidden, score_hidden


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides an adapter besides its samples, seed and base model (goes in manifests)."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 3e-4
    epochs: int = 3
    batch_size: int = 8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1 or self.lora_alpha <= 0:
            raise ConfigError("LoRA rank and alpha must be positive")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch size and learning rate must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("LoRA dropout must be in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**{**d, "target_modules": tuple(d["target_modules"])})


@dataclass
class TrainStats:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return {"steps": self.steps, "seconds": round(self.seconds, 3),
                "final_loss": round(sum(tail) / len(tail), 5) if tail else None}


def derive_seed(seed: int, shard: int | str) -> int:
    """A 31-bit seed for (run seed, shard): independent streams per shard, stable across runs."""
    return int(sha256_text(f"{seed}:{shard}")[:8], 16) & 0x7FFFFFFF


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def train_adapter(
    base: BaseModel, prompts: Sequence[str], labels: Sequence[int], cfg: TrainConfig, *, seed: int,
    desc: str | None = None,
) -> tuple[Any, TrainStats]:
    """Train one LoRA from scratch; returns the PEFT model (in eval mode) and its stats."""
    from peft import get_peft_model

    if len(prompts) != len(labels) or not prompts:
        raise ConfigError("need the same, non-zero number of prompts and labels")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = get_peft_model(strip_mixture(copy.deepcopy(base.model)), lora_config(cfg))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = torch.tensor([base.yes_id if y else base.no_id for y in labels])
    head = model.get_output_embeddings()
    stats = TrainStats()
    steps_per_epoch = -(-len(prompts) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, disable=desc is None, unit="step")
    started = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(prompts), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            batch = encode(base.tokenizer, [prompts[i] for i in index], base.device)
            logits = head(last_hidden(model, batch))  # [batch, vocab]
            loss = F.cross_entropy(logits.float(), targets[index].to(logits.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            stats.steps += 1
            stats.losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
            bar.update(1)
    bar.close()
    stats.seconds = time.perf_counter() - started
    model.eval()
    return model, stats


def predict(base: BaseModel, model: Any, prompts: Sequence[str], *, batch_size: int = 8,
            desc: str | None = None) -> list[float]:
    """p(yes) of each prompt through ``model`` (a PEFT model, or the base model)."""
    hidden = forward_last_hidden(base, prompts, batch_size=batch_size, desc=desc, model=model)
    return [float(p) for p in score_hidden(base, hidden, model=model)]


def save_adapter(model: Any, folder: Path) -> None:
    """PEFT's own format (adapter_config.json + adapter_model.safetensors): PEFT and vLLM load it."""
    model.save_pretrained(str(folder))
