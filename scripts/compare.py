"""Compare two evaluate.py runs on the same questions: each run's accuracies and the paired top-1 difference.

    python scripts/compare.py runs/eval_sft runs/eval_reft                 # B - A, with a 95% interval
    python scripts/compare.py runs/eval_sft runs/eval_reft --json out.json  # also write the numbers

Each argument is an evaluate.py --output_dir (its predictions.jsonl). Questions are matched by item_id, so the two
runs must have evaluated the same questions; the interval comes from resampling questions (the paired bootstrap
that scripts/quickstart.py reports, which calls this file).
"""
import argparse
import json
import random
from pathlib import Path

MODES = ("greedy_correct", "vote_correct", "rerank_correct", "pass_at_k")


def paired_bootstrap(a, b, n=2000, seed=0):
    """95% interval of mean(b) - mean(a) over questions, resampling questions (the two models are paired)."""
    rng = random.Random(seed)
    diffs = sorted(sum(b[i] - a[i] for i in idx) / len(a)
                   for idx in ([rng.randrange(len(a)) for _ in a] for _ in range(n)))
    return diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]


def load_predictions(run_dir):
    """{item_id: row} from {run_dir}/predictions.jsonl; one error line for a missing file or a malformed row."""
    path = Path(run_dir) / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (pass an evaluate.py --output_dir)")
    rows = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                rows[row["item_id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"error: {path} line {i}: not a prediction row with an item_id ({e})")
    return rows


def compare(a, b):
    """Accuracies of both runs per mode they share, and B - A on greedy top-1 with its 95% paired interval."""
    if a.keys() != b.keys():
        raise SystemExit(f"error: the runs evaluated different questions ({len(a.keys() - b.keys())} only in A, "
                         f"{len(b.keys() - a.keys())} only in B)")
    ids = list(a)  # A's file order: the bootstrap draws indices, so the order fixes which resamples it sees
    out = {"n": len(ids)}
    for mode in MODES:
        if all(mode in a[i] and mode in b[i] for i in ids):
            out[mode.removesuffix("_correct")] = [sum(run[i][mode] for i in ids) / len(ids) for run in (a, b)]
    if "greedy" not in out:
        raise SystemExit("error: both runs need greedy predictions (evaluate.py --mode greedy or all)")
    ga, gb = ([float(run[i]["greedy_correct"]) for i in ids] for run in (a, b))
    out["greedy_b_minus_a"] = out["greedy"][1] - out["greedy"][0]
    out["greedy_b_minus_a_ci95"] = list(paired_bootstrap(ga, gb))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="evaluate.py output dir of the baseline (A)")
    p.add_argument("b", help="evaluate.py output dir of the model compared with it (B)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    args = p.parse_args(argv)
    out = compare(load_predictions(args.a), load_predictions(args.b))
    print(f"n = {out['n']} questions;  A = {args.a}  B = {args.b}")
    for mode in ("greedy", "vote", "rerank", "pass_at_k"):
        if mode in out:
            print(f"  {mode:<10} A {100 * out[mode][0]:6.2f}%   B {100 * out[mode][1]:6.2f}%")
    lo, hi = out["greedy_b_minus_a_ci95"]
    print(f"  top-1 B - A: {100 * out['greedy_b_minus_a']:+.1f} points (95% paired bootstrap {100 * lo:+.1f} … "
          f"{100 * hi:+.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(out, a=args.a, b=args.b), indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
