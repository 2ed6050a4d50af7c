"""PNG plots of one benchmark results dict (bench/bench.py): GB/s against size for the sweep, and
bars of the speedup over torch fused for the model shapes and the small-tensor case."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: CI and GPU boxes have no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def _title(results, what):
    return (f"{what}: {results['device']}\ntorch {results['torch']}, {results['date']}, "
            f"commit {results['commit']}")


def sweep(results, path: Path):
    rows = [r for r in results["rows"] if r["section"] == "sweep"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["params"])
        style = dict(linestyle="--", color="gray") if provider == "device copy" else dict(marker="o")
        ax.plot([r["params"] for r in mine], [r["gbps"] for r in mine], label=provider,
                markersize=3, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements in one tensor")
    ax.set_ylabel("GB/s (bytes model: 7 x element size per param; copy: 2 x)")
    ax.set_title(_title(results, "One AdamW step"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(results, path: Path):
    rows = [r for r in results["rows"] if r["section"] in ("models", "small")
            and r["vs_fused"] is not None and r["provider"] != "device copy"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(provs)
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, provider in enumerate(provs):
        by_case = {r["case"]: r["vs_fused"] for r in rows if r["provider"] == provider}
        xs = [c + (i - (len(provs) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [by_case.get(c, 0) for c in cases], width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ratio = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(ratio)
    ax.yaxis.set_minor_formatter(ratio)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(cases)),
                  [c + (" (host)" if any(r["host_time"] for r in rows if r["case"] == c) else "")
                   for c in cases], fontsize=8)
    ax.set_ylabel("speedup over torch.optim.AdamW(fused=True)  (higher is faster)")
    ax.set_title(_title(results, "Step time, model shapes"), fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results, out: Path):
    """Writes the plots whose sections ran; returns their paths."""
    sections = {r["section"] for r in results["rows"]}
    paths = []
    for name, fn, needs in (("sweep", sweep, {"sweep"}), ("models", bars, {"models", "small"})):
        if sections & needs:
            path = out / f"bench-{results['device_type']}-{name}.png"
            fn(results, path)
            paths.append(path)
    return paths
