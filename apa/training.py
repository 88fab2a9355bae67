"""LoRA training of one adapter from scratch (a shard's, or a baseline's), kept at its best epoch.

PEFT's LoRA (r=8, alpha=16, dropout 0.05 on q_proj and v_proj by default, B zero-initialised) on a
fresh copy of the frozen base model. The loss is the causal-LM loss of the answer token: cross-entropy
over the whole vocabulary at the position after ``### Response:\\n``, target "Yes" or "No" — the same
token the score is read from. Every random choice (LoRA init, dropout, batch order) is seeded from
(seed, shard), so a retrain of a shard on the same samples reproduces its adapter.

TALLRec's schedule: after every epoch the caller's ``validate`` scores the adapter on validation;
the best epoch is kept, and training stops after ``patience`` epochs without a gain, at most
``max_epochs``. ``patience=None`` is the fixed schedule (every epoch, the last one kept, no
validation). With a ``checkpoint`` folder the state after each epoch is saved there (safetensors and
JSON, no pickle), and a run that stopped resumes from it with the same result as one that did not.
"""

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from apa.engines.mixture import strip_mixture
from apa.errors import ConfigError
from apa.faults import crash_point
from apa.hashing import sha256_text
from apa.model import (
    BaseModel,
    encode,
    forward_last_hidden,
    headed_last_hidden,
    last_hidden,
    run_head,
    score_hidden,
    shared_prefix_length,
    token_ids,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides an adapter besides its samples, seed and base model (goes in manifests)."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 3e-4
    max_epochs: int = 6
    patience: int | None = 2  # epochs without a validation gain before stopping; None: fixed schedule
    batch_size: int = 8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1 or self.lora_alpha <= 0:
            raise ConfigError("LoRA rank and alpha must be positive")
        if self.max_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch size and learning rate must be positive")
        if self.patience is not None and self.patience < 1:
            raise ConfigError("patience must be at least one epoch (or None for the fixed schedule)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("LoRA dropout must be in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        if "epochs" in d:  # runs written before early stopping: a fixed number of epochs, the last kept
            d["max_epochs"] = d.pop("epochs")
            d.setdefault("patience", None)
        return cls(**{**d, "target_modules": tuple(d["target_modules"])})


@dataclass(frozen=True)
class EpochScore:
    """What ``validate`` says of the adapter after an epoch: higher ``score`` is better."""

    score: float
    predictions: dict[str, float] = field(default_factory=dict)  # sample id -> p(yes), kept with the best


Validate = Callable[[Any], EpochScore]


@dataclass
class TrainStats:
    steps: int = 0
    seconds: float = 0.0  # training steps only
    validation_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, loss, valid
    epoch_kept: int = 0
    best: EpochScore | None = None

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return {"steps": self.steps, "seconds": round(self.seconds, 3),
                "validation_seconds": round(self.validation_seconds, 3),
                "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
                "epochs_run": len(self.curve), "epoch_kept": self.epoch_kept, "curve": self.curve}


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name; its sha256 identifies a version's weights


def replay_record(*, order: Sequence[str], selection: Sequence[str]) -> dict[str, Any]:
    """What decides an adapter's bytes beyond its manifest's hashed fields (samples, config, seed, base
    model): the order the samples were given in (the seeded permutation indexes it), the validation
    samples that chose the epoch, the thread count, and the versions of the code. ``apa verify`` reads it.
    Measured on 2-core CPUs: the same bytes with 1 or 2 threads and with deterministic algorithms on or
    off; the count is kept so a replay runs as the original did."""
    import peft
    import transformers

    from apa import __version__

    return {"order": list(order), "selection": list(selection), "threads": torch.get_num_threads(),
            "deterministic_algorithms": True,
            "batch_order": "torch.randperm(n, generator=torch.Generator().manual_seed(seed)) per epoch",
            "versions": {"apa": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def derive_seed(seed: int, shard: int | str) -> int:
    """A 31-bit seed for (run seed, shard): independent streams per shard, stable across runs."""
    return int(sha256_text(f"{seed}:{shard}")[:8], 16) & 0x7FFFFFFF


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _load_lora_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


class _Checkpoint:
    """The state after an epoch, in ``folder``: ``state.safetensors`` (current and best LoRA tensors,
    AdamW moments, both random generators) and ``state.json`` (epoch, curve, stats, best predictions).
    Written to a temporary folder and renamed over the old one, so a crash leaves one whole state."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, *, model: Any, optimiser: torch.optim.Optimizer, generator: torch.Generator,
             stats: TrainStats, best_state: dict[str, torch.Tensor] | None, epoch: int) -> None:
        tensors = {f"lora.{n}": t.contiguous() for n, t in _lora_state(model).items()}
        tensors.update({f"best.{n}": t.contiguous() for n, t in (best_state or {}).items()})
        opt = optimiser.state_dict()
        for index, slots in opt["state"].items():
            tensors.update({f"adam.{index}.{slot}": value.detach().clone().reshape(value.shape)
                            for slot, value in slots.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batches"] = generator.get_state()
        doc = {"epoch": epoch, "steps": stats.steps, "seconds": stats.seconds,
               "validation_seconds": stats.validation_seconds, "losses": stats.losses, "curve": stats.curve,
               "epoch_kept": stats.epoch_kept, "param_groups": opt["param_groups"],
               "best": None if stats.best is None else asdict(stats.best)}
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder.parent))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(doc))
        old = self.folder.with_name(self.folder.name + ".old")
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self, *, model: Any, optimiser: torch.optim.Optimizer, generator: torch.Generator,
                stats: TrainStats) -> tuple[int, dict[str, torch.Tensor] | None]:
        """Load the saved state into the given objects; returns (epochs done, best LoRA state)."""
        old = self.folder.with_name(self.folder.name + ".old")
        if not self.folder.exists() and old.exists():  # crashed between the two renames
            os.replace(old, self.folder)
        if not (self.folder / "state.json").is_file():
            return 0, None
        doc = json.loads((self.folder / "state.json").read_text())
        tensors = load_file(str(self.folder / "state.safetensors"))
        _load_lora_state(model, {n[len("lora."):]: t for n, t in tensors.items() if n.startswith("lora.")})
        best = {n[len("best."):]: t for n, t in tensors.items() if n.startswith("best.")} or None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, index, slot = name.split(".", 2)
                state.setdefault(int(index), {})[slot] = value
        optimiser.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        generator.set_state(tensors["rng.batches"])
        stats.steps, stats.seconds, stats.losses = doc["steps"], doc["seconds"], doc["losses"]
        stats.validation_seconds, stats.curve, stats.epoch_kept = doc["validation_seconds"], doc["curve"], \
            doc["epoch_kept"]
        stats.best = None if doc["best"] is None else EpochScore(**doc["best"])
        return int(doc["epoch"]), best

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms only (no kernel may pick its reduction order at run time), restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train_adapter(
    base: BaseModel, prompts: Sequence[str], labels: Sequence[int], cfg: TrainConfig, *, seed: int,
    validate: Validate | None = None, checkpoint: Path | None = None, desc: str | None = None,
) -> tuple[Any, TrainStats]:
    """Train one LoRA from scratch; returns the PEFT model (in eval mode, at the kept epoch) and its stats.

    ``validate`` is needed unless ``cfg.patience`` is None (the fixed schedule ignores it).
    """
    with deterministic():
        return _train_adapter(base, prompts, labels, cfg, seed=seed, validate=validate, checkpoint=checkpoint,
                              desc=desc)


def _train_adapter(
    base: BaseModel, prompts: Sequence[str], labels: Sequence[int], cfg: TrainConfig, *, seed: int,
    validate: Validate | None, checkpoint: Path | None, desc: str | None,
) -> tuple[Any, TrainStats]:
    from peft import get_peft_model

    if len(prompts) != len(labels) or not prompts:
        raise ConfigError("need the same, non-zero number of prompts and labels")
    patience = cfg.patience
    if patience is not None and validate is None:
        raise ConfigError("early stopping needs a validation function (or patience=None)")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = get_peft_model(strip_mixture(copy.deepcopy(base.model)), lora_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = torch.tensor([base.yes_id if y else base.no_id for y in labels])
    lm_head = model.get_output_embeddings()
    ids = token_ids(base.tokenizer, prompts)
    cut = shared_prefix_length(ids)  # the template's head, which every prompt starts with
    stats = TrainStats()
    saved = _Checkpoint(checkpoint) if checkpoint is not None else None
    done, best_state = saved.restore(model=model, optimiser=optimiser, generator=generator, stats=stats) \
        if saved else (0, None)
    steps_per_epoch = -(-len(prompts) // cfg.batch_size)
    bar = tqdm(total=cfg.max_epochs * steps_per_epoch, initial=done * steps_per_epoch, desc=desc,
               disable=desc is None, unit="step")
    for epoch in range(done + 1, cfg.max_epochs + 1):
        if patience is not None and epoch - stats.epoch_kept > patience:
            break  # only reached on a resume that had already decided to stop
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(prompts), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            if cut:  # the head once per batch, with gradients; each row runs its own tokens against it
                hidden = headed_last_hidden(model, run_head(model, ids[0][:cut], base.device),
                                            [ids[i][cut:] for i in index], base.device)  # [batch, hidden]
            else:
                hidden = last_hidden(model, encode(base.tokenizer, [prompts[i] for i in index], base.device))
            logits = lm_head(hidden)  # [batch, vocab]
            loss = F.cross_entropy(logits.float(), targets[index].to(logits.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            stats.steps += 1
            crash_point("training.step")
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
        stats.losses += losses
        stats.seconds += time.perf_counter() - started
        point: dict[str, float] = {"epoch": epoch, "loss": round(sum(losses) / len(losses), 5)}
        if validate is not None and patience is not None:
            started = time.perf_counter()
            model.eval()
            score = validate(model)
            stats.validation_seconds += time.perf_counter() - started
            point["valid"] = round(score.score, 5)
            if stats.best is None or score.score > stats.best.score:
                stats.best, stats.epoch_kept, best_state = score, epoch, _lora_state(model)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", valid=f"{score.score:.3f}", kept=stats.epoch_kept)
        else:
            stats.epoch_kept = epoch
        stats.curve.append(point)
        if saved:
            saved.save(model=model, optimiser=optimiser, generator=generator, stats=stats, best_state=best_state,
                       epoch=epoch)
            crash_point("training.epoch-saved")
        if patience is not None and epoch - stats.epoch_kept >= patience:
            break
    bar.close()
    if best_state is not None:
        _load_lora_state(model, best_state)
    model.eval()
    return model, stats


def predict(base: BaseModel, model: Any, prompts: Sequence[str], *, batch_size: int = 8,
            desc: str | None = None) -> list[float]:
    """p(yes) of each prompt through ``model`` (a PEFT model, or the base model). The prompts' common
    head runs once, through ``model`` (its keys depend on the adapter), and every prompt's own tokens
    against it (``forward_last_hidden``'s ``head``)."""
    head = None
    if len(prompts) > 1:
        ids = token_ids(base.tokenizer, prompts)
        cut = shared_prefix_length(ids)
        if cut:
            with torch.inference_mode():
                head = run_head(base.model if model is None else model, ids[0][:cut], base.device)
    hidden = forward_last_hidden(base, prompts, batch_size=batch_size, desc=desc, model=model, head=head)
    return [float(p) for p in score_hidden(base, hidden, model=model)]


def save_adapter(model: Any, folder: Path) -> None:
    """PEFT's own format (adapter_config.json + adapter_model.safetensors): PEFT and vLLM load it."""
    model.save_pretrained(str(folder))
