"""Compare two evaluate.py runs on the same questions: each run's accuracies and the paired difference per mode.

    python scripts/compare.py runs/eval_sft runs/eval_reft                 # B - A, with a 95% interval
    python scripts/compare.py runs/eval_sft runs/eval_reft --json out.json  # also write the numbers

Each argument is an evaluate.py --output_dir (its predictions.jsonl). Questions are matched by item_id, so the two
runs must have evaluated the same questions; the interval comes from resampling questions (the paired bootstrap
that scripts/quickstart.py reports, which calls this file).
"""
import argparse
import functools
import json
import random
from pathlib import Path

import numpy as np

FIELDS = {"greedy": "greedy_correct", "vote": "vote_correct", "rerank": "rerank_correct", "pass_at_k": "pass_at_k"}


@functools.lru_cache(maxsize=16)
def bootstrap_indices(size, n, seed):
    """(n, size) question indices of the n resamples, drawn one by one with random.Random(seed).randrange, as the
    first version of this file drew them (its intervals in README and docs/experiments.md stay reproducible). Cached:
    every mode and every model compared on the same questions resamples them the same way. (n, size)"""
    rng = random.Random(seed)
    return np.array([[rng.randrange(size) for _ in range(size)] for _ in range(n)], dtype=np.int64)


def pooled_paired_bootstrap(groups, n=2000, seed=0):
    """95% interval of the mean over groups of mean(b) - mean(a), resampling questions within each group.

    A group is one seed's (a, b) lists of per-question 0/1 flags of two models on the same questions, so the
    models are paired; seeds draw different questions, so each is resampled on its own (group g with seed + g).
    The training runs are held fixed: the interval covers which questions were drawn, not a new training run."""
    means = sum((np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64))[
        bootstrap_indices(len(a), n, seed + g)].sum(1) / len(a) for g, (a, b) in enumerate(groups)) / len(groups)
    diffs = np.sort(means)
    return float(diffs[int(0.025 * n)]), float(diffs[int(0.975 * n) - 1])


def paired_bootstrap(a, b, n=2000, seed=0):
    """95% interval of mean(b) - mean(a) over questions, resampling questions (the two models are paired)."""
    return pooled_paired_bootstrap([(a, b)], n, seed)


def load_predictions(run_dir):
    """{item_id: row} from {run_dir}/predictions.jsonl; one error line for a missing file, a malformed row or an
    item_id on two rows (a dict would keep one of them and compare fewer questions than were evaluated)."""
    path = Path(run_dir) / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (pass an evaluate.py --output_dir)")
    rows, first, repeated = {}, {}, {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                if row["item_id"] in rows:
                    repeated.setdefault(row["item_id"], [first[row["item_id"]]]).append(i)
                rows[row["item_id"]] = row
                first.setdefault(row["item_id"], i)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"error: {path} line {i}: not a prediction row with an item_id ({e})")
    if repeated:
        names = [f"{k!r} on lines {', '.join(map(str, lines))}" for k, lines in list(repeated.items())[:3]]
        raise SystemExit(f"error: {path}: {len(repeated)} item_ids on more than one row ({'; '.join(names)}"
                         f"{' …' if len(repeated) > 3 else ''}): each question must be evaluated once")
    return rows


def paired_flags(a, b, field):
    """The two runs' 0/1 values of `field`, question by question in A's file order (the bootstrap draws indices, so
    the order fixes which resamples it sees); one error line when they evaluated different questions."""
    if a.keys() != b.keys():
        raise SystemExit(f"error: the runs evaluated different questions ({len(a.keys() - b.keys())} only in A, "
                         f"{len(b.keys() - a.keys())} only in B)")
    return [float(a[i][field]) for i in a], [float(b[i][field]) for i in a]


def compare(a, b):
    """Accuracies of both runs per mode they share, and per mode B - A with its 95% paired interval."""
    flags = {mode: paired_flags(a, b, field) for mode, field in FIELDS.items()
             if all(field in row for run in (a, b) for row in run.values())}
    if "greedy" not in flags:
        raise SystemExit("error: both runs need greedy predictions (evaluate.py --mode greedy or all)")
    out = {"n": len(a)}
    for mode, (fa, fb) in flags.items():
        out[mode] = [sum(fa) / len(fa), sum(fb) / len(fb)]
        out[f"{mode}_b_minus_a"] = out[mode][1] - out[mode][0]
        out[f"{mode}_b_minus_a_ci95"] = list(paired_bootstrap(fa, fb))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("a", help="evaluate.py output dir of the baseline (A)")
    p.add_argument("b", help="evaluate.py output dir of the model compared with it (B)")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file (empty: print only)")
    args = p.parse_args(argv)
    out = compare(load_predictions(args.a), load_predictions(args.b))
    print(f"n = {out['n']} questions;  A = {args.a}  B = {args.b}")
    for mode in FIELDS:
        if mode in out:
            lo, hi = out[f"{mode}_b_minus_a_ci95"]
            print(f"  {mode:<10} A {100 * out[mode][0]:6.2f}%   B {100 * out[mode][1]:6.2f}%   B - A "
                  f"{100 * out[f'{mode}_b_minus_a']:+.1f} points (95% paired bootstrap {100 * lo:+.1f} … "
                  f"{100 * hi:+.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(out, a=args.a, b=args.b), indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
