"""rerank.py: AUC and the held-out split, a verifier that learns a learnable labelling, 1-vs-2-process parity,
and the sampling path (labels, deduplication, resume)."""
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PY, ROOT, main_error, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import rerank  # noqa: E402
import reward  # noqa: E402


def test_auc_matches_counting_pairs():
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(15)]
        labels = [rng.random() < 0.4 for _ in range(15)]
        pairs = [(p, n) for p, n in itertools.product(range(15), repeat=2) if labels[p] and not labels[n]]
        if not pairs:
            assert rerank.auc(scores, labels) is None
            continue
        want = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs)
        assert rerank.auc(scores, labels) == pytest.approx(want / len(pairs))
    assert rerank.auc([0.1, 0.9], [False, True]) == 1.0 and rerank.auc([0.3, 0.3], [True, True]) is None


def test_held_out_split_is_by_question():
    rows = [{"item_id": f"q{i // 3}", "question": "", "completion": str(i), "correct": i % 2} for i in range(60)]
    train, held = rerank.split_by_question(rows, 0.1, seed=1)
    assert len({r["item_id"] for r in held}) == 2 and len(held) == 6 and len(train) == 54
    assert not {r["item_id"] for r in held} & {r["item_id"] for r in train}
    assert rerank.split_by_question(rows, 0.1, seed=1) == (train, held)
    assert rerank.split_by_question(rows, 0.0, seed=1) == (rows, [])


def test_dedup_keeps_the_first_of_identical_completions_per_question():
    records = [{"item_id": "a", "question": "qa"}, {"item_id": "b", "question": "qb"}]
    texts = ["x", "y", "x", "x"]  # k=2: a gets x, y; b gets x twice
    rows = rerank.dedup_rows(records, texts, [1.0, None, 1.0, 1.0], [True, False, True, True], 2)
    assert [(r["item_id"], r["completion"], r["correct"]) for r in rows] == [("a", "x", True), ("a", "y", False),
                                                                             ("b", "x", True)]


ALL_WRONG = 4  # questions i with i % 5 == ALL_WRONG have no correct sample


