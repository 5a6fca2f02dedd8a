"""Tests for data/*/prepare.py: determinism, disjoint splits, sizes, and gold records checked against values derived
without the prepare scripts' own filter (reward.gold_failures drops what fails it, so checking what was written with
it again could not fail): answers recomputed from the question text, programs run by plain exec, the raw files.

Real data is read from ../shared/data beside the repo root; tests that need it skip when it is absent.
"""
import importlib.util
import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
import reward  # noqa: E402

SPLITS = ("train", "validation", "test")


def prepare(name, *args):
    """Run data/<name>/prepare.py as a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def ok(name, *args):
    proc = prepare(name, *args)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    return proc.stdout


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_disjoint(folder, cot):
    questions = {s: [r["question"] for r in read(folder / f"{s}_{cot}.jsonl")] for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not set(questions[a]) & set(questions[b]), f"{a} and {b} share questions"
    return questions


def run_plainly(program):
    """solution()'s value by plain exec, not through reward.py's sandbox and answer parsing (trusted programs only)."""
    namespace = {}
    exec(program, namespace)
    return float(namespace["solution"]())


def same_number(a, b):
    """Within the paper's tolerance of 1e-2 (SVAMP's gold programs divide by rounded numbers: 8.9996 for 9.0)."""
    return abs(float(a) - float(b)) <= 1e-2


def minigsm_answer(question):
    """The count a minigsm question asks for, computed from its sentences alone: the first states the count, each
    "... more." adds, "doubles" doubles, every other step sentence takes away."""
    first, *steps, ask = re.split(r"(?<=[.?]) ", question)
    count = int(re.fullmatch(r"[A-Z][a-z]+ has (\d+) [a-z ]+\.", first)[1])
    for sentence in steps:
        if "doubles" in sentence:
            count *= 2
        else:
            n = int(re.search(r"\d+", sentence)[0])
            count += n if sentence.endswith(" more.") else -n
    assert ask.startswith("How many ")
    return count


def assert_step_chain(cot, answer):
    """Every line is "a op n = b" with the arithmetic right, each line starts from the previous result, the last
    result is the answer."""
    prev = None
    for line in cot.split("\n"):
        a, op, n, b = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
        assert eval(f"{a} {op} {n}") == int(b) and (prev is None or a == prev), cot
        prev = b
    assert prev == answer, cot


def test_minigsm_answer_of_a_hand_checked_question():
    question = ("Max has 14 stickers. He finds 13 more. He loses 3. He doubles his stickers. Lily takes 15 from him. "
                "How many stickers does Max have now?")
    assert minigsm_answer(question) == (14 + 13 - 3) * 2 - 15 == 33


def one_error_line(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for needle in needles:
        assert str(needle) in err, err


# ---------------------------------------------------------------- minigsm

MINI = ("--n_train", 120, "--n_validation", 80, "--n_test", 100)


def test_minigsm_deterministic_disjoint_sized(tmp_path):
    ok("minigsm", *MINI, "--seed", 3, "--out_dir", tmp_path / "a")
    ok("minigsm", *MINI, "--seed", 3, "--out_dir", tmp_path / "b")
    ok("minigsm", *MINI, "--seed", 4, "--out_dir", tmp_path / "c")
    for split in SPLITS:
        for cot in ("nl", "python"):
            a = (tmp_path / "a" / f"{split}_{cot}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / f"{split}_{cot}.jsonl").read_bytes()
            assert a != (tmp_path / "c" / f"{split}_{cot}.jsonl").read_bytes()
    sizes = {"train": 120, "validation": 80, "test": 100}
    nl = assert_disjoint(tmp_path / "a", "nl")
    py = assert_disjoint(tmp_path / "a", "python")
    for split, n in sizes.items():
        assert len(nl[split]) == len(set(nl[split])) == n
        assert py[split] == nl[split]


def test_minigsm_test_set_independent_of_train_size(tmp_path):
    ok("minigsm", "--n_train", 50, "--n_validation", 20, "--n_test", 40, "--out_dir", tmp_path / "a")
    ok("minigsm", "--n_train", 90, "--n_validation", 20, "--n_test", 40, "--out_dir", tmp_path / "b")
    assert (tmp_path / "a" / "test_nl.jsonl").read_bytes() == (tmp_path / "b" / "test_nl.jsonl").read_bytes()


def test_minigsm_answers_cots_and_programs_follow_from_the_question(tmp_path):
    """Every record is written (none dropped by the scripts' reward.py check), its answer is the count the question
    text gives, its nl CoT a right chain of steps to it, its program returns it, and reward.py reads it back."""
    ok("minigsm", *MINI, "--out_dir", tmp_path)
    sizes = {"train": 120, "validation": 80, "test": 100}
    for split in SPLITS:
        nl, py = read(tmp_path / f"{split}_nl.jsonl"), read(tmp_path / f"{split}_python.jsonl")
        assert len(nl) == len(py) == sizes[split]
        for a, b in zip(nl, py):
            assert set(a) == set(b) == {"item_id", "question", "answer_cot", "answer_value"}
            assert a["question"] == b["question"] and a["answer_value"] == b["answer_value"]
            assert a["answer_value"] == str(minigsm_answer(a["question"])), a
            assert_step_chain(a["answer_cot"], a["answer_value"])
            assert run_plainly(b["answer_cot"]) == int(b["answer_value"]), b
        assert reward.compute_rewards([reward.build_target(r, "nl") for r in nl], [r["answer_value"] for r in nl],
                                      "nl") == [1.0] * len(nl)


def step_stats(records):
    """(step counts, all numbers in the questions) of minigsm records."""
    steps = [len(r["answer_cot"].split("\n")) for r in records]
    numbers = [int(n) for r in records for n in re.findall(r"\d+", r["question"])]
    return steps, numbers


@pytest.mark.parametrize("knobs,lo,hi,max_number", [((), 2, 3, 10),
                                                    (("--min_steps", 3, "--max_steps", 5, "--max_number", 9), 3, 5, 9)])
def test_minigsm_difficulty_knobs(tmp_path, knobs, lo, hi, max_number):
    ok("minigsm", *MINI, *knobs, "--out_dir", tmp_path)
    records = read(tmp_path / "train_nl.jsonl") + read(tmp_path / "test_nl.jsonl")
    steps, numbers = step_stats(records)
    assert min(steps) == lo and max(steps) == hi
    assert 1 <= min(numbers) and max(numbers) == max_number
    for r in records:  # one CoT line per step sentence; the question ends with the fixed ask
        assert r["question"].count(".") == len(r["answer_cot"].split("\n")) + 1
        assert re.search(r"How many [a-z ]+ does [A-Z][a-z]+ have now\?$", r["question"])
        assert int(r["answer_value"]) >= 0


def test_minigsm_one_line_cots(tmp_path):
    """--one_line_fraction rewrites that share of nl CoTs as one equation; the questions stay the same."""
    ok("minigsm", *MINI, "--out_dir", tmp_path / "steps")
    ok("minigsm", *MINI, "--one_line_fraction", 0.5, "--out_dir", tmp_path / "mixed")
    for split in SPLITS:
        steps, mixed = read(tmp_path / "steps" / f"{split}_nl.jsonl"), read(tmp_path / "mixed" / f"{split}_nl.jsonl")
        assert [r["question"] for r in steps] == [r["question"] for r in mixed]
        one_line = [r for r in mixed if "\n" not in r["answer_cot"]]
        assert 0.3 < len(one_line) / len(mixed) < 0.7
        for r in one_line:  # "expression = value", the expression evaluating to the answer, each question number once
            expr, value = r["answer_cot"].rsplit(" = ", 1)
            assert value == r["answer_value"] and eval(expr) == int(value)
            doubling_removed = re.sub(r"\* 2\b", "", expr)
            assert sorted(re.findall(r"\d+", doubling_removed)) == sorted(re.findall(r"\d+", r["question"]))
        for r in mixed:
            assert r["answer_value"] == str(minigsm_answer(r["question"]))
            if r not in one_line:
                assert_step_chain(r["answer_cot"], r["answer_value"])


def test_minigsm_any_order_cots(tmp_path):
    """--any_order_fraction 1: the same questions and steps, each CoT a valid chain in some order, many reordered."""
    ok("minigsm", *MINI, "--out_dir", tmp_path / "steps")
    ok("minigsm", *MINI, "--any_order_fraction", 1, "--out_dir", tmp_path / "any")
    line = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
    for split in SPLITS:
        steps, shuffled = read(tmp_path / "steps" / f"{split}_nl.jsonl"), read(tmp_path / "any" / f"{split}_nl.jsonl")
        assert [r["question"] for r in steps] == [r["question"] for r in shuffled]
        reordered = 0
        for a, b in zip(steps, shuffled):
            ops = [line.match(x).groups() for x in b["answer_cot"].split("\n")]
            narrative = [line.match(x).groups() for x in a["answer_cot"].split("\n")]
            assert ops[0][0] == narrative[0][0] and ops[-1][3] == b["answer_value"]  # same start, same answer
            for (x, op, n, y), nxt in zip(ops, ops[1:] + [None]):
                assert eval(f"{x} {op} {n}") == int(y) and (nxt is None or nxt[0] == y)  # a chain, counts >= 0
            assert sorted(o[1:3] for o in ops) == sorted(o[1:3] for o in narrative)  # the same steps
            assert [i for i, o in enumerate(ops) if o[1] == "*"] == [i for i, o in enumerate(narrative) if o[1] == "*"]
            reordered += ops != narrative
        assert 0.25 < reordered / len(steps) < 0.75, reordered
        assert all(r["answer_value"] == str(minigsm_answer(r["question"])) for r in shuffled)


def test_minigsm_any_order_keeps_counts_non_negative():
    """When only the question's order keeps every count >= 0, that order is the one written."""
    spec = importlib.util.spec_from_file_location("minigsm_prepare", ROOT / "data" / "minigsm" / "prepare.py")
    minigsm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minigsm)
    for seed in range(20):
        rng = random.Random(seed)
        assert minigsm.any_order_cot(0, [("+", 3), ("-", 3)], rng) == "0 + 3 = 3\n3 - 3 = 0"
        assert minigsm.any_order_cot(1, [("-", 1), ("*", 2), ("+", 4), ("-", 4)], rng) == \
            "1 - 1 = 0\n0 * 2 = 0\n0 + 4 = 4\n4 - 4 = 0"
    seen = {minigsm.any_order_cot(5, [("+", 1), ("+", 2), ("-", 3)], random.Random(s)) for s in range(50)}
    assert len(seen) == 6  # all 3! orders keep 5 +/- these >= 0


