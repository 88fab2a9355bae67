"""Plots for docs/results from the benchmarks' JSON: AUC by method, cost vs K.

    python bench/plots.py docs/results
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = ["apa_nd", "apa_d", "single", "sisa", "ensemble", "best_shard", "item_mean", "base"]


def auc_by_method(report: dict, out: Path) -> None:
    """Per-sample test AUC of every method; with a ``valid_tau`` section, APA(ND) at the tau chosen on
    validation as one more bar (older reports lack it)."""
    results = report["results"]
    tuned = all("valid_tau" in r for r in results)
    names = METHODS + (["apa_nd\n(valid τ)"] if tuned else [])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        auc = result["auc"]["per-sample"]
        values = [auc[m] for m in METHODS] + ([result["valid_tau"]["per-sample"]["auc"]["apa_nd"]] if tuned else [])
        ax.bar([m + i * width for m in range(len(names))], values, width, label=result["config"]["name"])
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(names))], names)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("test AUC (per-sample weights)")
    ax.set_ylim(0.4, max(0.8, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title(f"AUC by method — {report['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cost_vs_k(engine: dict | None, unlearning: dict | None, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if engine:
        ks = sorted(int(k) for k in engine["per_k"])
        axes[0].plot(ks, [engine["per_k"][str(k)]["mix_over_single"] for k in ks], "o-", label="APA mixture / single")
        axes[0].plot(ks, [engine["per_k"][str(k)]["ensemble_over_mix"] for k in ks], "s-",
                     label="K forwards / mixture")
        axes[0].set_xlabel("K")
        axes[0].set_ylabel("time ratio")
        axes[0].set_title("inference")
        axes[0].legend()
    if unlearning:
        rows = unlearning["training"]
        ks = [r["k"] for r in rows]
        axes[1].plot(ks, [r["shard_over_full"] for r in rows], "o-", label="one shard / all data (measured)")
        axes[1].plot(ks, [1 / k for k in ks], "--", color="grey", label="1 / K")
        axes[1].set_xlabel("K")
        axes[1].set_ylabel("retrain time ratio")
        axes[1].set_title("unlearning (training alone)")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()

    def load(name: str) -> dict | None:
        path = args.folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    for path in sorted(args.folder.glob("quality-*.json")):
        auc_by_method(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    engine, unlearning = load("engine-cpu.json"), load("unlearning.json")
    if engine or unlearning:
        cost_vs_k(engine, unlearning, args.folder / "cost-vs-k.png")
        print(f"wrote {args.folder / 'cost-vs-k.png'}")


if __name__ == "__main__":
    main()
