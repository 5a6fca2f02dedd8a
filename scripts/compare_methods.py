"""The paper's comparison over seeds: SFT, Offline-ST, Online-ST, ReFT, ReFT with GRPO and ReFT with a 1/0 reward,
from the same warm-up on the same pool, each on minigsm's test split and on its two shifted splits.

    python scripts/compare_methods.py --seeds 0 1 2 --out_dir runs/compare   # runs the seeds, then the table
    python scripts/compare_methods.py --seeds --seed_dirs runs/a runs/b --out_dir runs/table   # only the table
    python scripts/compare_methods.py --fast --seeds 0 --out_dir /tmp/compare  # the plumbing in minutes (tests)

Each seed is `scripts/quickstart.py --compare --seed S --out_dir {out_dir}/seed_S` (flags this script does not know
go to it, e.g. --threads 1): a finished seed (its compare.json exists) is not run again, an interrupted one resumes.
Then every finished seed, those of --seed_dirs too (a seed run elsewhere), goes into {out_dir}/results.json (each
seed's numbers, the means over seeds, each method − SFT), results.md (the tables) and results.png. Checkpoints are
selected on validation only (quickstart.py); the test splits are evaluated once per selected checkpoint.

Intervals: per seed, compare.py's paired bootstrap over that seed's questions; over seeds, the mean difference's
interval from resampling each seed's questions on its own (compare.pooled_paired_bootstrap). Neither covers a new
training run: the per-seed values beside the mean show that spread.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compare import FIELDS, load_predictions, paired_flags, pooled_paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
METHODS = (("SFT", "sft"), ("Offline-ST", "offline_st"), ("Online-ST", "online_st"), ("ReFT", "reft"),
           ("ReFT-GRPO", "reft_grpo"), ("ReFT-binary", "reft_binary"))
SPLITS = ("test", "test_longer", "test_larger")
METRICS = {"greedy": "greedy", "vote": "vote", "pass@k": "pass_at_k"}  # evaluate.py's name: compare.py's mode


def provenance():
    """Where and with what the numbers were made."""
    import torch
    import transformers
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def load_seed(seed_dir):
    """A finished seed's compare.json, with its folder; one error line when the seed has not finished."""
    path = Path(seed_dir) / "compare.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: not a finished `scripts/quickstart.py --compare` folder")
    return dict(json.loads(path.read_text()), dir=str(Path(seed_dir).resolve()))


def check_alike(seeds):
    """The seeds must compare the same methods on the same splits with the same k, each seed once."""
    first = seeds[0]
    for s in seeds[1:]:
        if (list(s["methods"]), s["splits"], s["k"]) != (list(first["methods"]), first["splits"], first["k"]):
            raise SystemExit(f"error: {s['dir']} compares other methods, splits or k than {first['dir']}")
    numbers = [s["seed"] for s in seeds]
    if len(set(numbers)) != len(numbers):
        raise SystemExit(f"error: a seed appears twice among {', '.join(s['dir'] for s in seeds)}")


