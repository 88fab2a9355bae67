"""Where a first /recommend's model time goes with prefix sharing: one user's 20 prompts scored on their
shared prefix (``TorchEngine.score_shared``) against 20 full forwards (``score``), and one full prompt
(about the cost of the prefix), on a trained run's adapters; and the user's history embedding with the
template's head run once (``apa.embeddings.template_head``, as the gateway does) against whole.

    python bench/prefix_profile.py --run RUN [--repeats 2]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from apa import prompts
from apa.embeddings import template_head
from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.model import forward_last_hidden, load_base_model, shared_prefix_length, token_ids
from apa.runs import read_run
from bench.machine import describe

HISTORY = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
           "Twelve Monkeys (1995)", "Babe (1995)"]
DISLIKED = ["Dead Man Walking (1995)", "Richard III (1995)", "Seven (Se7en) (1995)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (its v1 shard adapters)")
    parser.add_argument("--base-model", type=Path, default=Path("var/assets/smollm2-135m-instruct"))
    parser.add_argument("--repeats", type=int, default=2, help="the last repetition is reported")
    args = parser.parse_args()
    base = load_base_model(args.base_model)
    shards = read_run(args.run).config.shards
    engine = TorchEngine(base)
    engine.load([AdapterRef(shard=k, version=1, path=args.run / "adapters" / f"shard-{k}" / "v1")
                 for k in range(shards)])
    texts = [prompts.sample_prompt(HISTORY, DISLIKED, f"Movie Number {i} ({1990 + i})") for i in range(20)]
    history = prompts.history_prompt(HISTORY, DISLIKED)
    ids = token_ids(base.tokenizer, texts)
    weights = np.full(shards, 1.0 / shards)
    report = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        shared = engine.score_shared(texts, weights)
        shared_s = time.perf_counter() - started
        started = time.perf_counter()
        plain = engine.score(texts, np.tile(weights, (len(texts), 1)))
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        forward_last_hidden(base, texts[:1], batch_size=1)
        one_s = time.perf_counter() - started
        started = time.perf_counter()
        whole = forward_last_hidden(base, [history], batch_size=1)
        history_whole_s = time.perf_counter() - started
        started = time.perf_counter()
        headed = forward_last_hidden(base, [history], batch_size=1, head=template_head(base, "movie"))
        history_head_s = time.perf_counter() - started
        report = {"prompts": len(texts), "tokens_min": min(map(len, ids)), "tokens_max": max(map(len, ids)),
                  "shared_prefix_tokens": shared_prefix_length(ids), "shared_s": round(shared_s, 3),
                  "plain_s": round(plain_s, 3), "one_full_prompt_s": round(one_s, 3),
                  "plain_over_shared": round(plain_s / shared_s, 2),
                  "max_abs_diff": float(np.abs(shared - plain).max()),
                  "history_tokens": len(token_ids(base.tokenizer, [history])[0]),
                  "template_head_tokens": len(template_head(base, "movie").prefix),
                  "history_whole_s": round(history_whole_s, 3), "history_head_s": round(history_head_s, 3),
                  "history_max_abs_diff": float((whole - headed).abs().max()), "torch_threads": torch.get_num_threads()}
        print(json.dumps(report), flush=True)
    print(json.dumps({"machine": describe("cpu")}))


if __name__ == "__main__":
    main()
