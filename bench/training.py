"""Training and validation speed: every prompt whole (before) against the template's head run once per
batch (after, ``apa.training``), side by side on the same batches of real MovieLens prompts, same model.

* **training step** (forward, backward, AdamW step of one batch): before, ``encode`` + ``last_hidden``
  over whole prompts; after, ``run_head`` once with gradients and every prompt's own tokens against its
  keys and values (``headed_last_hidden``). The two alternate batch by batch on twin models that start
  equal and take the same steps, so a drift in the machine's load hits both; their losses are compared
  at every step and the twins' LoRA weights at the end. Each path goes first in every other batch; the
  ratio of total seconds and the median of the per-batch ratios are both reported. LoRA dropout is off
  here so that both draw nothing at random and differ by float rounding only (training's 0.05 costs
  the same both ways). The first batch warms up and is not timed.
* **validation** (p(yes) of the validation prompts through the adapter): before, ``forward_last_hidden``
  over whole prompts; after, ``training.predict`` (the head once, then each prompt's own tokens).

Reports seconds per training sample-epoch and per validation sample, and the ratios::

    python bench/training.py --out docs/results/training.json          # 64 training, 64 validation samples
    python bench/training.py --quick                                   # 24 / 16
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import get_peft_model

from apa import data, training
from apa.model import (
    BaseModel,
    encode,
    forward_last_hidden,
    headed_last_hidden,
    last_hidden,
    load_base_model,
    run_head,
    score_hidden,
    shared_prefix_length,
    token_ids,
)
from apa.samples import build_samples, split_samples
from apa.settings import get_settings
from bench.machine import command_line, describe, write_report


def real_prompts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` seeded TALLRec samples of MovieLens-100K (ten earlier items each), as prompts and labels."""
    settings = get_settings()
    dataset = data.load(data.MOVIELENS_100K, datasets_dir=settings.datasets_dir, assets_dir=settings.assets_dir)
    picked = split_samples(build_samples(dataset, min_history=10), n_train=n, n_valid=1, n_test=1, seed=seed)["train"]
    return [s.prompt(dataset.titles) for s in picked], [s.label for s in picked]


def step_times(base: BaseModel, texts: list[str], labels: list[int], batch_size: int, seed: int) -> dict[str, Any]:
    """One epoch of training steps each way, alternating batch by batch."""
    torch.manual_seed(seed)
    cfg = training.TrainConfig(batch_size=batch_size, lora_dropout=0.0)
    before = get_peft_model(copy.deepcopy(base.model), training.lora_config(cfg))
    after = copy.deepcopy(before)
    optimisers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr)
                  for name, m in (("before", before), ("after", after))}
    targets = torch.tensor([base.yes_id if y else base.no_id for y in labels])
    ids = token_ids(base.tokenizer, texts)
    cut = shared_prefix_length(ids)
    seconds = {"before": 0.0, "after": 0.0}
    gaps, ratios = [], []
    for start in range(0, len(texts), batch_size):
        index = list(range(start, min(start + batch_size, len(texts))))
        losses, took = {}, {}
        pair = [("before", before), ("after", after)]
        for name, model in pair if start // batch_size % 2 == 0 else pair[::-1]:  # each goes first in turn
            model.train()
            began = time.perf_counter()
            if name == "before":
                hidden = last_hidden(model, encode(base.tokenizer, [texts[i] for i in index], base.device))
            else:
                hidden = headed_last_hidden(model, run_head(model, ids[0][:cut], base.device),
                                            [ids[i][cut:] for i in index], base.device)
            loss = F.cross_entropy(model.get_output_embeddings()(hidden), targets[index])
            optimisers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimisers[name].step()
            took[name] = time.perf_counter() - began
            losses[name] = float(loss.detach())
        if start:
            for name in seconds:
                seconds[name] += took[name]
            ratios.append(took["before"] / took["after"])
        gaps.append(abs(losses["before"] - losses["after"]))
        print(f"batch {start // batch_size + 1}: before {losses['before']:.5f}, after {losses['after']:.5f}",
              flush=True)
    before.eval()
    after.eval()
    timed = len(texts) - min(batch_size, len(texts))
    return {"seconds": seconds, "timed_samples": timed, "batch_ratios": [round(r, 3) for r in ratios],
            "max_loss_gap": max(gaps), "head_tokens": cut,
            "mean_prompt_tokens": float(np.mean([len(x) for x in ids])), "models": (before, after)}


def validation_times(base: BaseModel, model: Any, texts: list[str], batch_size: int) -> dict[str, Any]:
    began = time.perf_counter()
    whole = score_hidden(base, forward_last_hidden(base, texts, batch_size=batch_size, model=model), model=model)
    before = time.perf_counter() - began
    began = time.perf_counter()
    headed = training.predict(base, model, texts, batch_size=batch_size)
    after = time.perf_counter() - began
    return {"seconds": {"before": before, "after": after},
            "max_p_gap": float(np.max(np.abs(whole.numpy() - np.array(headed))))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--valid-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="24 training and 16 validation samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n_train, n_valid = (24, 16) if args.quick else (args.train_samples, args.valid_samples)
    base = load_base_model(get_settings().base_model_dir, device=args.device)
    texts, labels = real_prompts(n_train + n_valid, args.seed)
    steps = step_times(base, texts[:n_train], labels[:n_train], args.batch_size, args.seed)
    before, after = steps.pop("models")
    weight_gap = max(float((p - q).detach().abs().max()) for (_, p), (_, q) in
                     zip(before.named_parameters(), after.named_parameters(), strict=True))
    valid = validation_times(base, after, texts[n_train:], args.batch_size)
    per = {
        "train_s_per_sample_epoch": {k: round(v / steps["timed_samples"], 4) for k, v in steps["seconds"].items()},
        "valid_s_per_sample": {k: round(v / n_valid, 4) for k, v in valid["seconds"].items()},
    }
    ratios = {"train": round(steps["seconds"]["before"] / steps["seconds"]["after"], 3),
              "train_median_of_batches": round(float(np.median(steps["batch_ratios"])), 3),
              "valid": round(valid["seconds"]["before"] / valid["seconds"]["after"], 3)}
    report = {"benchmark": "training", "machine": describe(args.device),
              "command": command_line("bench/training.py"),
              "n_train": n_train, "n_valid": n_valid, "batch_size": args.batch_size, **per, "speedup": ratios,
              "train_batch_ratios": steps["batch_ratios"],
              "head_tokens": steps["head_tokens"], "mean_prompt_tokens": round(steps["mean_prompt_tokens"], 1),
              "max_loss_gap": steps["max_loss_gap"], "max_lora_weight_gap_after_epoch": weight_gap,
              "max_valid_p_gap": valid["max_p_gap"]}
    print(json.dumps(report, indent=1))
    print(f"training: {per['train_s_per_sample_epoch']['before']} -> {per['train_s_per_sample_epoch']['after']} "
          f"s per sample-epoch ({ratios['train']}x); validation: {per['valid_s_per_sample']['before']} -> "
          f"{per['valid_s_per_sample']['after']} s per sample ({ratios['valid']}x)")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
