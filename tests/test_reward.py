"""Tests for reward.py: prompt format, answer parsing, rewards, data loading, the CLI, and the paper's data."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reward  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mwp_reft"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"paper data not found at {DATA}")
Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
MCQ = ("a shopkeeper sold an article offering a discount of 5 % and earned a profit of 31.1 % . what would have "
       "been the percentage of profit earned if no discount had been offered ?\n"
       "a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these")


# ---------------------------------------------------------------- format
def test_build_prompt_and_target_exact_strings():
    assert reward.build_prompt(Q, "nl") == f"Question:\n{Q}\nAnswer reasoning:\n"
    assert reward.build_prompt(f"  {Q}\n", "python") == f"Question:\n{Q}\nAnswer reasoning:\n"
    assert reward.build_prompt(Q, "python", sampling=True) == \
        f'Question:\n{Q}\nAnswer reasoning:\ndef solution():\n    """{Q}"""'
    assert reward.build_prompt(Q, "nl", sampling=True) == reward.build_prompt(Q, "nl")
    record = {"question": Q, "answer_cot": "3 + 4 = 7", "answer_value": "7"}
    assert reward.build_target(record, "nl") == "3 + 4 = 7\nTherefore, the answer is: 7"
    program = f'def solution():\n    """{Q}"""\n    result = 3 + 4\n    return result'
    assert reward.build_target(dict(record, answer_cot=program), "python") == program
    assert reward.INSTRUCTION + Q + reward.COT_TRIGGER == reward.build_prompt(Q, "nl")
    assert reward.ANSWER_TRIGGER == "\nTherefore, the answer is: "
    with pytest.raises(ValueError):
        reward.build_prompt(Q, "latex")


# ---------------------------------------------------------------- nl extraction
@pytest.mark.parametrize("completion, expected", [
    ("3 + 4 = 7\nTherefore, the answer is: 7", 7.0),
    ("Therefore, the answer is: 7", 7.0),                      # no leading newline
    ("x\nTherefore, the answer is:7", 7.0),                    # no space after the colon
    ("x\nTherefore, the answer is: 1,234", 1234.0),
    ("x\nTherefore, the answer is: 1,234,567.5", 1234567.5),
    ("x\nTherefore, the answer is: $5", 5.0),
    ("x\nTherefore, the answer is: -$5", -5.0),
    ("x\nTherefore, the answer is: $-5", -5.0),
    ("x\nTherefore, the answer is: 42.", 42.0),
    ("x\nTherefore, the answer is: 5.0", 5.0),
    ("x\nTherefore, the answer is: 3/4", 0.75),
    ("x\nTherefore, the answer is: -3 / 4", -0.75),
    ("x\nTherefore, the answer is: -7", -7.0),
    ("x\nTherefore, the answer is: \u22127", -7.0),            # unicode minus
    ("x\nTherefore, the answer is: 25%", 25.0),                # percent sign dropped, not divided
    ("x\nTherefore, the answer is: <203>.", 203.0),
    ("x\nTherefore, the answer is: .5", 0.5),
    ("x\nTherefore, the answer is: 1e3", 1000.0),
    ("x\nTherefore, the answer is: 7  \nQuestion: something else 9", 7.0),  # only the trigger's line
    ("x\nTherefore, the answer is: 1\nTherefore, the answer is: 2", 2.0),   # last trigger wins
    ("x\nTherefore, the answer is: 12,34", None),
    ("x\nTherefore, the answer is: 5 apples", None),
    ("x\nTherefore, the answer is: 3 + 4", None),
    ("x\nTherefore, the answer is: five", None),
    ("x\nTherefore, the answer is: True", None),
    ("x\nTherefore, the answer is: 1/0", None),
    ("x\nTherefore, the answer is: ", None),
    ("x\nTherefore, the answer is:\n 7\n8", 7.0),             # blank space after the trigger is skipped
    ("3 + 4 = 7. The answer is 7", None),                      # no trigger
    ("x\nTherefore, the answer is <7>.", None),                # SVAMP's own sentence has no colon
    ("", None),
])
def test_extract_answer_nl(completion, expected):
    assert reward.extract_answer(completion, "nl") == expected


def test_parse_number_returns_floats():
    assert isinstance(reward.parse_number("7"), float)
    assert reward.parse_number("inf") is None and reward.parse_number("nan") is None
    assert reward.parse_number("1" * 400) is None  # overflows to inf


# ---------------------------------------------------------------- python extraction
def test_extract_answer_python_full_program_and_body_only():
    program = f'def solution():\n    """{Q}"""\n    apples = 3\n    bought = 4\n    result = apples + bought\n' \
              '    return result'
    assert reward.extract_answer(program, "python") == 7.0
    body = program.split('"""\n', 1)[1]
    assert not body.startswith("def solution")
    assert reward.extract_program(body, Q) == program
    assert reward.extract_answer(body, "python", Q) == 7.0
    assert reward.extract_program("\n" + body, Q) == program  # as sampled after the header (no newline)
    assert reward.extract_answer("    return 7", "python") == 7.0  # no question: a bare header
    assert reward.extract_answer("some text\n" + program, "python") == 7.0  # no question: find the def line
    # with a question, a completion not starting with "def solution" is a body; a later program is ignored
    assert reward.extract_answer("    return 5\n\ndef solution():\n    return 99", "python", Q) == 5.0
    assert reward.extract_answer("\n" + program, "python", Q) == 7.0


