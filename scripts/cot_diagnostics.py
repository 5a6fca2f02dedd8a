"""Where greedy minigsm CoTs go wrong: reading the question, or the arithmetic. The numbers in
docs/experiments.md's "What was tried" come from this script.

    python evaluate.py --mode greedy --model M --data D --split validation --output_dir E
    python scripts/cot_diagnostics.py --data D --split validation E/predictions.jsonl [F/predictions.jsonl ...]

--data is a minigsm folder written without the CoT-style knobs, so its nl CoTs are the question's steps in the
question's order ("14 + 13 = 27\\n27 - 3 = 24"); the predictions may come from a model trained on any style. For
each predictions file (one line per question, as evaluate.py writes it) it prints:
  accuracy    greedy answers right
  read right  questions whose CoT lines are exactly the question's steps (start, operation and number of each
              step) in the question's order; in any order of the steps; the one-equation style is not counted
  arithmetic  equation lines "a op n = b" whose b is right
  styles      share (and accuracy) of CoTs that are one equation, the steps in the question's order, the same
              steps in another order, or anything else
"""
import argparse
import json
import operator
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reward  # noqa: E402

LINE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def steps(cot):
    """[(a, op, n, b)] of the CoT's equation lines; other lines are skipped."""
    return [m.groups() for m in (LINE.match(x.strip()) for x in cot.split("\n")) if m]


def ops(lines):
    """The (operation, number) of each step, the part of a CoT line read from the question."""
    return [x[1:3] for x in lines]


def diagnose(predictions, gold):
    """Counts over predictions [{item_id, greedy_completion, greedy_correct}] against gold {item_id: nl CoT}."""
    c = {k: 0 for k in ("n", "correct", "read_in_order", "read_any_order", "lines", "lines_right")}
    styles = {s: [0, 0] for s in ("one equation", "question's order", "other order", "other")}
    for p in predictions:
        want, got = steps(gold[p["item_id"]]), steps(p["greedy_completion"])
        in_order = bool(got) and got[0][0] == want[0][0] and ops(got) == ops(want)
        any_order = bool(got) and got[0][0] == want[0][0] and sorted(ops(got)) == sorted(ops(want))
        body = p["greedy_completion"].split(reward.ANSWER_TRIGGER.strip())[0].strip()
        one_equation = "\n" not in body and len(re.findall(r" [-+*] ", body)) > 1
        style = ("one equation" if one_equation else "question's order" if in_order
                 else "other order" if any_order else "other")
        styles[style][0] += 1
        styles[style][1] += bool(p["greedy_correct"])
        c["n"] += 1
        c["correct"] += bool(p["greedy_correct"])
        c["read_in_order"] += in_order
        c["read_any_order"] += any_order
        c["lines"] += len(got)
        c["lines_right"] += sum(APPLY[op](int(a), int(n)) == int(b) for a, op, n, b in got)
    return c, styles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("predictions", nargs="+", help="predictions.jsonl files written by evaluate.py")
    p.add_argument("--data", required=True, help="a minigsm folder with CoTs in the question's order")
    p.add_argument("--split", default="validation",
                   help="split the predictions were made on (reads its <split>_nl.jsonl in --data)")
    args = p.parse_args(argv)
    gold_path = Path(args.data) / f"{args.split}_nl.jsonl"
    if not gold_path.is_file():
        raise SystemExit(f"error: --data {args.data}: no {gold_path.name} (write it with data/minigsm/prepare.py)")
    with open(gold_path) as f:
        gold = {r["item_id"]: r["answer_cot"] for r in map(json.loads, f)}
    for path in args.predictions:
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such predictions file (evaluate.py writes predictions.jsonl)")
        with open(path) as f:
            preds = [json.loads(line) for line in f]
        unknown = [q["item_id"] for q in preds if q["item_id"] not in gold]
        if unknown:
            raise SystemExit(f"error: {path}: {len(unknown)} item_ids not in {gold_path} (first: {unknown[0]})")
        c, styles = diagnose(preds, gold)
        n = c["n"]
        print(f"{path}: {n} questions, accuracy {100 * c['correct'] / n:.1f}%; read right "
              f"{100 * c['read_in_order'] / n:.1f}% in the question's order, {100 * c['read_any_order'] / n:.1f}% "
              f"in any order; arithmetic right in "
              f"{100 * c['lines_right'] / max(1, c['lines']):.1f}% of {c['lines']} lines")
        print("  styles: " + ", ".join(f"{s} {100 * k / n:.0f}% (accuracy {100 * r / max(1, k):.0f}%)"
                                       for s, (k, r) in styles.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
