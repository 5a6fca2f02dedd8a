"""--reward module:function: the loader, its one-line errors, and a custom reward seen at work in reft.py (rollout
scores, accuracy, eval_accuracy), rerank.py (sample labels) and evaluate.py (correct flags); and no_answer, the
fraction of completions without an extractable answer, against a count of its own over the texts."""
import json
import sys

import pytest

from conftest import PY, ROOT, main_error, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import reft  # noqa: E402
import rerank  # noqa: E402
import reward  # noqa: E402

STAGES = {"reft.py": reft, "rerank.py": rerank, "evaluate.py": evaluate}

PARITY = '''
import json, os


def parity(completions, gold_answers, cot, questions=None, partial_reward=True, timeout=2.0):
    """1.0 for a completion of odd length, else 0.5 (not correct); each call is logged, one file per process."""
    scores = [1.0 if len(c) % 2 else 0.5 for c in completions]
    with open(os.environ["PARITY_LOG"] + f".{os.getpid()}", "a") as f:
        f.write(json.dumps({"partial_reward": partial_reward, "completions": list(completions), "scores": scores,
                            "golds": list(gold_answers), "questions": list(questions)}) + "\\n")
    return scores
'''


@pytest.fixture
def parity(tmp_path):
    """(env that puts the parity reward module on the path and names its log, a reader of its calls in order
    per process)."""
    (tmp_path / "parity_reward.py").write_text(PARITY)
    log = tmp_path / "calls"

    def calls():
        files = sorted(tmp_path.glob("calls.*"))
        return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]

    return {"PYTHONPATH": str(tmp_path), "PARITY_LOG": str(log)}, calls


def no_answer_count(texts, cot="nl", questions=None):
    """Completions without an extractable answer, counted apart from the stages; for nl also at least those
    without the answer trigger, which need no extractor to count."""
    count = sum(a is None for a in reward.extract_answers(texts, cot, questions))
    if cot == "nl":
        assert count >= sum(reward.ANSWER_TRIGGER.strip() not in t for t in texts)
    return count


# ----------------------------------------------------------------------------- the loader and its errors

def test_load_reward_finds_a_module_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "binary_reward_here.py").write_text("def binary(completions, *args, **kwargs):\n"
                                                    "    return [1.0] * len(completions)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    fn = reward.load_reward("binary_reward_here:binary")
    assert fn(["a", "b"], ["1", "2"], "nl") == [1.0, 1.0]
    assert reward.load_reward("reward:compute_rewards") is reward.compute_rewards


def test_the_default_reward_scores_extracted_answers_without_running_programs_again(monkeypatch):
    """reward.py's own reward through score_completions gives compute_rewards' values from the answers the stage
    extracted already: the sandbox is not asked again."""
    question = "Tom has 3 apples and buys 4. How many?"
    texts = {"nl": ["so\nTherefore, the answer is: 7", "Therefore, the answer is: 8", "no trigger"],
             "python": ["    return 3 + 4", "    return 8", "    return x"]}
    records = [{"question": question, "answer_value": "7"}] * 3
    for cot in ("nl", "python"):
        answers = reward.extract_answers(texts[cot], cot, [question] * 3)
        want = {p: reward.compute_rewards(texts[cot], ["7"] * 3, cot, [question] * 3, p) for p in (True, False)}
        assert want == {True: [1.0, 0.1, 0.0], False: [1.0, 0.0, 0.0]}
        with monkeypatch.context() as m:
            m.setattr(reward, "run_programs", lambda *a, **k: pytest.fail("a program ran twice"))
            for partial in (True, False):
                assert reward.score_completions(reward.compute_rewards, texts[cot], answers, records, cot,
                                              partial) == want[partial]


def test_a_reward_giving_the_wrong_number_of_values_is_one_error_line():
    def short(completions, *args, **kwargs):
        return [1.0]
    records = [{"question": "q", "answer_value": "1"}] * 2
    with pytest.raises(SystemExit, match=r"^error: --reward .*short returned 1 rewards for 2 completions$"):
        reward.score_completions(short, ["a", "b"], [None, None], records, "nl", False)


BROKEN = "x = 1 / 0\n"


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("spec, message", [
    ("parity", "--reward 'parity': expected module:function, such as reward:compute_rewards"),
    (":parity", "--reward ':parity': expected module:function"),
    ("no_such_module_xyz:f", "--reward no_such_module_xyz:f: cannot import no_such_module_xyz (ModuleNotFoundError: "
                             "No module named 'no_such_module_xyz')"),
    ("broken_reward:f", "--reward broken_reward:f: cannot import broken_reward (ZeroDivisionError: division by zero)"),
    ("reward:no_such_function", "reward.py has no function no_such_function"),
    ("reward:PARTIAL_REWARD", "reward.py has no function PARTIAL_REWARD"),
])
def test_a_bad_reward_is_one_error_line_before_any_model_is_loaded(stage, spec, message, tmp_path, monkeypatch):
    """The checkpoint does not exist: an error about --reward proves it came first. Nothing is written."""
    (tmp_path / "broken_reward.py").write_text(BROKEN)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)  # load_reward looks there too
    out = tmp_path / "out"
    error = main_error(STAGES[stage], ["--model", "/nonexistent/ckpt", "--output_dir", out, "--reward", spec])
    assert error.startswith("error: --reward ") and message in error and "\n" not in error, error
    assert not out.exists()


