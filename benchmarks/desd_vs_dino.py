"""DeSD vs DINO, paired over pre-training seeds: per-stage representations and few-label
fine-tuning, with paired t statistics and a Holm correction over the four stages.

    # the README's run with few-label fine-tuning (2-core CPU, idle: 85 minutes)
    python benchmarks/desd_vs_dino.py --output_dir dvd --seeds 0 1 2 3 4 5 --ft_labels 1 2 4 \
        --ft_seeds 4 --ft_patch 16 48 48 --ft_eval_overlap 0 --ft_epochs 12 \
        --ft_iters_per_epoch 25 --ft_eval_every 2
    # a fine-tuning variant beside it (reuses the data, pre-training and probes of dvd)
    python benchmarks/desd_vs_dino.py --output_dir dvd <the same arguments> --ft_labels 1 \
        --ft_freeze_epochs 4 --report_name fixed4
    # the README's 12 seeds, representations only (no fine-tuning)
    python benchmarks/desd_vs_dino.py --output_dir dvd12 --seeds 0 1 2 3 4 5 6 7 8 9 10 11 --ft_labels
    # the tables and charts again from the runs in dvd (starts no run)
    python benchmarks/desd_vs_dino.py --output_dir dvd <the same arguments> --report_only
    # a tiny end-to-end run (the test does this)
    python benchmarks/desd_vs_dino.py --output_dir dvd_tiny --tiny

DeSD's claim against DINO is that distilling into every stage makes the shallow stages
better. Here the two differ in the loss weights only: for each seed, DeSD
(`--stage_weights 0.25 0.25 0.25 0.25`) and DINO (`0 0 0 1`) are pre-trained by
main_desd.py with the same `--seed`, so they start from the same backbone and stage-4
head and see the same sub-volumes, views and augmentation draws in the same order (the
trainer seeds the backbone before the heads of the extra stages and draws every sample
and augmentation from streams of (seed, epoch, index); tests/test_desd_vs_dino.py checks
it). The seed is the unit: a per-seed difference DeSD - DINO cancels what the seed changes
in both alike (how much, the tables show: the spread of the paired differences next to
each method's), and the statistics are over seeds.

Steps, each a subprocess of the repository's own scripts (results of finished steps are
reused when the command is run again with the same settings):

1. data: synthetic DeepLesion-format CT (synthetic_ct.py) through the three
   preprocessing scripts, for pre-training and a held-out set for view retrieval (the
   first sub-volume of each held-out series); a labelled phantom set for the probes
   and fine-tuning.
2. pre-training: DeSD and DINO for every seed (main_desd.py, the demo's CPU settings, a
   shorter run by default), a seed's two runs side by side (`--jobs 2`, one thread each);
   `--pretrain_deadline_minutes` starts no further seed that would end after it (time
   alone decides, never a result).
3. frozen encoders per stage (tools/eval_probe.py, once on clean patches and once with
   `--augment`): held-out view retrieval top-1/top-5, linear-probe Dice and k-NN,
   each repeated over `--probe_seeds` and averaged within a pre-training seed; and the
   view retrieval each pre-training logged after its last epoch (another view draw).
4. few-label fine-tuning (finetune_example.py): for 1, 2, 4 ... labelled phantoms (a
   subset drawn per seed from the training pool; the held-out phantoms are fixed), from
   scratch, DINO and DeSD, with the same seed, patches and decoder initialisation; one
   run per (labels, init, seed) with the held-out Dice measured every `--ft_eval_every`
   epochs (the curve); `--deadline_minutes` starts no further seed that would end after
   it, and drops a label setting left with fewer than 2 seeds. The runs of each set of
   fine-tuning settings have their own folder, so a variant (`--ft_freeze_epochs`,
   `--ft_encoder_lr_scale`, `--ft_lr`) run into the same output folder reuses the data,
   the pre-training and the probes, and adds only its fine-tuning runs.
5. statistics per stage (and per fine-tuning setting): means and standard deviations
   over seeds, the mean paired difference, its t confidence interval, the paired t-test
   p-value, the Holm-adjusted p-value over the four stages (over the label settings
   for fine-tuning), the spread of the paired differences against each method's, and
   the seeds a paired t-test needs to detect `--target_difference` in stage-2 retrieval
   top-1 (from this run's spread of paired differences).

Output in OUTPUT_DIR: `measurements.csv` (one value per method, seed, metric and stage or
setting), `comparison.csv` (the statistics), `results.md` (the tables), `results.json`,
`representations.png` (paired differences per stage with their intervals, and the
seeds one by one) and `finetune.png` (held-out Dice against steps, mean and interval).
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402
from common.atomic import write_text  # noqa: E402
from common.cli import BOOL, float_in, int_at_least  # noqa: E402

NUM_STAGES = 4
STAGES = tuple(range(1, NUM_STAGES + 1))
METHODS = {"DeSD": ("0.25", "0.25", "0.25", "0.25"), "DINO": ("0", "0", "0", "1")}
SCRATCH = "scratch"
# the representation metrics: (name, probe run, column of probe_results.csv); "log": the
# view retrieval main_desd.py logged after the last epoch (views drawn with the pre-training
# seed, the same for both methods of a seed), a second draw of the held-out views
REPR_METRICS = (("retrieval_top1", "clean", "retrieval_top1"),
                ("retrieval_top5", "clean", "retrieval_top5"),
                ("probe_dice_clean", "clean", "dice_mean"),
                ("probe_dice_augmented", "augmented", "dice_mean"),
                ("knn_acc_clean", "clean", "knn_acc"),
                ("retrieval_top1_trainlog", "log", "retrieval_top1"))
HEADLINE = "retrieval_top1"
# fine-tuning comparisons: (a, b), the difference being a - b
FT_PAIRS = (("DeSD", SCRATCH), ("DINO", SCRATCH), ("DeSD", "DINO"))
COMPARISON_COLUMNS = ["family", "metric", "stage", "n_labels", "steps", "a", "b", "n",
                      "mean_a", "sd_a", "mean_b", "sd_b", "mean_diff", "sd_diff",
                      "ci_low", "ci_high", "t", "p", "p_holm", "significant"]
MEASUREMENT_COLUMNS = ["method", "seed", "metric", "stage", "n_labels", "steps", "value"]


class BenchError(RuntimeError):
    """A step failed; the message names the command and its log."""


# ============================================================================ statistics

def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired comparison of `a` and `b` (one value per seed, same order): n, mean and
    sample standard deviation (ddof 1) of each and of the differences a - b, the
    `confidence` t interval of the mean difference, t and the two-sided paired t-test
    p-value (scipy.stats.ttest_rel)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a paired test needs two equal-length series of at least 2 values, "
                         f"got {a.shape} and {b.shape}")
    d = a - b
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    if sd > 0:
        res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    else:  # every seed gives the same difference: no spread to test against
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    return {"n": n, "mean_a": float(a.mean()), "sd_a": float(a.std(ddof=1)),
            "mean_b": float(b.mean()), "sd_b": float(b.std(ddof=1)),
            "mean_diff": mean, "sd_diff": sd, "ci_low": mean - half, "ci_high": mean + half,
            "t": t, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times
    (m - i + 1), made monotone and capped at 1. Reject where adjusted p <= alpha."""
    p = np.asarray(pvalues, dtype=float)
    m, adjusted, running = len(p), np.empty(len(p)), 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_power(n: int, difference: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n seeds for a true mean difference
    `difference` when the paired differences have standard deviation `sd` (noncentral t)."""
    df, nc = n - 1, difference / sd * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(difference: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                 max_n: int = 10000) -> int | None:
    """The fewest seeds (at least 2) whose paired t-test has `power` (None beyond max_n)."""
    if sd <= 0:
        return 2
    for n in range(2, max_n + 1):
        if paired_power(n, difference, sd, alpha) >= power:
            return n
    return None


# ============================================================================ steps

def run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run `cmd` with its output appended to `log` (a resumed run keeps the earlier
    output); BenchError naming both if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(" ".join(map(str, cmd)) + "\n\n")
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                              cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise BenchError(f"{Path(cmd[1]).name} failed (exit {proc.returncode}); its output is in "
                         f"{log}:\n{tail}")


def script(name: str) -> list[str]:
    return [sys.executable, str(ROOT / name)]


def prepare_data(args, data: Path) -> dict[str, Path]:
    """The synthetic sets, preprocessed; reused when `data/settings.json` matches."""
    settings = {k: getattr(args, k) for k in ("series", "heldout", "size", "labelled",
                                              "ft_heldout", "ft_size")}
    paths = {"pretrain": data / "pretrain", "heldout": data / "heldout", "labelled": data / "labelled"}
    marker = data / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return paths
    if args.report_only:
        raise BenchError(f"{data} holds no data made with these settings; run without "
                         f"--report_only")
    shutil.rmtree(data, ignore_errors=True)
    logs = data / "logs"
    for name, n, seed in (("pretrain", args.series, 0), ("heldout", args.heldout, 1000)):
        run_logged(script("synthetic_ct.py") + [paths[name], "--kind", "deeplesion", "--n", n,
                                                "--size", args.size, "--n_slices", 40, 60,
                                                "--seed", seed], logs / f"synthetic_{name}.txt")
        for stage in ("DL_save_nifti.py", "re_spacing_ITK.py", "splitting_to_patches.py"):
            run_logged(script(stage), logs / f"{name}_{stage}.txt", cwd=paths[name])
    subvolumes = (paths["heldout"] / "SSL_data_deeplesion.txt").read_text().splitlines()
    firsts = [s for s in subvolumes if "_dep0." in s]  # one per held-out volume: none overlap
    write_text(paths["heldout"] / "retrieval.txt", "\n".join(firsts) + "\n")
    run_logged(script("synthetic_ct.py") + [paths["labelled"], "--kind", "labelled", "--n",
                                            args.labelled, "--size", args.ft_size,
                                            "--n_slices", 32, "--seed", 0],
               logs / "synthetic_labelled.txt")
    write_text(marker, json.dumps(settings) + "\n")
    return paths


def pretrain_command(args, data: dict[str, Path], method: str, seed: int, out: Path) -> list:
    return script("main_desd.py") + [
        "--arch", args.arch, "--data_path", data["pretrain"], "--list_path", "SSL_data_deeplesion.txt",
        "--retrieval_list", data["heldout"] / "retrieval.txt", "--num_workers", args.num_workers,
        "--print_freq", 1000, "--epochs", args.epochs, "--warmup_epochs", min(1, args.epochs),
        "--max_iters_per_epoch", args.max_iters_per_epoch, "--batch_size_per_gpu", args.batch_size,
        "--out_dim", args.out_dim, "--use_bn_in_head", "True", "--head_hidden_dim", args.head_hidden_dim,
        "--head_bottleneck_dim", args.head_bottleneck_dim, "--global_crop_size", *args.crop,
        "--local_crops_number", 0, "--lr", args.lr, "--momentum_teacher", 0.98,
        "--teacher_temp", 0.02, "--warmup_teacher_temp", 0.02,
        "--stage_weights", *METHODS[method], "--seed", seed, "--output_dir", out]


def in_parallel(jobs: int, calls: list) -> list:
    """Call every zero-argument function of `calls`, `jobs` at a time (each runs a
    subprocess); their results in order. The first failure is raised after the others end."""
    if jobs <= 1 or len(calls) <= 1:
        return [c() for c in calls]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(c) for c in calls]
        wait(futures)
    return [f.result() for f in futures]


def pretrain(args, data: dict[str, Path], out: Path, start: float
             ) -> tuple[dict[tuple[str, int], Path], list[int]]:
    """DeSD and DINO for every seed, a seed's pair side by side (--jobs 2), seeds in the
    order given; returns the checkpoint.pth of each (method, seed) and the seeds done. A
    finished run (its teacher_backbone.safetensors exists) is reused; a killed one resumes.
    With --pretrain_deadline_minutes, no further seed is started (after the first two)
    when, at the mean time of a seed so far, it would end after the deadline: a rule
    that depends on time alone, never on results."""
    ckpts, done, spent, timed = {}, [], 0.0, 0
    per_round = max(1, args.jobs // len(METHODS))  # seeds at once
    seeds = list(args.seeds)
    while seeds:
        batch, seeds = seeds[:per_round], seeds[per_round:]
        if args.pretrain_deadline_minutes and len(done) >= 2 and timed:
            projected = time.time() + spent / timed
            if projected > start + 60 * args.pretrain_deadline_minutes:
                print(f"  seeds {batch + seeds} not pre-trained: projected to end "
                      f"{(projected - start) / 60:.0f} min after the start", flush=True)
                break
        calls = []
        for seed in batch:
            for method in METHODS:
                run_dir = out / f"{method.lower()}_s{seed}"
                ckpts[(method, seed)] = run_dir / "checkpoint.pth"
                if not (run_dir / "teacher_backbone.safetensors").is_file():
                    calls.append(functools.partial(run_logged, pretrain_command(
                        args, data, method, seed, run_dir), run_dir / "stdout.txt"))
        if calls and args.report_only:
            break
        t0 = time.time()
        in_parallel(args.jobs, calls)
        if calls:
            spent, timed = spent + time.time() - t0, timed + 1
        done += batch
        print(f"  pre-trained DeSD and DINO, seed(s) {batch}: {time.time() - t0:.0f} s", flush=True)
    return {k: v for k, v in ckpts.items() if k[1] in done}, done


def probe(args, data: dict[str, Path], ckpts: dict, out: Path, augmented: bool) -> Path:
    """tools/eval_probe.py on every checkpoint (and random init); returns its CSV."""
    specs = (["random"] if args.probe_random else []) + [str(p) for p in ckpts.values()]
    names = (["random"] if args.probe_random else []) + [m for m, _ in ckpts]
    cmd = script("tools/eval_probe.py") + [
        *specs, "--names", *names, "--arch", args.arch, "--data_dir", data["labelled"],
        "--patches_per_case", args.patches_per_case, "--probe_seeds", *args.probe_seeds,
        "--epochs", args.probe_epochs, "--probe_voxels", args.probe_voxels,
        "--retrieval_crop", *args.crop, "--output_dir", out, "--augment", str(augmented)]
    if not augmented:
        cmd += ["--retrieval_list", data["heldout"] / "retrieval.txt"]
    log, csv_path = out / "stdout.txt", out / "probe_results.csv"
    if not (csv_path.is_file() and log.read_text().split("\n", 1)[0] == " ".join(map(str, cmd))):
        if args.report_only:
            raise BenchError(f"{out} holds no finished run of this probe command; run without "
                             f"--report_only")
        run_logged(cmd, log)  # else: this very command has run to the end before
    return csv_path


def read_probe_csv(path: Path, ckpts: dict, run: str, rows: list[dict]) -> None:
    """Append to `rows` one measurement per method, pre-training seed, metric and stage:
    the mean over the probe seeds (random init: one row per probe seed, its own seed)."""
    by_path = {str(p): key for key, p in ckpts.items()}
    values: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            method, seed = by_path[r["path"]] if r["path"] in by_path else ("random", int(r["seed"]))
            for metric, which, column in REPR_METRICS:
                if which == run and r.get(column, "") not in ("", None):
                    values.setdefault((method, seed, metric, int(r["stage"])), []).append(float(r[column]))
    for (method, seed, metric, stage), v in values.items():
        rows.append({"method": method, "seed": seed, "metric": metric, "stage": stage,
                     "n_labels": "", "steps": "", "value": float(np.nanmean(v))})


def read_training_logs(ckpts: dict, rows: list[dict]) -> None:
    """Append the held-out view retrieval top-1 that each pre-training logged after its
    last epoch (metric retrieval_top1_trainlog)."""
    for (method, seed), ckpt in ckpts.items():
        last = utils.read_log(ckpt.parent / "log.txt")[-1]
        for stage in STAGES:
            rows.append({"method": method, "seed": seed, "metric": "retrieval_top1_trainlog",
                         "stage": stage, "n_labels": "", "steps": "",
                         "value": float(last[f"retrieval_top1_stage{stage}"])})


def few_label_dir(labelled: Path, out: Path, n_labels: int, seed: int, pool: int, heldout: int) -> Path:
    """An MSD folder of `n_labels` training phantoms (drawn from the first `pool` cases
    for `seed`) followed, by name, by the last `heldout` cases (the same for every run)."""
    cases = sorted(p.name for p in (labelled / "imagesTr").glob("*.nii.gz"))
    if len(cases) < pool + heldout:
        raise BenchError(f"{labelled} has {len(cases)} cases; --ft_pool {pool} + --ft_heldout "
                         f"{heldout} are needed")
    rng = np.random.default_rng([seed, n_labels])
    chosen = sorted(rng.choice(cases[:pool], n_labels, replace=False).tolist()) + cases[-heldout:]
    d = out / f"n{n_labels}_s{seed}"
    for sub in ("imagesTr", "labelsTr"):
        (d / sub).mkdir(parents=True, exist_ok=True)
        for name in chosen:
            link = d / sub / name
            if not link.exists():
                link.symlink_to((labelled / sub / name).resolve())
    shutil.copyfile(labelled / "dataset.json", d / "dataset.json")
    return d


FT_SETTINGS = ("ft_lr", "ft_batch_size", "ft_patch", "ft_eval_overlap", "ft_decoder", "ft_epochs",
               "ft_iters_per_epoch", "ft_eval_every", "ft_freeze_epochs", "ft_encoder_lr_scale",
               "ft_pool", "ft_heldout", "arch")


def ft_folder(args, out: Path) -> Path:
    """The fine-tuning runs' folder for these fine-tuning settings: runs with other settings
    (a variant: a fixed encoder first, another learning rate) live beside them, and the
    runs of settings already run are reused."""
    settings = {k: getattr(args, k) for k in FT_SETTINGS}
    name = (f"{args.ft_epochs}x{args.ft_iters_per_epoch}_lr{args.ft_lr:g}_fix{args.ft_freeze_epochs}"
            f"_enc{args.ft_encoder_lr_scale:g}")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    folder = out / f"{name}_{digest}"
    if not args.report_only:  # --report_only creates nothing
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "settings.json", json.dumps(settings, indent=1) + "\n")
    return folder


def ft_steps(args) -> list[int]:
    """The points of the held-out Dice curve: every --ft_eval_every epochs and the last."""
    every = args.ft_eval_every or args.ft_epochs
    epochs = sorted({*range(every, args.ft_epochs + 1, every), args.ft_epochs})
    return [e * args.ft_iters_per_epoch for e in epochs]


def finetune(args, data: dict[str, Path], ckpts: dict, out: Path, rows: list[dict],
             start: float) -> list[str]:
    """Few-label fine-tuning from scratch, DINO and DeSD, paired over seeds: one run per
    (labels, init, seed), its held-out Dice measured along the way (the curve); the runs
    of --jobs seeds at a time side by side. Appends the curve points to `rows`. With
    --deadline_minutes, no further seed is started when, at the rate of the runs so far,
    its runs would end after the deadline (a rule on time alone); a label setting left
    with fewer than 2 seeds is dropped. Returns notes on what was left out."""
    cache = out / "preprocessed"  # shared by the runs through a link in each run folder
    if not args.report_only:
        cache.mkdir(parents=True, exist_ok=True)
    folder = ft_folder(args, out)
    t0, notes = time.time(), []
    spent, rounds = 0.0, 0  # of the rounds run here (not reused), for the rate
    group = args.jobs  # seeds at once: their runs keep every job busy
    for n_labels in args.ft_labels:
        measured, todo = [], ft_seeds(args)
        while todo:
            seeds, todo = todo[:group], todo[group:]
            if args.deadline_minutes:
                late = time.time() > start + 60 * args.deadline_minutes
                if rounds:
                    late |= time.time() + spent / rounds > start + 60 * args.deadline_minutes
                if late:
                    break
            calls, keys = [], []
            for seed in seeds:
                subset = few_label_dir(data["labelled"], out / "subsets", n_labels, seed,
                                       args.ft_pool, args.ft_heldout)
                for init in (SCRATCH, *METHODS):
                    run_dir = folder / f"n{n_labels}" / f"{init}_s{seed}"
                    keys.append((init, seed, run_dir / "results.json"))
                    if not (run_dir / "results.json").is_file():
                        calls.append(functools.partial(
                            finetune_once, args, subset, n_labels, seed,
                            None if init == SCRATCH else ckpts[(init, seed)], run_dir, cache))
            if calls and args.report_only:
                break
            t_round = time.time()
            in_parallel(args.jobs, calls)
            if calls:
                spent, rounds = spent + time.time() - t_round, rounds + 1
            measured += seeds
            for init, seed, result in keys:
                curve = {p["step"]: p["dice"] for p in json.loads(result.read_text())["curve"]}
                for steps in ft_steps(args):
                    if steps not in curve:
                        raise BenchError(f"{result} has no held-out Dice at step {steps}: it "
                                         f"was made with other settings; delete its folder")
                    dice = curve[steps]
                    rows.append({"method": init, "seed": seed, "metric": "finetune_dice",
                                 "stage": "", "n_labels": n_labels, "steps": steps,
                                 "value": float("nan") if dice is None else float(dice)})
            print(f"  fine-tuned with {n_labels} label(s), seed(s) {seeds}: {len(calls)} runs, "
                  f"{time.time() - t0:.0f} s", flush=True)
        left = [s for s in ft_seeds(args) if s not in measured]
        if len(measured) < 2:
            rows[:] = [r for r in rows if not (r["metric"] == "finetune_dice"
                                               and r["n_labels"] == n_labels)]
            notes.append(f"Fine-tuning with {n_labels} labelled phantom(s) left out: fewer than "
                         f"2 seeds were run before the deadline.")
        elif left:
            notes.append(f"Fine-tuning with {n_labels} labelled phantom(s): seeds {left} were not "
                         f"run before the deadline.")
    return notes


def ft_seeds(args) -> list[int]:
    return args.seeds[:args.ft_seeds] if args.ft_seeds else list(args.seeds)


def finetune_once(args, subset: Path, n_labels: int, seed: int, pretrained: Path | None,
                  run_dir: Path, cache: Path) -> None:
    """One finetune_example.py run; its results.json (with the curve) is in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "preprocessed").exists():
        (run_dir / "preprocessed").symlink_to(cache.resolve())
    cmd = script("finetune_example.py") + [
        "--arch", args.arch, "--data_dir", subset,
        "--val_fraction", args.ft_heldout / (n_labels + args.ft_heldout),
        "--batch_size", args.ft_batch_size, "--patch_size", *args.ft_patch,
        "--decoder_channels", *args.ft_decoder, "--lr", args.ft_lr,
        "--eval_overlap", args.ft_eval_overlap, "--eval_every", args.ft_eval_every,
        "--freeze_encoder_epochs", args.ft_freeze_epochs,
        "--encoder_lr_scale", args.ft_encoder_lr_scale,
        "--epochs", args.ft_epochs, "--iters_per_epoch", args.ft_iters_per_epoch, "--seed", seed,
        "--output_dir", run_dir]
    if pretrained is not None:
        cmd += ["--pretrained", pretrained]
    run_logged(cmd, run_dir / "stdout.txt")
    (run_dir / "finetuned_model.pth").unlink(missing_ok=True)  # not needed, and large


