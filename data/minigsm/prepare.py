"""minigsm: short synthetic word problems, the CPU quickstart task.

A starting count (1..max_number), then min_steps..max_steps steps, each +n, -n (n <= current count) or x2:

    Max has 14 stickers. He finds 13 more. He loses 3. Lily takes 15 from him. How many stickers does Max have now?

nl CoT:      "14 + 13 = 27\\n27 - 3 = 24\\n24 - 15 = 9"
             or, for a --one_line_fraction share of the questions, one equation: "14 + 13 - 3 - 15 = 9". Real
             annotations mix careful and terse styles too; the terse one is harder for a small model to get right.
             or, for an --any_order_fraction share, the steps in another valid order: "14 - 3 = 11\n11 - 15 ..."
             is not valid (a count never goes below 0), "14 - 3 = 11\n11 + 13 = 24\n24 - 15 = 9" is. Annotators
             of real problems also compute in different orders: several correct CoTs, one of them written down.
python CoT:  def solution(): ... stickers = 14 / found = 13 / ... / result = stickers + found - lost - taken
             (the program only copies numbers from the question; the interpreter does the arithmetic)

The training split is a fixed small pool (the paper's regime). Each split has its own random stream, so the
test set does not change with --n_train; a question is kept only in the first split (test, validation, train)
that draws it. Every record is checked through reward.py before it is written.

Two out-of-distribution test sets from the same generator measure generalization beyond the pool, each with a shift
no training question shows (evaluate.py --split test_longer): test_longer has --max_steps + 1 steps, test_larger
at least one stated number above --max_number (all up to 2 × --max_number). They are drawn after the other splits,
from streams of their own, so those do not change with them.

    python data/minigsm/prepare.py                       # writes data/minigsm/{train,validation,test}_{nl,python}.jsonl
                                                         # and test_{longer,larger}_{nl,python}.jsonl
    python data/minigsm/prepare.py --max_steps 4 --max_number 30 --n_train 200
    python data/minigsm/prepare.py --one_line_fraction 0.5                    # half the CoTs as one equation
    python data/minigsm/prepare.py --any_order_fraction 1                     # steps in a random valid order
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import reward  # noqa: E402

NAMES = [("Max", "he"), ("Lily", "she"), ("Sam", "he"), ("Emma", "she"), ("Leo", "he"), ("Mia", "she"),
         ("Tom", "he"), ("Ava", "she"), ("Ben", "he"), ("Zoe", "she"), ("Jack", "he"), ("Nora", "she"),
         ("Omar", "he"), ("Ruby", "she"), ("Eli", "he"), ("Ivy", "she")]
OBJECTS = ["stickers", "marbles", "apples", "cards", "coins", "pencils", "shells", "books", "stamps",
           "cookies", "balloons", "toy cars", "crayons", "buttons", "beads", "rocks"]
PRONOUNS = {"he": ("He", "him", "his"), "she": ("She", "her", "her")}
# (sign, variable name, sentence); {P} subject pronoun, {o} object pronoun, {F} a friend's name, {n} the number.
STEPS = [("+", "bought", "{P} buys {n} more."), ("+", "found", "{P} finds {n} more."),
         ("+", "received", "{F} gives {o} {n} more."),
         ("-", "given", "{P} gives {n} to {F}."), ("-", "lost", "{P} loses {n}."), ("-", "sold", "{P} sells {n}."),
         ("-", "taken", "{F} takes {n} from {o}.")]


def step_lines(start, ops):
    """The CoT lines "a op n = b" of the steps in this order from the starting count, and the counts on the way."""
    lines, counts = [], [start]
    for sign, n in ops:
        a = counts[-1]
        counts.append(a + n if sign == "+" else a - n if sign == "-" else a * n)
        lines.append(f"{a} {sign} {n} = {counts[-1]}")
    return lines, counts


def any_order_cot(start, ops, rng):
    """The step-by-step CoT with the +/- steps between doublings in a random order keeping every count >= 0.

    ops are the steps in the question's order: ("+", n), ("-", n) or ("*", 2). The question's order is always
    valid, so the search ends; a doubling stays where it is (it does not commute with the steps around it)."""
    order, run = [], []
    for op in ops + [None]:
        if op is not None and op[0] != "*":
            run.append(op)
            continue
        while True:
            shuffled = rng.sample(run, len(run))
            if min(step_lines(start, order + shuffled)[1]) >= 0:
                break
        order += shuffled + ([op] if op is not None else [])
        run = []
    return "\n".join(step_lines(start, order)[0])


def make_problem(rng, min_steps, max_steps, max_number):
    """One problem: (question, nl CoT step by step, nl CoT as one equation, python CoT, answer, (start, ops)).

    (start, ops) is the starting count and the steps ("+", n) / ("-", n) / ("*", 2) in the question's order."""
    name, gender = rng.choice(NAMES)
    subj, obj, poss = PRONOUNS[gender]
    objects = rng.choice(OBJECTS)
    var = objects.replace(" ", "_")
    count = start = rng.randint(1, max_number)
    sentences = [f"{name} has {count} {objects}."]
    ops, assigns, expr, used = [], [f"{var} = {count}"], var, set()
    numbers = str(count)  # the whole computation as one expression of the question's numbers
    doubled = lambda e: f"({e}) * 2" if " " in e else f"{e} * 2"  # noqa: E731
    for _ in range(rng.randint(min_steps, max_steps)):
        if 1 <= count <= max_number and rng.random() < 0.15:
            sentences.append(f"{subj} doubles {poss} {objects}.")
            ops.append(("*", 2))
            expr, numbers, count = doubled(expr), doubled(numbers), count * 2
            continue
        sign, verb, template = rng.choice([s for s in STEPS if s[0] == "+" or count > 0])
        n = rng.randint(1, max_number if sign == "+" else min(count, max_number))
        friend = rng.choice([f for f, _ in NAMES if f != name])
        sentences.append(template.format(P=subj, o=obj, F=friend, n=n))
        new = count + n if sign == "+" else count - n
        ops.append((sign, n))
        verb_var = verb if verb not in used else f"{verb}_{sum(v.startswith(verb) for v in used) + 1}"
        used.add(verb_var)
        assigns.append(f"{verb_var} = {n}")
        expr, count = f"{expr} {sign} {verb_var}", new
        numbers = f"{numbers} {sign} {n}"
    question = " ".join(sentences) + f" How many {objects} does {name} have now?"
    body = "\n".join(f"    {line}" for line in assigns + [f"result = {expr}", "return result"])
    program = f'def solution():\n    """{question}"""\n{body}'
    return question, "\n".join(step_lines(start, ops)[0]), f"{numbers} = {count}", program, str(count), (start, ops)


