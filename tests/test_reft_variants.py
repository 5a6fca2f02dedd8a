"""reft.py's variants (issue 19): the critic-free advantages (--advantage grpo|rloo), the KL in the loss
(--kl_in_loss) and the paper's online self-training baseline (--objective online_st): each formula against a plain
loop, 1-vs-2-process parity, Online-ST learning on a fixed pool, and the flag combinations that are refused. Issue 28:
the loss aggregations (their gradient the same whatever the micro-batches and processes), clip-higher, GRPO without
the std, zero-variance groups, and a test per flag that changes what is learned from, failing when main() ignores it."""
import json
import math
import statistics
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

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


def test_online_st_update_is_half_gold_half_correct_samples_each_a_token_mean():
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
        stats, stepped = reft.online_st_update(model, Recorder(), examples, 0, 3, 1, 0,
                                               reft.Args(ppo_epochs=1, micro_batch_size=2), "cpu")
    finally:
        torch.distributed.destroy_process_group()
    assert len(seen) == 1 and stepped == [True]

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
    (["--advantage", "grpo"], ("pg_loss", "kl", "kl_penalty", "zero_variance_groups"),
     ("vf_loss", "explained_variance", "loss")),
    (["--objective", "online_st"], ("loss", "zero_variance_groups"),
     ("kl", "entropy", "pg_loss", "vf_loss", "beta", "ratio_first")),
    # one PPO epoch of one minibatch: ppo_update's first forwards give the old log-probs on each rank (issue 36)
    (["--advantage", "rloo", "--kl_in_loss", "--ppo_epochs", 1], ("pg_loss", "kl", "kl_loss", "entropy", "ratio_first"),
     ("vf_loss", "kl_penalty")),
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
             "rloo", "--kl_in_loss", "--kl_coef", beta, *RUN, "--batch_size", 16, "--lr", 5e-5,
             "--output_dir", tmp_path / str(beta)])
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
    (["--advantage", "grpo", "--num_samples", 1], "--advantage grpo compares the samples of a question: it needs --num_samples 2"),
    (["--advantage", "rloo", "--num_samples", 1], "--advantage rloo compares the samples of a question"),
    (["--advantage", "rloo", "--num_samples", 2, "--separate_value_model"], "--separate_value_model needs a value "
                                                                            "head"),
    (["--advantage", "rloo", "--num_samples", 2, "--scale_rewards", "none"], "--scale_rewards is GRPO's option"),
    (["--objective", "online_st", "--loss_aggregation", "token_mean"], "--loss_aggregation and --clip_range_high"),
    (["--objective", "online_st", "--clip_range_high", 0.3], "online_st has its own"),
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


# ----------------------------------------------------------------------------- issue 28: DAPO's and Dr. GRPO's recipes

def test_grpo_without_the_std_matches_a_python_loop():
    """--scale_rewards none (Dr. GRPO): the reward minus its group's mean, not divided by the group's std."""
    mask = masks(len(GROUP), 6)
    got = reft.grpo_advantages(REWARDS, GROUP, mask, scale=False)
    for i in range(len(GROUP)):
        a = REWARDS[i].item() - statistics.mean(members(i))
        for t in range(6):
            assert got[i, t].item() == pytest.approx(a * mask[i, t].item(), abs=1e-6), (i, t)
    assert got[GROUP == 3].abs().max() > 0.4  # 1 vs 0.1: ±0.45, where the std division makes it ±0.707


def test_clip_range_high_matches_a_python_loop():
    """DAPO's clip-higher: the ratio clipped to [1 - ε, 1 + ε_high], and the clip fraction counting both sides."""
    gen = torch.Generator().manual_seed(3)
    logp, old = torch.randn(5, 7, generator=gen) * 0.3, torch.randn(5, 7, generator=gen) * 0.3
    adv, mask = torch.randn(5, 7, generator=gen), masks(5, 7)
    loss, clipfrac, _ = reft.policy_loss(logp, old, adv, mask, 0.2, 0.28)
    clipped, n = 0, 0
    for b in range(5):
        tokens = []
        for t in range(int(mask[b].sum())):
            r, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
            tokens.append(max(-a * r, -a * min(max(r, 0.8), 1.28)))
            clipped += r < 0.8 or r > 1.28
            n += 1
        assert loss[b].item() == pytest.approx(sum(tokens) / len(tokens), abs=1e-6)
    assert clipfrac.item() == pytest.approx(clipped / n)
    assert 0 < clipped < n and (torch.exp(logp - old)[mask.bool()] - 1).abs().gt(0.2).sum() > clipped  # has teeth


