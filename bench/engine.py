"""Inference cost of APA's one-forward mixture vs a single LoRA vs K separate forwards.

For each K and batch size, on the same real TALLRec prompts (MovieLens-100K) and the real base model
(or a 7B-shaped random model with ``--shape llama7b``), with K random LoRA adapters (r=8, q_proj +
v_proj, B non-zero):

* ``single``   — PEFT's own forward with one LoRA (what serving one adapter costs);
* ``mix``      — the torch engine: K adapters stacked, per-sample weights, one forward;
* ``ensemble`` — K separate forwards (one per adapter), as SISA-style output averaging needs.

Prints the table and writes JSON with ``mix_over_single`` and ``ensemble_over_mix`` per K (median
over batch sizes) and every measurement. Times are medians of ``--reps`` runs after one warm-up;
``single`` and ``mix`` alternate run by run within each (K, batch) cell.

    python bench/engine.py --out docs/results/engine-cpu.json
    python bench/engine.py --quick
    python bench/engine.py --device cuda --shape llama7b --out engine-h200.json
"""

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apa.engines.base import AdapterRef
from apa.engines.mixture import strip_mixture
from apa.engines.torch import TorchEngine
from apa.model import BaseModel, forward_last_hidden, load_base_model, score_hidden
from apa.settings import get_settings
from apa.training import TrainConfig, lora_config
from bench.machine import describe, write_report


def real_prompts(n: int) -> list[str]:
    from apa import data
    from apa.samples import build_samples

    settings = get_settings()
    dataset = data.load(data.MOVIELENS_100K, datasets_dir=settings.datasets_dir, assets_dir=settings.assets_dir)
    samples = build_samples(dataset)
    rng = np.random.default_rng(0)
    titles = dataset.titles
    return [samples[i].prompt(titles) for i in rng.choice(len(samples), n, replace=False)]


def llama7b_base(device: str, layers: int, dtype: torch.dtype) -> BaseModel:
    """Llama-2-7B's shape with random weights (no download); the tokenizer is SmolLM2's."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    settings = get_settings()
    tokenizer = AutoTokenizer.from_pretrained(str(settings.base_model_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
        model.to(dtype=dtype)
    model.eval().requires_grad_(False)
    return BaseModel(model=model, tokenizer=tokenizer, sha256="random", name=f"llama7b-shape-{layers}l",
                     yes_id=10539, no_id=5230)


def random_adapters(base: BaseModel, k: int, folder: Path, seed: int = 0) -> tuple[list[AdapterRef], Any]:
    """K random LoRA adapters in PEFT's format; returns them and a PEFT model holding the first."""
    from peft import get_peft_model

    peft_model = get_peft_model(strip_mixture(copy.deepcopy(base.model)), lora_config(TrainConfig()))
    refs = []
    for shard in range(k):
        torch.manual_seed(seed + shard)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.02)
        path = folder / f"shard-{shard}"
        peft_model.save_pretrained(str(path))
        refs.append(AdapterRef(shard=shard, version=1, path=path))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02)
    return refs, peft_model.eval()


def timed(fns: list[Callable[[], Any]], reps: int, device: str) -> list[float]:
    """Median seconds of each function; their repetitions alternate (A B A B ...), so a drift in the
    machine's speed hits all of them alike. One warm-up call each first."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, samples in zip(fns, times, strict=True):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - started)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="1,4,8,16", help="numbers of shards")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", "llama7b"], default="smollm2")
    parser.add_argument("--layers", type=int, default=32, help="llama7b depth (fewer for a smoke run)")
    parser.add_argument("--quick", action="store_true", help="K=1,4 and batch 1,8, one rep")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.ks, args.batches, args.reps = "1,4", "1,8", 1
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    if args.shape == "llama7b":
        base = llama7b_base(args.device, args.layers, torch.bfloat16 if args.device.startswith("cuda") else
                            torch.float32)
    else:
        base = load_base_model(get_settings().base_model_dir, device=args.device)
    prompts = real_prompts(max(batches))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        refs, single_model = random_adapters(base, max(ks), Path(tmp))
        for batch in batches:
            texts = prompts[:batch]

            def single(texts: list[str] = texts) -> None:
                hidden = forward_last_hidden(base, texts, batch_size=len(texts), model=single_model)
                score_hidden(base, hidden, model=single_model)

            for k in ks:
                engine = TorchEngine(base)
                engine.load(refs[:k])
                w = np.random.default_rng(k).dirichlet(np.ones(k), size=batch)  # [batch, K]

                def mix(texts: list[str] = texts, w: np.ndarray = w, engine: TorchEngine = engine) -> None:
                    engine.score(texts, w, batch_size=len(texts))

                def ensemble(texts: list[str] = texts, k: int = k, engine: TorchEngine = engine) -> None:
                    for shard in range(k):
                        engine.score(texts, np.eye(k)[[shard] * len(texts)], batch_size=len(texts))

                single_s, mix_s = timed([single, mix], args.reps, args.device)  # the target ratio: side by side
                [ensemble_s] = timed([ensemble], args.reps, args.device)
                row = {"k": k, "batch": batch, "single_s": round(single_s, 4), "mix_s": round(mix_s, 4),
                       "ensemble_s": round(ensemble_s, 4), "mix_over_single": round(mix_s / single_s, 3),
                       "ensemble_over_mix": round(ensemble_s / mix_s, 3)}
                rows.append(row)
                print(f"K={k:<3} batch={batch:<3} single {single_s:8.3f} s  mix {mix_s:8.3f} s  "
                      f"K forwards {ensemble_s:8.3f} s  mix/single {row['mix_over_single']:.3f}  "
                      f"K-forwards/mix {row['ensemble_over_mix']:.2f}", flush=True)
    def median(key: str, k: int) -> float:
        return round(statistics.median(r[key] for r in rows if r["k"] == k), 3)

    summary = {str(k): {"mix_over_single": median("mix_over_single", k),
                        "ensemble_over_mix": median("ensemble_over_mix", k)} for k in ks}
    report = {"benchmark": "engine", "shape": args.shape, "machine": describe(args.device),
              "command": "python bench/engine.py " + " ".join(
                  f"--{k}={v}" for k, v in vars(args).items() if v not in (None, False)),
              "per_k": summary, "rows": rows}
    print("\n| K | mix / single | K forwards / mix |\n|---|---|---|")
    for key, ratios in summary.items():
        print(f"| {key} | {ratios['mix_over_single']:.3f} | {ratios['ensemble_over_mix']:.2f} |")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