def test_minigsm_lengths_are_short(tmp_path):
    ok("minigsm", *MINI, "--out_dir", tmp_path)
    nl, py = read(tmp_path / "test_nl.jsonl"), read(tmp_path / "test_python.jsonl")
    mean = {k: statistics.mean(len(r[f]) for r in rs) for k, rs, f in
            (("question", nl, "question"), ("nl", nl, "answer_cot"), ("python", py, "answer_cot"))}
    print("mean chars:", mean)
    assert 60 < mean["question"] < 160
    assert 20 < mean["nl"] < 50
    assert mean["python"] < mean["question"] + 150
    assert max(len(r["answer_cot"]) for r in nl) < 80


def test_minigsm_bad_knobs():
    one_error_line(prepare("minigsm", "--min_steps", 4, "--max_steps", 2, "--out_dir", "/tmp/unused"), "--min_steps")


# ---------------------------------------------------------------- gsm_symbolic

def test_gsm_symbolic_sample(tmp_path):
    pytest.importorskip("reasoning_gym")
    out = ok("gsm_symbolic", "--n_train", 300, "--n_validation", 40, "--n_test", 80, "--seed", 1,
             "--out_dir", tmp_path)
    assert "per template" in out
    kept, total = map(int, re.search(r"python programs kept: (\d+)/(\d+)", out).groups())
    assert total == 420 and kept / total > 0.93  # measured 97.7% on 6,500 items (templates 66 and 83 fail)
    questions = assert_disjoint(tmp_path, "nl")
    assert [len(questions[s]) for s in SPLITS] == [300, 40, 80]
    for split in SPLITS:
        nl, py = read(tmp_path / f"{split}_nl.jsonl"), read(tmp_path / f"{split}_python.jsonl")
        assert not any("####" in r["answer_cot"] for r in nl)  # no nl record dropped: the sizes above
        with_program = [r for r in py if "answer_cot" in r]
        assert all(same_number(run_plainly(r["answer_cot"]), r["answer_value"]) for r in with_program)
        assert all(r["answer_cot"].startswith('def solution():\n    """' + r["question"]) for r in with_program)
        if split == "train":
            assert len(py) == len(with_program) >= 0.93 * len(nl)
        else:
            assert [r["question"] for r in py] == [r["question"] for r in nl]


