"""mwp_reft: the data files released with the ReFT paper (github.com/lqtrung1998/mwp_ReFT, folder data/).

For --dataset NAME (gsm8k, svamp, mathqa, mathqa-numeric) the release has JSON lists of
{"item_id", "question", "answer_cot", "answer_value"}:
  NAME_nl.json (N-CoT train), NAME_python_sdp.json (P-CoT train), NAME_test_set.json (test, no answer_cot).
Writes data/NAME/ (data/gsm8k_reft/ for gsm8k): train_{nl,python}.jsonl, validation_{nl,python}.jsonl (--n_validation questions carved out of
train, the same questions for both CoTs; the paper had no dev split) and test_{nl,python}.jsonl (the same test
questions for both CoTs). A file missing from the source is skipped with a message. Gold CoTs are kept as
released (9 SVAMP N-CoTs are junk text; the paper trained on them too); records that fail reward.py's check are
dropped and counted.

    python data/mwp_reft/prepare.py --dataset svamp --source /path/to/mwp_ReFT/data   # local copy of the files
    python data/mwp_reft/prepare.py --dataset gsm8k                                    # download from GitHub

The download path fetches raw.githubusercontent.com/lqtrung1998/mwp_ReFT/main/data/<file> (needs network
access; not exercised by the tests). The GSM8K and MathQA training files are 4-20 MB each. It uses urllib, not
`datasets`: the files are plain JSON on GitHub, not a hub dataset, and `load_dataset("json", data_files=<url>)`
needs aiohttp and requests (fsspec's HTTP filesystem), which are not dependencies of this project.
"""
import argparse
import json
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import reward  # noqa: E402

URL = "https://raw.githubusercontent.com/lqtrung1998/mwp_ReFT/main/data/{}"
OUT_DIRS = {"gsm8k": "gsm8k_reft"}
FILES = {"nl": "{}_nl.json", "python": "{}_python_sdp.json", "test": "{}_test_set.json"}


def read(source, name):
    """The JSON list in file `name` (local folder or GitHub), or None when the file does not exist there."""
    if source is None:
        try:
            with urllib.request.urlopen(URL.format(name), timeout=60) as r:
                text, where = r.read().decode(), URL.format(name)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise SystemExit(f"error: {URL.format(name)}: HTTP {e.code}")
        except urllib.error.URLError as e:
            raise SystemExit(f"error: {URL.format(name)}: {e.reason} (offline? pass --source DIR)")
    else:
        path = Path(source) / name
        if not path.is_file():
            return None
        text, where = path.read_text(), str(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {where}: malformed JSON at line {e.lineno} ({e.msg})")
    if not isinstance(rows, list):
        raise SystemExit(f"error: {where}: expected a JSON list of records")
    fields = ("item_id", "question", "answer_value") + (() if name.endswith("_test_set.json") else ("answer_cot",))
    for i, r in enumerate(rows):
        missing = [k for k in fields if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise SystemExit(f"error: {where}: record {i} ({r.get('item_id') if isinstance(r, dict) else r!r}) "
                             f"lacks string field(s) {', '.join(missing)}")
    return [{k: r[k] for k in fields} for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", required=True, choices=["gsm8k", "svamp", "mathqa", "mathqa-numeric"],
                   help="which of the released datasets to prepare")
    p.add_argument("--source", default=None,
                   help="folder with the released files (None: download them from GitHub)")
    p.add_argument("--n_validation", type=int, default=300, help="training questions carved out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of validation questions")
    p.add_argument("--out_dir", default=None,
                   help="where the splits are written (None: data/<dataset>/, data/gsm8k_reft/ for gsm8k)")
    args = p.parse_args()
    if args.source is not None and not Path(args.source).is_dir():
        raise SystemExit(f"error: --source {args.source}: folder not found")
    # data/gsm8k/ is taken by data/gsm8k/prepare.py (the original GSM8K release), so the paper's copy goes elsewhere.
    out = Path(args.out_dir or Path(__file__).resolve().parents[1] / OUT_DIRS.get(args.dataset, args.dataset))
    data = {}
    for key, pattern in FILES.items():
        name = pattern.format(args.dataset)
        data[key] = read(args.source, name)
        if data[key] is None:
            print(f"skipped {name}: not in {args.source or 'the GitHub repository'}")
    if all(v is None for v in data.values()):
        raise SystemExit(f"error: none of the {args.dataset} files found in {args.source or URL.format('')}")
    out.mkdir(parents=True, exist_ok=True)
    test = data.pop("test") or []
    test_questions = {r["question"] for r in test}
    for cot in ("nl", "python"):
        if test:
            with open(out / f"test_{cot}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in test)
            print(f"test_{cot}: wrote {len(test)}")
    train = {cot: rows for cot, rows in data.items() if rows is not None}
    # Validation: item_ids present in every training file, so both CoTs validate on the same questions.
    common = sorted(set.intersection(*({r["item_id"] for r in rows} for rows in train.values()))) if train else []
    val_ids = set(random.Random(args.seed).sample(common, min(args.n_validation, len(common))))
    val_questions = {r["question"] for rows in train.values() for r in rows if r["item_id"] in val_ids}
    for cot, rows in train.items():
        bad = {rows[i]["item_id"] for i in reward.gold_failures(rows, cot)}
        kept = [r for r in rows if r["item_id"] not in bad and r["question"] not in test_questions]
        in_val = [r["item_id"] in val_ids or r["question"] in val_questions for r in kept]
        for split, records in (("train", [r for r, v in zip(kept, in_val) if not v]),
                               ("validation", [r for r, v in zip(kept, in_val) if v])):
            with open(out / f"{split}_{cot}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            print(f"{split}_{cot}: wrote {len(records)}")
        print(f"{cot}: skipped {len(bad)} records failing reward.py check, "
              f"{sum(r['question'] in test_questions for r in rows)} whose question is in test")
    print(f"wrote to {out}")


if __name__ == "__main__":
    main()
