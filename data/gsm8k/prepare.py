"""gsm8k: grade-school math word problems (Cobbe et al. 2021), natural-language CoT only.

Source records are {"question", "answer"}; the answer is a worked solution with calculator annotations
("48/2 = <<48/2=24>>24") whose last line is "#### N". The nl CoT is the solution without the annotations and
without the "####" line; answer_value is N without thousands commas. Validation is carved out of train (the
paper selects checkpoints on test; we never tune on it).

    python data/gsm8k/prepare.py --source /path/to/grade_school_math/data   # local train.jsonl + test.jsonl
    python data/gsm8k/prepare.py                                             # from the Hugging Face hub

The hub path (`datasets.load_dataset("openai/gsm8k", "main")`, `datasets` is in requirements.txt; it needs network
access) is not exercised by the tests; it yields the same records as the local files.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import reward  # noqa: E402


def read_jsonl(path):
    if not path.is_file():
        raise SystemExit(f"error: {path}: file not found")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{n}: malformed JSON ({e.msg})")
    return rows


def load_hub():
    from datasets import load_dataset
    try:
        ds = load_dataset("openai/gsm8k", "main")
    except (OSError, ConnectionError) as e:
        raise SystemExit(f"error: cannot load openai/gsm8k from the hub ({str(e).splitlines()[0]}); offline, pass "
                         "--source DIR with train.jsonl and test.jsonl")
    return {split: [dict(r) for r in ds[split]] for split in ("train", "test")}


def to_record(row, item_id, where):
    """A source row {"question", "answer"} -> {"item_id", "question", "answer_cot", "answer_value"}."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise SystemExit(f"error: {where}: record lacks a string 'question' or 'answer'")
    solution, sep, value = row["answer"].rpartition("####")
    value = value.strip().replace(",", "")
    if not sep or not re.fullmatch(r"-?\d+(\.\d+)?", value):
        raise SystemExit(f"error: {where}: answer does not end with '#### <number>'")
    cot = re.sub(r"<<[^>]*>>", "", solution).strip()
    return {"item_id": item_id, "question": row["question"].strip(), "answer_cot": cot, "answer_value": value}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--source", default=None,
                   help="folder with train.jsonl and test.jsonl (None: download openai/gsm8k from the HF hub)")
    p.add_argument("--n_validation", type=int, default=500, help="questions carved out of train for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of validation questions")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent),
                   help="where {train,validation,test}_nl.jsonl are written")
    args = p.parse_args()
    if args.source is None:
        rows, names = load_hub(), {"train": "hub openai/gsm8k train", "test": "hub openai/gsm8k test"}
    else:
        src = Path(args.source)
        if not src.is_dir():
            raise SystemExit(f"error: --source {src}: folder not found")
        rows = {split: read_jsonl(src / f"{split}.jsonl") for split in ("train", "test")}
        names = {split: str(src / f"{split}.jsonl") for split in ("train", "test")}
    data = {split: [to_record(r, f"gsm8k_{split}_{i}", f"{names[split]} record {i + 1}") for i, r in enumerate(rs)]
            for split, rs in rows.items()}
    test_questions = {r["question"] for r in data["test"]}
    train = [r for r in data["train"] if r["question"] not in test_questions]
    overlap = len(data["train"]) - len(train)
    if not 0 <= args.n_validation < len(train):
        raise SystemExit(f"error: --n_validation must be in [0, {len(train)})")
    val = set(random.Random(args.seed).sample(range(len(train)), args.n_validation))
    splits = {"train": [r for i, r in enumerate(train) if i not in val],
              "validation": [r for i, r in enumerate(train) if i in val], "test": data["test"]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        bad = [r["item_id"] for r in records if not reward.answers_equal(
            reward.extract_answer(reward.build_target(r, "nl"), "nl"), r["answer_value"])]
        with open(out / f"{split}_nl.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["item_id"] not in bad)
        print(f"{split}_nl: wrote {len(records) - len(bad)}, skipped {len(bad)} failing reward.py check {bad[:5]}")
    print(f"skipped {overlap} train questions that are also in test")


if __name__ == "__main__":
    main()
