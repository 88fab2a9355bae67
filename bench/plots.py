"""Plots for docs/results from the benchmarks' JSON: AUC by method, cost vs K, serving with prefix
sharing on and off, the forgetting audit's attack AUCs.

    python bench/plots.py docs/results
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from apa.evaluation import METHODS


def auc_by_method(report: dict, out: Path) -> None:
    """Per-sample test AUC of every method with its 95% bootstrap interval, one bar group per config."""
    results = report["results"]
    methods = [m for m in METHODS if any(m in r["eval"]["per-sample"]["auc"] for r in results)]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(results)
    lowest = 1.0
    for i, result in enumerate(results):
        ev = result["eval"]["per-sample"]
        xs = [m + i * width for m, name in enumerate(methods) if name in ev["auc"]]
        names = [name for name in methods if name in ev["auc"]]
        values = [ev["auc"][n] for n in names]
        errors = [[v - ev["ci95"][n][0] for v, n in zip(values, names, strict=True)],
                  [ev["ci95"][n][1] - v for v, n in zip(values, names, strict=True)]]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=result["config"]["name"])
        lowest = min([lowest, *(ev["ci95"][n][0] for n in names)])
    ticks = [name if len(name) <= 6 else "\n".join(name.rsplit("_", 1)) for name in methods]  # apa_nd\npaper
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(methods))], ticks, fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("test AUC, per-sample weights\n(bars: 95% bootstrap CI)")
    ax.set_ylim(min(0.4, lowest - 0.02), max(0.8, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.set_title(f"AUC by method — {report['preset']} preset, {report['machine']['cpu']}")
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


def serving(report: dict, out: Path) -> None:
    """``bench/serving.py``: p50/p99 latency and candidates per second by concurrency, sharing on vs off."""
    levels = sorted(int(key[1:]) for key in report["speedup"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("sharing_on", "o-"), ("sharing_off", "s--")):
        rows = [report[name][f"c{c}"] for c in levels]
        label = name.replace("_", " ")
        axes[0].plot(levels, [r["p50_s"] for r in rows], style, label=f"{label}: p50")
        axes[0].fill_between(levels, [r["p50_s"] for r in rows], [r["p99_s"] for r in rows], alpha=0.15)
        axes[1].plot(levels, [r["candidates_per_s"] for r in rows], style, label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("latency, s (band: p50 to p99)")
    axes[1].set_ylabel("candidates scored per second")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients (20 candidates each)")
        ax.legend(fontsize=8)
    fig.suptitle(f"/recommend, first request per user — {report['machine']['cores']} cores "
                 f"{report['machine']['cpu']}, {report['machine']['date'][:10]}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


AUDIT_PHASES = (("before", "deleted vs never-seen,\nbefore the deletion"),
                ("quarantine_only", "deleted vs never-seen,\nquarantine only"),
                ("after", "deleted vs never-seen,\nafter the retrain"),
                ("reference_never_vs_never", "never-seen vs never-seen\n(0.5 reference)"),
                ("reference_kept_vs_never_after", "kept training vs never-seen,\nafter"),
                ("own_test_after", "deleted vs the same users'\ntest samples, after"))


def forget_audit(report: dict, out: Path) -> None:
    """``bench/forget_audit.py``: the membership-inference attack's AUC with its 95% interval, by phase."""
    phases = [(key, label) for key, label in AUDIT_PHASES if key in report["attack"]]
    values = [report["attack"][key]["auc"] for key, _ in phases]
    errors = [[v - report["attack"][key]["ci95"][0] for v, (key, _) in zip(values, phases, strict=True)],
              [report["attack"][key]["ci95"][1] - v for v, (key, _) in zip(values, phases, strict=True)]]
    fig, ax = plt.subplots(figsize=(1.9 * len(phases), 4))
    colours = ["tab:red", "tab:orange", "tab:green", "tab:grey", "tab:blue", "tab:purple"][: len(phases)]
    ax.bar(range(len(phases)), values, 0.6, yerr=errors, capsize=4, color=colours)
    ax.set_xticks(range(len(phases)), [label for _, label in phases], fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("attack AUC (lower loss = member)\n(bars: 95% bootstrap CI)")
    ax.set_title(f"Loss-based membership inference, {len(report['users'])} users deleted "
                 f"({report['n_deleted_training_samples']} training samples) — {report['machine']['cpu']}",
                 fontsize=9)
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
    for path in sorted(args.folder.glob("serving*.json")):
        serving(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    for path in sorted(args.folder.glob("forget-audit*.json")):
        forget_audit(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    engine, unlearning = load("engine-cpu.json"), load("unlearning.json")
    if engine or unlearning:
        cost_vs_k(engine, unlearning, args.folder / "cost-vs-k.png")
        print(f"wrote {args.folder / 'cost-vs-k.png'}")


if __name__ == "__main__":
    main()