def test_combinations_that_make_no_sense_are_refused(parity, tmp_path, monkeypatch):
    env, _ = parity
    monkeypatch.setattr(sys, "path", [env["PYTHONPATH"]] + sys.path)
    out = tmp_path / "out"
    error = main_error(evaluate, ["--model", "/nonexistent/ckpt", "--output_dir", out, "--scoring", "paper",
                                  "--reward", "parity_reward:parity"])
    assert error == ("error: --scoring paper judges answers by the paper code's rule, --reward parity_reward:parity "
                     "by its own: pass one of them")
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"item_id": "q", "question": "q?", "completion": "c", "correct": true}\n')
    error = main_error(rerank, ["--samples", samples, "--init", "/nonexistent/ckpt", "--output_dir", out,
                                "--reward", "parity_reward:parity"])
    assert error.startswith("error: --reward parity_reward:parity labels the samples rerank.py draws; --samples ")
    assert not out.exists()


def test_a_bad_reward_on_the_command_line(tmp_path):
    p = run([PY, "reft.py", "--reward", "reward", "--output_dir", tmp_path / "out"], check=False, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        "error: --reward 'reward': expected module:function, such as reward:compute_rewards"]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the custom reward at work

def test_reft_scores_rollouts_and_evaluates_with_the_custom_reward(parity, minigsm, warmup, tmp_path):
    """2 processes, 2 steps: each step's score, accuracy and no_answer are the means over both ranks' rollouts of
    what the parity reward returned (1.0 or 0.5) and of the completions without an answer; eval_accuracy counts
    the 1.0s it gave the greedy completions (called with partial_reward=False)."""
    env, calls = parity
    torchrun(2, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 2, "--batch_size", 8,
             "--num_samples", 1, "--max_length", 80, "--eval_every", 2, "--eval_limit", 8, "--reward", "parity_reward:parity",
             "--output_dir", tmp_path / "reft", env=env)
    metrics = read_metrics(tmp_path / "reft" / "metrics.jsonl")
    per_rank = calls()
    assert len(per_rank) == 2
    rollouts = [[c for c in rank if c["partial_reward"]] for rank in per_rank]
    assert [len(r) for r in rollouts] == [2, 2]
    for step, m in enumerate(metrics):
        scores = [s for rank in rollouts for s in rank[step]["scores"]]
        texts = [t for rank in rollouts for t in rank[step]["completions"]]
        assert len(scores) == 8
        assert m["score"] == pytest.approx(sum(scores) / 8, abs=1e-6)
        assert m["accuracy"] == pytest.approx(scores.count(1.0) / 8, abs=1e-6)
        assert m["no_answer"] == pytest.approx(no_answer_count(texts) / 8, abs=1e-6)
    evals = [c for rank in per_rank for c in rank if not c["partial_reward"]]
    assert sum(len(c["scores"]) for c in evals) == 8
    assert metrics[-1]["eval_accuracy"] == pytest.approx(sum(c["scores"].count(1.0) for c in evals) / 8)
    # Teeth: the reward gave both values, and some completions had an answer while others had none.
    assert {s for rank in rollouts for call in rank for s in call["scores"]} == {0.5, 1.0}
    assert any(0 < m["no_answer"] < 1 for m in metrics), metrics


