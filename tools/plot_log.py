"""Training curves of main_desd.py runs as one PNG: losses, schedules, collapse indicators.

    python tools/plot_log.py runs/desd                                  # -> curves.png
    python tools/plot_log.py runs/dino runs/desd --labels DINO DeSD --out curves.png

Reads `OUTPUT_DIR/log.txt` (one JSON line per epoch, written by main_desd.py) of every run
and draws seven panels, the runs overlaid in one colour each:
- total loss; the loss of each stage (stage 4 is `loss_ssl`, stages 1-3 `deep_loss_k`);
- learning rate; teacher temperature;
- teacher entropy and the entropy of the batch-mean teacher output, against ln(out_dim):
  a teacher entropy near ln(out_dim) is a uniform teacher, near 0 a one-hot one (DINO's
  two collapse modes); a batch-mean entropy far below ln(out_dim) means few prototypes
  are used;
- KL(teacher || student) per stage: near 0 means the student copies the teacher;
- the teacher's view retrieval top-1 per stage against chance (runs with --retrieval_list):
  rising above the first epoch's value means the features learn something.
A quantity a run did not log (e.g. the KL of a stage with weight 0 in a DINO baseline)
is left out for that run. matplotlib is needed here only (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules
from common import atomic  # noqa: E402
from utils import read_log  # noqa: E402

NUM_STAGES = 4
# (panel title, [(log key, legend label)]): the key is looked up with and without "train_".
PANELS = (
    ("total loss", [("total_loss", "total")]),
    ("loss per stage", [("deep_loss_1", "stage 1"), ("deep_loss_2", "stage 2"),
                        ("deep_loss_3", "stage 3"), ("loss_ssl", "stage 4")]),
    ("learning rate", [("lr", "lr")]),
    ("teacher temperature", [("teacher_temp", "teacher temp")]),
    ("teacher entropy (collapse: ~ln K or ~0)",
     [("teacher_entropy", "entropy"), ("teacher_batch_entropy", "batch-mean entropy"),
      ("ln_out_dim", "ln(out_dim)")]),
    ("KL(teacher || student) per stage (collapse: ~0)",
     [(f"kl_stage{k}", f"stage {k}") for k in range(1, NUM_STAGES + 1)]),
    ("view retrieval top-1 per stage (label-free; --retrieval_list)",
     [(f"retrieval_top1_stage{k}", f"stage {k}") for k in range(1, NUM_STAGES + 1)]
     + [("retrieval_chance1", "chance")]),
)
LINESTYLES = ("-", "--", ":", "-.", (0, (1, 4)))


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of `key` (or `train_<key>`), finite numbers only."""
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(f"train_{key}", r.get(key))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r.get("epoch", i)))
            ys.append(float(v))
    return xs, ys


def plot_runs(runs: dict[str, list[dict]], out: str | os.PathLike) -> Path:
    """Draw the runs (label -> epochs) into `out` (PNG, written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cols = math.ceil(len(PANELS) / 2)
    fig, axes = plt.subplots(2, cols, figsize=(5.3 * cols, 8.5))
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        styles = {}
        for r, (label, records) in enumerate(runs.items()):
            colour = colours[r % len(colours)]
            for j, (key, name) in enumerate(keys):
                xs, ys = series(records, key)
                if not xs:
                    continue
                style = LINESTYLES[j % len(LINESTYLES)]
                marker = "o" if len(xs) < 20 else None  # a two-epoch run still shows
                ax.plot(xs, ys, linestyle=style, color=colour, marker=marker, markersize=3,
                        label=f"{label}: {name}")
                styles[name] = style
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(styles) > 1:  # which line is which quantity; the colours are the runs
            ax.legend(handles=[Line2D([], [], color="grey", linestyle=s, label=n)
                               for n, s in styles.items()], fontsize=8)
        elif not styles:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.legend(handles=[Line2D([], [], color=colours[r % len(colours)], label=label)
                        for r, label in enumerate(runs)],
               loc="upper center", ncol=min(len(runs), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def default_labels(dirs: Sequence[str]) -> list[str]:
    """Each run's folder name; the whole path where two runs share a name."""
    names = [Path(d).resolve().name if not Path(d).is_file() else Path(d).resolve().parent.name
             for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeSD training curves", add_help=False)
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR",
                   help="--output_dir of main_desd.py runs (or their log.txt files); several "
                        "are overlaid, one colour each")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="one legend label per run (default: the folder names)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("plot_log.py", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    labels = args.labels or default_labels(args.output_dirs)
    if len(labels) != len(args.output_dirs):
        parser.error(f"--labels gives {len(labels)} labels for {len(args.output_dirs)} runs")
    if len(set(labels)) != len(labels):
        parser.error(f"--labels must differ from each other, got {labels}")
    try:
        runs = {label: read_log(d) for label, d in zip(labels, args.output_dirs)}
        import matplotlib  # noqa: F401  (optional dependency, needed only here)
    except ImportError:
        print("plot_log.py: error: matplotlib is not installed; pip install matplotlib",
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"plot_log.py: error: {e}", file=sys.stderr)
        return 1
    out = plot_runs(runs, args.out)
    print(f"{', '.join(f'{k} ({len(v)} epochs)' for k, v in runs.items())} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