# ============================================================================ analysis

def series(rows: list[dict], method: str, seeds: Sequence[int], **key) -> list[float]:
    """The values of `method` for `seeds` (in that order) at `key` (metric, stage, ...)."""
    found = {r["seed"]: r["value"] for r in rows if r["method"] == method
             and all(str(r[k]) == str(v) for k, v in key.items())}
    missing = [s for s in seeds if s not in found]
    if missing:
        raise BenchError(f"no {method} measurement of {key} for seed(s) {missing}")
    return [found[s] for s in seeds]


def present(rows: list[dict], seeds: Sequence[int], n_labels=None) -> list[int]:
    """The seeds of `seeds` that `rows` measured (with `n_labels` labelled phantoms, if
    given): fine-tuning may use fewer seeds than pre-training."""
    found = {r["seed"] for r in rows if n_labels is None or str(r["n_labels"]) == str(n_labels)}
    return [s for s in seeds if s in found]


def compare(rows: list[dict], seeds: Sequence[int], alpha: float, confidence: float) -> list[dict]:
    """The statistics rows: DeSD - DINO per representation metric and stage (Holm over
    the stages of a metric); per fine-tuning pair, label setting and step count (Holm
    over the label settings at each step count)."""
    out = []
    for metric, _, _ in REPR_METRICS:
        if not any(r["metric"] == metric for r in rows):
            continue
        family = [{"family": "representation", "metric": metric, "stage": s, "n_labels": "",
                   "steps": "", "a": "DeSD", "b": "DINO",
                   **paired_test(series(rows, "DeSD", seeds, metric=metric, stage=s),
                                 series(rows, "DINO", seeds, metric=metric, stage=s), confidence)}
                  for s in STAGES]
        out += _with_holm(family, alpha)
    ft = [r for r in rows if r["metric"] == "finetune_dice"]
    labels = sorted({r["n_labels"] for r in ft})
    for a, b in FT_PAIRS if ft else ():
        for steps in sorted({r["steps"] for r in ft}):
            family = [{"family": "finetune", "metric": "finetune_dice", "stage": "",
                       "n_labels": n, "steps": steps, "a": a, "b": b,
                       **paired_test(series(ft, a, present(ft, seeds, n), n_labels=n, steps=steps),
                                     series(ft, b, present(ft, seeds, n), n_labels=n, steps=steps),
                                     confidence)}
                      for n in labels]
            out += _with_holm(family, alpha)
    return out