def stated_numbers(steps):
    """The numbers a question states: the starting count and each +/- step's number (a doubling states none)."""
    start, ops = steps
    return [start] + [n for sign, n in ops if sign != "*"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--n_train", type=int, default=400, help="training pool size (small and fixed, as in the paper)")
    p.add_argument("--n_validation", type=int, default=500, help="validation questions (model selection)")
    p.add_argument("--n_test", type=int, default=1000, help="test questions (reported, never tuned on)")
    p.add_argument("--min_steps", type=int, default=2, help="fewest arithmetic steps per problem")
    p.add_argument("--max_steps", type=int, default=3, help="most arithmetic steps per problem (test_longer: one more)")
    p.add_argument("--max_number", type=int, default=10,
                   help="largest starting count and step number (the quickstart's; at 20 the SFT baseline reached "
                        "16%% on validation)")
    p.add_argument("--one_line_fraction", type=float, default=0.0,
                   help="share of nl CoTs written as one equation ('14 + 13 - 3 = 24') instead of step by step")
    p.add_argument("--any_order_fraction", type=float, default=0.0,
                   help="share of nl CoTs (of those not one equation) doing the steps in a random valid order")
    p.add_argument("--n_shifted", type=int, default=None,
                   help="size of each shifted test set, test_longer and test_larger (None: --n_test; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem generator")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where the splits are written")
    args = p.parse_args()
    if not 1 <= args.min_steps <= args.max_steps or args.max_number < 1 or not 0 <= args.one_line_fraction <= 1 \
            or not 0 <= args.any_order_fraction <= 1:
        raise SystemExit("error: need 1 <= --min_steps <= --max_steps, --max_number >= 1 and "
                         "0 <= --one_line_fraction, --any_order_fraction <= 1")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    n_shifted = args.n_test if args.n_shifted is None else args.n_shifted
    in_pool = (args.min_steps, args.max_steps, args.max_number, lambda steps: True)
    longer = (args.max_steps + 1, args.max_steps + 1, args.max_number, lambda steps: True)
    larger = (args.min_steps, args.max_steps, 2 * args.max_number,
              lambda steps: max(stated_numbers(steps)) > args.max_number)
    for k, (split, n, (min_steps, max_steps, max_number, shifted)) in enumerate([
            ("test", args.n_test, in_pool), ("validation", args.n_validation, in_pool), ("train", args.n_train, in_pool),
            ("test_longer", n_shifted, longer), ("test_larger", n_shifted, larger)]):
        if n == 0 and split.startswith("test_"):
            continue
        # The CoT style has its own stream, so the questions do not depend on --one_line_fraction.
        rng, style_rng = random.Random(args.seed * 1000 + k), random.Random(args.seed * 1000 + k + 100)
        rows, dup, tries = [], 0, 0
        while len(rows) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise SystemExit(f"error: {split}: only {len(rows)} distinct questions of {n} after {tries} "
                                 f"draws; widen --max_number/--max_steps")
            q, nl, one_line, py, value, steps = make_problem(rng, min_steps, max_steps, max_number)
            if not shifted(steps):
                continue
            if q in seen:
                dup += 1
                continue
            seen.add(q)
            if style_rng.random() < args.one_line_fraction:
                nl = one_line
            elif args.any_order_fraction and style_rng.random() < args.any_order_fraction:
                nl = any_order_cot(*steps, style_rng)
            rows.append((q, nl, py, value))
        for cot, col in (("nl", 1), ("python", 2)):
            records = [{"item_id": f"minigsm_{split}_{i}", "question": r[0], "answer_cot": r[col],
                        "answer_value": r[3]} for i, r in enumerate(rows)]
            bad = set(reward.gold_failures(records, cot))
            with open(out / f"{split}_{cot}.jsonl", "w") as f:
                for i, r in enumerate(records):
                    if i not in bad:
                        f.write(json.dumps(r) + "\n")
            print(f"{split}_{cot}: wrote {len(records) - len(bad)}, skipped {dup} duplicate questions, "
                  f"{len(bad)} failing reward.py check")


if __name__ == "__main__":
    main()