@pytest.fixture(scope="module")
def synthetic_samples(minigsm, tmp_path_factory):
    """Samples whose label shows in the text: correct CoTs end with a marker line, wrong ones with another. Two of
    the four samples of a question are correct, none for every fifth question (ALL_WRONG)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("synthetic") / "samples.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(reward.load_records(str(minigsm), "train", "nl")[:100]):
            gold = int(r["answer_value"])
            for j in range(4):
                ok = j % 2 == 0 and i % 5 != ALL_WRONG
                value = gold if ok else gold + rng.choice([-2, -1, 1, 3])
                completion = f"{r['answer_cot']}\nTherefore, the answer is: {value}\n{'verified' if ok else 'unsure'}"
                f.write(json.dumps({"item_id": r["item_id"], "question": r["question"], "completion": completion,
                                    "answer": float(value), "correct": ok}) + "\n")
    return path


TRAIN = ["--batch_size", 16, "--micro_batch_size", 8, "--holdout_fraction", 0.2, "--seed", 3]


def test_verifier_learns_a_learnable_labelling(synthetic_samples, warmup, tmp_path):
    run([PY, "rerank.py", "--samples", synthetic_samples, "--init", warmup, "--output_dir", tmp_path, *TRAIN,
         "--epochs", 2])
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    before, after = metrics[0], metrics[-1]
    assert before["step"] == 0 and after["epoch"] == pytest.approx(2.0)
    assert after["holdout_accuracy"] >= 0.8 and after["holdout_auc"] >= 0.9, after
    assert after["holdout_auc"] > before["holdout_auc"]
    # pass@k from the construction: the held-out questions with a correct sample (all but the ALL_WRONG ones).
    rows = [json.loads(line) for line in open(synthetic_samples)]
    order = list(dict.fromkeys(r["item_id"] for r in rows))
    held = {r["item_id"] for r in rerank.split_by_question(rows, 0.2, seed=3)[1]}
    pass_at_k = sum(order.index(q) % 5 != ALL_WRONG for q in held) / len(held)
    assert after["holdout_pass_at_k"] == pytest.approx(pass_at_k) and pass_at_k < 1, (after, pass_at_k)
    assert pass_at_k - 0.1 <= after["holdout_rerank_accuracy"] <= pass_at_k, after

    # The saved verifier is an AutoModelForSequenceClassification reading the last non-pad token.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert tok.model_max_length == 256
    rows = rows[:6]
    texts = [reward.build_prompt(r["question"], "nl", sampling=True) + r["completion"] for r in rows]
    tok.padding_side = "right"
    with torch.no_grad():
        ids = [reward.encode_prompt(tok, t)[:tok.model_max_length] for t in texts]  # as the module docstring says
        batch = model(**tok.pad({"input_ids": ids}, return_tensors="pt")).logits[:, 0]
        alone = [model(input_ids=torch.tensor([x])).logits[0, 0] for x in ids]
    assert torch.allclose(batch, torch.stack(alone), atol=1e-4)
    assert ((batch > 0) == torch.tensor([r["correct"] for r in rows])).float().mean() >= 0.8


def test_two_processes_train_like_one(synthetic_samples, warmup, tmp_path):
    common = ["rerank.py", "--samples", synthetic_samples, "--init", warmup, *TRAIN, "--epochs", 1]
    run([PY, *common, "--output_dir", tmp_path / "one"])
    torchrun(2, *common, "--output_dir", tmp_path / "two")
    one, two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "holdout_accuracy", "holdout_auc"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-3, (key, a, b)


def test_sigkill_and_resume_of_the_verifier_training_repeats_the_same_run(synthetic_samples, warmup, tmp_path):
    """2 epochs of 8 steps (128 training samples) with the resume state every 3 steps and at each epoch end,
    killed in epoch 1: the resumed run crosses the epoch boundary with the same losses and held-out metrics, and
    saves the same verifier, as the run never killed."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(synthetic_samples.read_text().splitlines(keepends=True)[:160]))
    common = [PY, "rerank.py", "--samples", samples, "--init", warmup, *TRAIN, "--epochs", 2, "--save_steps", 3]
    run([*common, "--output_dir", tmp_path / "full"])
    full = read_metrics(tmp_path / "full/metrics.jsonl")
    assert [m["step"] for m in full] == list(range(17))

    out = tmp_path / "killed"
    proc = subprocess.Popen([str(a) for a in common] + ["--output_dir", str(out)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists() and rerank.find_resume_state(out) is not None

    p = run([*common, "--output_dir", out, "--resume"])
    assert "resumed from" in p.stdout
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(17))
    for a, b in zip(full, resumed):
        for key in ("loss", "train_accuracy", "lr", "holdout_accuracy", "holdout_auc", "holdout_rerank_accuracy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)
    from safetensors.torch import load_file
    want, got = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "full", out))
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


SAMPLE = ["--num_samples", 6, "--max_new_tokens", 40, "--gen_batch_size", 8, "--epochs", 1, "--batch_size", 2,
          "--micro_batch_size", 2, "--holdout_fraction", 0.25, "--temperature", 0.7]


def test_sampling_labels_dedups_and_resumes(minigsm, warmup, tmp_path):
    p = run([PY, "rerank.py", "--model", warmup, "--data", minigsm, "--limit", 4, "--output_dir", tmp_path, *SAMPLE])
    assert "4 to do" in p.stdout
    first = (tmp_path / "samples.jsonl").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    records = {r["item_id"]: r for r in reward.load_records(str(minigsm), "train", "nl")[:4]}
    assert {r["item_id"] for r in rows} == set(records)
    pairs = [(r["item_id"], r["completion"]) for r in rows]
    assert len(pairs) == len(set(pairs)) and all(pairs.count(p) == 1 for p in pairs)
    for item_id in records:
        assert 1 <= sum(r["item_id"] == item_id for r in rows) <= 6
    golds = [records[r["item_id"]]["answer_value"] for r in rows]
    rewards = reward.compute_rewards([r["completion"] for r in rows], golds, "nl", [r["question"] for r in rows],
                                     partial_reward=False)
    assert [r["correct"] for r in rows] == [x == 1.0 for x in rewards]
    assert (tmp_path / "final" / "config.json").is_file()

    p = run([PY, "rerank.py", "--model", warmup, "--data", minigsm, "--limit", 6, "--output_dir", tmp_path, *SAMPLE,
             "--resume"])  # --limit may grow on a resume: the 4 sampled questions are kept
    assert "4 already in" in p.stdout and "2 to do" in p.stdout
    second = (tmp_path / "samples.jsonl").read_text()
    assert second.startswith(first)
    assert len({json.loads(line)["item_id"] for line in second.splitlines()}) == 6


