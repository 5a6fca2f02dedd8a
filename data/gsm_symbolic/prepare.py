"""gsm_symbolic: GSM8K-like templated word problems from reasoning-gym (offline, deterministic per seed).

reasoning-gym's `gsm_symbolic` has 85 usable templates; each item carries a GSM8K-style worked solution
(metadata['answer_cot'], ending in "#### N") and metadata['answer_value'].

- nl CoT: the solution text without the "#### N" line (template glitches such as "48=48" are left as they are).
- python CoT: the solution's arithmetic steps ("a op b = c") turned into a program. A number that an earlier step
  produced is replaced by that step's variable, so the program only copies numbers from the question (plus
  the solution's constants) and the interpreter does the arithmetic. A program is kept only if reward.py runs it
  to answer_value; the script prints the kept fraction per template.

Each split is drawn from its own seeded stream, so the test set does not depend on --n_train; a question is kept
only in the first split (test, validation, train) that draws it. Validation and test files hold the same
questions for both CoTs (answer_cot only where one exists); train_python holds only the converted items.

    python data/gsm_symbolic/prepare.py                          # data/gsm_symbolic/{train,validation,test}_{nl,python}.jsonl
    python data/gsm_symbolic/prepare.py --n_train 2000 --templates 3,16,58
"""
import argparse
import builtins
import json
import keyword
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import reward  # noqa: E402

NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# An expression token: a number (maybe a percent), an operator or a parenthesis; words (units, prose) are dropped,
# except "half". "-" and "/" directly followed by a letter belong to words ("4-hour", "carrot/minute", "$5/day").
TOKEN = re.compile(rf"(?P<num>{NUM})(?P<pct>\s*%)?|(?P<op>[+*×÷^]|-(?![A-Za-z])|/(?![A-Za-z])|(?<![A-Za-z])x(?![A-Za-z]))"
                   r"|(?P<lp>\()|(?P<rp>\))|(?P<half>\bhalf\b)")
RHS = re.compile(rf"=\s*[$€£]?\s*(?P<neg>-)?\s*[$€£]?\s*(?P<num>{NUM})(?:\s*/\s*(?P<den>\d+)(?![\d.]))?(?P<pct>\s*%)?"
                 r"(?:\s*(?P<unit>[A-Za-z]+))?")
STOPS = re.compile(r"[=:;?!•]|,(?!\d{3})|\.(?!\d)|\n")  # an expression never spans these
OPS = {"×": "*", "x": "*", "^": "**"}
NOT_NAMES = {"for", "and", "the", "per", "more", "less", "left", "each", "in", "of", "on", "to", "from", "with",
             "because", "which", "that", "this", "so", "is", "are", "was", "a", "an", "at", "total", "result",
             "every", "times"}


def number(text):
    return float(text.replace(",", ""))


def tokenize(text, start, end):
    """(kind, text, is_percent) for the numbers, operators and parentheses of text[start:end]."""
    out = []
    for t in TOKEN.finditer(text, start, end):
        if t["num"] or t["half"]:
            out.append(("num", t["num"] or "0.5", bool(t["pct"])))
        else:
            out.append((t.lastgroup, OPS.get(t[0], t[0]), False))
    return out


def candidates(tokens):
    """Expressions from suffixes of the tokens, longest first: (parts, number texts); a part is an operator, a
    parenthesis or ("n", index, is_percent)."""
    while tokens and tokens[-1][0] == "op":  # "71 + 47 + T =": the unknown was a word
        tokens = tokens[:-1]
    for start in range(len(tokens)):
        if tokens[start][0] not in ("num", "lp"):
            continue
        parts, nums, i = [], [], start
        while i < len(tokens):
            kind, text, pct = tokens[i]
            prev = tokens[i - 1][0] if i > start else None
            if kind == "num" and prev in ("num", "rp"):
                break  # two numbers in a row: not one expression
            if kind == "lp" and prev in ("num", "rp"):
                parts.append("*")  # implicit product: 2(19)
            if text == "÷" and [k for k, *_ in tokens[i + 1:i + 4]] == ["num", "op", "num"] and tokens[i + 2][1] == "/":
                parts += ["/", "(", ("n", len(nums), tokens[i + 1][2]), "/", ("n", len(nums) + 1, tokens[i + 3][2]), ")"]
                nums += [tokens[i + 1][1], tokens[i + 3][1]]  # 12÷2/5 means 12 / (2/5)
                i += 4
                continue
            if kind == "num":
                parts.append(("n", len(nums), pct))
                nums.append(text)
            else:
                parts.append("/" if text == "÷" else text)
            i += 1
        else:
            if any(p in ("+", "-", "*", "/", "**") for p in parts):
                yield parts, nums


