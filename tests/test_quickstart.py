"""The quickstart pipeline, shortened (a few steps per stage): it completes, writes the table, the plots and
results.json, and a second call skips the finished stages; its --compare mode and scripts/compare_methods.py on top of
it. Also the experiment scripts beside it in scripts/."""
import json
import random
import re
import sys

import pytest

from conftest import PY, ROOT, run

sys.path.insert(0, str(ROOT / "scripts"))
import compare  # noqa: E402
import compare_methods  # noqa: E402
import pretrain_arithmetic  # noqa: E402


@pytest.fixture(scope="module")
def fast_quickstart(tmp_path_factory):
    """One `quickstart.py --fast` folder, named as compare_methods.py names seed 0's: the quickstart's test checks it,
    then the comparison's test adds the --compare stages to it (reusing its stages, as --compare does)."""
    out = tmp_path_factory.mktemp("compare") / "seed_0"
    return out, run([PY, "scripts/quickstart.py", "--fast", "--out_dir", out], timeout=1500)


def plain_bootstrap(groups, n=2000):
    """The paired bootstrap written out as a loop, independently of compare.py: per resample, each group's questions
    drawn with random.Random(group number).randrange, the mean over groups of mean(b - a); the 2.5% and 97.5%
    points."""
    rngs = [random.Random(g) for g in range(len(groups))]
    means = sorted(sum(sum(b[i] - a[i] for i in [rng.randrange(len(a)) for _ in a]) / len(a)
                       for rng, (a, b) in zip(rngs, groups)) / len(groups) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def test_quickstart_fast_runs_end_to_end_and_skips_finished_stages(fast_quickstart, tmp_path):
    out, p = fast_quickstart
    assert "top-1" in p.stdout and "ReFT" in p.stdout
    results = json.loads((out / "results.json").read_text())
    # The table is the evaluations' output, recomputed from their predictions, for the checkpoints the pipeline
    # picked: SFT's epoch with the best validation accuracy (the first of equals; sft.py's best/), ReFT's best/.
    sft_metrics = [json.loads(line) for line in open(out / "sft/metrics.jsonl")]
    evaluated = [m for m in sft_metrics if "eval_accuracy" in m]
    best_epoch = round(max(evaluated, key=lambda m: m["eval_accuracy"])["epoch"])
    assert results["sft_best_epoch"] == best_epoch
    assert sorted(f.name for f in (out / "sft").iterdir() if f.is_dir()) == ["best", "final", "init", "warmup"]
    for name, checkpoint in (("SFT", "sft/best"), ("ReFT", "reft/best")):
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
    assert not (out / "compare.json").exists()  # the comparison is --compare's only


def flags(path, field):
    return [float(json.loads(line)[field]) for line in open(path)]


def scramble(ev_dir, rng):
    """Random right/wrong flags in an evaluation's predictions.jsonl, and results.json's accuracies to match."""
    rows = [json.loads(line) for line in open(ev_dir / "predictions.jsonl")]
    for r in rows:
        r.update(greedy_correct=rng.random() < 0.4, vote_correct=rng.random() < 0.5, pass_at_k=rng.random() < 0.7)
    (ev_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = json.loads((ev_dir / "results.json").read_text())
    res["accuracy"].update({m: sum(r[f] for r in rows) / len(rows) for m, f in
                            (("greedy", "greedy_correct"), ("vote", "vote_correct"), ("pass@k", "pass_at_k"))})
    (ev_dir / "results.json").write_text(json.dumps(res))


def test_compare_fast_evaluates_every_method_on_every_split(fast_quickstart, tmp_path, capsys):
    """compare_methods.py --fast for seed 0, whose quickstart stages the fixture has run: quickstart.py --compare adds
    its stages to that folder. Asserts: the quickstart's stages are reused, not rerun; each method's checkpoint is the
    one its own validation metrics select and was trained with its method's flags from W; every method is evaluated
    on every split (test, test_longer, test_larger: model, split, all questions); compare.json's accuracies and each
    method − SFT difference and interval equal a recomputation from the predictions.jsonl files (plain_bootstrap);
    the tables have a row per method and split; a finished seed is skipped; --seed_dirs aggregates a folder given
    explicitly into the same numbers. --fast models get (nearly) every answer wrong, so before the numbers are checked
    every evaluation's flags are replaced by random ones and the report is made again from them (with every stage
    skipped: a seed resumes)."""
    seed_dir, _ = fast_quickstart
    out = seed_dir.parent
    p = run([PY, "scripts/compare_methods.py", "--fast", "--seeds", "0", "--out_dir", out], timeout=1500)
    for name in ("data", "sft", "reft", "verifier_sft", "verifier_reft", "evaluate_sft", "evaluate_reft"):
        assert f"[{name}] done already" in p.stdout, name
    rng = random.Random(0)
    for row in json.loads((seed_dir / "compare.json").read_text())["methods"].values():
        for cell in row["splits"].values():
            scramble(seed_dir / cell["eval_dir"], rng)
    (seed_dir / "compare.json").unlink()
    p = run([PY, "scripts/compare_methods.py", "--fast", "--seeds", "0", "--out_dir", out], timeout=600)
    assert p.stdout.count("done already") == 7 + 4 + 18  # the quickstart's, the 4 methods', every evaluation
    report = json.loads((seed_dir / "compare.json").read_text())
    assert [m for m, _ in compare_methods.METHODS] == list(report["methods"]) and report["k"] == 2
    W = str(seed_dir / "sft/warmup")
    expected = {"SFT": "sft/best", "Offline-ST": "offline_st/best",
                "Online-ST": "online_st/best", "ReFT": "reft/best", "ReFT-GRPO": "reft_grpo/best",
                "ReFT-binary": "reft_binary/best"}
    assert {m: r["checkpoint"] for m, r in report["methods"].items()} == expected
    offline = json.loads((seed_dir / "offline_st/final/train_args.json").read_text())
    assert offline["model"] == "tiny" and offline["epochs"] == 1
    assert offline["extra_samples"] == str(seed_dir / "verifier_sft/samples.jsonl")
    for key, objective, advantage, kl_in_loss, partial in (
            ("online_st", "online_st", "gae", False, True), ("reft_grpo", "ppo", "grpo", True, True),
            ("reft_binary", "ppo", "gae", False, False), ("reft", "ppo", "gae", False, True)):
        trained = json.loads((seed_dir / key / "best/train_args.json").read_text())
        assert (trained["model"], trained["objective"], trained["advantage"], trained["kl_in_loss"],
                trained["partial_reward"]) == (W, objective, advantage, kl_in_loss, partial), key
        assert (trained["max_steps"], trained["batch_size"], trained["num_samples"]) == (3, 8, 4), key

    for method, row in report["methods"].items():
        for split in compare_methods.SPLITS:
            cell, ev_dir = row["splits"][split], seed_dir / row["splits"][split]["eval_dir"]
            ev = json.loads((ev_dir / "results.json").read_text())
            n = sum(1 for _ in open(seed_dir / f"data/{split}_python.jsonl"))
            assert (ev["model"], ev["split"], ev["n"], cell["n"]) == (str(seed_dir / row["checkpoint"]), split, n, n)
            for metric, field in (("greedy", "greedy_correct"), ("vote", "vote_correct"), ("pass@k", "pass_at_k")):
                assert cell[metric] == sum(flags(ev_dir / "predictions.jsonl", field)) / n, (method, split, metric)
                if method != "SFT":
                    a = flags(seed_dir / report["methods"]["SFT"]["splits"][split]["eval_dir"] / "predictions.jsonl",
                              field)
                    b = flags(ev_dir / "predictions.jsonl", field)
                    assert cell["minus_sft"][metric]["diff"] == sum(b) / n - sum(a) / n
                    assert tuple(cell["minus_sft"][metric]["ci95"]) == plain_bootstrap([(a, b)])
    assert all(report["stage_seconds"][s] > 0 for s in ("offline_st", "online_st", "evaluate_reft_binary_test_larger"))

    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0]
    for method, row in report["methods"].items():
        for split in compare_methods.SPLITS:
            cell = results["methods"][method]["splits"][split]
            assert cell["greedy"]["per_seed"] == [cell["greedy"]["mean"]] == [row["splits"][split]["greedy"]]
            if method != "SFT":  # one seed: the pooled interval is that seed's
                assert cell["minus_sft"]["vote"]["ci95"] == row["splits"][split]["minus_sft"]["vote"]["ci95"]
    table = (out / "results.md").read_text()
    for split in compare_methods.SPLITS:
        section = table.split(f"**{split}**")[1].split("**")[0]
        for method in report["methods"]:
            assert f"\n| {method} (" in section, (split, method)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (seed_dir / "compare.md").read_text().count("| ReFT-GRPO (") == 3

    compare_methods.main(["--fast", "--seeds", "0", "--out_dir", str(out)])  # in this process: no Python start
    assert "[seed 0] finished already" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    compare_methods.main(["--seeds", "--seed_dirs", str(seed_dir), "--out_dir", str(tmp_path / "elsewhere")])
    assert json.loads((tmp_path / "elsewhere/results.json").read_text())["methods"] == results["methods"]


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
    """scripts/compare.py on two hand-made evaluate.py runs: accuracies, the paired difference per mode, and its
    interval against an independent numpy bootstrap and the plain loop; mismatched question sets and missing files are
    refused."""
    import numpy as np
    rng = random.Random(0)
    ids = [f"q{i}" for i in range(400)]
    a = {i: rng.random() < 0.5 for i in ids}
    b = {i: (a[i] or rng.random() < 0.3) and rng.random() < 0.95 for i in ids}
    votes = {"a": {i: rng.random() < 0.5 for i in ids}, "b": {i: rng.random() < 0.6 for i in ids}}
    for name, flags, order in (("a", a, ids), ("b", b, ids[::-1])):  # B's rows in another order: matched by id
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(
            {"item_id": i, "greedy_correct": flags[i], "vote_correct": votes[name][i]}) + "\n" for i in order))
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
    # the resamples of the first version of compare.py (the README's intervals), drawn one index at a time
    assert (lo, hi) == plain_bootstrap([([float(a[i]) for i in ids], [float(b[i]) for i in ids])])
    va, vb = ([float(votes[name][i]) for i in ids] for name in "ab")  # every mode both runs have
    assert out["vote"] == [sum(va) / 400, sum(vb) / 400] and out["vote_b_minus_a"] == sum(vb) / 400 - sum(va) / 400
    assert tuple(out["vote_b_minus_a_ci95"]) == plain_bootstrap([(va, vb)]) and "pass_at_k" not in out

    (tmp_path / "b" / "predictions.jsonl").write_text(json.dumps({"item_id": "other", "greedy_correct": True}) + "\n")
    p = run([PY, "scripts/compare.py", tmp_path / "a", tmp_path / "b"], check=False)
    assert p.returncode != 0 and "different questions (400 only in A, 1 only in B)" in p.stderr
    p = run([PY, "scripts/compare.py", tmp_path / "a", tmp_path / "missing"], check=False)
    assert p.returncode != 0 and "missing/predictions.jsonl not found" in p.stderr


