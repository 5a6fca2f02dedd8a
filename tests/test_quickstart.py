"""The quickstart pipeline, shortened (a few steps per stage): it completes, writes the table, the plots and
results.json, and a second call skips the finished stages. Also the experiment scripts beside it in scripts/."""
import json
import random
import re
import sys

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT / "scripts"))
import pretrain_arithmetic  # noqa: E402


def test_quickstart_fast_runs_end_to_end_and_skips_finished_stages(tmp_path):
    out = tmp_path / "qs"
    p = run([PY, "scripts/quickstart.py", "--fast", "--out_dir", out], timeout=1500)
    assert "top-1" in p.stdout and "ReFT" in p.stdout
    results = json.loads((out / "results.json").read_text())
    # The table is the evaluations' output, recomputed from their predictions, for the checkpoints the pipeline
    # picked: SFT's epoch with the best validation accuracy (the first of equals), ReFT's best/.
    sft_metrics = [json.loads(line) for line in open(out / "sft/metrics.jsonl")]
    evaluated = [m for m in sft_metrics if "eval_accuracy" in m]
    best_epoch = round(max(evaluated, key=lambda m: m["eval_accuracy"])["epoch"])
    for name, checkpoint in (("SFT", f"sft/epoch_{best_epoch}"), ("ReFT", "reft/best")):
        row, ev = results["table"][name], json.loads((out / f"eval_{name.lower()}/results.json").read_text())
        preds = [json.loads(line) for line in open(out / f"eval_{name.lower()}/predictions.jsonl")]
        assert row["checkpoint"] == checkpoint and ev["model"] == str(out / checkpoint)
        assert row["n"] == len(preds) == 64 and row["k"] == 2
        for mode, key in (("greedy", "greedy_correct"), ("vote", "vote_correct"), ("rerank", "rerank_correct"),
                          ("pass@k", "pass_at_k")):
            assert row[mode] == ev["accuracy"][mode] == sum(p[key] for p in preds) / 64, (name, mode)
    assert results["reft_minus_sft_top1"] == results["table"]["ReFT"]["greedy"] - results["table"]["SFT"]["greedy"]
    run([PY, "scripts/compare.py", out / "eval_sft", out / "eval_reft", "--json", tmp_path / "compare.json"])
    assert results["reft_minus_sft_top1_ci95"] == json.loads((tmp_path / "compare.json").read_text())[
        "greedy_b_minus_a_ci95"]  # SFT is A, ReFT is B
    assert "| SFT" in (out / "results.md").read_text()
    cot = results["args"]["cot"]  # every stage trained and evaluated the same CoT kind
    for path in ("sft/final/train_args.json", "reft/final/train_args.json", "verifier_sft/final/train_args.json",
                 "eval_sft/results.json", "eval_reft/results.json"):
        assert json.loads((out / path).read_text())["cot"] == cot, path
    for png in ("sft.png", "reft.png", "table.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run([PY, "scripts/quickstart.py", "--fast", "--out_dir", out], timeout=600)
    assert again.stdout.count("skipping") == 7  # data, sft, reft, 2 verifiers, 2 evaluations


def test_cot_diagnostics_counts_reading_and_arithmetic_errors(tmp_path):
    """scripts/cot_diagnostics.py on hand-made predictions whose errors are known."""
    gold = {"item_id": "q", "question": "Max has 3 cards. He finds 4 more. He loses 2. How many cards ...?",
            "answer_cot": "3 + 4 = 7\n7 - 2 = 5", "answer_value": "5"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "validation_nl.jsonl").write_text(json.dumps(gold) + "\n")
    cases = [("3 + 4 = 7\n7 - 2 = 5", True),   # right
             ("3 - 2 = 1\n1 + 4 = 5", True),   # the same steps in another order
             ("3 + 4 - 2 = 5", True),          # one equation
             ("3 + 5 = 8\n8 - 2 = 6", False),  # misread a number, arithmetic right
             ("3 + 4 = 8\n8 - 2 = 6", False)]  # read right, one arithmetic slip
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"item_id": "q", "greedy_completion": c + "\nTherefore, the answer is: x",
                                         "greedy_correct": ok}) + "\n" for c, ok in cases))
    out = run([PY, "scripts/cot_diagnostics.py", "--data", tmp_path / "data", preds]).stdout
    assert "5 questions, accuracy 60.0%; read right 40.0% in the question's order, 60.0% in any order" in out
    assert "arithmetic right in 87.5% of 8 lines" in out  # the one-equation line is not an "a op n = b" line
    assert "one equation 20% (accuracy 100%), question's order 40% (accuracy 50%), other order 20% (accuracy 100%), " \
           "other 20% (accuracy 0%)" in out

    preds.write_text(json.dumps({"item_id": "nope", "greedy_completion": "", "greedy_correct": False}) + "\n")
    p = run([PY, "scripts/cot_diagnostics.py", "--data", tmp_path / "data", preds], check=False)
    assert p.returncode != 0 and "1 item_ids not in" in p.stderr and "nope" in p.stderr