@pytest.mark.parametrize("how", ["seq_mean", "token_mean", "token_sum_norm"])
def test_loss_aggregation_matches_a_python_loop(how):
    """The per-sequence terms of micro-batches of 2, 3 and 1 sequences, averaged over the whole minibatch, are the
    minibatch's loss by the aggregation's equation."""
    gen = torch.Generator().manual_seed(4)
    losses, mask = torch.randn(6, 9, generator=gen), masks(6, 9)
    n_tokens = int(mask.sum())
    terms = torch.cat([reft.aggregate_loss(losses[s], mask[s], how, 6, n_tokens, 50)
                       for s in (slice(0, 2), slice(2, 5), slice(5, 6))])
    sums = [sum(losses[b, t].item() for t in range(int(mask[b].sum()))) for b in range(6)]
    want = {"seq_mean": sum(s / mask[b].sum().item() for b, s in enumerate(sums)) / 6,
            "token_mean": sum(sums) / n_tokens, "token_sum_norm": sum(sums) / (6 * 50)}[how]
    assert terms.mean().item() == pytest.approx(want, rel=1e-6)


def test_zero_variance_groups_matches_a_python_loop():
    scores = torch.tensor([1.0, 1.0, 0.1, 1.0, 0.0, 0.0, 0.1, 0.1, 1.0, 0.0, 0.1, 0.1])
    for k in (2, 3, 4):
        want = sum(len(set(scores[q:q + k].tolist())) == 1 for q in range(0, len(scores), k))
        assert reft.zero_variance_groups(scores, k).item() == want, k
    assert reft.zero_variance_groups(scores, 2).item() == 4  # (1, 1), (0, 0), (0.1, 0.1) twice


def test_online_st_learns_only_from_samples_that_scored_1():
    """A wrong answer's partial reward (0.1), no answer (0) and any other score below 1 give no sample to learn from;
    a correct one gives the prompt + its response up to and including EOS (id 1)."""
    gold = [([7, 7, 8], 2), ([9, 9, 8], 2)]
    prompts = [[5, 6], [4]]
    rows = [0, 0, 1, 1, 1]
    responses = torch.tensor([[11, 12, 1, 0], [13, 1, 0, 0], [14, 15, 16, 1], [17, 1, 0, 0], [18, 18, 18, 18]])
    scores = torch.tensor([1.0, 0.1, 0.0, 1.0, 0.5])
    got = reft.online_st_examples(gold, prompts, rows, responses, reft.response_mask(responses, 1), scores)
    assert got == [(gold[0], ([5, 6, 11, 12, 1], 2)), (gold[0], None), (gold[1], None), (gold[1], ([4, 17, 1], 1)),
                   (gold[1], None)]


TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            pad_token_id=0, eos_token_id=1)
B, P, R = 8, 3, 12
LENGTHS = [1, 2, 3, 2, 12, 9, 11, 12]  # rank 0 gets 8 tokens and rank 1 44: per-rank means would weigh them wrong

