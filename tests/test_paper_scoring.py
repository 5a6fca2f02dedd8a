"""--scoring paper: the paper code's answer extraction, comparison and reward, on hand-made cases where it differs
from the project's lenient rules and where both agree, and evaluate.py's results under it against an independent
recomputation."""
import json
import sys
from collections import Counter

import pytest

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import reward  # noqa: E402

T = "\nTherefore, the answer is: "
Q = "Max has 3 apples. He finds 4 more. How many apples does Max have now?"
MCQ = "a shop sold 3 and then 27 more . how many ?\na ) 38 , b ) 27.675 , c ) 30 , d ) 12 , e ) none of these"


def paper_nl(completion, question, gold):
    """The paper's N-CoT rules transcribed from its train_rl_reft.py, independently of reward.py: (prediction,
    correct, reward) for numeric gold (gsm8k/svamp) or a MathQA letter."""
    text = (reward.build_prompt(question, "nl") + completion).strip().split("\nAnswer reasoning:\n")[-1].strip()
    after = text.split(T)[-1]
    if gold in "abcde":
        pred = after.lower().replace('"', "").replace("'", "").strip()
        correct = pred == gold
    else:
        try:
            pred = float(after.strip())
        except Exception:
            pred = None
        correct = pred is not None and abs(pred - float(gold.replace(",", "").strip())) <= 1e-2
    return pred, correct, 1.0 if correct else 0.1 if pred is not None else 0.0


# (completion, question, gold, paper prediction, paper reward, lenient reward)
NL_CASES = [
    ("3 + 4 = 1234" + T + "1,234", Q, "1234", None, 0.0, 1.0),  # a thousands comma: float() fails
    ("3 + 4 = 7", Q, "7", None, 0.0, 0.0),  # no trigger: float() of the whole CoT
    ("7", Q, "7", 7.0, 1.0, 0.0),  # no trigger, but the whole CoT is a number
    ("3 + 4 = 7" + T + "$7", Q, "7", None, 0.0, 1.0),
    ("3 + 4 = 7" + T + "7\nSo Max has 7.", Q, "7", None, 0.0, 1.0),  # text after the answer line
    ("18 - 0 = 18" + T + "18.01", Q, "18", 18.01, 0.1, 1.0),  # |18.01 - 18| is a hair over 1e-2 in floats
    ("3 + 27 = 30" + T + "(c)", MCQ, "c", "(c)", 0.1, 1.0),  # a letter in parentheses for MCQ
    ("3 + 27 = 30" + T + "30", MCQ, "c", "30", 0.1, 1.0),  # a number for an MCQ answer (option c is 30)
    ("3 + 27 = 30" + T + "b", MCQ, "c", "b", 0.1, 0.0),  # a wrong letter: 0.1 in the paper
    # agreeing cases
    ("3 + 4 = 7" + T + "7", Q, "7", 7.0, 1.0, 1.0),
    ("3 + 4 = 7" + T + "8", Q, "7", 8.0, 0.1, 0.1),
    ("3 + 4 = 7" + T + "1234", Q, "1,234", 1234.0, 1.0, 1.0),  # commas are stripped from the gold
    ("3 + 4 = 7" + T + "7.005", Q, "7", 7.005, 1.0, 1.0),
    ("3 + 27 = 30" + T + "C", MCQ, "c", "c", 1.0, 1.0),
    ("3 + 27 = 30" + T + "c", MCQ, "c", "c", 1.0, 1.0),
]


@pytest.mark.parametrize("completion, question, gold, pred, paper, lenient", NL_CASES)
def test_nl_cases_give_the_paper_codes_values(completion, question, gold, pred, paper, lenient):
    got = reward.extract_answers_paper([completion], "nl", [gold], [question])[0]
    assert got == pred and type(got) is type(pred)
    assert paper_nl(completion, question, gold) == (pred, paper == 1.0, paper)  # the transcription agrees
    assert reward.paper_correct(got, gold) == (paper == 1.0)
    assert reward.compute_rewards([completion], [gold], "nl", [question], scoring="paper") == [paper]
    assert reward.compute_rewards([completion], [gold], "nl", [question]) == [lenient]


def test_partial_reward_off_gives_binary_rewards():
    completions = ["x" + T + "8", "x" + T + "b", "x"]
    assert reward.compute_rewards(completions, ["7", "c", "7"], "nl", [Q, MCQ, Q], partial_reward=False,
                                  scoring="paper") == [0.0, 0.0, 0.0]


BODY = "\n    apples = 3\n    found = 4\n    result = apples + found\n    return result"