def test_pretrain_arithmetic_chains_are_right_and_the_checkpoint_feeds_sft(minigsm, tmp_path):
    """The pretraining experiment: its chains are valid CoT lines, and its output is a folder sft.py starts from."""
    rng = random.Random(0)
    for _ in range(500):
        lines = pretrain_arithmetic.chain(rng).split("\n")
        assert 1 <= len(lines) <= 4
        prev = None
        for line in lines:
            a, op, n, b = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
            assert eval(f"{a} {op} {n}") == int(b) >= 0 and (prev is None or a == prev)
            assert int(n) <= 10 and (op != "*" or n == "2" and int(a) <= 20)
            prev = b
    out = tmp_path / "pretrained"
    p = run([PY, "scripts/pretrain_arithmetic.py", "--data", minigsm, "--output_dir", out, "--steps", 3])
    assert "greedy right on" in p.stdout and "of 200 fresh equations" in p.stdout
    run([PY, "sft.py", "--model", out, "--data", minigsm, "--max_steps", 2, "--output_dir", tmp_path / "sft",
         "--save_epochs", "none"])
    assert (tmp_path / "sft" / "final" / "config.json").exists()


def test_compare_pairs_runs_by_item_id_and_its_interval_matches_a_plain_bootstrap(tmp_path):
    """scripts/compare.py on two hand-made evaluate.py runs: accuracies, the paired difference, and its interval
    against an independent numpy bootstrap; mismatched question sets and missing files are refused."""
    import numpy as np
    rng = random.Random(0)
    ids = [f"q{i}" for i in range(400)]
    a = {i: rng.random() < 0.5 for i in ids}
    b = {i: (a[i] or rng.random() < 0.3) and rng.random() < 0.95 for i in ids}
    for name, flags, order in (("a", a, ids), ("b", b, ids[::-1])):  # B's rows in another order: matched by id
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text(
            "".join(json.dumps({"item_id": i, "greedy_correct": flags[i]}) + "\n" for i in order))
    p = run([PY, "scripts/compare.py", tmp_path / "a", tmp_path / "b", "--json", tmp_path / "c.json"])
    out = json.loads((tmp_path / "c.json").read_text())
    acc_a, acc_b = sum(a.values()) / 400, sum(b.values()) / 400
    assert out["n"] == 400 and out["greedy"] == [acc_a, acc_b]
    assert abs(out["greedy_b_minus_a"] - (acc_b - acc_a)) < 1e-12
    assert f"{100 * (acc_b - acc_a):+.1f} points" in p.stdout
    d = np.array([b[i] - a[i] for i in ids], dtype=float)
    means = np.sort(d[np.random.default_rng(1).integers(0, 400, (4000, 400))].mean(1))
    lo, hi = out["greedy_b_minus_a_ci95"]
    assert lo < acc_b - acc_a < hi
    assert abs(lo - means[100]) < 0.01 and abs(hi - means[3899]) < 0.01

    (tmp_path / "b" / "predictions.jsonl").write_text(json.dumps({"item_id": "other", "greedy_correct": True}) + "\n")
    p = run([PY, "scripts/compare.py", tmp_path / "a", tmp_path / "b"], check=False)
    assert p.returncode != 0 and "different questions (400 only in A, 1 only in B)" in p.stderr
    p = run([PY, "scripts/compare.py", tmp_path / "a", tmp_path / "missing"], check=False)
    assert p.returncode != 0 and "missing/predictions.jsonl not found" in p.stderr