def test_gsm_symbolic_template_subset_and_determinism(tmp_path):
    pytest.importorskip("reasoning_gym")
    args = ("--n_train", 40, "--n_validation", 10, "--n_test", 10, "--templates", "3,16")
    out = ok("gsm_symbolic", *args, "--out_dir", tmp_path / "a")
    ok("gsm_symbolic", *args, "--out_dir", tmp_path / "b")
    per_template = re.search(r"per template \(id: kept/drawn\): (.*)", out).group(1)
    assert sorted(int(t.split(":")[0]) for t in per_template.split(", ")) == [3, 16]
    for split in SPLITS:
        for cot in ("nl", "python"):
            name = f"{split}_{cot}.jsonl"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_gsm_symbolic_bad_templates():
    one_error_line(prepare("gsm_symbolic", "--templates", "3,x", "--out_dir", "/tmp/unused"), "--templates")


# ---------------------------------------------------------------- gsm8k

needs_gsm8k = pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(),
                                 reason=f"GSM8K files not found under {SHARED / 'gsm8k'}")


@needs_gsm8k
def test_gsm8k_all_solutions_extract_gold(tmp_path):
    ok("gsm8k", "--source", SHARED / "gsm8k", "--out_dir", tmp_path)
    gold = {}
    for name in ("train.jsonl", "test.jsonl"):
        for row in read(SHARED / "gsm8k" / name):
            gold[row["question"].strip()] = row["answer"].split("####")[-1].strip().replace(",", "")
    records = {s: read(tmp_path / f"{s}_nl.jsonl") for s in SPLITS}
    assert [len(records[s]) for s in SPLITS] == [7473 - 500, 500, 1319]
    assert_disjoint(tmp_path, "nl")
    everything = [r for rs in records.values() for r in rs]
    assert len(everything) == len(gold) == 8792
    for r in everything:
        assert r["answer_value"] == gold[r["question"]]
        assert "<<" not in r["answer_cot"] and "####" not in r["answer_cot"]
        pred = reward.extract_answer(reward.build_target(r, "nl"), "nl")
        assert reward.answers_equal(pred, r["answer_value"]), r["item_id"]