def test_program_ends_at_first_blank_line():
    completion = "    result = 5\n    return result\n\nprint(solution())\nraise SystemExit"
    assert reward.extract_program(completion, Q).endswith("    return result")
    assert reward.extract_answer(completion, "python", Q) == 5.0
    # a blank line inside the body cuts the program before its return: no answer
    assert reward.extract_answer("    x = 5\n\n    return x", "python", Q) is None


@pytest.mark.parametrize("body, expected", [
    ("    return True", 1.0),                      # the paper's floatify: True -> 1.0
    ("    return 3 / 4", 0.75),
    ("    return '42'", 42.0),                     # a str result is parsed like nl text
    ("    return [1, 2]", None),
    ("    return {'a': 1}", None),
    ("    return None", None),
    ("    return float('nan')", None),
    ("    return 1 / 0", None),
    ("    return undefined_name", None),
    ("    return math.sqrt(16) + math.pi - math.pi", 4.0),
    ("    x = sympy.symbols('x')\n    return sympy.solve(2 * x - 6, x)[0]", 3.0),
    ("    from fractions import Fraction\n    return Fraction(3, 4) + 1", 1.75),
    ("    import statistics\n    return statistics.mean([1, 2, 6])", 3.0),
    ("    x = sympy.symbols('x')\n    return x + 1", None),  # symbolic: not a number
    ("    import os\n    return 1", None),
])
def test_program_results(body, expected):
    assert reward.extract_answer(body, "python", Q) == expected


# ---------------------------------------------------------------- MathQA multiple choice
def test_parse_options():
    assert reward.parse_options(MCQ) == {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate",
                                         "e": "none of these"}
    assert reward.parse_options(Q) == {} and reward.parse_options(None) == {}


@pytest.mark.parametrize("answer, expected", [
    ("c", "c"), ("C", "c"), ("(c)", "c"), ("c )", "c"), ("c ) 30", "c"), ("c.", "c"), ("'c'", "c"),
    ("30", "c"), ("30.004", "c"), ("27.675", "b"), ("$38", "a"),  # numbers map to the option with that value
    ("31", None), ("f", None),                                    # no such option
    ("data inadequate", "d"),                                      # an option's text
])
def test_mathqa_nl_answers(answer, expected):
    assert reward.extract_answer(f"reasoning\nTherefore, the answer is: {answer}", "nl", MCQ) == expected


