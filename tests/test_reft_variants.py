"""reft.py's variants (issue 19): the critic-free advantages (--advantage grpo|rloo), the KL in the loss
(--kl_in_loss) and the paper's online self-training baseline (--objective online_st): each formula against a plain
loop, 1-vs-2-process parity, Online-ST learning on a fixed pool, and the flag combinations that are refused."""
import json
import math
import statistics
import sys

import pytest
import torch

from conftest import PY, ROOT, main_error, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import reft  # noqa: E402
import sft  # noqa: E402

# Groups of sizes 2, 3 and 4, interleaved; group 7 has all-equal rewards.
GROUP = torch.tensor([3, 3, 7, 5, 7, 5, 7, 5, 5])
REWARDS = torch.tensor([1.0, 0.1, 0.1, 0.0, 0.1, 1.0, 0.1, 0.97, -0.03])


def masks(B, R):
    lengths = torch.randint(1, R + 1, (B,), generator=torch.Generator().manual_seed(0))
    return (torch.arange(R)[None] < lengths[:, None]).float()


def members(i):
    return [REWARDS[j].item() for j in range(len(GROUP)) if GROUP[j] == GROUP[i]]


def test_grpo_matches_a_python_loop():
    mask = masks(len(GROUP), 6)
    got = reft.grpo_advantages(REWARDS, GROUP, mask)
    for i in range(len(GROUP)):
        r = members(i)
        a = (REWARDS[i].item() - statistics.mean(r)) / (statistics.stdev(r) + 1e-4)
        for t in range(6):
            assert got[i, t].item() == pytest.approx(a * mask[i, t].item(), abs=1e-5), (i, t)
    assert not got[GROUP == 7].abs().gt(1e-5).any()  # all-equal rewards: 0, not NaN


def test_rloo_matches_a_python_loop():
    mask = masks(len(GROUP), 6)
    got = reft.rloo_advantages(REWARDS, GROUP, mask)
    for i in range(len(GROUP)):
        r = members(i)
        a = REWARDS[i].item() - (sum(r) - REWARDS[i].item()) / (len(r) - 1)
        for t in range(6):
            assert got[i, t].item() == pytest.approx(a * mask[i, t].item(), abs=1e-6), (i, t)
    assert not got[GROUP == 7].abs().gt(1e-6).any()


def test_k3_matches_a_python_loop_and_is_zero_at_the_reference():
    gen = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(4, 5, generator=gen) * 3, -torch.rand(4, 5, generator=gen) * 3
    got = reft.k3_kl(logp, ref)
    for b in range(4):
        for t in range(5):
            d = ref[b, t].item() - logp[b, t].item()
            assert got[b, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-5, abs=1e-7)
    assert (got >= 0).all() and reft.k3_kl(logp, logp).abs().max() == 0