def render(parts, names, pct_div):
    """Python text of an expression; number i is written as names[i] (a variable or a literal)."""
    out = []
    for p in parts:
        if isinstance(p, tuple):
            text = names[p[1]] + (" / 100" if p[2] and pct_div else "")
            out.append(f"({text})" if " " in text and out and out[-1] in ("/", "**") else text)
        else:
            out.append(p)
    return " ".join(out).replace("( ", "(").replace(" )", ")")


def close(a, b):
    return abs(a - b) <= max(0.01, 1e-6 * abs(b))


def to_program(question, solution, answer):
    """The solution's arithmetic as a Python program, or None if no chain of its steps reaches the answer."""
    in_question = {number(m[1]): (m[1].replace(",", ""), bool(m[2])) for m in re.finditer(rf"({NUM})(\s*%)?", question)}
    steps = []  # (name, python expression, value, written result, names of the steps it uses)
    env, taken = {}, set()
    for line in solution.split("\n"):
        for m in RHS.finditer(line):
            start = max((s.end() for s in STOPS.finditer(line, 0, m.start())), default=0)
            rhs = number(m["num"]) / (int(m["den"]) if m["den"] and int(m["den"]) else 1) * (-1 if m["neg"] else 1)
            step = best_step(tokenize(line, start, m.start()), rhs, bool(m["pct"]), steps, env, in_question)
            if step is not None:
                name = var_name(m["unit"], taken)
                env[name] = step[1]
                steps.append((name, step[0], step[1], rhs, step[2]))
    ends = [s for s in steps if close(s[3], answer) and close(s[2], answer)]
    if not ends:
        return None
    needed, todo = set(), [ends[-1][0]]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += next(s[4] for s in steps if s[0] == name)
    lines = [f"    {n} = {e}" for n, e, *_ in steps if n in needed]
    return f'def solution():\n    """{question}"""\n' + "\n".join(lines) + f"\n    result = {ends[-1][0]}\n    return result"


def best_step(tokens, rhs, rhs_pct, steps, env, in_question):
    """The longest expression before '=' that evaluates to the written result, with earlier results reused;
    failing that, one whose integer part is the written result (the solution rounded a count down)."""
    for floor in (False, True):
        for parts, nums in candidates(tokens):
            names, deps = [], []
            for text in nums:
                prior = next((s[0] for s in reversed(steps) if s[3] == number(text)), None)
                names.append(prior or literal(text, in_question))
                deps += [prior] if prior else []
            for pct_div, scale in ((True, False), (False, False), (True, rhs_pct)):
                expr = render(parts, names, pct_div)
                if scale:  # "15 / 20 = 75%"
                    expr = f"({expr}) * 100" if " + " in expr or " - " in expr else f"{expr} * 100"
                expr = re.sub(r"(?<![\w)])\(([\w.]+)\)", r"\1", f"int({expr})" if floor else expr)
                try:
                    value = eval(expr, {"int": int}, dict(env))
                except (SyntaxError, ZeroDivisionError, TypeError, ValueError, OverflowError):
                    break
                if isinstance(value, (int, float)) and close(value, rhs):
                    return expr, value, deps
    return None


def literal(text, in_question):
    """A number as Python source; a decimal that is a percent of the question ("0.6" for 60%) becomes "60 / 100"."""
    value = number(text)
    pct = in_question.get(round(value * 100, 9))
    if value not in in_question and pct and pct[1]:
        return f"{pct[0]} / 100"
    text = text.replace(",", "")
    return text if "." in text else text.lstrip("0") or "0"


def var_name(unit, taken):
    base = (unit or "").lower()
    if len(base) < 3 or base in NOT_NAMES or keyword.iskeyword(base) or hasattr(builtins, base) \
            or base in ("math", "sympy", "solution"):
        base = "step"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def draw(n, seed, templates, seen):
    """n items with unseen questions (and a template in `templates`) from the stream create_dataset(seed)."""
    import reasoning_gym
    items, size, idx, dup = [], max(64, 2 * n), 0, 0
    while len(items) < n:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)  # item i does not depend on size
        for idx in range(idx, size):
            if len(items) == n:
                break
            if templates and ds.task_indices[idx] not in templates:
                continue
            item = ds[idx]
            if item["question"] in seen:
                dup += 1
                if dup > 10 * n + 1000:
                    raise SystemExit(f"error: gsm_symbolic seed {seed}: cannot draw {n} distinct questions "
                                     f"(templates {sorted(templates) or 'all'}); ask for fewer")
                continue
            seen.add(item["question"])
            items.append((ds.task_indices[idx], idx, item))
        else:
            idx, size = size, 2 * size
    return items, dup


