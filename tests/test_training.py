"""Training kept at its best epoch: early stopping by a scripted validation, the fixed schedule, and a
resume from the per-epoch checkpoint that ends exactly where an uninterrupted run ends."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from apa import prompts
from apa.checkpoints import lora_state
from apa.errors import ConfigError
from apa.model import BaseModel
from apa.training import EpochScore, TrainConfig, train_adapter
from tests.conftest import TITLES

TEXTS = [prompts.sample_prompt([a], [b], c) for a, b, c in zip(TITLES.values(), list(TITLES.values())[1:],
                                                               list(TITLES.values())[2:], strict=False)]
LABELS = [i % 2 for i in range(len(TEXTS))]
CFG = TrainConfig(r=4, max_epochs=5, patience=2, batch_size=4)


class Scripted:
    """A validation that returns the given scores in turn and keeps each epoch's LoRA tensors."""

    def __init__(self, scores: list[float], fail_at: int | None = None) -> None:
        self.scores, self.fail_at = iter(scores), fail_at
        self.states: list[dict[str, torch.Tensor]] = []

    def __call__(self, model: Any) -> EpochScore:
        if self.fail_at is not None and len(self.states) + 1 == self.fail_at:
            raise KeyboardInterrupt("the machine went away")
        self.states.append(lora_state(model))
        return EpochScore(score=next(self.scores), predictions={"v": float(len(self.states))})


def equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stops_after_patience_epochs_without_gain_and_keeps_the_best(tiny_base: BaseModel) -> None:
    validate = Scripted([0.5, 0.7, 0.6, 0.7, 0.9])  # epoch 2 is best; 3 and 4 do not beat it (a tie is no gain)
    model, stats = train_adapter(tiny_base, TEXTS, LABELS, CFG, seed=3, validate=validate)
    assert [p["epoch"] for p in stats.curve] == [1, 2, 3, 4]  # epoch 5 never ran
    assert [p["valid"] for p in stats.curve] == [0.5, 0.7, 0.6, 0.7]
    assert stats.epoch_kept == 2 and stats.best is not None and stats.best.predictions == {"v": 2.0}
    assert len(TEXTS) == 10 and stats.steps == 4 * 3  # 10 prompts in batches of 4: 3 steps an epoch
    assert equal_states(lora_state(model), validate.states[1])
    assert not equal_states(validate.states[1], validate.states[3])
    assert not model.training
    assert stats.summary()["epoch_kept"] == 2 and stats.summary()["epochs_run"] == 4


def test_runs_every_epoch_while_it_improves(tiny_base: BaseModel) -> None:
    validate = Scripted([0.1, 0.2, 0.3, 0.4, 0.5])
    model, stats = train_adapter(tiny_base, TEXTS, LABELS, CFG, seed=3, validate=validate)
    assert stats.epoch_kept == 5 and len(stats.curve) == 5
    assert equal_states(lora_state(model), validate.states[-1])


def test_the_fixed_schedule_keeps_the_last_epoch_without_validating(tiny_base: BaseModel) -> None:
    fixed = TrainConfig(r=4, max_epochs=3, patience=None, batch_size=4)
    _, stats = train_adapter(tiny_base, TEXTS, LABELS, fixed, seed=3, validate=Scripted([]))
    assert stats.epoch_kept == 3 and stats.best is None and stats.validation_seconds == 0.0
    assert [p.get("valid") for p in stats.curve] == [None, None, None]
    with pytest.raises(ConfigError, match="validation function"):
        train_adapter(tiny_base, TEXTS, LABELS, CFG, seed=3)


@pytest.fixture
def no_threads() -> Iterator[None]:
    """One thread, so that summation order (and so every bit) is the same across the two runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_resumed_training_ends_exactly_where_an_uninterrupted_one_does(
    tiny_model_dir: Path, tmp_path: Path, no_threads: None,
) -> None:
    from tests.conftest import load_tiny

    scores = [0.5, 0.8, 0.6, 0.9, 0.7]
    straight_model, straight = train_adapter(load_tiny(tiny_model_dir), TEXTS, LABELS, CFG, seed=5,
                                             validate=Scripted(scores))
    checkpoint = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):  # killed while validating epoch 3: epochs 1-2 are saved
        train_adapter(load_tiny(tiny_model_dir), TEXTS, LABELS, CFG, seed=5, validate=Scripted(scores, fail_at=3),
                      checkpoint=checkpoint)
    assert (checkpoint / "state.json").is_file()
    resumed_validate = Scripted(scores[2:])
    resumed_model, resumed = train_adapter(load_tiny(tiny_model_dir), TEXTS, LABELS, CFG, seed=5,
                                           validate=resumed_validate, checkpoint=checkpoint)
    assert len(resumed_validate.states) == 3  # epochs 3, 4 and 5 only
    assert resumed.curve == straight.curve and resumed.epoch_kept == straight.epoch_kept == 4
    assert resumed.steps == straight.steps and resumed.losses == straight.losses
    assert equal_states(lora_state(resumed_model), lora_state(straight_model))
    # resumed once more after it finished: nothing left to train, the same adapter
    again_model, again = train_adapter(load_tiny(tiny_model_dir), TEXTS, LABELS, CFG, seed=5,
                                       validate=Scripted([]), checkpoint=checkpoint)
    assert again.curve == straight.curve
    assert equal_states(lora_state(again_model), lora_state(straight_model))


def test_config_from_a_run_written_before_early_stopping() -> None:
    old = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "lr": 3e-4,
           "epochs": 3, "batch_size": 8, "weight_decay": 0.0}
    cfg = TrainConfig.from_dict(old)
    assert cfg.max_epochs == 3 and cfg.patience is None
    assert TrainConfig.from_dict(cfg.as_dict()) == cfg
    with pytest.raises(ConfigError):
        TrainConfig(patience=0)


def _loss_and_grads(base: BaseModel, model: Any, hidden_of: Any) -> tuple[float, dict[str, torch.Tensor]]:
    targets = torch.tensor([base.yes_id if y else base.no_id for y in LABELS])
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model.get_output_embeddings()(hidden_of(model)), targets)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_shared_head_training_step_equals_the_whole_prompts_step(tiny_base: BaseModel) -> None:
    """The template's head run once per batch with gradients, every prompt's own tokens against its keys and
    values: the same loss and the same LoRA gradients as running every prompt whole (dropout off, so both
    draw nothing at random)."""
    import copy

    from peft import get_peft_model

    from apa.model import encode, headed_last_hidden, last_hidden, run_head, shared_prefix_length, token_ids
    from apa.training import lora_config

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_base.model), lora_config(TrainConfig(r=4, lora_dropout=0.0)))
    with torch.no_grad():  # B is zero at init, which would leave A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.train()
    ids = token_ids(tiny_base.tokenizer, TEXTS)
    cut = shared_prefix_length(ids)
    assert cut >= 5  # the template's head is really shared

    def whole(net: Any) -> torch.Tensor:
        return last_hidden(net, encode(tiny_base.tokenizer, TEXTS, tiny_base.device))

    def headed(net: Any) -> torch.Tensor:
        head = run_head(net, ids[0][:cut], tiny_base.device)
        return headed_last_hidden(net, head, [x[cut:] for x in ids], tiny_base.device)

    loss, grads = _loss_and_grads(tiny_base, model, whole)
    shared_loss, shared_grads = _loss_and_grads(tiny_base, model, headed)
    assert shared_loss == pytest.approx(loss, abs=1e-5)
    assert grads.keys() == shared_grads.keys() and len(grads) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for name, grad in grads.items():
        assert grad.abs().max() > 1e-3, name  # every gradient is really there
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=0), name