def test_gold_examples_are_sfts_tokens_and_sequence_nll_a_plain_forward(minigsm, warmup):
    """The gold half of Online-ST trains on the ids and labels sft.py makes; sequence_nll, left-padding several
    examples into one forward, equals each example's NLL over its labelled tokens alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import reward
    tok = AutoTokenizer.from_pretrained(warmup)
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)[:3]
    examples = [reft.gold_example(tok, r, "nl") for r in records]
    for r, (ids, n_prompt) in zip(records, examples):
        sft_ids, labels = sft.encode_example(tok, r, "nl", 10_000)
        assert ids == sft_ids and labels == [-100] * n_prompt + ids[n_prompt:]
    examples.append((examples[0][0][:7], 4))  # a short one, so the others are padded
    lm = AutoModelForCausalLM.from_pretrained(warmup)
    with torch.no_grad():
        got = reft.sequence_nll(reft.PolicyWithValueHead(lm, value_head=False), examples, tok.pad_token_id, "cpu")
        for (ids, n_prompt), nll in zip(examples, got):
            logits = lm(torch.tensor([ids])).logits[0, :-1]
            want = torch.nn.functional.cross_entropy(logits[n_prompt - 1:], torch.tensor(ids[n_prompt:]),
                                                     reduction="sum")
            assert nll.item() == pytest.approx(want.item(), rel=1e-5)


RUN = ["--batch_size", 8, "--max_length", 120, "--eval_every", 0, "--save_steps", 1000, "--seed", 5]


@pytest.mark.parametrize("variant, keys, absent", [
    (["--advantage", "grpo"], ("pg_loss", "kl", "kl_penalty"), ("vf_loss", "explained_variance", "loss")),
    (["--objective", "online_st"], ("loss",), ("kl", "entropy", "pg_loss", "vf_loss", "beta", "ratio_first")),
])
def test_two_processes_match_one(variant, keys, absent, minigsm, warmup, tmp_path):
    """1 process with micro-batches of 4 and 2 processes take the same steps; no value head is written, and the
    metrics of what the variant lacks are absent."""
    common = ["reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 2, "--num_samples", 2, *variant, *RUN]
    run([PY, *common, "--micro_batch_size", 4, "--output_dir", tmp_path / "one"])
    torchrun(2, *common, "--output_dir", tmp_path / "two")
    one, two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["response_length"] == b["response_length"]  # the same rollouts
        for k in ("score", "accuracy") + keys:
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
        assert not set(absent) & set(a), set(absent) & set(a)
    assert not (tmp_path / "one/final/value_head.safetensors").exists()


def test_kl_in_loss_moves_the_kl_out_of_the_reward(minigsm, warmup, tmp_path):
    """--kl_in_loss logs the k3 term it adds to the loss and no KL penalty on the reward. With one minibatch and one
    PPO epoch, a step's k3 is that of the weights before it: 0 at first (the policy is the reference), then not."""
    run([PY, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 3, "--num_samples", 2, "--advantage",
         "rloo", "--kl_in_loss", "--ppo_epochs", 1, *RUN, "--batch_size", 16, "--output_dir", tmp_path])
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert m[0]["kl_loss"] == pytest.approx(0, abs=1e-6) and m[2]["kl_loss"] > 1e-4
    assert all("kl_penalty" not in x for x in m)


@pytest.mark.slow
def test_online_st_raises_the_training_accuracy(minigsm, warmup, tmp_path):
    """Online-ST on a fixed pool of 16 training questions, 2 samples each per step: every step sees the same
    questions, so a rise in the fraction of correct samples is learning from their gold CoTs and correct samples
    (measured: 0.056 over the first 5 of 20 steps, 0.331 over the last 5)."""
    pool = tmp_path / "pool.jsonl"
    with open(minigsm / "train_nl.jsonl") as f:
        pool.write_text("".join(f.readlines()[:16]))
    run([PY, "reft.py", "--model", warmup, "--data", pool, "--objective", "online_st", "--max_steps", 20,
         "--batch_size", 16, "--num_samples", 2, "--lr", 1e-4, "--max_length", 120, "--eval_every", 0,
         "--save_steps", 1000, "--output_dir", tmp_path / "out"], timeout=1800)
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    first = sum(x["accuracy"] for x in m[:5]) / 5
    last = sum(x["accuracy"] for x in m[-5:]) / 5
    print(f"fraction of correct samples: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.1


@pytest.mark.parametrize("args, message", [
    (["--advantage", "grpo"], "--advantage grpo compares the samples of a question: it needs --num_samples 2"),
    (["--advantage", "rloo", "--num_samples", 1], "--advantage rloo compares the samples of a question"),
    (["--advantage", "rloo", "--num_samples", 2, "--separate_value_model"], "--separate_value_model needs a value "
                                                                            "head"),
    (["--objective", "online_st", "--separate_value_model"], "--separate_value_model needs a value head"),
    (["--objective", "online_st", "--kl_in_loss"], "--objective online_st has no advantages and no KL"),
    (["--objective", "online_st", "--num_samples", 2, "--advantage", "grpo"], "online_st has no advantages"),
    (["--objective", "online_st", "--data", "NO_COT"], "has no 'answer_cot'"),
])
def test_bad_flag_combinations_give_one_error_line(args, message, minigsm, warmup, tmp_path):
    no_cot = tmp_path / "no_cot.jsonl"
    no_cot.write_text("".join(json.dumps({k: r[k] for k in ("item_id", "question", "answer_value")}) + "\n"
                              for r in map(json.loads, (minigsm / "train_nl.jsonl").read_text().splitlines())))
    args = [no_cot if a == "NO_COT" else a for a in args]
    out = tmp_path / "out"
    error = main_error(reft, ["--model", warmup, "--data", minigsm, "--batch_size", 16, "--output_dir", out, *args])
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not out.exists()
