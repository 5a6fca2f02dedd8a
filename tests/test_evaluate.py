"""evaluate.py: the selection rules, the three modes end to end, 1-vs-2-process parity, and bad input."""
import json
import math
import sys
import textwrap
from types import SimpleNamespace

import pytest

from conftest import PY, ROOT, main_error, run, torchrun

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import reward  # noqa: E402
import rerank  # noqa: E402

SMALL = ["--limit", 12, "-k", 4, "--max_new_tokens", 48, "--batch_size", 16, "--seed", 5]


def test_majority_vote_ties_go_to_the_first_answer_seen():
    assert evaluate.majority_index([7.0, 4.0, 4.0, 7.0]) == 0
    assert evaluate.majority_index([None, 4.0, 7.0]) == 1
    assert evaluate.majority_index([2.0, 9.0, 9.0, 2.0, 9.0]) == 1


def test_majority_vote_without_any_answer_is_none():
    assert evaluate.majority_index([None, None]) is None
    assert evaluate.majority_index([]) is None
    assert evaluate.majority_index([None, None, 3.0]) == 2  # no-answer samples do not vote


def test_numbers_within_tolerance_vote_together():
    answers = [5.0, 3.0, 3.001, 5.0, 2.999]
    assert evaluate.majority_index(answers) == 1  # the group's first sample represents it
    assert evaluate.vote_counts(answers) == [[5.0, 2], [3.0, 3]]
    assert evaluate.majority_index(["b", "c", "B"]) == 0  # letters compare case-insensitively


def test_rerank_skips_samples_without_an_answer():
    assert evaluate.rerank_index([None, 4.0, 6.0], [0.99, 0.2, 0.7]) == 2
    assert evaluate.rerank_index([None, None], [0.9, 0.8]) is None
    assert evaluate.rerank_index([1.0, 2.0], [0.5, 0.5]) == 0  # equal scores: the first
    assert evaluate.rerank_index([1.0, 1.0, 1.0], [0.1, 0.7, 0.3]) == 1  # the best sample, not the first of its answer


def test_pass_at_k():
    assert evaluate.pass_at_k([False, True, False]) and not evaluate.pass_at_k([False, False])