@pytest.mark.parametrize("args, message", [
    (["--model", ""], "--model is required to draw samples"),
    (["--model", "", "--samples", "GOOD"], "--init (or --model) is required"),
    (["--samples", "/nonexistent.jsonl", "--init", "x"], "--samples '/nonexistent.jsonl': no such file"),
    (["--model", "/nonexistent/ckpt"], "--model '/nonexistent/ckpt': no such checkpoint folder"),
    (["--samples", "GOOD", "--init", "/nonexistent/ckpt"], "--init '/nonexistent/ckpt': no such checkpoint folder"),
    (["--model", "WARMUP", "--holdout_fraction", 1.0], "--holdout_fraction must be in [0, 1), not 1.0"),
    (["--model", "WARMUP", "--holdout_fraction", -0.1], "--holdout_fraction must be in [0, 1), not -0.1"),
    (["--model", "WARMUP", "--num_samples", 0], "--num_samples must be -1 (by model size) or at least 1, not 0"),
    (["--samples", "MALFORMED", "--init", "WARMUP"], "MALFORMED:2: malformed JSON"),
    (["--samples", "INCOMPLETE", "--init", "WARMUP"], "INCOMPLETE:2: sample has no completion, correct"),
    (["--samples", "EMPTY", "--init", "WARMUP"], "EMPTY: no samples"),
    (["--samples", "GOOD", "--init", "WARMUP", "--batch_size", 24, "--micro_batch_size", 16],
     "--batch_size 24 is not a multiple of micro_batch_size × world (16 × 1)"),
    (["--samples", "GOOD", "--init", "WARMUP", "--batch_size", 4096],
     "training samples are fewer than one --batch_size 4096"),
    (["--model", "WARMUP", "--lora_rank", -1], "--lora_rank must be at least 0 (0: full fine-tuning), not -1"),
    (["--model", "WARMUP", "--lora_rank", 8, "--lora_alpha", 0], "--lora_alpha must be above 0, not 0.0"),
])
def test_bad_input_gives_one_error_line(args, message, minigsm, warmup, synthetic_samples, tmp_path):
    """One `error:` line and no file written, before any sampling or training."""
    good = synthetic_samples.read_text().splitlines(keepends=True)
    files = {"GOOD": good[:40], "MALFORMED": good[:1] + ['{"item_id": "q", "question": \n'],
             "INCOMPLETE": good[:1] + ['{"item_id": "q", "question": "q?"}\n'], "EMPTY": ["\n"]}
    for name, lines in files.items():
        (tmp_path / name).write_text("".join(lines))
    paths = {name: str(tmp_path / name) for name in files}
    args = [paths.get(a, warmup if a == "WARMUP" else a) if isinstance(a, str) else a for a in args]
    first = message.split(":")[0]
    message = paths[first] + message[len(first):] if first in paths else message
    out = tmp_path / "out"
    error = main_error(rerank, ["--data", minigsm, "--output_dir", out, *args])
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not out.exists()