@pytest.mark.parametrize("options, number, expected", [
    ("['a ) 15 / 8 ohms', 'b ) 15 ohms', 'c ) 8 ohms']", "1.875", "a"),   # list style, fraction with a unit
    ("a ) a ) 4 inches , b ) b ) 6 inches , c ) c ) 5 inches", "6", "b"),  # the letter repeated
    ("a ) 30 km / hr , b ) 36 km / hr , c ) none of these", "36", "b"),
    ("a ) 9 / \u03c0 , b ) 6 , c ) 9", "9", "c"),                          # "9 / pi" is not 9
    ("a ) 2 : 3 , b ) 3 : 2 , c ) 2", "2", "c"),
    ("a ) 7 1 / 2 , b ) 7 , c ) 8", "7.5", "a"),                          # mixed number
    ("a ) rs . 1,200 , b ) rs . 1,300 , c ) rs . 1,400", "1300", "b"),
    ("a ) 288 cm 2 , b ) 384 cm ^ 2 , c ) 672 cm 2", "384", "b"),          # unit powers
    ("a ) \u2212 60 , b ) 60 , c ) 100", "-60", "a"),
])
def test_mathqa_option_values(options, number, expected):
    question = f"some question ?\n{options}"
    assert reward.extract_answer(f"x\nTherefore, the answer is: {number}", "nl", question) == expected


def test_mathqa_letters_without_question_and_python():
    assert reward.extract_answer("x\nTherefore, the answer is: b", "nl") == "b"
    assert reward.extract_answer("    return 'b'", "python", MCQ) == "b"
    assert reward.extract_answer("    result = 38.0\n    return result", "python", MCQ) == "a"
    assert reward.extract_answer("    return 39", "python", MCQ) is None


# ---------------------------------------------------------------- comparison and rewards
@pytest.mark.parametrize("pred, gold, equal", [
    (1.01, "1", True), (0.99, "1.0", True), (1.011, "1", False), (0.989, "1", False),
    (5.0, "5.0", True), (1000.0, "1,000", True), (-3.0, "-3", True), (8.9333, "8.9333333333", True),
    ("7", "7.0", True), (None, "7", False), (7.0, None, False), (7.0, 7, True),
    ("a", "a", True), ("a", "A", True), ("a", "'a'", True), ("b", "a", False), (1.0, "a", False),
])
def test_answers_equal(pred, gold, equal):
    assert reward.answers_equal(pred, gold) is equal


def test_compute_rewards_nl_and_partial():
    completions = ["x\nTherefore, the answer is: 7", "x\nTherefore, the answer is: 8", "I don't know"]
    assert reward.compute_rewards(completions, ["7", "7", "7"], "nl") == [1.0, 0.1, 0.0]
    assert reward.compute_rewards(completions, ["7", "7", "7"], "nl", partial_reward=False) == [1.0, 0.0, 0.0]
    assert reward.PARTIAL_REWARD == 0.1
    # a letter is not a number: no partial reward on a numeric question
    assert reward.compute_rewards(["x\nTherefore, the answer is: b"], ["7"], "nl") == [0.0]


def test_compute_rewards_python_order_and_partial():
    bodies = ["    return 7", "    return 8", "    while True:\n        pass", "    return 7.004", "    return [7]"]
    assert reward.compute_rewards(bodies, ["7"] * 5, "python", [Q] * 5, timeout=0.5) == [1.0, 0.1, 0.0, 1.0, 0.0]