def aggregate(seed_dirs):
    """Each finished seed's numbers, their means over seeds, and each method − SFT per split and metric: the mean over
    seeds with its pooled interval (recomputed from the predictions), and the per-seed differences and intervals."""
    seeds = sorted((load_seed(d) for d in seed_dirs), key=lambda s: s["seed"])
    check_alike(seeds)
    splits, table = seeds[0]["splits"], {}
    for name in seeds[0]["methods"]:
        rows = [s["methods"][name] for s in seeds]
        entry = {"checkpoints": [r["checkpoint"] for r in rows], "validation": [r["validation"] for r in rows],
                 "train_minutes": [r["train_seconds"] / 60 if r["train_seconds"] is not None else None for r in rows],
                 "eval_minutes": [r["eval_seconds"] / 60 if r["eval_seconds"] is not None else None for r in rows],
                 "splits": {}}
        for split in splits:
            cells = [r["splits"][split] for r in rows]
            cell = {"n": [c["n"] for c in cells], **{m: {"mean": statistics.fmean(c[m] for c in cells),
                                                        "per_seed": [c[m] for c in cells]} for m in METRICS}}
            if name != "SFT":
                runs = [(load_predictions(Path(s["dir"]) / s["methods"]["SFT"]["splits"][split]["eval_dir"]),
                         load_predictions(Path(s["dir"]) / c["eval_dir"])) for s, c in zip(seeds, cells)]
                cell["minus_sft"] = {m: {"mean": statistics.fmean(c["minus_sft"][m]["diff"] for c in cells),
                                         "ci95": list(pooled_paired_bootstrap(
                                             [paired_flags(a, b, FIELDS[mode]) for a, b in runs])),
                                         "per_seed": [c["minus_sft"][m]["diff"] for c in cells],
                                         "per_seed_ci95": [c["minus_sft"][m]["ci95"] for c in cells]}
                                     for m, mode in METRICS.items()}
            entry["splits"][split] = cell
        table[name] = entry
    return {"seeds": [s["seed"] for s in seeds], "seed_dirs": [s["dir"] for s in seeds], "k": seeds[0]["k"],
            "splits": splits, "methods": table, "warmup_epoch": seeds[0]["warmup_epoch"],
            "stage_minutes": [{k: v / 60 for k, v in s["stage_seconds"].items()} for s in seeds],
            "seed_provenance": [{k: s[k] for k in ("machine", "date", "python", "torch", "transformers")}
                                for s in seeds]}


def points(x):
    return f"{100 * x:.1f}"


def signed(x):
    return f"{100 * x:+.1f}".replace("-", "−")


def minutes(values):
    known = [v for v in values if v is not None]
    return f"{statistics.fmean(known):.1f}" if known else "?"


def checkpoints(paths):
    """Each seed's checkpoint folder by its name (epoch_36 / epoch_33, or best once when all seeds' are best)."""
    names = [Path(p).name for p in paths]
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def markdown(agg):
    """The tables: per split, each method's top-1 / voting@k / pass@k (mean over seeds, then each seed's) and its
    difference to SFT (mean, 95% interval, each seed's); then the wall time of each method and the provenance."""
    k, seeds = agg["k"], agg["seeds"]
    per_seed = len(seeds) > 1
    head = {"greedy": "top-1", "vote": f"voting@{k}", "pass@k": f"pass@{k}"}
    lines = [f"Seed{'s' if per_seed else ''} {', '.join(map(str, seeds))}. Cells: accuracy (%) as the mean over seeds"
             + (" (each seed's after it, in seed order)" if per_seed else "")
             + "; method − SFT in points with its 95% paired bootstrap interval over the test questions"
             + (" of all seeds" if per_seed else "") + ". Checkpoints selected on validation."]
    for split in agg["splits"]:
        n = agg["methods"]["SFT"]["splits"][split]["n"]
        lines += ["", f"**{split}** (n = {' / '.join(map(str, n))} questions)", "",
                  "| method (checkpoint) | " + " | ".join(head.values()) + " | "
                  + " | ".join(f"{h} − SFT" for h in head.values()) + " |", "|---" * 7 + "|"]
        for name, entry in agg["methods"].items():
            cell = entry["splits"][split]
            acc = [points(cell[m]["mean"]) + (f" ({' / '.join(points(v) for v in cell[m]['per_seed'])})"
                                              if per_seed else "") for m in METRICS]
            if name == "SFT":
                diff = ["—"] * 3
            else:
                diff = [f"{signed(d['mean'])} [{signed(d['ci95'][0])}, {signed(d['ci95'][1])}]"
                        + (f" ({' / '.join(signed(v) for v in d['per_seed'])})" if per_seed else "")
                        for d in (cell["minus_sft"][m] for m in METRICS)]
            lines.append(f"| {name} ({checkpoints(entry['checkpoints'])}) | " + " | ".join(acc + diff) + " |")
    lines += ["", f"Wall time per seed (minutes, mean over seeds). Every method but Offline-ST starts from W, epoch "
                  f"{agg['warmup_epoch']} of the SFT run; Offline-ST's training includes drawing its samples from W.",
              "", "| method | best validation accuracy (%, each seed) | training | evaluation (3 splits) |",
              "|---|---|---|---|"]
    for name, entry in agg["methods"].items():
        lines.append(f"| {name} | {' / '.join(points(v) for v in entry['validation'])} | "
                     f"{minutes(entry['train_minutes'])} | {minutes(entry['eval_minutes'])} |")
    totals = [sum(m.values()) for m in agg["stage_minutes"]]
    lines += ["", f"All stages of a seed: {' / '.join(f'{t:.1f}' for t in totals)} min."]
    for seed, p in zip(seeds, agg["seed_provenance"]):
        lines.append(f"Seed {seed}: {p['machine']}, {p['date']}, Python {p['python']}, torch {p['torch']}, "
                     f"transformers {p['transformers']}.")
    return "\n".join(lines) + "\n"


