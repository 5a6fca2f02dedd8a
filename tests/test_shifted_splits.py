"""minigsm's out-of-distribution test sets: test_longer (one step more than any training problem) and test_larger
(stated numbers beyond the training range), checked from the records themselves, and evaluate.py --split on them."""
import json
import re
import subprocess
import sys

import pytest

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT))
import reward  # noqa: E402

KNOBS = ("--n_train", 120, "--n_validation", 40, "--n_test", 60, "--min_steps", 2, "--max_steps", 3,
         "--max_number", 20)
SPLITS = ("train", "validation", "test")
SHIFTED = ("test_longer", "test_larger")


def prepare(out, *args):
    p = subprocess.run([sys.executable, str(ROOT / "data/minigsm/prepare.py"), *map(str, KNOBS + args),
                        "--out_dir", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    return out


def read(folder, split, cot):
    with open(folder / f"{split}_{cot}.jsonl") as f:
        return [json.loads(line) for line in f]


def steps(question):
    """Steps of a minigsm question: its sentences but the first ("Max has 14 stickers.") and the ask ("...?")."""
    return question.count(".") - 1


def numbers(question):
    return [int(n) for n in re.findall(r"\d+", question)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("shifted"), "--n_shifted", 50)


def test_the_shifted_sets_are_shifted(prepared):
    pool = read(prepared, "train", "nl")
    assert max(steps(r["question"]) for r in pool) == 3 and max(max(numbers(r["question"])) for r in pool) == 20
    longer = read(prepared, "test_longer", "nl")
    assert len(longer) == 50
    for r in longer:
        assert steps(r["question"]) == 4 == len(r["answer_cot"].split("\n")), r
        assert max(numbers(r["question"])) <= 20, r
    larger = read(prepared, "test_larger", "nl")
    assert len(larger) == 50
    for r in larger:
        assert 20 < max(numbers(r["question"])) <= 40, r
        assert 2 <= steps(r["question"]) <= 3, r
    assert max(max(numbers(r["question"])) for r in larger) > 30  # the range is used, not just its edge


@pytest.mark.parametrize("cot", ["nl", "python"])
def test_shifted_gold_scores_and_no_question_is_in_the_pool(prepared, cot):
    others = {r["question"] for split in SPLITS for r in read(prepared, split, cot)}
    for split in SHIFTED:
        records = read(prepared, split, cot)
        assert [r["question"] for r in records] == [r["question"] for r in read(prepared, split, "nl")]
        assert not reward.gold_failures(records, cot)
        questions = [r["question"] for r in records]
        assert len(set(questions)) == len(questions) and not set(questions) & others
        assert [r["item_id"] for r in records] == [f"minigsm_{split}_{i}" for i in range(len(records))]


def test_the_other_splits_do_not_change(prepared, tmp_path):
    """The shifted sets come from streams of their own, drawn last: without them the other files are the same."""
    prepare(tmp_path, "--n_shifted", 0)
    for cot in ("nl", "python"):
        for split in SPLITS:
            assert (tmp_path / f"{split}_{cot}.jsonl").read_bytes() == (prepared / f"{split}_{cot}.jsonl").read_bytes()
        assert not any((tmp_path / f"{split}_{cot}.jsonl").exists() for split in SHIFTED)


@pytest.mark.parametrize("split", SHIFTED)
def test_evaluate_takes_a_shifted_split(minigsm, warmup, tmp_path, split):
    run([PY, "evaluate.py", "--data", minigsm, "--model", warmup, "--split", split, "--limit", 6,
         "--max_new_tokens", 64, "--output_dir", tmp_path])
    results = json.loads((tmp_path / "results.json").read_text())
    golds = [json.loads(line)["gold"] for line in open(tmp_path / "predictions.jsonl")]
    assert results["split"] == split and golds == [r["answer_value"] for r in read(minigsm, split, "nl")[:6]]