def fake_seed(path, seed, n, rng, k=8):
    """A finished seed folder as quickstart.py --compare leaves it, made by hand: each method's predictions on each
    split (random 0/1 flags, the better methods more often right) and its compare.json (accuracies and each method −
    SFT from compare.py, as quickstart.py computes them)."""
    methods = {}
    for j, (method, key) in enumerate(compare_methods.METHODS):
        cells = {}
        for split in compare_methods.SPLITS:
            ev = path / f"eval_{key}_{split}"
            ev.mkdir(parents=True)
            rows = [{"item_id": f"{split}_{i}", **{f: rng.random() < 0.3 + 0.05 * j + (f == "pass_at_k") * 0.3
                                                 for f in ("greedy_correct", "vote_correct", "pass_at_k")}}
                    for i in range(n)]
            (ev / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            cells[split] = {m: sum(r[f] for r in rows) / n for m, f in
                            (("greedy", "greedy_correct"), ("vote", "vote_correct"), ("pass@k", "pass_at_k"))}
            cells[split].update(n=n, k=k, eval_dir=ev.name)
            if key != "sft":
                c = compare.compare(compare.load_predictions(path / f"eval_sft_{split}"), compare.load_predictions(ev))
                cells[split]["minus_sft"] = {m: {"diff": c[f"{mode}_b_minus_a"], "ci95": c[f"{mode}_b_minus_a_ci95"]}
                                             for m, mode in compare_methods.METRICS.items()}
        methods[method] = {"checkpoint": f"{key}/best", "validation": 0.4 + 0.01 * j, "train_seconds": 60.0 * (j + 1),
                           "eval_seconds": 30.0, "splits": cells}
    (path / "compare.json").write_text(json.dumps({
        "seed": seed, "k": k, "splits": list(compare_methods.SPLITS), "methods": methods, "warmup_epoch": 24,
        "stage_seconds": {"sft": 600.0, "reft": 480.0}, "machine": "x86_64, 2 cores", "date": "2026-12-01",
        "python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0"}))
    return path


def test_compare_methods_aggregates_seeds_as_a_plain_recomputation(tmp_path):
    """compare_methods.aggregate and markdown on two hand-made seeds with different numbers of questions: the means
    over seeds, each method − SFT's interval over both seeds' questions against plain_bootstrap, each seed's numbers
    passed through, the table's cells; one error line for a folder that has not finished, another k, a seed twice."""
    rng = random.Random(0)
    dirs = [fake_seed(tmp_path / "s1", 1, 50, rng), fake_seed(tmp_path / "s0", 0, 40, rng)]
    agg = compare_methods.aggregate(dirs)
    assert agg["seeds"] == [0, 1] and agg["k"] == 8  # ordered by seed, not by argument
    seeds = [json.loads((tmp_path / f"s{s}/compare.json").read_text()) for s in (0, 1)]
    cell = agg["methods"]["ReFT"]["splits"]["test_longer"]
    per_seed = [s["methods"]["ReFT"]["splits"]["test_longer"] for s in seeds]
    assert cell["vote"]["per_seed"] == [c["vote"] for c in per_seed]
    assert abs(cell["vote"]["mean"] - (per_seed[0]["vote"] + per_seed[1]["vote"]) / 2) < 1e-12
    groups = [(flags(tmp_path / f"s{s}/eval_sft_test_longer/predictions.jsonl", "pass_at_k"),
               flags(tmp_path / f"s{s}/eval_reft_test_longer/predictions.jsonl", "pass_at_k")) for s in (0, 1)]
    d = cell["minus_sft"]["pass@k"]
    assert tuple(d["ci95"]) == plain_bootstrap(groups)
    assert abs(d["mean"] - sum(sum(b) / len(b) - sum(a) / len(a) for a, b in groups) / 2) < 1e-12
    assert d["per_seed_ci95"] == [c["minus_sft"]["pass@k"]["ci95"] for c in per_seed]
    assert d["per_seed_ci95"][0] == list(plain_bootstrap(groups[:1]))
    assert agg["methods"]["Online-ST"]["train_minutes"] == [3.0, 3.0]

    table = compare_methods.markdown(agg)
    row = next(line for line in table.split("**test_longer**")[1].splitlines() if line.startswith("| ReFT ("))
    pct = [f"{100 * v:.1f}" for v in cell["greedy"]["per_seed"]]
    assert row.startswith(f"| ReFT (best) | {100 * cell['greedy']['mean']:.1f} ({pct[0]} / {pct[1]}) |")
    lo, hi = (f"{100 * v:+.1f}".replace("-", "−") for v in d["ci95"])
    assert f"[{lo}, {hi}]" in row
    assert "| voting@8 − SFT |" in table and table.count("| SFT (best) |") == 3
    assert "| Online-ST | 42.0 / 42.0 | 3.0 | 0.5 |" in table

    with pytest.raises(SystemExit, match="s2/compare.json not found"):
        compare_methods.aggregate(dirs + [tmp_path / "s2"])
    report = json.loads((dirs[0] / "compare.json").read_text())
    (dirs[0] / "compare.json").write_text(json.dumps(dict(report, k=4)))
    with pytest.raises(SystemExit, match="other methods, splits or k"):
        compare_methods.aggregate(dirs)
    (dirs[0] / "compare.json").write_text(json.dumps(dict(report, seed=0)))
    with pytest.raises(SystemExit, match="a seed appears twice"):
        compare_methods.aggregate(dirs)