def test_bad_input_on_the_command_line(minigsm, tmp_path):
    p = run([PY, "rerank.py", "--data", minigsm, "--model", "/nonexistent/ckpt", "--output_dir", tmp_path / "out"],
            check=False, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == "error: --model '/nonexistent/ckpt': no such checkpoint folder"
    assert not (tmp_path / "out").exists()


def test_gold_samples_are_the_gold_cots_written_as_samples(minigsm):
    """--gold_samples adds one correct row per sampled question whose text after the sampling prompt is its gold CoT:
    prompt + completion is the SFT example's prompt + target, for both CoT kinds."""
    for cot in ("nl", "python"):
        records = reward.load_records(str(minigsm), "train", cot, require_cot=True)[:5]
        rows = [{"item_id": r["item_id"], "question": r["question"], "completion": "x", "correct": False}
                for r in records[:3] for _ in range(2)]
        rows_with_gold = rerank.with_gold(rows, records, cot)
        assert rows_with_gold[:6] == rows and len(rows_with_gold) == 9
        for r, gold in zip(records[:3], rows_with_gold[6:]):
            assert gold["item_id"] == r["item_id"] and gold["correct"] is True
            assert (reward.build_prompt(r["question"], cot, sampling=True) + gold["completion"]
                    == reward.build_prompt(r["question"], cot) + reward.build_target(r, cot))
    with pytest.raises(SystemExit, match="question nope of the samples is not in --data"):
        rerank.with_gold([{"item_id": "nope", "question": "q", "completion": "c", "correct": False}], records, "nl")


def test_resume_with_gold_samples_adds_them_to_the_samples_drawn(minigsm, warmup, tmp_path, monkeypatch):
    """A sampler whose samples are all wrong (a --reward that marks every one wrong) ends after the sampling with one
    line that names --gold_samples; `--resume --gold_samples` then trains the verifier on the samples drawn plus
    each question's gold CoT, without loading the sampler or drawing again (it was refused as a changed flag)."""
    (tmp_path / "never_right.py").write_text("def reward(completions, *args, **kwargs):\n"
                                             "    return [0.0] * len(completions)\n")
    common = [PY, "rerank.py", "--model", warmup, "--data", minigsm, "--limit", 8, "--reward", "never_right:reward",
              "--output_dir", tmp_path / "run", *SAMPLE]
    env = {"PYTHONPATH": str(tmp_path)}
    p = run(common, check=False, env=env)
    assert p.returncode == 1 and "training samples are wrong" in p.stderr and "pass --gold_samples" in p.stderr, \
        p.stderr[-2000:]
    drawn = (tmp_path / "run" / "samples.jsonl").read_text()
    assert len({json.loads(line)["item_id"] for line in drawn.splitlines()}) == 8
    p = run([*common, "--resume", "--gold_samples"], env=env)
    assert "8 already in" in p.stdout and "0 to do" in p.stdout, p.stdout
    assert (tmp_path / "run" / "samples.jsonl").read_text() == drawn  # nothing drawn again
    assert "samples: " in p.stdout and (tmp_path / "run" / "final" / "config.json").is_file()
    n_drawn = len(drawn.splitlines())
    assert f"samples: {n_drawn + 8} distinct from 8 questions" in p.stdout, p.stdout
    launches = [json.loads(line) for line in (tmp_path / "run" / "launches.jsonl").read_text().splitlines()]
    assert launches[-1]["changed"] == {"gold_samples": [False, True]}
    # the verifier's training has begun on the samples with gold rows: a plain --resume keeps them (the run's flags),
    # and a resume that drops them is refused, since its resume state was trained on them
    assert (tmp_path / "run" / "args.json").is_file()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rerank.parse_args(rerank.Args, [str(a) for a in [*common[2:], "--resume"]]).gold_samples is True
    error = main_error(rerank, [*common[2:], "--resume", "--no-gold_samples"])
    assert "the verifier's training began with --gold_samples True" in error and "pass --gold_samples" in error


def test_max_steps_stops_the_verifier_training(synthetic_samples, warmup, tmp_path):
    """--max_steps N ends the training after N optimizer steps, as in the other stages, with a resume state at N;
    a --resume may raise it (MAY_CHANGE)."""
    run([PY, "rerank.py", "--samples", synthetic_samples, "--init", warmup, "--output_dir", tmp_path, *TRAIN,
         "--max_steps", 3])
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "checkpoint-3").is_dir()
    run([PY, "rerank.py", "--samples", synthetic_samples, "--init", warmup, "--output_dir", tmp_path, *TRAIN,
         "--max_steps", 5, "--resume"])
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]