def _with_holm(family: list[dict], alpha: float) -> list[dict]:
    for row, adj in zip(family, holm([r["p"] for r in family])):
        row["p_holm"] = adj
        row["significant"] = bool(adj <= alpha)
    return family


def power_estimate(comparisons: list[dict], difference: float, alpha: float,
                   power: float) -> dict | None:
    """Seeds needed to detect `difference` in stage-2 retrieval top-1, from this run's
    spread of the paired differences (and with a Holm-worst-case alpha / 4)."""
    row = next((c for c in comparisons if c["metric"] == HEADLINE and c["stage"] == 2), None)
    if row is None or not math.isfinite(row["sd_diff"]):
        return None
    return {"metric": HEADLINE, "stage": 2, "difference": difference, "alpha": alpha,
            "power": power, "sd_diff": row["sd_diff"], "n_seeds_run": row["n"],
            "seeds_needed": seeds_needed(difference, row["sd_diff"], alpha, power),
            "seeds_needed_alpha_over_4": seeds_needed(difference, row["sd_diff"],
                                                      alpha / NUM_STAGES, power),
            "power_of_this_run": paired_power(row["n"], difference, row["sd_diff"], alpha)
            if row["sd_diff"] > 0 else 1.0}


def _fmt(v: float, signed: bool = False) -> str:
    return "nan" if not math.isfinite(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _p(v: float) -> str:
    return f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}"