@needs_gsm8k
def test_gsm8k_bad_input(tmp_path):
    one_error_line(prepare("gsm8k", "--source", tmp_path / "nope", "--out_dir", tmp_path), "nope")
    test_line = (SHARED / "gsm8k" / "test.jsonl").read_text().split("\n")[0] + "\n"
    cases = {"malformed": '{"question": "q", "answer": "#### 1"}\n{"question": \n',
             "missing": '{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n',
             "unparsable": '{"question": "q", "answer": "so #### many"}\n'}
    for case, train in cases.items():
        src = tmp_path / case
        src.mkdir()
        (src / "train.jsonl").write_text(train)
        (src / "test.jsonl").write_text(test_line)
        proc = prepare("gsm8k", "--source", src, "--n_validation", 0, "--out_dir", tmp_path / "out")
        one_error_line(proc, src / "train.jsonl", ":2" if case == "malformed" else "record")


# ---------------------------------------------------------------- mwp_reft

needs_reft = pytest.mark.skipif(not (SHARED / "mwp_reft" / "svamp_nl.json").is_file(),
                                reason=f"ReFT release files not found under {SHARED / 'mwp_reft'}")


@needs_reft
def test_mwp_reft_svamp(tmp_path):
    out = ok("mwp_reft", "--dataset", "svamp", "--source", SHARED / "mwp_reft", "--out_dir", tmp_path)
    n = {f"{s}_{c}": len(read(tmp_path / f"{s}_{c}.jsonl")) for s in SPLITS for c in ("nl", "python")}
    assert n["train_nl"] + n["validation_nl"] == 3076
    assert n["train_python"] + n["validation_python"] == 3043
    assert n["test_nl"] == n["test_python"] == 1000
    assert 300 <= n["validation_nl"] <= 310
    nl, py = assert_disjoint(tmp_path, "nl"), assert_disjoint(tmp_path, "python")
    assert set(nl["validation"]) == set(py["validation"]) and nl["test"] == py["test"]
    assert "skipped 0 records failing" in out
    raw = {r["item_id"]: r for r in json.loads((SHARED / "mwp_reft" / "svamp_python_sdp.json").read_text())}
    for r in read(tmp_path / "train_python.jsonl") + read(tmp_path / "validation_python.jsonl"):
        assert r == {k: raw[r["item_id"]][k] for k in r}  # as released
        assert same_number(run_plainly(r["answer_cot"]), r["answer_value"]), r["item_id"]


@needs_reft
def test_mwp_reft_missing_files_are_skipped(tmp_path):
    out = ok("mwp_reft", "--dataset", "gsm8k", "--source", SHARED / "mwp_reft", "--out_dir", tmp_path)
    assert "skipped gsm8k_nl.json" in out and "skipped gsm8k_python_sdp.json" in out
    assert len(read(tmp_path / "test_nl.jsonl")) == 1319
    assert not (tmp_path / "train_nl.jsonl").exists()


def test_mwp_reft_bad_input(tmp_path):
    one_error_line(prepare("mwp_reft", "--dataset", "svamp", "--source", tmp_path / "nope"), "nope")
    good = {"item_id": "svamp_0", "question": "q", "answer_cot": "1 + 1 = 2", "answer_value": "2"}
    cases = {"malformed": '[{"item_id": "svamp_0",\n "question": ]',
             "missing": json.dumps([good, {k: v for k, v in good.items() if k != "answer_cot"}])}
    for case, text in cases.items():
        src = tmp_path / case
        src.mkdir()
        (src / "svamp_nl.json").write_text(text)
        proc = prepare("mwp_reft", "--dataset", "svamp", "--source", src, "--out_dir", tmp_path / "out")
        one_error_line(proc, src / "svamp_nl.json", "line 2" if case == "malformed" else "answer_cot")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(prepare("mwp_reft", "--dataset", "svamp", "--source", empty, "--out_dir", tmp_path / "out"),
                   "none of the svamp files")