def test_a_resumed_sampling_is_refused_for_a_change_of_any_sampling_flag(minigsm, warmup, tmp_path, monkeypatch):
    """samples.jsonl grows question by question across resumes: a flag that changes what a question's samples are
    (the sampler, the questions, k, the seed, the labelling, the temperature, the filters and the length budget) must
    be refused on --resume, or the file would silently mix samples of two settings. Only the flags of MAY_CHANGE
    pass: --limit (more questions, the drawn ones stay) and --gen_batch_size among them."""
    import dataclasses
    (tmp_path / "other_reward.py").write_text("import reward\n\n\ndef score(*args, **kwargs):\n"
                                              "    return reward.compute_rewards(*args, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    other_model = tmp_path / "other_model"
    shutil.copytree(warmup, other_model)
    out = tmp_path / "run"
    out.mkdir()
    started = rerank.Args(model=str(warmup), data=str(minigsm), cot="nl", output_dir=str(out), num_samples=4,
                          temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=24, limit=4, seed=5)
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(started)))
    (out / "samples.jsonl").write_text(json.dumps({"item_id": "x", "question": "q", "completion": "c", "answer": None,
                                                   "correct": False, "distinct": 1}) + "\n")
    changes = {"model": other_model, "data": minigsm / "train_nl.jsonl", "split": "validation", "num_samples": 5,
               "seed": 6, "reward": "other_reward:score", "temperature": 0.9, "top_k": 0, "top_p": 1.0,
               "max_new_tokens": 32}
    for flag, value in changes.items():
        error = main_error(rerank, ["--output_dir", out, "--resume", f"--{flag}", value])
        assert error.startswith(f"error: --resume in {out}: flags differ from the run's args.json: --{flag} "
                                f"{type(getattr(started, flag))(value)} (the run's: {getattr(started, flag)}); "), error
    for given in ([], ["--limit", "8", "--gen_batch_size", "2"]):
        args = rerank.parse_args(rerank.Args, ["--output_dir", str(out), "--resume", *given])
        assert rerank.plan_run(args, dataclasses.asdict(args), rerank.MAY_CHANGE, ("samples.jsonl",)) is True


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_a_call_of_many_questions_samples_each_as_a_call_of_its_own(temperature, top_k, top_p, minigsm, warmup):
    """Issue 36: rerank.draw puts the rows of many questions, left-padded, in one generate() call; each question's
    samples are those of the call of its own that rerank.py made before: generate(do_sample=True) after
    torch.manual_seed(the question's seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(warmup).eval(), AutoTokenizer.from_pretrained(warmup)
    tok.padding_side = "left"
    records = reward.load_records(str(minigsm), "train", "nl")[:6]
    prompts = [reward.encode_prompt(tok, reward.build_prompt(r["question"], "nl", sampling=True)) for r in records]
    assert len({len(p) for p in prompts}) > 1  # so the call pads
    args = rerank.Args(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=40)
    seeds = [42 * 1_000_003 + i for i in range(len(prompts))]
    with torch.no_grad():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        batched = rerank.draw(model, tok, prompts, [3] * len(prompts), generators, args, "cpu")
        alone = []
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            enc = tok.pad({"input_ids": [prompt] * 3}, return_tensors="pt")
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                 max_new_tokens=40, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            alone += tok.batch_decode(out[:, enc.input_ids.size(1):], skip_special_tokens=True)
    assert batched == alone
    assert len(set(alone)) > len(prompts)  # teeth: a question's 3 samples are not all alike


@pytest.fixture(scope="module")
def lora_run(synthetic_samples, warmup, tmp_path_factory):
    """A 2-step verifier training with --lora_rank 4: (its folder, its stdout)."""
    out = tmp_path_factory.mktemp("lora")
    p = run([PY, "rerank.py", "--samples", synthetic_samples, "--init", warmup, "--output_dir", out, *TRAIN,
             "--max_steps", 2, "--lora_rank", 4, "--save_steps", 1])
    return out, p.stdout


def test_lora_trains_the_adapters_and_the_head_only(lora_run, warmup):
    """final/ is a plain verifier whose trunk is --init's but for the LoRA targets, where the merged updates changed
    every one; the head moved from its fresh init by at most AdamW's two steps; the resume state holds only the
    adapters and the head (and their AdamW moments); the recipe's lr is ×10, and the log counts what trains."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    out, stdout = lora_run
    final, init = load_file(out / "final" / "model.safetensors"), load_file(warmup / "model.safetensors")
    targets = [k for k in final if k.split(".")[-2] in rerank.LORA_TARGETS]
    layers = json.loads((warmup / "config.json").read_text())["num_hidden_layers"]
    assert len(targets) == 7 * layers and set(final) - set(init) == {"score.weight"}  # q k v o gate up down
    assert all(final[k].dtype == torch.float32 for k in final)
    for key in set(final) - {"score.weight"}:
        assert torch.equal(final[key], init[key]) == (key not in targets), key
    assert "model.embed_tokens.weight" in final and "model.norm.weight" in final

    torch.manual_seed(3)  # --seed: the head's init, drawn as rerank.py draws it, before the LoRA layers
    fresh = AutoModelForSequenceClassification.from_pretrained(warmup, num_labels=1).score.weight.detach()
    moved = (final["score.weight"] - fresh).abs().max().item()
    assert 0 < moved <= 2e-3, moved  # two AdamW steps of at most lr (1e-3, then 5e-4 as it decays) each

    trained = {f"{name}.{factor}.weight" for name in (k[:-len(".weight")] for k in targets)
               for factor in ("lora_A", "lora_B")} | {"score.weight"}
    n_trained = sum(4 * (init[k].shape[0] + init[k].shape[1]) for k in targets) + final["score.weight"].numel()
    assert f"{n_trained:,} trained (LoRA rank 4), lr 0.001" in stdout, stdout
    state, _ = rerank.find_resume_state(out)
    saved = dcp.FileSystemReader(state).read_metadata().state_dict_metadata
    assert {k[len("model."):] for k in saved if k.startswith("model.")} == trained
    assert {k.rsplit(".", 1)[0][len("optim.state."):] for k in saved if k.startswith("optim.state.")} == trained


