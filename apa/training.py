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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apa.checkpoints import Checkpoint, load_lora_state, lora_state
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

    def to_doc(self) -> dict[str, Any]:
        """What a checkpoint keeps of the statistics (JSON)."""
        return {"steps": self.steps, "seconds": self.seconds, "validation_seconds": self.validation_seconds,
                "losses": self.losses, "curve": self.curve, "epoch_kept": self.epoch_kept,
                "best": None if self.best is None else asdict(self.best)}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "TrainStats":
        return cls(steps=doc["steps"], seconds=doc["seconds"], validation_seconds=doc["validation_seconds"],
                   losses=doc["losses"], curve=doc["curve"], epoch_kept=doc["epoch_kept"],
                   best=None if doc["best"] is None else EpochScore(**doc["best"]))

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 4):]
        return {"steps": self.steps, "seconds": round(self.seconds, 3),
                "validation_seconds": round(self.validation_seconds, 3),
                "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
                "epochs_run": len(self.curve), "epoch_kept": self.epoch_kept, "curve": self.curve}


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name; its sha256 identifies a version's weights


def cpu_identity() -> dict[str, str]:
    """The CPU this process runs on: its name, vendor, family and model (from ``/proc/cpuinfo`` where there
    is one) and the instruction set torch's kernels use."""
    import platform

    fields = {"model name": "name", "vendor_id": "vendor", "cpu family": "family", "model": "model"}
    out = {"name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                if key.strip() in fields:
                    out[fields[key.strip()]] = value.strip()
    except OSError:
        pass
    out["capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def replay_record(*, order: Sequence[str], selection: Sequence[str]) -> dict[str, Any]:
    """What decides an adapter's bytes beyond its manifest's hashed fields (samples, config, seed, base
    model): the order the samples were given in (the seeded permutation indexes it), the validation
    samples that chose the epoch, the thread count, the versions of the code and the CPU. ``apa verify``
    reads it. Measured on 2-core CPUs: the same bytes with 1 or 2 threads and with deterministic algorithms
    on or off; the count is kept so a replay runs as the original did. Another CPU model's kernels may
    round differently (the paper run's shard 2 replayed on another machine to the same bytes, its shard 3,
    finished on a third, to within 2.05e-6), so the CPU is recorded, and a replay that differs says whether
    it ran on another one."""
    import peft
    import transformers

    from apa import __version__

    return {"order": list(order), "selection": list(selection), "threads": torch.get_num_threads(),
            "deterministic_algorithms": True,
            "batch_order": "torch.randperm(n, generator=torch.Generator().manual_seed(seed)) per epoch",
            "versions": {"apa": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
            "cpu": cpu_identity()}


def derive_seed(seed: int, shard: int | str) -> int:
    """A 31-bit seed for (run seed, shard): independent streams per shard, stable across runs."""
    return int(sha256_text(f"{seed}:{shard}")[:8], 16) & 0x7FFFFFFF


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


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
    saved = Checkpoint(checkpoint) if checkpoint is not None else None
    doc, best_state = saved.restore(model=model, optimiser=optimiser, generator=generator) if saved else (None, None)
    stats = TrainStats() if doc is None else TrainStats.from_doc(doc)
    done = 0 if doc is None else int(doc["epoch"])
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
                stats.best, stats.epoch_kept, best_state = score, epoch, lora_state(model)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", valid=f"{score.score:.3f}", kept=stats.epoch_kept)
        else:
            stats.epoch_kept = epoch
        stats.curve.append(point)
        if saved:
            saved.save(model=model, optimiser=optimiser, generator=generator, best_state=best_state,
                       doc={"epoch": epoch, **stats.to_doc()})
            crash_point("training.epoch-saved")
        if patience is not None and epoch - stats.epoch_kept >= patience:
            break
    bar.close()
    if best_state is not None:
        load_lora_state(model, best_state)
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
