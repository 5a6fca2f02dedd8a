"""sft.py --extra_samples (offline self-training): exactly the correct samples are added, less duplicates of each
other and of the gold CoT per question, as targets built like the gold ones; bad rows give one error line."""
import json
import re
import sys

import pytest

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT))
import reward  # noqa: E402
import sft  # noqa: E402


def write_samples(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(record, completion, correct):
    return {"item_id": record["item_id"], "question": record["question"], "completion": completion,
            "answer": None, "correct": correct}


def nl_samples(records):
    """Hand-made samples of three questions and what must come of them: [(record, target)] added, duplicates."""
    a, b, c = records[:3]
    gold = reward.build_target(a, "nl")
    other = f"{a['answer_value']} + 0 = {a['answer_value']}{reward.ANSWER_TRIGGER}{a['answer_value']}"
    rows = [row(a, gold, True),  # the gold CoT itself: a duplicate
            row(a, other, True),  # added
            row(a, other + "\n", True),  # the same once stripped: a duplicate
            row(a, "I do not know.", False),  # wrong: not counted
            row(b, other, True),  # the same text for another question: added (dedup is per question)
            row(c, "17 - 3 = 14" + reward.ANSWER_TRIGGER + "14", False)]
    return rows, [(a, other), (b, other)], 2


def python_samples(records):
    a, b = records[:2]
    gold_body = reward.build_target(a, "python")[len(reward.program_header(a["question"])):]
    other_body = gold_body.replace("result", "answer")
    rows = [row(a, gold_body, True),  # the gold program's body: a duplicate
            row(a, gold_body + "\n\nprint('more')", True),  # the same program up to the first blank line
            row(a, other_body, True),  # added: header + body
            row(a, "\n    return 1 / 0", False),
            row(b, reward.build_target(a, "python"), True),  # a whole program (written after the plain prompt)
            row(b, other_body, True)]
    added = [(a, reward.program_header(a["question"]) + other_body), (b, reward.build_target(a, "python")),
             (b, reward.program_header(b["question"]) + other_body)]
    return rows, added, 2


@pytest.mark.parametrize("cot, make", [("nl", nl_samples), ("python", python_samples)])
def test_exactly_the_correct_distinct_samples_are_added(minigsm, tmp_path, cot, make):
    records = reward.load_records(str(minigsm), "train", cot, require_cot=True)
    rows, expected, expected_duplicates = make(records)
    pairs, n_rows = sft.read_extra_samples(str(write_samples(tmp_path / "s.jsonl", rows)), records)
    assert n_rows == len(rows) and len(pairs) == sum(r["correct"] for r in rows)
    added, duplicates = sft.self_training_examples(pairs, cot)
    assert added == expected and duplicates == expected_duplicates
    if cot == "python":  # the sampled programs run to the answer their label says, as gold targets do
        a = records[0]
        assert reward.compute_rewards([t for _, t in added[:1]], [a["answer_value"]], cot) == [1.0]


def test_sft_trains_on_gold_plus_added_samples(minigsm, tmp_path):
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)
    rows, expected, duplicates = nl_samples(records)
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    out = run([PY, "sft.py", "--data", minigsm, "--cot", "nl", "--extra_samples", samples, "--max_steps", 1,
               "--batch_size", 32, "--save_epochs", "none", "--output_dir", tmp_path / "sft"]).stdout
    assert f"{len(rows)} extra samples: 4 correct, {duplicates} duplicates dropped, 0 longer than --max_length, " \
           f"{len(expected)} added from {samples}" in out, out
    steps, left = map(int, re.search(r"(\d+) steps per epoch \((\d+) examples left over", out).groups())
    assert steps * 32 + left == len(records) + len(expected)


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ('{"item_id": "X", "question": "q", "completion": "c"}', "a sample needs item_id, question and completion"),
    ('{"item_id": "X", "question": "q", "completion": "c", "correct": 1}', "correct (true or false)"),
    ('{"item_id": "no_such_item", "question": "q", "completion": "c", "correct": true}', "is not a training question"),
])
def test_a_bad_row_is_named_by_file_and_line(minigsm, tmp_path, line, message):
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row(records[0], "x", True)) + "\n\n" + line + "\n")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(path))}:3: .*{re.escape(message)}"):
        sft.read_extra_samples(str(path), records)


def test_a_bad_file_is_one_error_line(minigsm, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"item_id": "no_such_item", "question": "q", "completion": "c", "correct": true}\n')
    p = run([PY, "sft.py", "--data", minigsm, "--extra_samples", path, "--output_dir", tmp_path / "sft"], check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {path}:1: 'no_such_item' is not a training question of --data"]
