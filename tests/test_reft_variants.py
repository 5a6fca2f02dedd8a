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
    assert got[GROUP == 7].abs().max() < 1e-5  # all-equal rewards: 0, not NaN


def test_rloo_matches_a_python_loop():
    mask = masks(len(GROUP), 6)
    got = reft.rloo_advantages(REWARDS, GROUP, mask)
    for i in range(len(GROUP)):
        r = members(i)
        a = REWARDS[i].item() - (sum(r) - REWARDS[i].item()) / (len(r) - 1)
        for t in range(6):
            assert got[i, t].item() == pytest.approx(a * mask[i, t].item(), abs=1e-6), (i, t)
    assert got[GROUP == 7].abs().max() < 1e-6


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


def test_online_st_step_is_half_gold_half_correct_samples_each_a_token_mean():
    """One minibatch of 3 rows in micro-batches of 2 and 1: the optimizer sees the (clipped) gradient of
    ½ Σ NLL(gold) / gold tokens + ½ Σ NLL(correct samples) / their tokens, with the counts of the whole minibatch;
    the row whose sample was wrong adds only its gold CoT."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, pad_token_id=0, eos_token_id=1))
    model = reft.PolicyWithValueHead(lm, value_head=False)
    ids = [torch.randint(2, 40, (n,)).tolist() for n in (9, 6, 7, 11, 8)]
    examples = [((ids[0], 3), (ids[1], 3)), ((ids[2], 2), None), ((ids[3], 4), (ids[4], 5))]
    seen = []

    class Recorder:  # an optimizer that records the gradient it is given
        def step(self):
            seen.append([p.grad.clone() for p in model.parameters()])

        def zero_grad(self, set_to_none):
            model.zero_grad(set_to_none=set_to_none)

    reft.init_distributed()
    try:
        stats, skipped = reft.online_st_update(model, Recorder(), examples, 0, 3, 1, 0,
                                               reft.Args(ppo_epochs=1, micro_batch_size=2), "cpu")
    finally:
        torch.distributed.destroy_process_group()
    assert len(seen) == 1 and skipped == 0

    def nll(ids, n_prompt):
        logits = lm(torch.tensor([ids])).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits[n_prompt - 1:], torch.tensor(ids[n_prompt:]), reduction="sum")

    gold, samples = [g for g, _ in examples], [s for _, s in examples if s is not None]
    loss = sum(0.5 * sum(nll(*e) for e in half) / sum(len(e) - k for e, k in half) for half in (gold, samples))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for got, p in zip(seen[0], model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-4)
    assert stats["loss"][0] == pytest.approx(loss.item(), rel=1e-5)


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


def test_kl_in_loss_pulls_the_policy_towards_the_reference(minigsm, warmup, tmp_path):
    """--kl_in_loss: β k3 is in the loss, and no KL penalty in the reward. Its gradient is 0 where the policy is the
    reference, so β changes nothing before the first update; then a large β keeps the k3 the steps log several times
    smaller (measured over steps 2-3: 0.015 with β = 0, 0.0024 with β = 10)."""
    runs = {}
    for beta in (0, 10):
        run([PY, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 3, "--num_samples", 2, "--advantage",
             "rloo", "--kl_in_loss", "--kl_coef", beta, *RUN, "--batch_size", 16, "--output_dir", tmp_path / str(beta)])
        runs[beta] = read_metrics(tmp_path / str(beta) / "metrics.jsonl")
        assert all("kl_penalty" not in m and m["beta"] == beta for m in runs[beta])
    assert runs[0][0]["kl_loss"] == runs[10][0]["kl_loss"] > 0
    kl_loss = {beta: sum(m["kl_loss"] for m in runs[beta][1:]) for beta in runs}
    assert kl_loss[10] < kl_loss[0] / 2, kl_loss


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