SAMPLE = ["--num_samples", 6, "--max_new_tokens", 20, "--gen_batch_size", 8, "--epochs", 1, "--batch_size", 2,
          "--micro_batch_size", 2, "--holdout_fraction", 0.25, "--temperature", 0.7]


def test_rerank_labels_samples_with_the_custom_reward(parity, minigsm, warmup, tmp_path):
    """Labels are the parity reward's 1.0s; the log line counts the samples without an answer (a budget of 20
    tokens cuts the longer CoTs, 16-28 tokens, before it)."""
    env, calls = parity
    p = run([PY, "rerank.py", "--model", warmup, "--data", minigsm, "--limit", 4, "--output_dir", tmp_path / "out",
             "--reward", "parity_reward:parity", *SAMPLE], env=env)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert all(not c["partial_reward"] for rank in calls() for c in rank)
    assert [r["correct"] for r in rows] == [len(r["completion"]) % 2 == 1 for r in rows]
    golds = {r["item_id"]: r["answer_value"] for r in reward.load_records(str(minigsm), "train", "nl")}
    default = [r["answer"] is not None and reward.answers_equal(r["answer"], golds[r["item_id"]]) for r in rows]
    assert default != [r["correct"] for r in rows]  # the parity labels are not reward.py's
    n_none = no_answer_count([r["completion"] for r in rows])
    assert [r["answer"] is None for r in rows].count(True) == n_none and 0 < n_none < len(rows)
    assert (f"{sum(r['correct'] for r in rows) / len(rows):.1%} correct, {n_none / len(rows):.1%} with no answer"
            in p.stdout), p.stdout


def test_evaluate_judges_correctness_with_the_custom_reward(parity, minigsm, warmup, verifier, tmp_path):
    """Greedy and sample flags are the parity reward's 1.0s; the vote and the rerank choice are correct when the
    sample they picked is (not another sample with the same answer); no_answer counts the greedy completions and
    samples without an answer (a budget of 24 tokens cuts some CoTs before it)."""
    env, calls = parity
    out, n, k = tmp_path / "eval", 8, 16
    run([PY, "evaluate.py", "--data", minigsm, "--model", warmup, "--verifier", verifier, "--mode", "all",
         "--limit", n, "-k", k, "--max_new_tokens", 24, "--seed", 5, "--reward", "parity_reward:parity",
         "--output_dir", out], env=env)
    results = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    (greedy, samples), = calls()
    assert not greedy["partial_reward"] and not samples["partial_reward"]
    assert greedy["completions"] == [p["greedy_completion"] for p in preds]
    assert [p["greedy_correct"] for p in preds] == [s == 1.0 for s in greedy["scores"]]
    assert [c for p in preds for c in p["sample_correct"]] == [s == 1.0 for s in samples["scores"]]
    picked_another = 0  # questions where the first sample with the picked answer is judged otherwise
    for p in preds:
        vote = evaluate.majority_index(p["sample_answers"])
        best = evaluate.rerank_index(p["sample_answers"], p["verifier_scores"])
        assert p["vote_correct"] == (vote is not None and p["sample_correct"][vote])
        assert p["rerank_correct"] == (best is not None and p["sample_correct"][best])
        if best is not None:
            first = p["sample_answers"].index(p["sample_answers"][best])
            picked_another += p["sample_correct"][first] != p["sample_correct"][best]
    assert picked_another > 0  # the rerank check has teeth
    for mode, key in (("greedy", "greedy_correct"), ("vote", "vote_correct"), ("rerank", "rerank_correct"),
                      ("pass@k", "pass_at_k")):
        assert results["accuracy"][mode] == pytest.approx(sum(p[key] for p in preds) / n)
    assert results["reward"] == "parity_reward:parity"
    questions = [r["question"] for r in reward.load_records(str(minigsm), "test", "nl")[:n]]
    assert results["no_answer"] == pytest.approx({
        "greedy": no_answer_count(greedy["completions"], "nl", questions) / n,
        "samples": no_answer_count(samples["completions"], "nl", [q for q in questions for _ in range(k)]) / (n * k)})
    assert 0 < results["no_answer"]["greedy"] < 1 and 0 < results["no_answer"]["samples"] < 1, results
    default = [a is not None and reward.answers_equal(a, p["gold"]) for p in preds for a in p["sample_answers"]]
    assert default != [c for p in preds for c in p["sample_correct"]]  # the parity flags are not reward.py's