def plot(agg, path):
    """Per split, each method's three accuracies as bars (mean over seeds) with each seed's value as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(agg["methods"])
    fig, axes = plt.subplots(1, len(agg["splits"]), figsize=(5.5 * len(agg["splits"]), 3.8), sharey=True)
    for ax, split in zip(axes, agg["splits"]):
        for j, (metric, label) in enumerate(zip(METRICS, ("top-1", f"voting@{agg['k']}", f"pass@{agg['k']}"))):
            xs = [i + 0.27 * (j - 1) for i in range(len(names))]
            cells = [agg["methods"][name]["splits"][split][metric] for name in names]
            ax.bar(xs, [100 * c["mean"] for c in cells], width=0.27, label=label)
            for x, c in zip(xs, cells):
                ax.plot([x] * len(c["per_seed"]), [100 * v for v in c["per_seed"]], "k.", markersize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=f"minigsm {split}", ylabel="accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_seed(seed, seed_dir, fast, passed):
    """quickstart.py --compare for one seed unless it finished; whether it finished (a failure is reported, and the
    other seeds still run)."""
    if (seed_dir / "compare.json").is_file():
        print(f"[seed {seed}] finished already ({seed_dir}); skipping", flush=True)
        return True
    cmd = [sys.executable, "scripts/quickstart.py", "--compare", "--seed", str(seed), "--out_dir", str(seed_dir),
           *(["--fast"] if fast else []), *passed]
    print(f"[seed {seed}] {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print(f"error: seed {seed} failed; run the command again to resume it", file=sys.stderr, flush=True)
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Flags not listed here go to each seed's scripts/quickstart.py run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds to run (none: only aggregate)")
    p.add_argument("--out_dir", default="runs/compare", help="seed_S/ folders and results.{json,md,png} go here")
    p.add_argument("--seed_dirs", nargs="*", default=[],
                   help="finished `quickstart.py --compare` folders made elsewhere, aggregated with the seeds")
    p.add_argument("--fast", action="store_true",
                   help="quickstart.py --fast: checks the plumbing; numbers mean nothing")
    args, passed = p.parse_known_args(argv)
    out = (ROOT / args.out_dir).resolve()
    ok = [run_seed(s, out / f"seed_{s}", args.fast, passed) for s in args.seeds]
    dirs = [out / f"seed_{s}" for s, done in zip(args.seeds, ok) if done] + [Path(d) for d in args.seed_dirs]
    if not dirs:
        raise SystemExit("error: no finished seed to aggregate")
    agg = dict(aggregate(dirs), **provenance())
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(agg, indent=2) + "\n")
    table = markdown(agg)
    (out / "results.md").write_text(table)
    plot(agg, out / "results.png")
    print(table)
    print(f"results: {out / 'results.json'}, table: {out / 'results.md'}, plot: {out / 'results.png'}")
    if not all(ok):
        raise SystemExit(f"error: {ok.count(False)} seed(s) failed; the table holds the finished ones")


if __name__ == "__main__":
    main()