@pytest.mark.parametrize("completion, question, gold, pred, paper, lenient", [
    (BODY, Q, "7", 7.0, 1.0, 1.0),
    (reward.program_header(Q) + BODY, Q, "7", 7.0, 1.0, 1.0),  # the completion writes the header itself
    ("\n    return 18.01", Q, "18", 18.01, 0.1, 1.0),
    ("\n    return '1,234'", Q, "1234", None, 0.0, 1.0),  # a str result goes through float()
    ("\n    return True", Q, "1", 1.0, 1.0, 1.0),
    ("\n    return [7]", Q, "7", None, 0.0, 0.0),
    ("\n    sys.exit(3)\n    return 7", Q, "7", 7.0, 1.0, 0.0),  # the paper turns sys.exit into print
    ("\n    x = 7\n\n    return x", Q, "7", None, 0.0, 0.0),  # a blank line ends the program
    ("\n    return 'C'", MCQ, "c", "c", 1.0, 1.0),
    ("\n    return '(c)'", MCQ, "c", "(c)", 0.1, 1.0),
    ("\n    return 1 / 0", MCQ, "c", "none", 0.1, 0.0),  # a failed MathQA program is the text "none"
    ("\n    return 1 / 0", Q, "7", None, 0.0, 0.0),
])
def test_python_cases_give_the_paper_codes_values(completion, question, gold, pred, paper, lenient):
    got = reward.extract_answers_paper([completion], "python", [gold], [question])[0]
    assert got == pred and type(got) is type(pred)
    assert reward.compute_rewards([completion], [gold], "python", [question], scoring="paper") == [paper]
    assert reward.compute_rewards([completion], [gold], "python", [question]) == [lenient]


def test_paper_program_is_process_code():
    text = 'def solution():\n    """q"""\n    x = 1\n    sys.exit(x)\n\n    return x\nmore'
    assert reward.paper_program(text) == \
        'import math\nimport sympy\ndef solution():\n    """q"""\n    x = 1\n    print(x)'


def test_unknown_scoring_is_refused():
    with pytest.raises(ValueError, match="scoring"):
        reward.compute_rewards(["7"], ["7"], "nl", scoring="strict")


def test_paper_votes_count_exact_values_and_mathqa_candidates_are_single_characters():
    answers = [3.0, 3.001, 3.001]
    assert evaluate.majority_index(answers, "paper") == 1 and evaluate.majority_index(answers) == 0
    sampled = ["c", "(c)", "5", "none", 7.0]
    assert evaluate.paper_candidates(sampled, letters_only=False) == ["c", None, "5", None, 7.0]  # sampling.py
    assert evaluate.paper_candidates(sampled, letters_only=True) == ["c", None, None, None, 7.0]  # its rerank


@pytest.mark.parametrize("max_new_tokens", [48, 1])
def test_evaluate_paper_scoring_matches_a_recomputation(minigsm, warmup, tmp_path, max_new_tokens):
    """evaluate.py --scoring paper on a tiny run: greedy accuracy recomputed from the saved completions with the
    transcription above, vote with a Counter over the saved sample answers, pass@k from those answers. Cut after
    one token, a completion is the CoT's first digit with no trigger: a float for the paper, None when lenient."""
    run([PY, "evaluate.py", "--data", minigsm, "--model", warmup, "--output_dir", tmp_path, "--mode", "all",
         "--limit", 12, "-k", 4, "--max_new_tokens", max_new_tokens, "--batch_size", 16, "--seed", 5,
         "--scoring", "paper"])
    results = json.loads((tmp_path / "results.json").read_text())
    preds = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    questions = {r["item_id"]: r["question"] for r in reward.load_records(str(minigsm), "test", "nl")}
    assert results["scoring"] == "paper" and len(preds) == 12
    greedy, vote, pass_k = [], [], []
    for p in preds:
        pred, correct, _ = paper_nl(p["greedy_completion"], questions[p["item_id"]], p["gold"])
        assert p["greedy_answer"] == pred
        greedy.append(correct)
        gold = float(p["gold"].replace(",", ""))
        right = [a is not None and abs(a - gold) <= 1e-2 for a in p["sample_answers"]]
        counts = Counter(a for a in p["sample_answers"] if a is not None)
        voted = counts.most_common(1)[0][0] if counts else None
        vote.append(voted is not None and abs(voted - gold) <= 1e-2)
        pass_k.append(any(right))
        assert p["sample_correct"] == right
    assert results["accuracy"] == {"greedy": sum(greedy) / 12, "vote": sum(vote) / 12, "pass@k": sum(pass_k) / 12}
    if max_new_tokens == 1:
        assert all(isinstance(p["greedy_answer"], float) and T.strip() not in p["greedy_completion"] for p in preds)