def format_tables(comparisons: list[dict], rows: list[dict], seeds: Sequence[int],
                  confidence: float, power: dict | None) -> str:
    """The markdown tables of the comparison."""
    pct = f"{confidence:.0%}"
    lines = [f"DeSD − DINO, paired over {len(seeds)} pre-training seeds ({', '.join(map(str, seeds))}); "
             f"mean ± sd over seeds; difference with its {pct} t interval; paired t-test p; "
             f"Holm over the 4 stages; sd(diff) / sd(DeSD), sd(DINO) shows what pairing removed.", ""]
    lines += ["| metric | stage | DeSD | DINO | random | DeSD − DINO | " + pct + " CI | p | p (Holm) "
              "| sd(diff) | sd DeSD / DINO |", "|---" * 11 + "|"]
    for c in (c for c in comparisons if c["family"] == "representation"):
        rnd = [r["value"] for r in rows if r["method"] == "random" and r["metric"] == c["metric"]
               and str(r["stage"]) == str(c["stage"])]
        rnd_cell = f"{np.mean(rnd):.3f} ± {np.std(rnd, ddof=1):.3f}" if len(rnd) > 1 else "–"
        star = "**" if c["significant"] else ""
        lines.append(f"| {c['metric']} | {c['stage']} | {c['mean_a']:.3f} ± {c['sd_a']:.3f} | "
                     f"{c['mean_b']:.3f} ± {c['sd_b']:.3f} | {rnd_cell} | "
                     f"{star}{_fmt(c['mean_diff'], True)}{star} | "
                     f"[{_fmt(c['ci_low'], True)}, {_fmt(c['ci_high'], True)}] | {_p(c['p'])} | "
                     f"{_p(c['p_holm'])} | {_fmt(c['sd_diff'])} | {_fmt(c['sd_a'])} / {_fmt(c['sd_b'])} |")
    ft = [c for c in comparisons if c["family"] == "finetune"]
    if ft:
        lines += ["", f"Few-label fine-tuning, held-out Dice (mean ± sd over the seeds in the "
                      f"column 'seeds'); "
                      f"paired differences with their {pct} t interval and p (Holm over the "
                      f"label settings at each step count).", "",
                  "| labels | seeds | steps | scratch | DeSD | DINO | DeSD − scratch "
                  "| DINO − scratch | DeSD − DINO |", "|---" * 9 + "|"]
        ft_rows = [r for r in rows if r["metric"] == "finetune_dice"]
        for n in sorted({c["n_labels"] for c in ft}):
            for steps in sorted({c["steps"] for c in ft}):
                cells = []
                for m in (SCRATCH, *METHODS):
                    v = series(ft_rows, m, present(ft_rows, seeds, n), n_labels=n, steps=steps)
                    cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}")
                for a, b in FT_PAIRS:
                    c = next(c for c in ft if (c["n_labels"], c["steps"], c["a"], c["b"]) == (n, steps, a, b))
                    star = "**" if c["significant"] else ""
                    cells.append(f"{star}{_fmt(c['mean_diff'], True)}{star} "
                                 f"[{_fmt(c['ci_low'], True)}, {_fmt(c['ci_high'], True)}] "
                                 f"p {_p(c['p'])} ({_p(c['p_holm'])})")
                used = ", ".join(map(str, present(ft_rows, seeds, n)))
                lines.append(f"| {n} | {used} | {steps} | " + " | ".join(cells) + " |")
    if power and power["sd_diff"] == 0:
        lines += ["", f"Power: the paired stage-2 retrieval top-1 differences do not vary over "
                      f"{power['n_seeds_run']} seeds; no estimate."]
    elif power:
        lines += ["", f"Power: the paired stage-2 retrieval top-1 differences have sd "
                      f"{power['sd_diff']:.3f} over {power['n_seeds_run']} seeds; a paired t-test "
                      f"detects {power['difference']:+.2f} with {power['power']:.0%} power at alpha "
                      f"{power['alpha']} with {power['seeds_needed']} seeds "
                      f"({power['seeds_needed_alpha_over_4']} at alpha {power['alpha']}/4, the Holm "
                      f"worst case); this run's power for it: {power['power_of_this_run']:.0%}."]
    lines += ["", "Bold: the Holm-adjusted p is at most alpha."]
    return "\n".join(lines)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def plot(comparisons: list[dict], rows: list[dict], seeds: Sequence[int], out: Path,
         prefix: str = "") -> list[Path]:
    """representations.png and, with fine-tuning, finetune.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    repr_metrics = [m for m, _, _ in REPR_METRICS if any(c["metric"] == m for c in comparisons)]
    if repr_metrics:
        fig, axes = plt.subplots(2, len(repr_metrics), figsize=(4 * len(repr_metrics), 7.5),
                                 squeeze=False)
        for j, metric in enumerate(repr_metrics):
            cs = [c for c in comparisons if c["metric"] == metric]
            ax = axes[0][j]
            x = np.array([c["stage"] for c in cs])
            mean = np.array([c["mean_diff"] for c in cs])
            ax.errorbar(x, mean, yerr=[mean - [c["ci_low"] for c in cs], [c["ci_high"] for c in cs] - mean],
                        fmt="o", capsize=4, color="k", label="mean, 95% CI")
            for s in seeds:
                d = [series(rows, "DeSD", [s], metric=metric, stage=st)[0]
                     - series(rows, "DINO", [s], metric=metric, stage=st)[0] for st in STAGES]
                ax.plot(np.array(STAGES) + 0.15, d, ".", color="tab:blue", alpha=0.5)
            ax.axhline(0, color="grey", linewidth=1)
            ax.set_xticks(STAGES, [f"stage {s}" for s in STAGES])
            ax.set_title(f"{metric}\nDeSD − DINO (dots: seeds)", fontsize=9)
            ax = axes[1][j]
            for method, colour in (("DINO", "tab:orange"), ("DeSD", "tab:blue")):
                for s in seeds:
                    ax.plot(STAGES, [series(rows, method, [s], metric=metric, stage=st)[0]
                                     for st in STAGES], color=colour, alpha=0.35, linewidth=1)
                ax.plot([], [], color=colour, label=method)
            ax.set_xticks(STAGES, [f"stage {s}" for s in STAGES])
            ax.set_title(f"{metric}: every seed", fontsize=9)
        axes[0][0].legend(fontsize=8)
        axes[1][0].legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{prefix}representations.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    ft = [r for r in rows if r["metric"] == "finetune_dice"]
    if ft:
        labels = sorted({r["n_labels"] for r in ft})
        steps = sorted({r["steps"] for r in ft})
        fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.8), squeeze=False)
        for ax, n in zip(axes[0], labels):
            for method, colour in ((SCRATCH, "grey"), ("DINO", "tab:orange"), ("DeSD", "tab:blue")):
                v = np.array([series(ft, method, present(ft, seeds, n), n_labels=n, steps=s) for s in steps])
                mean = v.mean(1)
                k = v.shape[1]
                if k > 1:
                    half = stats.t.ppf(0.975, k - 1) * v.std(1, ddof=1) / math.sqrt(k)
                    ax.fill_between(steps, mean - half, mean + half, color=colour, alpha=0.15)
                ax.plot(steps, mean, "o-", color=colour, label=method)
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.set_xlabel("fine-tuning steps")
            ax.set_ylabel("held-out Dice")
            ax.set_title(f"{n} labelled phantom(s): mean, 95% CI over seeds", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{prefix}finetune.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


# ============================================================================ CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("desd_vs_dino", add_help=False)
    nonneg_int, positive = int_at_least(0), float_in(0.0, low_open=True)
    p.add_argument("--output_dir", default="desd_vs_dino_output", type=str,
                   help="where the data, the runs and the results go; finished steps found "
                        "there are reused")
    p.add_argument("--seeds", default=list(range(8)), type=int, nargs="+", metavar="SEED",
                   help="pre-training seeds; DeSD and DINO are paired on each (also the "
                        "fine-tuning seeds and the few-label subsets). At least 2.")
    p.add_argument("--jobs", default=2, type=int_at_least(1),
                   help="runs (pre-training, probes, fine-tuning) at a time, as separate "
                        "processes; with --threads 1, one per core is the fastest on a small CPU")
    p.add_argument("--threads", default=1, type=int_at_least(0),
                   help="OMP_NUM_THREADS of every run (0: as set in the environment)")
    p.add_argument("--report_name", default="", type=str,
                   help="prefix of the report files (NAME_results.md, ...), e.g. for a "
                        "fine-tuning variant run into the same output folder; default none")
    p.add_argument("--report_only", action="store_true",
                   help="start no run: make the tables and charts from the runs already in "
                        "--output_dir (the seeds whose pre-training finished, the fine-tuning "
                        "seeds whose runs all finished)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long run for tests: tiny data, 2 seeds, 1 epoch of 2 "
                        "iterations, 2 fine-tuning steps (overrides the sizes below)")
    g = p.add_argument_group("data (synthetic CT, as demo.sh)")
    g.add_argument("--series", default=48, type=int_at_least(2),
                   help="synthetic series for pre-training (demo: 48)")
    g.add_argument("--heldout", default=24, type=int_at_least(2),
                   help="held-out synthetic series for the view retrieval (demo: 24)")
    g.add_argument("--size", default=128, type=int_at_least(32),
                   help="in-plane pixels of the synthetic series (demo: 128)")
    g.add_argument("--labelled", default=12, type=int_at_least(3),
                   help="labelled phantoms for the probes and fine-tuning (the last "
                        "--ft_heldout are held out)")
    g.add_argument("--ft_size", default=96, type=int_at_least(32),
                   help="in-plane pixels of the labelled phantoms (demo: 96)")
    g = p.add_argument_group("pre-training (main_desd.py, the demo's CPU settings)")
    g.add_argument("--arch", default="res3d10", help="backbone (res3d10 on a CPU)")
    g.add_argument("--epochs", default=4, type=int_at_least(1), help="pre-training epochs (demo: 8)")
    g.add_argument("--max_iters_per_epoch", default=8, type=nonneg_int,
                   help="cap on iterations per epoch (0: every sub-volume once, 27 at the "
                        "default data and batch; the demo's setting)")
    g.add_argument("--batch_size", default=16, type=int_at_least(2), help="pre-training batch (demo: 16)")
    g.add_argument("--lr", default=0.03, type=positive, help="learning rate per 256 (demo: 0.03)")
    g.add_argument("--out_dim", default=1024, type=int_at_least(2), help="prototypes (demo: 1024)")
    g.add_argument("--head_hidden_dim", default=256, type=int_at_least(1), help="head width (demo: 256)")
    g.add_argument("--head_bottleneck_dim", default=64, type=int_at_least(1),
                   help="head bottleneck (demo: 64)")
    g.add_argument("--crop", default=[16, 48, 48], type=int_at_least(1), nargs=3,
                   metavar=("D", "H", "W"), help="global view size, also of the retrieval views")
    g.add_argument("--pretrain_deadline_minutes", default=0, type=float_in(0.0),
                   help="start no further seed (after the first two) that, at the mean time "
                        "per seed so far, would end later than this many minutes after the "
                        "start (0: never); the statistics use the seeds done")
    g.add_argument("--num_workers", default=0, type=nonneg_int, help="DataLoader workers")
    g = p.add_argument_group("probes (tools/eval_probe.py)")
    g.add_argument("--probe_seeds", default=[0, 1], type=int, nargs="+", metavar="SEED",
                   help="repetitions of every probe and retrieval measurement, averaged within "
                        "a pre-training seed (they reduce measurement noise; they are not units)")
    g.add_argument("--patches_per_case", default=8, type=int_at_least(1),
                   help="probe patches per labelled phantom (demo: 16)")
    g.add_argument("--probe_epochs", default=40, type=int_at_least(1),
                   help="passes of each linear probe over its voxels (eval_probe.py --epochs)")
    g.add_argument("--probe_voxels", default=32768, type=int_at_least(1),
                   help="training voxels of each linear probe (eval_probe.py --probe_voxels)")
    g.add_argument("--probe_random", default=True, **BOOL,
                   help="also probe random init (context, not part of the tests)")
    g = p.add_argument_group("few-label fine-tuning (finetune_example.py)")
    g.add_argument("--ft_labels", default=[1, 4, 2], type=int_at_least(1), nargs="*", metavar="N",
                   help="labelled training phantoms per setting, run in this order (none: no "
                        "fine-tuning)")
    g.add_argument("--ft_seeds", default=4, type=int_at_least(0),
                   help="fine-tune with the first N pre-training seeds only (0: all of them)")
    g.add_argument("--ft_epochs", default=8, type=int_at_least(1),
                   help="fine-tuning epochs of every run (one cosine schedule over them)")
    g.add_argument("--ft_iters_per_epoch", default=25, type=int_at_least(1),
                   help="iterations per fine-tuning epoch")
    g.add_argument("--ft_eval_every", default=1, type=int_at_least(0),
                   help="held-out Dice after every N epochs: the points of the curve (0: only "
                        "after the last)")
    g.add_argument("--ft_freeze_epochs", default=0, type=int_at_least(0),
                   help="keep the pre-trained (or random) encoder fixed for the first N epochs "
                        "(finetune_example.py --freeze_encoder_epochs)")
    g.add_argument("--ft_encoder_lr_scale", default=1.0, type=positive,
                   help="encoder learning rate as a fraction of --ft_lr "
                        "(finetune_example.py --encoder_lr_scale)")
    g.add_argument("--ft_pool", default=8, type=int_at_least(1),
                   help="the first N phantoms, from which each seed draws its labelled ones")
    g.add_argument("--ft_heldout", default=4, type=int_at_least(1),
                   help="the last N phantoms: the held-out cases of every fine-tuning run")
    g.add_argument("--deadline_minutes", default=0, type=float_in(0.0),
                   help="skip a fine-tuning label setting that, at the rate of the runs so far, "
                        "would end later than this many minutes after the start (0: never)")
    g.add_argument("--ft_lr", default=3e-4, type=positive, help="fine-tuning AdamW peak learning rate")
    g.add_argument("--ft_batch_size", default=2, type=int_at_least(1), help="fine-tuning batch")
    g.add_argument("--ft_patch", default=[32, 64, 64], type=int_at_least(1), nargs=3,
                   metavar=("D", "H", "W"), help="fine-tuning patch (demo: 32 64 64)")
    g.add_argument("--ft_eval_overlap", default=0.5, type=float_in(0.0, 0.95),
                   help="sliding-window overlap of the held-out evaluation (0 is fastest)")
    g.add_argument("--ft_decoder", default=[128, 64, 32, 16, 8], type=int_at_least(1), nargs=5,
                   metavar="C", help="decoder widths (demo: 128 64 32 16 8)")
    g = p.add_argument_group("statistics")
    g.add_argument("--alpha", default=0.05, type=float_in(0.0, 1.0, low_open=True),
                   help="family-wise error rate of the Holm correction")
    g.add_argument("--confidence", default=0.95, type=float_in(0.0, 1.0, low_open=True),
                   help="level of the t intervals of the mean paired differences")
    g.add_argument("--target_difference", default=0.1, type=positive,
                   help="stage-2 retrieval top-1 difference the power estimate is for")
    g.add_argument("--target_power", default=0.8, type=float_in(0.0, 1.0, low_open=True),
                   help="power the seed estimate asks for")
    return p


TINY = {"seeds": [0, 1], "series": 3, "heldout": 3, "size": 64, "labelled": 6, "ft_size": 48,
        "epochs": 1, "max_iters_per_epoch": 2, "batch_size": 2, "out_dim": 32,
        "head_hidden_dim": 32, "head_bottleneck_dim": 16, "crop": [16, 48, 48], "num_workers": 0,
        "probe_seeds": [0], "patches_per_case": 2,
        "probe_epochs": 2, "probe_voxels": 2048, "ft_labels": [1], "ft_seeds": 0, "ft_epochs": 2,
        "ft_iters_per_epoch": 1, "ft_eval_every": 1, "ft_pool": 3, "ft_heldout": 2, "ft_patch": [16, 48, 48],
        "ft_decoder": [16, 8, 8, 8, 4]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("desd_vs_dino.py", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    if len(set(args.seeds)) < 2 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: give at least 2 distinct seeds (the seed is the unit)")
    if args.ft_seeds == 1:
        parser.error("--ft_seeds 1: a paired comparison needs at least 2 seeds")
    if args.ft_labels and max(args.ft_labels) > args.ft_pool:
        parser.error(f"--ft_labels {args.ft_labels} exceeds --ft_pool {args.ft_pool}")
    if args.ft_labels and args.ft_pool + args.ft_heldout > args.labelled:
        parser.error(f"--ft_pool {args.ft_pool} + --ft_heldout {args.ft_heldout} exceeds "
                     f"--labelled {args.labelled}")
    return args


def report(args, rows: list[dict], seconds: dict, out: Path, notes: list[str]) -> dict:
    """The statistics of `rows`, written (CSV, markdown, JSON, charts) and printed."""
    prefix = f"{args.report_name}_" if args.report_name else ""
    comparisons = compare(rows, args.seeds, args.alpha, args.confidence)
    power = power_estimate(comparisons, args.target_difference, args.alpha, args.target_power)
    tables = format_tables(comparisons, rows, args.seeds, args.confidence, power)
    previous = out / f"{prefix}results.json"
    if args.report_only and previous.is_file():  # the timing of the runs, not of this pass
        seconds = json.loads(previous.read_text())["seconds"]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    text = (f"# DeSD vs DINO, paired\n\n{tables}\n\n" + "".join(f"{n}\n\n" for n in notes)
            + f"Wall time: {timing} ({utils.machine_description()}, OMP_NUM_THREADS "
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}).\n")
    write_csv(out / f"{prefix}measurements.csv", MEASUREMENT_COLUMNS, rows)
    write_csv(out / f"{prefix}comparison.csv", COMPARISON_COLUMNS, comparisons)
    write_text(out / f"{prefix}results.md", text)
    results = {"settings": dict(vars(args)), "seconds": seconds, "notes": notes,
               "power": power, "comparisons": comparisons, "measurements": rows}
    write_text(out / f"{prefix}results.json", json.dumps(results, indent=1, default=str) + "\n")
    charts = plot(comparisons, rows, args.seeds, out, prefix)
    print("\n" + tables + "\n\n" + "".join(f"{n}\n" for n in notes) + f"wall time: {timing}")
    print("written: " + ", ".join(str(out / f"{prefix}{n}") for n in (
        "measurements.csv", "comparison.csv", "results.md", "results.json"))
          + "".join(f", {c}" for c in charts), flush=True)
    return results


def run(args) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for every subprocess
    start, seconds, notes = time.time(), {}, []
    print(f"DeSD vs DINO, paired over seeds {args.seeds} on {utils.machine_description()}",
          flush=True)

    t = time.time()
    data = prepare_data(args, out / "data")
    seconds["data"] = time.time() - t
    print(f"  data ready, {seconds['data']:.0f} s", flush=True)
    t = time.time()
    ckpts, done = pretrain(args, data, out / "pretrain", start)
    seconds["pretrain"] = time.time() - t
    if done != args.seeds:
        notes.append(f"Seeds {[s for s in args.seeds if s not in done]} were not pre-trained: "
                     f"they would have ended after --pretrain_deadline_minutes "
                     f"{args.pretrain_deadline_minutes:g}.")
        args.seeds = done

    rows: list[dict] = []
    t = time.time()
    probe_runs = (("clean", False), ("augmented", True))
    csv_paths = in_parallel(args.jobs, [functools.partial(probe, args, data, ckpts,
                                                          out / f"probe_{name}", augmented)
                                        for name, augmented in probe_runs])
    for (name, _), csv_path in zip(probe_runs, csv_paths):
        read_probe_csv(csv_path, ckpts, name, rows)
    read_training_logs(ckpts, rows)
    print(f"  probes done, {time.time() - t:.0f} s", flush=True)
    seconds["probes"] = time.time() - t
    if not args.ft_labels:
        seconds["total"] = time.time() - start
        return report(args, rows, seconds, out, notes)
    report(args, rows, seconds, out, notes)  # the representations, before fine-tuning

    t = time.time()
    notes += finetune(args, data, ckpts, out / "finetune", rows, start)
    seconds["finetune"] = time.time() - t
    seconds["total"] = time.time() - start
    return report(args, rows, seconds, out, notes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (BenchError, ValueError, OSError) as e:
        print(f"desd_vs_dino.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
