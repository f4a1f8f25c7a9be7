"""The probes' report (tools/eval_probe.py): per group of checkpoints, the mean and
spread over checkpoints and probe seeds; every group compared with each group before it
in both directions (better, worse, within, or unknown for a single measurement); the
tables, results.json and the chart."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from common import atomic

NUM_STAGES = 4


SUMMARY_METRICS = ("retrieval_top1", "retrieval_top5", "dice_mean", "knn_acc")


def result_columns(class_names: Sequence[str], retrieval: bool) -> list[str]:
    """The measured columns of one (checkpoint, seed, stage)."""
    cols = [f"dice_{n}" for n in class_names[1:]] + ["dice_mean", "knn_acc"]
    return cols + (["retrieval_top1", "retrieval_top5"] if retrieval else [])


def summarise(runs: list[dict], metrics: Sequence[str]) -> dict:
    """Per group name, stage and metric: mean, std (over the group's checkpoints and
    seeds), min, max and n."""
    out: dict = {}
    for run in runs:
        for st in run["stages"]:
            for m in metrics:
                out.setdefault(run["name"], {}).setdefault(st["stage"], {}).setdefault(m, []).append(st[m])
    return {name: {stage: {m: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)),
                               "min": float(np.nanmin(v)), "max": float(np.nanmax(v)), "n": len(v)}
                           for m, v in by_m.items()} for stage, by_m in by_stage.items()}
            for name, by_stage in out.items()}


def compare(summary: dict, metrics: Sequence[str]) -> list[dict]:
    """Every group against every group before it (random, DINO, DeSD: DINO - random,
    DeSD - random, DeSD - DINO): difference of the means, twice the larger of the two
    spreads (std), and the verdict, in both directions (every metric is higher-is-better):
    'better' or 'worse' when the difference exceeds that bar, 'within' when it does not,
    'unknown' when either group has a single measurement (n = 1: no spread to judge by).
    `beyond` is True for 'better' and 'worse'."""
    names = list(summary)
    rows = []
    for j, name in enumerate(names):
        for base in names[:j]:
            for stage in summary[name]:
                for m in metrics:
                    a, b = summary[name][stage][m], summary[base][stage][m]
                    diff, bar = a["mean"] - b["mean"], 2 * max(a["std"], b["std"])
                    verdict = ("unknown" if min(a["n"], b["n"]) < 2 else "better" if diff > bar
                               else "worse" if diff < -bar else "within")
                    rows.append({"group": name, "baseline": base, "stage": stage, "metric": m,
                                 "n_group": a["n"], "n_baseline": b["n"], "difference": diff,
                                 "twice_spread": bar, "verdict": verdict,
                                 "beyond": verdict in ("better", "worse")})
    return rows


def _verdict_cell(c: dict) -> str:
    if c["verdict"] == "unknown":
        return f"{c['difference']:+.3f} (n=1, no spread)"
    if c["verdict"] == "within":
        return f"{c['difference']:+.3f} (within {c['twice_spread']:.3f})"
    return f"{c['difference']:+.3f} ({c['verdict']}, beyond {c['twice_spread']:.3f})"


def format_tables(results: dict) -> str:
    """One table per summary metric: rows the groups, columns the stages (mean ± std);
    then the comparisons of every group with each group before it."""
    lines = []
    for m in results["summary_metrics"]:
        lines += ["", f"{m} (mean ± std over checkpoints x {len(results['settings']['probe_seeds'])} "
                      f"seeds; {_chance(results, m)})",
                  "| group | " + " | ".join(f"stage {s}" for s in range(1, NUM_STAGES + 1)) + " |",
                  "|---" * (NUM_STAGES + 1) + "|"]
        for name, by_stage in results["summary"].items():
            cells = [f"{by_stage[s][m]['mean']:.3f} ± {by_stage[s][m]['std']:.3f}"
                     for s in range(1, NUM_STAGES + 1)]
            lines.append(f"| {name} (n={by_stage[1][m]['n']}) | " + " | ".join(cells) + " |")
    if results["comparisons"]:
        lines += ["", "differences between groups (better / worse: beyond twice the larger std, "
                      "either way; within: not)",
                  "| group | metric | " + " | ".join(f"stage {s}" for s in range(1, NUM_STAGES + 1))
                  + " |", "|---" * (NUM_STAGES + 2) + "|"]
        rows: dict = {}
        for c in results["comparisons"]:
            rows.setdefault((c["group"], c["baseline"], c["metric"]), {})[c["stage"]] = c
        for (group, base, m), by_stage in rows.items():
            cells = [_verdict_cell(by_stage[s]) for s in range(1, NUM_STAGES + 1)]
            lines.append(f"| {group} vs {base} | {m} | " + " | ".join(cells) + " |")
        single = sorted({c[k] for c in results["comparisons"] for k in ("group", "baseline")
                         if c[f"n_{k}"] < 2})
        if single:
            lines += ["", f"WARNING: {', '.join(single)} measured once (one repetition, no "
                          f"spread): no difference with them is called better or worse; pass "
                          f"two or more --probe_seeds (or several checkpoints per --names)"]
    return "\n".join(lines)


def _chance(results: dict, metric: str) -> str:
    if metric.startswith("retrieval_top"):
        return f"chance {results['retrieval_chance'][metric.removeprefix('retrieval_')]:.3f}"
    if metric == "knn_acc":
        return f"chance {results['knn_chance']:.3f}"
    return "Dice of the held-out patches"


def _json_safe(obj):
    """NaN (a class absent from prediction and labels) as null: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """probe_results.csv and .json (atomically), and the PNG when matplotlib is installed."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=results["columns"])
    writer.writeheader()
    writer.writerows({"checkpoint": r["name"], "path": r["checkpoint"], "seed": r["seed"], **st}
                     for r in results["runs"] for st in r["stages"])
    written = [out_dir / "probe_results.csv", out_dir / "probe_results.json"]
    atomic.write_text(written[0], text.getvalue())
    atomic.write_text(written[1], json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    png = plot_results(results, out_dir / "probe_results.png")
    return written + ([png] if png is not None else [])


def plot_results(results: dict, out: Path) -> Path | None:
    """Bars per stage with the spread as error bars, one colour per group, one panel per
    summary metric. None (with a notice) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: probe_results.png skipped "
              "(pip install matplotlib to get it)")
        return None
    metrics, groups = results["summary_metrics"], list(results["summary"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(groups)
    stages = np.arange(1, NUM_STAGES + 1)
    for ax, m in zip(axes[0], metrics):
        for j, g in enumerate(groups):
            st = results["summary"][g]
            ax.bar(stages + (j - (len(groups) - 1) / 2) * width, [st[s][m]["mean"] for s in stages],
                   width, yerr=[st[s][m]["std"] for s in stages], capsize=3, label=g)
        if m != "dice_mean":
            ax.axhline(float(_chance(results, m).split()[-1]), color="grey", linestyle="--",
                       linewidth=1, label="chance")
        ax.set_xticks(stages, [f"stage {s}" for s in stages])
        ax.set_ylim(0, 1)
        ax.set_title(m.replace("_", " ") + (" (held-out views)" if m.startswith("retr") else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"frozen {results['settings']['arch']} per stage: mean ± std over checkpoints "
                 f"and seeds")
    fig.tight_layout()
    with atomic.atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