def test_compute_rewards_mcq_has_no_partial_reward():
    completions = [f"x\nTherefore, the answer is: {a}" for a in ("c", "b", "30", "38", "nothing")]
    assert reward.compute_rewards(completions, ["c"] * 5, "nl", [MCQ] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        reward.compute_rewards(["a"], ["a", "b"], "nl")


def test_gold_failures_flags_exactly_the_wrong_gold_records():
    nl = {"item_id": "n", "question": Q, "answer_cot": "3 + 4 = 7", "answer_value": "7"}
    # An nl target ends with its own answer_value, so only values no parser can read fail.
    assert reward.gold_failures([nl, dict(nl, answer_value="7 apples"), nl, dict(nl, answer_value="")], "nl") == [1, 3]
    program = f'def solution():\n    """{Q}"""\n    return 3 + 4'
    py = dict(nl, answer_cot=program)
    hostile = [dict(py, answer_cot=program.replace("3 + 4", "1 / 0")), dict(py, answer_cot=program + " + 1"),
               dict(py, answer_cot=program.replace("return 3 + 4", "import os\n    return 7"))]
    assert reward.gold_failures([py, *hostile, py], "python") == [1, 2, 3]


# ---------------------------------------------------------------- load_records and the CLI
def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "reward.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_load_records_jsonl_and_json(tmp_path):
    rows = [{"item_id": "x_0", "question": Q, "answer_cot": "3 + 4 = 7", "answer_value": 7}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.jsonl", "d.json"):
        records = reward.load_records(str(tmp_path / name), require_cot=True)
        assert records == [dict(rows[0], answer_value="7")]


@pytest.mark.parametrize("case, content, message", [
    ("missing file", None, r"data file not found: .*nope\.jsonl"),
    ("malformed line", '{"question": "q", "answer_value": "1"}\n{"question": \n', r"bad\.jsonl:2: malformed JSON"),
    ("missing field", '{"item_id": "r7", "answer_value": "1"}\n', r"record r7 has no 'question'"),
    ("missing cot", '{"item_id": "r8", "question": "q", "answer_value": "1"}\n', r"record r8 has no 'answer_cot'"),
    ("empty file", "\n", r"no records"),
    ("not a list", '{"question": "q"}', r"expected a JSON list"),
])
def test_load_records_errors_one_line_via_cli(tmp_path, case, content, message):
    name = {"malformed line": "bad.jsonl", "not a list": "d.json"}.get(case, "d.jsonl")
    path = tmp_path / ("nope.jsonl" if content is None else name)
    if content is not None:
        path.write_text(content)
    result = run_cli("--data", str(path), "--cot", "nl")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.stderr
    with pytest.raises(SystemExit, match=message):
        reward.load_records(str(path), require_cot=True)


def test_unknown_dataset_name_lists_prepared_and_prepare_hint():
    result = run_cli("--data", "no_such_dataset", "--cot", "nl")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown dataset 'no_such_dataset' (prepared datasets:")
    # a dataset folder with a prepare.py and no splits written tells the user to run it (a checkout where it ran,
    # such as one that ran the benchmarks, lists the splits it has instead)
    prepared = any((ROOT / "data" / "minigsm").glob("*.jsonl"))
    message = r"no no_such_split split for nl CoTs .*its nl splits: test" if prepared else \
        r"run `python data/minigsm/prepare.py` first"
    with pytest.raises(SystemExit, match=message):
        reward.load_records("minigsm", split="no_such_split")


def test_cli_on_small_nl_file(tmp_path):
    rows = [{"item_id": f"t{i}", "question": Q, "answer_cot": "3 + 4 = 7", "answer_value": v}
            for i, v in enumerate(["7", "x", "7"])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_cli("--data", str(tmp_path / "d.jsonl"), "--cot", "nl", "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "1/2 correct"


# ---------------------------------------------------------------- the paper's data
@needs_data
def test_all_svamp_gold_programs_score_one():
    records = reward.load_records(str(DATA / "svamp_python_sdp.json"), cot="python", require_cot=True)
    assert len(records) == 3043
    rewards = reward.compute_rewards([r["answer_cot"] for r in records], [r["answer_value"] for r in records],
                                     "python", [r["question"] for r in records], timeout=reward.GOLD_TIMEOUT)
    assert rewards == [1.0] * 3043


@needs_data
def test_svamp_gold_program_bodies_with_rebuilt_header():
    records = reward.load_records(str(DATA / "svamp_python_sdp.json"), cot="python")[:200]
    bodies = [r["answer_cot"].split('"""\n', 1)[1] for r in records]
    rewards = reward.compute_rewards(bodies, [r["answer_value"] for r in records], "python",
                                     [r["question"] for r in records], timeout=reward.GOLD_TIMEOUT)
    assert rewards == [1.0] * 200


@needs_data
def test_svamp_nl_targets_and_the_cots_own_answers():
    records = reward.load_records(str(DATA / "svamp_nl.json"), require_cot=True)
    assert len(records) == 3076
    # The SFT target appends "\nTherefore, the answer is: {answer_value}", so every target extracts its gold.
    targets = [reward.build_target(r, "nl") for r in records]
    assert reward.compute_rewards(targets, [r["answer_value"] for r in records], "nl") == [1.0] * 3076
    # The CoTs also state their own answer as "Therefore, the answer is <N>." (no colon). Reading that sentence
    # with our parser finds the records whose CoT is junk (a "duplicate question" note) or disagrees with
    # answer_value; nothing else may fail.
    failures = []
    for r in records:
        own = r["answer_cot"].replace("Therefore, the answer is <", "Therefore, the answer is: <")
        if not reward.answers_equal(reward.extract_answer(own, "nl"), r["answer_value"]):
            failures.append(r)
    print(f"\nsvamp_nl: {len(failures)} of {len(records)} CoTs do not state answer_value:")
    junk, mismatched = [], []
    for r in failures:
        stated = re.findall(r"Therefore, the answer is <([^>]*)>", r["answer_cot"])
        print(f"  {r['item_id']}: answer_value {r['answer_value']}, CoT states {stated or 'nothing'}: "
              f"...{r['answer_cot'][-70:]!r}")
        if not stated:
            junk.append(r)
        else:
            assert not reward.answers_equal(reward.parse_number(stated[-1]), r["answer_value"])
            mismatched.append(r)
    assert all(re.search(r"duplicate|already been answered|already answered|repeat of", r["answer_cot"]) for r in junk)
    assert (len(junk), len(mismatched)) == (9, 2)


@needs_data
def test_mathqa_numeric_answers_map_to_the_mcq_letter():
    """The 1,605 MathQA test questions exist with options (gold: a letter) and without (gold: a number): the
    number, read from a completion, must map to the gold letter through the options' values."""
    letters = {r["item_id"].split("_")[1]: r for r in reward.load_records(str(DATA / "mathqa_test_set.json"))}
    numbers = {r["item_id"].split("_")[1]: r for r in reward.load_records(str(DATA / "mathqa-numeric_test_set.json"))}
    assert len(letters) == len(numbers) == 1605
    misses = []
    for key, mcq in letters.items():
        pred = reward.extract_answer(f"x\nTherefore, the answer is: {numbers[key]['answer_value']}", "nl",
                                     mcq["question"])
        if pred != mcq["answer_value"]:
            misses.append((numbers[key]["answer_value"], mcq["answer_value"], pred, mcq["question"].split("\n")[-1]))
    print(f"\nmathqa: {len(misses)} of 1605 numeric answers do not map to the gold letter:")
    for miss in misses:
        print("  number %s, gold %s, mapped to %s: %s" % miss)
    # what is left is the data's own: duplicated options, options that disagree with the numeric set
    # ("- 6" for 6.0, "$ 1,354" for 1.0), and options that are expressions ("44 / ab", "4 , 3")
    assert len(misses) == 15
    for number, gold, pred, line in misses:
        values = [reward._option_value(t) for t in reward.parse_options(line).values()]
        same = [v for v in values if v is not None and reward.answers_equal(v, number)]
        assert len(same) != 1, f"{line!r}: exactly one option has the value {number}, yet it was not chosen"


@needs_data
def test_cli_scores_all_svamp_programs():
    result = run_cli("--data", str(DATA / "svamp_python_sdp.json"), "--cot", "python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "3043/3043 correct"