# One minibatch (the whole rollout, one PPO epoch) through reft.ppo_update, the gradient its optimizer step is given
# (before clipping) saved per (aggregation, micro-batch size); run by 1 and by 2 processes (rank r holds rows r·B/world...). Rank 0 of
# the 1-process run also saves the initial weights and the batch.
GRADIENTS = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import reft
    from transformers import LlamaConfig, LlamaForCausalLM
    out, micro_sizes, spec = sys.argv[2], [int(m) for m in sys.argv[3].split(",")], json.loads(sys.argv[4])
    B, P, R = spec["shape"]
    rank, world, device, mesh = reft.init_distributed()
    torch.manual_seed(0)
    model = reft.PolicyWithValueHead(LlamaForCausalLM(LlamaConfig(**spec["config"])))
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(R)[None] < torch.tensor(spec["lengths"])[:, None]).float()
    input_ids = torch.randint(2, 40, (B, P + R), generator=g)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)
    with torch.no_grad():
        logits, values = model(input_ids, attn, P)
    logp = reft.logprobs_of(logits, input_ids[:, P:])
    batch = dict(input_ids=input_ids, attn=attn, responses=input_ids[:, P:], mask=mask,
                 old_logprobs=logp + 0.2 * torch.randn(B, R, generator=g),
                 ref_logprobs=logp + 0.5 * torch.randn(B, R, generator=g),
                 advantages=torch.randn(B, R, generator=g) * mask, returns=torch.randn(B, R, generator=g),
                 old_values=values + 0.3 * torch.randn(B, R, generator=g))
    if world == 1:
        torch.save({"state": model.state_dict(), "batch": batch}, f"{out}/inputs.pt")
    reft.shard(model, mesh, torch.float32)
    mine = {k: v[rank * B // world:(rank + 1) * B // world] for k, v in batch.items()}
    rollout = reft.Rollout(rows=list(range(B // world)), input_ids=mine["input_ids"], attn=mine["attn"], P=P,
                           responses=mine["responses"], mask=mine["mask"], ended=mine["mask"][:, -1] == 0)
    forwards = reft.Forwards(old_logprobs=mine["old_logprobs"], old_values=mine["old_values"],
                             ref_logprobs=mine["ref_logprobs"], entropy=None)
    seen = []

    def record(model, opt):  # instead of the clipped optimizer step: the gradient as accumulated, unclipped
        seen.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
        return True
    reft.clipped_step = record

    for how in ("seq_mean", "token_mean", "token_sum_norm"):
        for m in micro_sizes:
            args = reft.Args(loss_aggregation=how, micro_batch_size=m, kl_in_loss=True, clip_range_high=0.28,
                             max_length=P + R, vf_coef=5.0, ppo_epochs=1)
            seen.clear()
            _, stepped, _ = reft.ppo_update(model, None, rollout, forwards, mine["advantages"], mine["returns"],
                                         0.1, B, 0, args)
            assert stepped == [True] and len(seen) == 1
            if rank == 0:
                torch.save(seen[0], f"{out}/{how}_{world}_{m}.pt")
    torch.distributed.destroy_process_group()
""")


def plain_minibatch_gradient(how, inputs):
    """The gradient of the minibatch's loss written out token by token from the aggregation's equation: PPO's clipped
    surrogate (ε 0.2, ε_high 0.28), 5 × the clipped value loss (ε_v 0.2) and 0.1 × k3, on one unsharded model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = reft.PolicyWithValueHead(LlamaForCausalLM(LlamaConfig(**TINY)))
    model.load_state_dict(inputs["state"])
    b = inputs["batch"]
    logits, values = model(b["input_ids"], b["attn"], P)
    logp = torch.log_softmax(logits, -1)
    sequences = []
    for i, n in enumerate(LENGTHS):
        tokens = []
        for t in range(n):
            lp = logp[i, t, b["responses"][i, t]]
            ratio, adv = torch.exp(lp - b["old_logprobs"][i, t]), b["advantages"][i, t]
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
            v, old_v, ret = values[i, t], b["old_values"][i, t], b["returns"][i, t]
            vf = 0.5 * torch.max((v - ret) ** 2, (old_v + (v - old_v).clamp(-0.2, 0.2) - ret) ** 2)
            d = b["ref_logprobs"][i, t] - lp
            tokens.append(pg + 5.0 * vf + 0.1 * (torch.exp(d) - d - 1))
        sequences.append(sum(tokens) / n if how == "seq_mean" else sum(tokens))
    loss = sum(sequences) / {"seq_mean": B, "token_mean": sum(LENGTHS), "token_sum_norm": B * (P + R)}[how]
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_aggregations_give_one_gradient_for_any_micro_batches_and_processes(tmp_path):
    """The gradient of one minibatch of responses of 1 to 12 tokens, by reft.ppo_update with the policy, value and
    k3 losses: 1 process in micro-batches of 1, 3 and 8 sequences and 2 processes in micro-batches of 1 and 4 give
    the plain token-by-token gradient of the aggregation's equation. A token mean per micro-batch or per rank fails."""
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    spec = json.dumps({"config": TINY, "shape": [B, P, R], "lengths": LENGTHS})
    run([PY, script, ROOT, tmp_path, "1,3,8", spec], timeout=300)
    torchrun(2, script, ROOT, tmp_path, "1,4", spec, timeout=300)
    inputs = torch.load(tmp_path / "inputs.pt")
    for how in ("seq_mean", "token_mean", "token_sum_norm"):
        want = plain_minibatch_gradient(how, inputs)
        for world, m in [(1, 1), (1, 3), (1, 8), (2, 1), (2, 4)]:
            got = torch.load(tmp_path / f"{how}_{world}_{m}.pt")
            for name, w in want.items():
                error = ((got[name] - w).norm() / w.norm()).item()
                assert error < 1e-5, (how, world, m, name, error)  # fp32 sums in other orders: measured ≤ 4e-6


# ----------------------------------------------------------------------------- main() uses every flag that changes
# what is learned from: one step of main() in this process, the pure functions it calls wrapped to record their
# arguments, with each such flag away from its default. A main() that ignored one passes the default instead.

SPIED = ("kl_shaped_rewards", "compute_gae", "grpo_advantages", "rloo_advantages", "policy_loss")


def spied_main(out, minigsm, warmup, *flags):
    """(arguments of every call to each function of SPIED, the metrics row) of one step of main() on 16 questions."""
    seen = {name: [] for name in SPIED}

    def spy(name, real):
        return lambda *a: seen[name].append(a) or real(*a)

    with pytest.MonkeyPatch.context() as mp:
        for name in SPIED:
            mp.setattr(reft, name, spy(name, getattr(reft, name)))
        try:
            reft.main(reft.parse_args(reft.Args, [str(a) for a in (
                "--model", warmup, "--data", minigsm, "--output_dir", out, "--max_steps", 1, "--batch_size", 16,
                "--max_length", 120, "--eval_every", 0, "--save_steps", 1000, *flags)]))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return seen, read_metrics(out / "metrics.jsonl")[0]


@pytest.fixture(scope="module")
def spied_step(minigsm, warmup, tmp_path_factory):
    """spied_main with --no-partial_reward --advantage grpo --scale_rewards none --kl_in_loss --clip_range_high 0.3
    --loss_aggregation token_sum_norm --temperature 0.7."""
    return spied_main(tmp_path_factory.mktemp("spied"), minigsm, warmup, "--num_samples", 2, "--seed", 2,
                      "--no-partial_reward", "--advantage", "grpo", "--scale_rewards", "none", "--kl_in_loss",
                      "--kl_coef", 0.3, "--clip_range_high", 0.3, "--loss_aggregation", "token_sum_norm",
                      "--temperature", 0.7)


def test_no_partial_reward_scores_a_wrong_answer_0(spied_step):
    """README's ReFT-binary rests on --no-partial_reward: the scores PPO learns from are 1 or 0, also for the
    samples with an extracted but wrong answer (0.1 with partial rewards), of which this step has some."""
    (scores, *_), = spied_step[0]["kl_shaped_rewards"]
    m = spied_step[1]
    assert set(scores.tolist()) <= {0.0, 1.0}, scores
    assert m["score"] == pytest.approx(m["accuracy"], abs=1e-9)
    assert 1 - m["accuracy"] - m["no_answer"] > 0.1, m  # teeth: wrong answers that partial rewards would pay 0.1


def test_kl_in_loss_leaves_the_kl_out_of_the_reward(spied_step):
    (_, _, _, _, beta), = spied_step[0]["kl_shaped_rewards"]
    m = spied_step[1]
    assert beta == 0.0 and m["beta"] == 0.3 and "kl_loss" in m and "kl_penalty" not in m


def test_grpo_advantages_get_scale_rewards(spied_step):
    (rewards, group, mask, scale), = spied_step[0]["grpo_advantages"]
    assert scale is False and len(rewards) == 32 and group.tolist()[::2] == group.tolist()[1::2]


def test_policy_loss_gets_clip_range_high_and_the_aggregation(spied_step):
    calls = spied_step[0]["policy_loss"]
    assert len(calls) == 2  # 2 PPO epochs of one minibatch in one micro-batch
    for *_, clip_range, clip_range_high, aggregation in calls:
        assert (clip_range, clip_range_high) == (0.2, 0.3)
        assert aggregation == dict(how="token_sum_norm", n_seq=32, max_length=120)


def test_ratio_and_kl_of_the_first_step_use_the_sampling_temperature(spied_step):
    """At --temperature 0.7 the first ratio is 1 and the KL 0 only if every forward divides by the same 0.7."""
    m = spied_step[1]
    assert m["ratio_first"] == pytest.approx(1.0, abs=1e-6) and m["kl"] == pytest.approx(0.0, abs=1e-6)


def test_zero_variance_groups_is_the_fraction_of_questions_whose_samples_agree(spied_step):
    (scores, *_), = spied_step[0]["kl_shaped_rewards"]
    pairs = scores.view(16, 2).tolist()
    agree = sum(a == b for a, b in pairs)
    assert spied_step[1]["zero_variance_groups"] == pytest.approx(agree / 16) and 0 < agree < 16


def test_gae_gets_gamma_and_lam(minigsm, warmup, tmp_path):
    seen, _ = spied_main(tmp_path, minigsm, warmup, "--gamma", 0.9, "--lam", 0.5)
    (*_, gamma, lam), = seen["compute_gae"]
    assert (gamma, lam) == (0.9, 0.5) and not seen["grpo_advantages"] and not seen["rloo_advantages"]


def test_advantage_rloo_takes_rloos_advantages(minigsm, warmup, tmp_path):
    seen, _ = spied_main(tmp_path, minigsm, warmup, "--num_samples", 2, "--advantage", "rloo")
    assert len(seen["rloo_advantages"]) == 1 and not seen["grpo_advantages"] and not seen["compute_gae"]


def counted_main(out, minigsm, warmup, every_forward, *flags):
    """(the no-grad forwards rollout_forwards ran, by model, the metrics rows) of 2 steps of main(); every_forward
    forces today's path before issue 36: every forward of step 3 runs."""
    ran = []
    real = reft.rollout_forwards

    def counted(name, module):
        return lambda *a: ran.append(name) or module(*a)

    def spy(model, ref, rollout, micro_batch_size, temperature, policy=True, reference=True):
        return real(counted("policy", model), counted("reference", ref), rollout, micro_batch_size, temperature,
                    policy, reference)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reft, "rollout_forwards", spy)
        if every_forward:
            mp.setattr(reft, "forwards_to_run", lambda *a: (True, True))
        try:
            reft.main(reft.parse_args(reft.Args, [str(a) for a in (
                "--model", warmup, "--data", minigsm, "--output_dir", out, "--max_steps", 2, "--batch_size", 8,
                "--micro_batch_size", 4, "--max_length", 120, "--eval_every", 0, "--save_steps", 1000, *flags)]))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return ran, read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("variant, skipped", [
    # one PPO epoch of one minibatch, advantages from the scores alone: the old log-probs are the update's
    (["--advantage", "grpo", "--kl_in_loss", "--kl_coef", 0.3, "--ppo_epochs", 1], {"policy"}),
    # β = 0, the KL in the reward: the reference is unused (GAE needs the old values: the policy's forward runs)
    (["--kl_coef", 0], {"reference"}),
    (["--advantage", "rloo", "--kl_coef", 0, "--ppo_epochs", 1], {"policy", "reference"}),
])
def test_skipped_forwards_leave_the_weights_bitwise_the_same(variant, skipped, minigsm, warmup, tmp_path):
    """Issue 36: a no-grad forward whose numbers are known (the old policy's) or unused (the reference's) is not run,
    and the final weights are bitwise those of the run with every forward, the metrics the same but the KL (absent
    without a reference) and the times."""
    flags = ["--num_samples", 2, "--seed", 3, *variant]
    ran, fast = counted_main(tmp_path / "fast", minigsm, warmup, False, *flags)
    ran_all, full = counted_main(tmp_path / "full", minigsm, warmup, True, *flags)
    assert set(ran_all) == {"policy", "reference"} and not set(ran) & skipped and set(ran) | skipped == set(ran_all)
    assert len(ran) == len(ran_all) // 2 * (2 - len(skipped))  # 2 steps × 2 micro-batches of each forward that ran
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = tmp_path / "fast/final" / name, tmp_path / "full/final" / name
        assert a.exists() == b.exists() and (not a.exists() or a.read_bytes() == b.read_bytes()), name
    times = {"tokens_per_s", "time_generation", "time_scoring", "time_training"}
    no_kl = {"kl", "kl_penalty"} if "reference" in skipped else set()
    for f, g in zip(fast, full):
        assert set(g) - set(f) == no_kl and f["ratio_first"] == g["ratio_first"] == 1.0
        assert {k: v for k, v in f.items() if k not in times} == {k: v for k, v in g.items() if k not in times | no_kl}