def test_policy_and_verifier_inputs_follow_the_stages_tokenization(llama_tokenizer, minigsm, monkeypatch):
    """With a Llama tokenizer, evaluate.py feeds the policy reward.encode_prompt's ids (BOS first, once; left
    padding), as reft.py samples from, and the verifier the ids rerank.py trains it on (rerank.encode: BOS first,
    cut at the verifier's max_length; right padding)."""
    import torch
    from transformers import AutoTokenizer

    class Recorder(torch.nn.Module):
        """Keeps the unpadded rows it is given; generates nothing and scores 0."""
        def __init__(self):
            super().__init__()
            self.rows = []

        def keep(self, input_ids, attention_mask, padded_on):
            self.rows += [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
            assert (attention_mask[:, -1 if padded_on == "left" else 0] == 1).all()

        def generate(self, input_ids, attention_mask, **kwargs):
            self.keep(input_ids, attention_mask, "left")
            return input_ids

        def forward(self, input_ids, attention_mask):
            self.keep(input_ids, attention_mask, "right")
            return SimpleNamespace(logits=torch.zeros(len(input_ids), 1))

    monkeypatch.setattr(evaluate, "num_calls", lambda n_items, batch_size, device: math.ceil(n_items / batch_size))
    tok = AutoTokenizer.from_pretrained(llama_tokenizer)
    tok.add_special_tokens({"pad_token": "<pad>"})
    records = reward.load_records(str(minigsm / "test_python.jsonl"))[:5]
    prompts = [reward.build_prompt(r["question"], "python", sampling=True) for r in records]
    policy = Recorder()
    evaluate.generate_texts(policy, tok, prompts, 2, "cpu", "greedy", 0)
    assert policy.rows == [reward.encode_prompt(tok, p) for p in prompts]
    assert all(row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1 for row in policy.rows)

    rows = [{"question": r["question"], "completion": reward.build_target(r, "python")[len(reward.program_header(
        r["question"])):], "correct": True} for r in records]
    tok.model_max_length = 40  # the verifier's training max_length, as rerank.py saves it
    verifier = Recorder()
    evaluate.verifier_scores(verifier, tok, [p + row["completion"] for p, row in zip(prompts, rows)], 2, "cpu", 0)
    trained, n_cut = rerank.encode(tok, rows, "python", 40)
    assert verifier.rows == [ids for ids, _ in trained] and n_cut == len(rows)
    assert all(row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1 for row in verifier.rows)


def evaluation(minigsm, model, out, *extra):
    run([PY, "evaluate.py", "--data", minigsm, "--model", model, "--output_dir", out, *SMALL, *extra])
    with open(out / "results.json") as f:
        results = json.load(f)
    with open(out / "predictions.jsonl") as f:
        return results, [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(minigsm, warmup, verifier, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return {mode: evaluation(minigsm, warmup, tmp / mode, "--mode", mode, "--verifier", verifier)
            for mode in ("greedy", "vote", "rerank", "all")}


KNOWN_VERIFIER = textwrap.dedent("""
    import sys, torch
    from types import SimpleNamespace
    sys.path.insert(0, sys.argv[1])
    import evaluate, reward
    from transformers import AutoTokenizer

    class KnownVerifier(torch.nn.Module):
        \"\"\"Scores the text it is given by that text's own answer: logit = answer / 100, and 50 (the highest
        score) for a text without an answer, which rerank must skip for having none.\"\"\"
        def __init__(self, tok):
            super().__init__()
            self.tok = tok

        def forward(self, input_ids, attention_mask):
            texts = [self.tok.decode(ids[m.bool()], skip_special_tokens=True)
                     for ids, m in zip(input_ids, attention_mask)]
            answers = [reward.extract_answer(t, "nl") for t in texts]
            return SimpleNamespace(logits=torch.tensor([[50.0 if a is None else a / 100] for a in answers]))

    real_load = evaluate.load

    def load(cls_name, path, flag, mesh, device, **kw):
        if cls_name == "AutoModelForSequenceClassification":
            return KnownVerifier(AutoTokenizer.from_pretrained(path)), AutoTokenizer.from_pretrained(path)
        return real_load(cls_name, path, flag, mesh, device, **kw)

    evaluate.load = load
    sys.argv = sys.argv[1:]
    evaluate.main(evaluate.parse_args(evaluate.Args))
""")


def test_rerank_picks_the_sample_a_known_verifier_scores_highest(minigsm, warmup, verifier, tmp_path):
    """evaluate.py --mode rerank on 2 ranks with a verifier whose score of a text is known (a function of that
    text's answer, through the same loading, batching and scoring path): every sample must carry its own score, and
    each question must pick the sample with the largest answer, recomputed here from the sample answers alone."""
    script = tmp_path / "known_verifier.py"
    script.write_text(KNOWN_VERIFIER)
    torchrun(2, script, ROOT, "--data", minigsm, "--model", warmup, "--verifier", verifier, "--mode", "rerank",
             "--output_dir", tmp_path / "out", *SMALL)
    preds = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert len(preds) == 12
    for p in preds:
        want = [1.0 if a is None else 1 / (1 + math.exp(-a / 100)) for a in p["sample_answers"]]
        assert p["verifier_scores"] == pytest.approx(want, abs=1e-6), p
        answered = [a for a in p["sample_answers"] if a is not None]
        assert p["rerank_answer"] == (max(answered) if answered else None), p
        assert p["rerank_correct"] == (p["rerank_answer"] is not None and reward.answers_equal(p["rerank_answer"],
                                                                                              p["gold"]))
    # The check has teeth: most questions' samples disagree, and some samples have no answer.
    assert sum(len(set(p["sample_answers"])) > 1 for p in preds) >= 6
    assert any(a is None for p in preds for a in p["sample_answers"])


def test_all_modes_write_consistent_results(runs, warmup, minigsm):
    results, preds = runs["all"]
    assert set(results["accuracy"]) == {"greedy", "vote", "rerank", "pass@k"}
    assert results["n"] == len(preds) == 12 and results["k"] == 4 and results["split"] == "test"
    assert results["model"] == str(warmup) and results["cot"] == "nl" and results["temperature"] == 1.0
    golds = [json.loads(line)["answer_value"] for line in open(minigsm / "test_nl.jsonl")][:12]
    assert [p["gold"] for p in preds] == golds
    for mode, key in (("greedy", "greedy_correct"), ("vote", "vote_correct"), ("rerank", "rerank_correct"),
                      ("pass@k", "pass_at_k")):
        assert results["accuracy"][mode] == pytest.approx(sum(p[key] for p in preds) / len(preds))
    for p in preds:
        assert len(p["sample_answers"]) == len(p["sample_correct"]) == len(p["verifier_scores"]) == 4
        vote, best = (evaluate.majority_index(p["sample_answers"]),
                      evaluate.rerank_index(p["sample_answers"], p["verifier_scores"]))
        assert p["vote_answer"] == (None if vote is None else p["sample_answers"][vote])
        assert p["rerank_answer"] == (None if best is None else p["sample_answers"][best])
        assert p["vote_correct"] == (vote is not None and p["sample_correct"][vote])
        assert p["rerank_correct"] == (best is not None and p["sample_correct"][best])
        assert p["sample_correct"] == [a is not None and reward.answers_equal(a, p["gold"])
                                       for a in p["sample_answers"]]
        assert p["pass_at_k"] == any(p["sample_correct"])
        assert p["pass_at_k"] >= p["vote_correct"] and p["pass_at_k"] >= p["rerank_correct"]
        assert all(p["pass_at_k"] >= c for c in p["sample_correct"])
        assert all(0.0 <= s <= 1.0 for s in p["verifier_scores"])
    acc = results["accuracy"]
    assert acc["pass@k"] >= max(acc["vote"], acc["rerank"], results["sample_accuracy"])
    assert results["no_answer"] == {"greedy": sum(p["greedy_answer"] is None for p in preds) / 12,
                                    "samples": sum(a is None for p in preds for a in p["sample_answers"]) / 48}


def test_each_mode_alone_matches_all(runs):
    """Greedy uses no randomness, so `all` draws the same samples as vote and rerank alone (same seed)."""
    _, everything = runs["all"]
    for mode, keys in (("greedy", ["greedy_completion", "greedy_answer", "greedy_correct"]),
                       ("vote", ["sample_answers", "votes", "vote_answer", "vote_correct", "pass_at_k"]),
                       ("rerank", ["sample_answers", "verifier_scores", "rerank_answer", "rerank_correct"])):
        results, preds = runs[mode]
        for a, b in zip(preds, everything):
            assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, mode
    assert set(runs["greedy"][0]["accuracy"]) == {"greedy"}
    assert set(runs["vote"][0]["accuracy"]) == {"vote", "pass@k"}
    assert set(runs["rerank"][0]["accuracy"]) == {"vote", "rerank", "pass@k"}


def test_two_processes_match_one_greedy(runs, minigsm, warmup, tmp_path):
    torchrun(2, "evaluate.py", "--data", minigsm, "--model", warmup, "--output_dir", tmp_path, *SMALL,
             "--mode", "greedy")
    one, preds_one = runs["greedy"]
    two = json.loads((tmp_path / "results.json").read_text())
    preds_two = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert two["world_size"] == 2 and two["accuracy"] == one["accuracy"]
    assert preds_two == preds_one


def test_python_cot_warmup_writes_programs_that_run_after_the_header(minigsm, tmp_path):
    """The python CoT from sft.py through evaluate.py: greedy and sampled bodies follow the rollout prompt's
    program header, run in the sandbox and are mostly right (a header ending on a token boundary SFT never
    trained made every sampled body noise: 0% sample accuracy)."""
    run([PY, "sft.py", "--data", minigsm, "--cot", "python", "--epochs", 30, "--batch_size", 32,
         "--micro_batch_size", 32, "--output_dir", tmp_path / "sft", "--save_epochs", "none", "--save_steps", 1000])
    results, preds = evaluation(minigsm, tmp_path / "sft/final", tmp_path / "eval", "--cot", "python",
                                "--mode", "all", "--limit", 32)
    assert results["cot"] == "python" and results["n"] == 32
    ran = [p["greedy_answer"] is not None for p in preds] + [a is not None for p in preds for a in p["sample_answers"]]
    assert sum(ran) / len(ran) >= 0.8, results  # measured: 0.92 (and 0.78 greedy, 0.76 of samples right)
    assert results["accuracy"]["greedy"] >= 0.5 and results["sample_accuracy"] >= 0.5, results
    assert all(not p["greedy_completion"].lstrip().startswith("def solution") for p in preds)


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/ckpt"], "--model '/nonexistent/ckpt': no such checkpoint folder"),
    (["--data", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    (["--mode", "rerank"], "--mode rerank needs --verifier"),
    (["--mode", "vote", "-k", 0], "-k must be at least 1, not 0"),
    (["--mode", "all", "-k", -2], "-k must be at least 1, not -2"),
    (["--model", ""], "--model is required"),
    (["--data", "NOCOT"], "no records"),
    (["--mode", "rerank", "--verifier", "/nonexistent/v"], "--verifier '/nonexistent/v': no such checkpoint folder"),
    (["--mode", "rerank", "--verifier", "WARMUP", "--limit", 1], "not a verifier written by rerank.py"),
])
def test_bad_input_gives_one_error_line(args, message, warmup, minigsm, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [warmup if a == "WARMUP" else empty if a == "NOCOT" else a for a in args]
    out = tmp_path / "out"
    error = main_error(evaluate, ["--model", warmup, "--data", minigsm, "--output_dir", out, *args])
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not out.exists()  # nothing written


def test_bad_input_on_the_command_line(warmup, minigsm, tmp_path):
    p = run([PY, "evaluate.py", "--model", warmup, "--data", minigsm, "--mode", "vote", "-k", 0, "--output_dir",
             tmp_path / "out"], check=False, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["error: -k must be at least 1, not 0"]
    assert not (tmp_path / "out").exists()


GREEDY_IN_TRAINING = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    import reward, reft, sft
    checkpoint, data, limit, batch_size, max_new_tokens, out = sys.argv[2:]
    records = reward.load_records(data, "test", "nl")[:int(limit)]
    completions = {}
    real = reward.compute_rewards

    def recording(texts, golds, cot, questions, **kw):
        scores = real(texts, golds, cot, questions, **kw)
        for q, text, s in zip(questions, texts, scores):
            completions.setdefault(q, (text, s))  # a rank without questions left repeats one: keep the first
        return scores

    rank, world, device, mesh = sft.init_distributed()
    tok = sft.load_tokenizer(SimpleNamespace(model=checkpoint), None)
    model = sft.load_model(SimpleNamespace(model=checkpoint, gradient_checkpointing=False, lora_rank=0), tok, mesh,
                           device)
    result = {"sft": sft.greedy_accuracy(model, model, tok, records, "nl", int(max_new_tokens), rank, world, device,
                                         int(batch_size), recording)}
    result["sft_completions"], completions = completions, {}
    tok, policy, _ = reft.load_models(SimpleNamespace(model=checkpoint, seed=0, separate_value_model=False,
                                                      objective="ppo", advantage="gae", lora_rank=0), mesh, device)
    prompts = [reward.encode_prompt(tok, reward.build_prompt(r["question"], "nl", sampling=True)) for r in records]
    with torch.no_grad():  # as reft.py does before any generation: FSDP2 picks its root at the first forward
        policy(*reft.left_pad(prompts[:1], tok.pad_token_id, device), len(prompts[0]))
    longest = max(len(p) for p in prompts)
    args = SimpleNamespace(cot="nl", max_length=longest + int(max_new_tokens))
    result["reft"] = reft.greedy_accuracy(policy, policy.lm, tok, records, "nl", reft.greedy_budget(tok, records, args),
                                          rank, world, device, int(batch_size), recording)
    result["reft_completions"] = completions
    parts = [None] * world
    dist.all_gather_object(parts, result)
    if rank == 0:
        for key in ("sft_completions", "reft_completions"):
            result[key] = {q: c for part in parts for q, c in part[key].items()}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("world", [1, 2])
def test_greedy_accuracy_of_sft_and_reft_matches_evaluate(world, minigsm, warmup, tmp_path):
    """The greedy evaluations inside sft.py (it picks the baseline epoch) and reft.py (it picks the best step) give
    the completions, the correct flags and the accuracy of `evaluate.py --mode greedy` on the same checkpoint and
    questions: 9 questions (5 and 4 over 2 ranks), batches of 4 (a short last
    batch), and a budget that cuts some completions (reft.py's budget is --max_length minus the longest prompt)."""
    common = ["--data", minigsm, "--model", warmup, "--mode", "greedy", "--limit", 9, "--batch_size", 4,
              "--max_new_tokens", 24]
    run([PY, "evaluate.py", *common, "--output_dir", tmp_path / "eval"])
    evaluated = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    questions = [r["question"] for r in reward.load_records(str(minigsm), "test", "nl")[:9]]
    script = tmp_path / "greedy.py"
    script.write_text(GREEDY_IN_TRAINING)
    args = [script, ROOT, warmup, minigsm, 9, 4, 24, tmp_path / "greedy.json"]
    run([PY, *args]) if world == 1 else torchrun(2, *args)
    got = json.loads((tmp_path / "greedy.json").read_text())
    accuracy = sum(p["greedy_correct"] for p in evaluated) / 9
    for stage in ("sft", "reft"):
        assert got[stage] == pytest.approx(accuracy, abs=1e-12), stage
        completions = got[f"{stage}_completions"]
        assert [completions[q][0] for q in questions] == [p["greedy_completion"] for p in evaluated], stage
        assert [completions[q][1] == 1.0 for q in questions] == [p["greedy_correct"] for p in evaluated], stage
    assert 0 < accuracy < 1  # some right, some wrong: the flags are compared on both kinds
    assert any(p["greedy_answer"] is None for p in evaluated)  # the budget cuts some before their answer