def test_lora_resumes_to_the_same_verifier(lora_run, synthetic_samples, warmup, tmp_path):
    """The run's folder as a kill after step 1 leaves it (its resume state at step 1, only the adapters and the
    head): --resume takes the frozen trunk from --init again and ends on the same verifier, byte for byte."""
    out, _ = lora_run
    shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("final", "checkpoint-2"))
    p = run([PY, "rerank.py", "--samples", synthetic_samples, "--init", warmup, "--output_dir", tmp_path / "run",
             *TRAIN, "--max_steps", 2, "--lora_rank", 4, "--save_steps", 1, "--resume"])
    assert "resumed from" in p.stdout and "checkpoint-1" in p.stdout, p.stdout
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run" / "final" / name).read_bytes() == (out / "final" / name).read_bytes(), name


def test_lora_adapter_loads_in_peft_as_the_merged_verifier(lora_run, warmup, synthetic_samples):
    """final/adapter/ in peft's format: PeftModel.from_pretrained on --init's AutoModelForSequenceClassification
    scores texts as the merged final/ does; without the adapters (and with --init's fresh head) the scores differ."""
    peft = pytest.importorskip("peft", reason="peft (a test dependency) loads the adapters in their format")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out, _ = lora_run
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    tok.padding_side = "right"
    base = AutoModelForSequenceClassification.from_pretrained(warmup, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    adapted = peft.PeftModel.from_pretrained(base, out / "final" / "adapter").eval()
    config = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"] and config["r"] == 4
    rows = [json.loads(line) for line in synthetic_samples.read_text().splitlines()[:8]]
    ids = [reward.encode_prompt(tok, reward.build_prompt(r["question"], "nl", sampling=True) + r["completion"])
           for r in rows]
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        want, got = merged(**enc).logits[:, 0], adapted(**enc).logits[:, 0]
        with adapted.disable_adapter():
            bare = adapted(**enc).logits[:, 0]
    assert torch.allclose(got, want, atol=1e-4), (got, want)  # merged: each weight rounded once
    assert (bare - want).abs().max() > 1e-3  # teeth: the adapters and the head matter


def test_lora_memory_is_the_frozen_trunk_in_bf16_and_the_trained_fraction():
    """rerank.py's training phase of a CodeLlama-7B verifier on one 80 GB GPU: full fine-tuning (16 bytes per
    parameter, 108 GB) is refused; with --lora_rank 16 the state is the bf16 trunk (2 bytes per parameter) plus 12 + 4
    bytes per adapter parameter, counted here from the projections' shapes: it fits, and the estimate is this sum."""
    import dataclasses
    from transformers import LlamaConfig
    config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=11008, vocab_size=32016, tie_word_embeddings=False)
    P, L, H, V = 6_738_546_688, 32, 4096, 32016  # CodeLlama-7B's parameters (tests/test_memory.py)
    args = dataclasses.replace(rerank.Args(), batch_size=48, micro_batch_size=6, max_length=700)
    assert rerank.memory_error(args, P, config, 1, True, 80e9, None) is not None
    lora = dataclasses.replace(args, lora_rank=16)
    assert rerank.memory_error(lora, P, config, 1, True, 80e9, None) is None
    adapters = 16 * L * (4 * (H + H) + 2 * (H + 11008) + (11008 + H))  # r (in + out): q k v o, gate up, down
    tokens = 6 * 700
    training = (2 * P + 12 * adapters + 4 * adapters + (2 * 2 + 4) * P / L + 4 * V * H + 3 * 4 * tokens * V
                + L * 34 * tokens * H)
    error = rerank.memory_error(lora, P, config, 1, True, 20e9, None)
    assert error.startswith(f"error: the estimated peak memory is {training / 1e9:.3g} GB per device"), error
    assert 30e9 < training < 40e9