def convert(template, idx, item, split, i):
    """(nl record, program or None) of one reasoning-gym item."""
    meta = item.get("metadata", {})
    where = f"gsm_symbolic item {idx} (template {template}, split {split})"
    solution, value = meta.get("answer_cot"), meta.get("answer_value")
    if not isinstance(solution, str) or "####" not in solution or value is None:
        raise SystemExit(f"error: {where}: metadata lacks answer_cot with '#### N' or answer_value")
    try:
        answer = float(str(value).replace(",", ""))
    except ValueError:
        raise SystemExit(f"error: {where}: unparsable answer_value {value!r}")
    nl = re.sub(r"\n*####[^\n]*$", "", solution.strip()).strip()
    record = {"item_id": f"gsm_symbolic_{split}_{i}", "question": item["question"], "answer_cot": nl,
              "answer_value": str(value)}
    return record, to_program(item["question"], nl, answer)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--n_train", type=int, default=5000,
                   help="training questions drawn (train_python keeps only those with a program)")
    p.add_argument("--n_validation", type=int, default=500, help="validation questions drawn")
    p.add_argument("--n_test", type=int, default=1000, help="test questions drawn")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed of reasoning-gym's streams (test, validation, train: one stream each)")
    p.add_argument("--templates", default="",
                   help="comma-separated template ids (reasoning-gym task indices); empty: all 85 usable ones")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent),
                   help="where {train,validation,test}_{nl,python}.jsonl are written")
    args = p.parse_args()
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok  # the 85 usable template ids
    try:
        templates = {int(t) for t in args.templates.split(",") if t.strip()}
    except ValueError:
        raise SystemExit(f"error: --templates must be comma-separated integers, got {args.templates!r}")
    if templates - set(tasks_ok):
        raise SystemExit(f"error: --templates: unknown template ids {sorted(templates - set(tasks_ok))} "
                         f"(valid: {', '.join(map(str, tasks_ok))})")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen, tried, kept = set(), Counter(), Counter()
    for k, (split, n) in enumerate([("test", args.n_test), ("validation", args.n_validation), ("train", args.n_train)]):
        items, dup = draw(n, args.seed + k * 10**7, templates, seen)
        nl, py = [], []
        for i, (template, idx, item) in enumerate(items):
            record, program = convert(template, idx, item, split, i)
            nl.append(record)
            py.append(dict(record, answer_cot=program) if program else None)
        bad_nl = {nl[i]["item_id"] for i in reward.gold_failures(nl, "nl")}
        done = [r for r in py if r]
        bad_py = {done[i]["item_id"] for i in reward.gold_failures(done, "python")}
        py = [r if r and r["item_id"] not in bad_py else None for r in py]
        for (template, *_), r in zip(items, py):
            tried[template] += 1
            kept[template] += r is not None
        if split != "train":  # evaluation splits: the same questions for both CoTs, a program where there is one
            py = [r or {key: v for key, v in nl_r.items() if key != "answer_cot"} for r, nl_r in zip(py, nl)]
        nl = [r for r in nl if r["item_id"] not in bad_nl]
        py = [r for r in py if r]
        for cot, records in (("nl", nl), ("python", py)):
            with open(out / f"{split}_{cot}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{split}: drew {len(items)} items (skipped {dup} questions already drawn); wrote {len(nl)} nl "
              f"({len(bad_nl)} failing reward.py check), {len(py)} python "
              f"({sum(r is not None and 'answer_cot' in r for r in py)} with a program)")
    total = sum(tried.values())
    print(f"python programs kept: {sum(kept.values())}/{total} = {sum(kept.values()) / max(total, 1):.1%}; "
          f"templates with >= 90% kept: {sum(kept[t] >= 0.9 * tried[t] for t in tried)}/{len(tried)}")
    print("per template (id: kept/drawn): " + ", ".join(f"{t}: {kept[t]}/{tried[t]}" for t in sorted(tried)))


if __name__ == "__main__":
    main()
