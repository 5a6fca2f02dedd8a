"""reft.py: each PPO formula against a plain-loop version, the model plumbing, and whole runs
(learning, 1-vs-2-process parity, no per-token all-gather under FSDP, kill/resume)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import PY, ROOT, main_error, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import reft  # noqa: E402


def random_mask(B, R, gen):
    """Masks of random lengths 1..R (1 up to and including the last valid token, 0 after)."""
    lengths = torch.randint(1, R + 1, (B,), generator=gen)
    return (torch.arange(R)[None] < lengths[:, None]).float()


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.5), (1.0, 0.0)])
def test_gae_matches_a_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, R = 5, 9
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    mask = random_mask(B, R, g)
    adv, ret = reft.compute_gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(R):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            want = 0.0
            for k in range(t, n):  # A_t = Σ_k (γλ)^(k-t) δ_k, with V_n = 0 at the end of the episode
                v_next = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                want += (gamma * lam) ** (k - t) * delta
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(want + values[b, t].item(), abs=1e-5)


def test_masked_whiten_uses_valid_tokens_only():
    g = torch.Generator().manual_seed(1)
    x, mask = torch.randn(4, 6, generator=g) * 3 + 2, random_mask(4, 6, g)
    valid = [x[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    mean = sum(valid) / len(valid)
    std = (sum((v - mean) ** 2 for v in valid) / len(valid)) ** 0.5
    w = reft.masked_whiten(x, mask)
    for b in range(4):
        for t in range(6):
            want = (x[b, t].item() - mean) / std if mask[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(want, abs=1e-4)
    x2 = x.clone()
    x2[mask == 0] = 1e6  # garbage in the padding must not move the statistics
    assert torch.allclose(reft.masked_whiten(x2, mask), w, atol=1e-5)


def test_kl_shaping_penalises_every_token_and_scores_the_last_one():
    g = torch.Generator().manual_seed(2)
    B, R, beta = 4, 7, 0.05
    logp, ref_logp, mask = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g), random_mask(B, R, g)
    scores = torch.tensor([1.0, 0.1, 0.0, 1.0])
    rewards, kl = reft.kl_shaped_rewards(scores, logp, ref_logp, mask, beta)
    for b in range(B):
        last = int(mask[b].sum()) - 1
        for t in range(R):
            want = 0.0
            if mask[b, t]:
                want = -beta * (logp[b, t] - ref_logp[b, t]).item() + (scores[b].item() if t == last else 0.0)
            assert rewards[b, t].item() == pytest.approx(want, abs=1e-6)
            assert kl[b, t].item() == pytest.approx((logp[b, t] - ref_logp[b, t]).item() * mask[b, t].item(), abs=1e-6)


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.randn(3, 5)
    rewards, kl = reft.kl_shaped_rewards(torch.zeros(3), logp, logp.clone(), torch.ones(3, 5), 0.1)
    assert kl.abs().max() == 0 and rewards.abs().max() == 0


def test_policy_loss_by_hand():
    # One sequence of 3 valid tokens + 1 pad. ratios e^0.5≈1.65 (clipped at 1.2), e^-0.5≈0.61 (clipped at 0.8), 1.
    logp = torch.tensor([[0.5, -0.5, 0.0, 9.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = reft.policy_loss(logp, old, adv, mask, 0.2)
    r1, r2 = torch.exp(torch.tensor(0.5)).item(), torch.exp(torch.tensor(-0.5)).item()
    # token 1: max(-1·1.65, -1·1.2) = -1.2; token 2: max(-0.61, -0.8) = -0.61; token 3: max(2, 2) = 2
    want = (max(-r1, -1.2) + max(-r2, -0.8) + 2.0) / 3
    assert loss.shape == (1,) and loss.item() == pytest.approx(want, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0) / 3)


def test_policy_loss_is_a_per_sequence_mean_then_a_batch_mean():
    logp, old = torch.zeros(2, 4), torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    loss, _, _ = reft.policy_loss(logp, old, adv, mask, 0.2)
    assert loss.tolist() == [-1.0, -4.0]  # a 1-token CoT weighs as much as a 4-token one


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5]])
    old = torch.tensor([[0.5, 0.0, 0.5]])
    returns = torch.tensor([[2.0, 1.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = reft.value_loss(values, old, returns, mask, 0.2)
    # token 1: V moved 0.5 > 0.2 → clipped V = 0.7; max((1-2)², (0.7-2)²) = 1.69; token 2: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_explained_variance_from_sums_and_when_returns_are_constant():
    torch.manual_seed(0)
    ret, val = torch.randn(50), torch.randn(50)
    err = ret - val
    got = reft.explained_variance(err.sum().item(), (err ** 2).sum().item(), ret.sum().item(),
                                  (ret ** 2).sum().item(), 50)
    assert abs(got - (1 - err.var(unbiased=False) / ret.var(unbiased=False)).item()) < 1e-5
    zeros = torch.zeros(50)  # all returns 0: the first step of a run where no sample earned anything
    assert reft.explained_variance((zeros - val).sum().item(), ((zeros - val) ** 2).sum().item(), 0.0, 0.0, 50) is None


@pytest.mark.parametrize("value, n", [(0.3, 777), (1 / 3, 4096), (0.1, 1000), (-2.5, 333)])
def test_explained_variance_of_constant_returns_summed_in_float32_is_none(value, n):
    """Constant returns summed in float32 (step_metrics' sums) leave Var(R) a tiny positive rounding residue, which
    the old `> 0` guard divided by: -4.2e13 logged at step 1. Now that is no variance (None), while returns that do
    vary a little still give a finite value."""
    torch.manual_seed(0)
    ret = torch.full((n,), value, dtype=torch.float32)
    val = ret - 0.05 * torch.randn(n)
    sums = ((ret - val).sum().item(), ((ret - val) ** 2).sum().item(), ret.sum().item(), (ret ** 2).sum().item())
    assert reft.explained_variance(*sums, n) is None
    varied = ret + 0.05 * torch.randn(n)
    err = varied - val
    got = reft.explained_variance(err.sum().item(), (err ** 2).sum().item(), varied.sum().item(),
                                  (varied ** 2).sum().item(), n)
    assert got == pytest.approx((1 - err.double().var(unbiased=False) / varied.double().var(unbiased=False)).item(),
                                rel=1e-2, abs=1e-2)


def test_response_mask_ends_at_the_first_eos():
    eos = 1
    resp = torch.tensor([[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [1, 4, 4, 4, 4]])
    assert reft.response_mask(resp, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------- model plumbing

def tiny_lm(seed=0, vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, pad_token_id=0, eos_token_id=1)).eval()


def test_logprobs_match_a_plain_forward_with_left_padding():
    lm = tiny_lm()
    model = reft.PolicyWithValueHead(lm).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, pmask = reft.left_pad(prompts, 0, "cpu")  # (2, 4)
    resp = torch.tensor([[11, 12, 1], [13, 1, 0]])
    rmask = reft.response_mask(resp, 1)
    with torch.no_grad():
        logits, values = model(torch.cat([ids, resp], 1), torch.cat([pmask, rmask.long()], 1), 4)
    got = reft.logprobs_of(logits, resp, temperature=0.7)
    assert values.shape == (2, 3)
    for b, p in enumerate(prompts):  # each row alone, unpadded, positions 0..n-1
        seq = torch.tensor([p + resp[b].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(lm(seq).logits[0] / 0.7, -1)
        for t in range(int(rmask[b].sum())):
            want = logp[len(p) - 1 + t, resp[b, t]]
            assert got[b, t].item() == pytest.approx(want.item(), abs=1e-5)


def test_sampling_of_a_row_does_not_depend_on_its_batch():
    lm = tiny_lm(1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ids, mask = reft.left_pad(prompts, 0, "cpu")
    together = reft.sample(lm, ids, mask, 12, eos_id=1, pad_id=0, temperature=1.0, seeds=[7, 8, 9])
    for b in range(3):
        alone = reft.sample(lm, *reft.left_pad([prompts[b]], 0, "cpu"), 12, 1, 0, 1.0, [7 + b])
        n = alone.size(1)
        assert together[b, :n].tolist() == alone[0].tolist()
    again = reft.sample(lm, ids, mask, 12, 1, 0, 1.0, [7, 8, 9])
    assert torch.equal(together, again)
    other = reft.sample(lm, ids, mask, 12, 1, 0, 1.0, [1, 2, 3])
    assert not torch.equal(together, other)


def test_greedy_sampling_equals_hf_generate():
    lm = tiny_lm(2)
    ids, mask = reft.left_pad([[5, 6, 7], [8, 9]], 0, "cpu")
    ours = reft.sample(lm, ids, mask, 8, 1, 0, 0.0, [0, 0])
    theirs = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0,
                         eos_token_id=1)[:, ids.size(1):]
    mask_ours = reft.response_mask(ours, 1)
    for b in range(2):
        n = int(mask_ours[b].sum())
        assert ours[b, :n].tolist() == theirs[b, :n].tolist()



def splitmix64(seed, t):
    """The (t+1)-th output of SplitMix64 from `seed`, in Python's unbounded ints masked to 64 bits (Steele et al.)."""
    z = (seed + 0x9E3779B97F4A7C15 * (t + 1)) % 2 ** 64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2 ** 64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2 ** 64
    return z ^ (z >> 31)


def test_row_uniforms_are_splitmix64_per_row():
    """Every row's u is its own seed's SplitMix64 stream, uint64 seeds at the int64 edges included, at any token t:
    the vectorised int64 arithmetic wraps as uint64 does. The first output for seed 0 is the published
    0xE220A8397B1DCDAF."""
    assert splitmix64(0, 0) == 0xE220A8397B1DCDAF
    seeds = [0, 1, 7, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 12345678901234567890]
    for t in (0, 1, 31, 999, 10 ** 6):
        got = reft.row_uniforms(torch.tensor([reft.i64(s) for s in seeds]), t).tolist()
        assert got == [(splitmix64(s, t) >> 11) / 2 ** 53 for s in seeds], t
    assert reft.row_uniforms(torch.tensor([reft.i64(s) for s in seeds[::-1]]), 3).tolist()[::-1] == \
        reft.row_uniforms(torch.tensor([reft.i64(s) for s in seeds]), 3).tolist()


def sample_reference(lm, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, seeds):
    """reft.sample before its preallocated KV cache: transformers' DynamicCache, the mask grown by torch.cat, and
    all-done checked after every token; each row's token drawn alone, from Python's SplitMix64 and a count over the
    CDF."""
    B, device = prompt_ids.size(0), prompt_ids.device
    mask = prompt_mask
    inp, pos = prompt_ids, (prompt_mask.cumsum(1) - 1).clamp(min=0)
    past, out = None, []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        o = lm(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
        past, logits = o.past_key_values, o.logits[:, -1].float()  # (B, V)
        nxt = logits.argmax(-1)
        if temperature > 0:
            cdf = torch.softmax((logits / temperature).double(), -1).cumsum(-1)  # (B, V)
            nxt = torch.tensor([int((cdf[b] <= (splitmix64(int(seeds[b]), len(out)) >> 11) / 2 ** 53 * cdf[b, -1])
                                    .sum()) for b in range(B)])
        nxt = torch.where(done, pad_id, nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        inp, pos = nxt[:, None], pos[:, -1:] + 1
    return torch.stack(out, 1)


def tiny_family_lm(family, seed):
    """A random 2-layer Llama (grouped-query attention) or OPT with a vocabulary of 8: rows end at varied steps."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64))
    return OPTForCausalLM(OPTConfig(vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sampler_draws_exactly_the_tokens_of_the_dynamic_cache_loop(family):
    """The preallocated KV cache and the every-8-tokens all-done check change no token and no length: left-padded
    prompts, greedy and sampled, rows ending at different steps, the batch ending between two checks or running to
    max_new_tokens."""
    seen = set()
    for seed in range(4):
        lm = tiny_family_lm(family, seed)
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(2, 8, (n,), generator=gen).tolist() for n in (3, 9, 1, 6, 4)]
        ids, mask = reft.left_pad(prompts, 0, "cpu")
        for temperature in (0.0, 0.7, 1.0):
            for R in (1, 6, 30):
                seeds = [100 * seed + b for b in range(5)]
                want = sample_reference(lm.eval(), ids, mask, R, 1, 0, temperature, seeds)
                assert torch.equal(reft.sample(lm, ids, mask, R, 1, 0, temperature, seeds), want)
                n = want.size(1)
                if len(set(reft.response_mask(want, 1).sum(1).tolist())) > 1:
                    seen.add("rows end at different steps")
                seen.add("ends between two checks" if n < R and n % 8 else "runs to max_new_tokens" if n == R else "")
    assert {"rows end at different steps", "ends between two checks", "runs to max_new_tokens"} <= seen

def chi_square(counts, probs):
    """Pearson's statistic of observed counts against probabilities, the bins expected under 5 merged into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    return (((obs - exp) ** 2)[keep] / exp[keep]).sum().item(), int(keep.sum()) - 1


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_compiled_decode_step_draws_the_eager_samplers_tokens(family):
    """--compile (fp32, CPU): the same tokens and lengths as the eager sampler, left-padded prompts, greedy and
    sampled, rows ending at different steps; models of one config and prompts of other lengths in a cache of the same
    capacity (as --max_length fixes it) reuse the one compiled graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    staggered = 0
    for seed in range(3):
        lm = tiny_family_lm(family, seed)
        gen = torch.Generator().manual_seed(seed)
        for lengths in ((3, 9, 1, 6, 4), (2, 5, 7, 1, 3)):  # prompt widths 9 and 7: capacity 40 both times
            prompts = [torch.randint(2, 8, (n,), generator=gen).tolist() for n in lengths]
            ids, mask = reft.left_pad(prompts, 0, "cpu")
            R = 41 - ids.size(1)
            for temperature in (0.0, 1.0):
                seeds = [100 * seed + b for b in range(5)]
                want = reft.sample(lm.eval(), ids, mask, R, 1, 0, temperature, seeds)
                assert torch.equal(reft.sample(lm, ids, mask, R, 1, 0, temperature, seeds, compiled=True), want)
                staggered += len(set(reft.response_mask(want, 1).sum(1).tolist())) > 1
    assert staggered  # batches whose rows end at different steps
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, for 3 models × 2 prompt widths × 2 temperatures


def test_the_compiled_step_is_one_graph_under_fsdp():
    """Inside gathered_for_generation the compiled step runs without FSDP2's forward hooks, which dynamo does not
    trace (each would break the graph: a graph per block, recompiled per layer index): one graph, no break, the eager
    tokens; the hooks are back afterwards for training."""
    from torch._dynamo.utils import counters
    _, _, _, mesh = reft.init_distributed()
    model = reft.shard(reft.PolicyWithValueHead(tiny_lm()), mesh, torch.float32)
    ids, mask = reft.left_pad([[5, 6, 7], [8, 9, 3, 4, 2]], 0, "cpu")
    with torch.no_grad():
        model(ids, mask, ids.size(1))  # FSDP2 picks its root at the first forward (as reft.main)
    model.eval()
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    torch._dynamo.reset()
    counters.clear()
    with reft.gathered_for_generation(model):
        want = reft.sample(model.lm, ids, mask, 12, 1, 0, 1.0, [3, 4])
        got = reft.sample(model.lm, ids, mask, 12, 1, 0, 1.0, [3, 4], compiled=True)
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_follows_the_softmax(temperature):
    """Inverse-CDF sampling: first-token frequencies of 4000 rows match softmax(logits / T) by a chi-square test, on
    a model whose lm_head is scaled so that its logits (known from a plain forward) spread over 4 nats: T = 0.5, 1
    and 2 then put 80%, 51% and 30% on the top token, and each temperature's counts reject the other two."""
    lm = tiny_lm(3, vocab=8)
    with torch.no_grad():
        lm.lm_head.weight.mul_(20)
        logits = lm(torch.tensor([[5, 6]])).logits[0, -1].double()
    assert logits.max() - logits.min() > 4
    ids, mask = reft.left_pad([[5, 6]] * 4000, 0, "cpu")
    first = reft.sample(lm, ids, mask, 1, 1, 0, temperature, list(range(4000)))[:, 0]
    counts = torch.bincount(first, minlength=8).double()
    stat, dof = chi_square(counts, torch.softmax(logits / temperature, -1))
    assert stat < {5: 20.5, 6: 22.5, 7: 24.3}[dof], (stat, dof)  # p = 0.001
    for other in {0.5, 1.0, 2.0} - {temperature}:
        assert chi_square(counts, torch.softmax(logits / other, -1))[0] > 200, other


# ----------------------------------------------------------------------------- whole runs

RUN = ["--batch_size", 16, "--max_length", 120, "--eval_every", 0, "--save_steps", 1000, "--seed", 5]


def test_first_step_has_ratio_one_and_zero_kl(minigsm, warmup, tmp_path):
    run([PY, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 2, *RUN, "--output_dir", tmp_path])
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert m[0]["ratio_first"] == pytest.approx(1.0, abs=1e-6)  # old log-probs come from the same forward
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert m[1]["kl"] != 0.0
    for key in ("score", "accuracy", "kl_penalty", "entropy", "pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac",
                "approx_kl", "ratio", "explained_variance", "response_length", "eos_fraction", "tokens_per_s",
                "time_generation", "time_scoring", "time_training"):
        assert key in m[0]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "value_head.safetensors").exists()


def test_two_processes_match_one(minigsm, warmup, tmp_path):
    common = ["reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 3, *RUN]
    run([PY, *common, "--micro_batch_size", 4, "--output_dir", tmp_path / "one"])
    torchrun(2, *common, "--output_dir", tmp_path / "two")
    one, two = read_metrics(tmp_path / "one/metrics.jsonl"), read_metrics(tmp_path / "two/metrics.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["response_length"] == b["response_length"]  # the same rollouts
        for k in ("score", "kl", "pg_loss", "vf_loss"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])


def test_compile_gives_the_eager_runs_step_on_two_processes_with_lora(minigsm, warmup, tmp_path):
    """reft.py --compile on its real path: FSDP2 on 2 CPU processes, the LoRA policy gathered for the rollout, the
    compiled step without FSDP2's hooks. fp32 draws the eager sampler's tokens, so every metric but the times is the
    eager run's, and the weights too."""
    common = ["reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 1, "--lora_rank", 4, *RUN]
    torchrun(2, *common, "--output_dir", tmp_path / "eager")
    torchrun(2, *common, "--compile", "--output_dir", tmp_path / "compiled")
    (eager,), (compiled,) = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("eager", "compiled"))
    timed = {"tokens_per_s", "time_generation", "time_scoring", "time_training"}
    assert {k: v for k, v in compiled.items() if k not in timed} == {k: v for k, v in eager.items() if k not in timed}
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("eager", "compiled"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_and_resume_across_epochs_restores_beta_and_best(minigsm, warmup, tmp_path):
    """8 PPO steps over a pool of 48 questions (3 steps per epoch) with adaptive β, --save_best and an evaluation
    every 2 steps, killed after step 3 (resumed from 2, 3 or 4): it crosses the epoch boundaries with the same steps, β
    and evaluations as the run never killed, and the same epoch and final checkpoints. The best accuracy is restored
    too: set above any accuracy in the saved state, no later evaluation may write best/ again."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join((minigsm / "train_nl.jsonl").read_text().splitlines(keepends=True)[:48]))
    common = [PY, "reft.py", "--model", warmup, "--data", pool, "--max_steps", 8, "--batch_size", 16,
              "--max_length", 120, "--save_steps", 2, "--seed", 5, "--adaptive_kl", "--target_kl", 0.5,
              "--save_best", "--eval_every", 2, "--eval_data", minigsm / "validation_nl.jsonl", "--eval_limit", 8,
              "--save_epochs", "all"]
    run([*common, "--output_dir", tmp_path / "full"])
    full = read_metrics(tmp_path / "full/metrics.jsonl")
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(a) for a in common] + ["--output_dir", str(out)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved, _ = reft.find_resume_state(out)
    loop = Path(saved) / "loop_state_rank0.pt"
    state = torch.load(loop)
    assert 2 <= state["step"] < 6 and 0 <= state["best"] <= 1 and (out / "best").is_dir(), state
    torch.save(dict(state, best=2.0), loop)
    manifest = json.loads((Path(saved) / "manifest.json").read_text())  # an edit its manifest vouches for
    manifest["files"][loop.name] = reft.file_digest(loop)
    (Path(saved) / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "best")

    run([*common, "--output_dir", out, "--resume"])
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        for k in ("score", "kl", "pg_loss", "vf_loss"):
            assert abs(a[k] - b[k]) < 1e-5, (k, a, b)
        assert b["beta"] == pytest.approx(a["beta"], rel=1e-9) and a.get("eval_accuracy") == b.get("eval_accuracy")
    assert full[-1]["beta"] != full[0]["beta"]  # β moved, so a β not restored would show
    last, _ = reft.find_resume_state(out)
    assert not (out / "best").exists() and torch.load(Path(last) / "loop_state_rank0.pt")["best"] == 2.0
    from safetensors.torch import load_file
    for name in ("epoch_2", "final"):
        want, got = (load_file(d / name / "model.safetensors") for d in (tmp_path / "full", out))
        assert all(torch.allclose(want[k], got[k], atol=1e-5) for k in want), name


THREADS_AROUND_RESUME_STATE = textwrap.dedent("""
    import os, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, sys.argv[1])
    import reft
    rank, world, device, mesh = reft.init_distributed()
    # 32 layers: enough tensors that DCP's plans are large enough for gloo to copy them with OpenMP
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1))
    model = reft.shard(reft.PolicyWithValueHead(lm), mesh, device)
    opt = torch.optim.AdamW(model.parameters())
    ids, mask = reft.left_pad([[5, 6, 7]], 0, device)
    sum(t.sum() for t in model(ids, mask, 2)).backward()
    opt.step()
    before = len(os.listdir("/proc/self/task"))
    if sys.argv[3] == "save":
        reft.save_resume_state(model, opt, {"step": 1}, sys.argv[2])
    else:
        assert reft.load_resume_state(model, opt, sys.argv[2]) == {"step": 1}
    print(before, len(os.listdir("/proc/self/task")))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_resume_state_leaves_no_thread_behind(tmp_path):
    """With OMP_NUM_THREADS > 1, DCP on the default gloo group left gloo workers holding OpenMP teams of their own;
    libgomp then saw more threads than cores and stopped spin-waiting, and every later step ran ~10-25% slower."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_AROUND_RESUME_STATE)
    for what in ("save", "load"):  # a fresh process each: a save's leftover threads would hide the load's
        p = subprocess.run([PY, str(script), str(ROOT), str(tmp_path), what], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert p.returncode == 0, p.stderr[-3000:]
        before, after = (int(n) for n in p.stdout.split()[-2:])
        assert after == before, f"{what}: {after - before} threads left behind"


COUNT_GATHERS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    import reft
    from transformers import LlamaConfig, LlamaForCausalLM
    rank, world, device, mesh = reft.init_distributed()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, pad_token_id=0, eos_token_id=1))
    model = reft.shard(reft.PolicyWithValueHead(lm), mesh, reft.compute_dtype(device))
    n_fsdp = sum(isinstance(m, reft.FSDPModule) for m in model.modules())
    ids, mask = reft.left_pad([[5, 6, 7]], 0, device)
    with torch.no_grad():
        model(ids, mask, 3)
    calls = []
    real = dist.all_gather_single
    dist.all_gather_single = lambda *a, **k: calls.append(1) or real(*a, **k)
    new_tokens = 6 + 4 * rank  # ranks decode different lengths (as with early EOS): must not hang
    with reft.gathered_for_generation(model):
        out = reft.sample(model.lm, ids, mask, new_tokens, 99, 0, 1.0, [rank])
    gathered = len(calls)
    calls.clear()
    with torch.no_grad():  # the default path: every forward (one per generated token) gathers every layer
        for _ in range(6):
            model(ids, mask, 3)
    with open(f"{sys.argv[2]}/result_{rank}.txt", "w") as f:
        f.write(f"{rank} {gathered} {len(calls)} {out.size(1)} {n_fsdp}")
    dist.destroy_process_group()
""")


def test_generation_under_fsdp_gathers_once_not_per_token(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(COUNT_GATHERS)
    torchrun(2, script, ROOT, tmp_path, timeout=300)
    results = [(tmp_path / f"result_{r}.txt").read_text().split() for r in range(2)]
    assert [int(n) for _, _, _, n, _ in results] == [6, 10]  # different lengths, and no hang
    for rank, gathered, per_token, n, n_fsdp in results:
        # 6 FSDP modules (3 layers, LM head, value head, root): at most one all-gather each for the whole rollout
        # (the root may still be unsharded from the forward before)...
        assert int(n_fsdp) == 6
        assert 5 <= int(gathered) <= 6
        # ...against one per layer per generated token on the default path.
        assert int(per_token) >= 6 * 3


@pytest.mark.slow
def test_ppo_raises_the_training_score(minigsm, warmup, tmp_path):
    """PPO on a fixed pool of 16 training questions, 4 samples each per step. Every step sees the same questions,
    so a rise in the fraction of correct samples is learning, not a change of questions (measured: about 0.09 over
    the first 5 steps, 0.31 over the last 5). λ = 1 and a small value weight, as the quickstart uses for this
    1.8M-parameter model (see scripts/quickstart.py)."""
    pool = tmp_path / "pool.jsonl"
    with open(minigsm / "train_nl.jsonl") as f:
        pool.write_text("".join(f.readlines()[:16]))
    run([PY, "reft.py", "--model", warmup, "--data", pool, "--max_steps", 30, "--batch_size", 16,
         "--num_samples", 4, "--lr", 1e-4, "--lam", 1.0, "--vf_coef", 0.1, "--max_length", 120, "--eval_every", 0,
         "--save_steps", 1000, "--output_dir", tmp_path / "out"], timeout=1800)
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    first = sum(x["accuracy"] for x in m[:5]) / 5
    last = sum(x["accuracy"] for x in m[-5:]) / 5
    print(f"fraction of correct samples: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.1


@pytest.fixture(scope="module")
def bad_inputs(minigsm, warmup, tmp_path_factory):
    """Folders for the bad-input cases: an empty one, the warm-up with pad == EOS, and data whose training prompts
    fit --max_length 80 but whose validation prompt does not."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("reft_bad")
    (root / "empty").mkdir()
    shutil.copytree(warmup, root / "pad_is_eos")
    tok = AutoTokenizer.from_pretrained(warmup)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(root / "pad_is_eos")
    (root / "long_eval").mkdir()
    train = (minigsm / "train_nl.jsonl").read_text().splitlines()[:32]
    (root / "long_eval" / "train_nl.jsonl").write_text("\n".join(train) + "\n")
    long = json.loads(train[0])
    (root / "long_eval" / "validation_nl.jsonl").write_text(json.dumps(dict(long, question=long["question"] * 4)))
    return root


@pytest.mark.parametrize("args, message", [
    (["--mini_batch_size", 5, "--num_samples", 1], "--batch_size 16 × --num_samples 1 must split into minibatches of 5"),
    (["--num_samples", 3, "--mini_batch_size", 32], "--batch_size 16 × --num_samples 3 must split"),
    (["--save_epochs", "2,x"], "--save_epochs must be all, none or epoch numbers such as 2,40, not '2,x'"),
    (["--model", "/no/such/ckpt"], "--model '/no/such/ckpt': no such checkpoint folder"),
    (["--model", "EMPTY"], "not a checkpoint folder (no config.json)"),
    (["--model", "PAD_IS_EOS"], "needs a pad token distinct from EOS"),
    (["--data", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    (["--batch_size", 1024], "256 questions are fewer than one --batch_size 1024"),
    (["--max_prompt_length", 10], "0 questions are fewer than one --batch_size 16"),
    (["--max_length", 30], "--max_length 30 leaves no room to generate after the longest training prompt"),
    (["--data", "LONG_EVAL", "--max_length", 80], "--max_length 80 leaves no room to generate after the longest "
                                                   "--eval_split validation prompt"),
    (["--lora_rank", -1], "--lora_rank must be at least 0 (0: full fine-tuning), not -1"),
    (["--lora_rank", 8, "--lora_alpha", 0], "--lora_alpha must be above 0, not 0"),
    (["--lora_rank", 8, "--separate_value_model"], "--separate_value_model trains a second full trunk: it needs full "
                                                   "fine-tuning, without --lora_rank"),
])
def test_bad_input_gives_one_error_line(args, message, minigsm, warmup, bad_inputs, tmp_path):
    """One `error:` line and no output folder, before any training."""
    names = {"EMPTY": bad_inputs / "empty", "PAD_IS_EOS": bad_inputs / "pad_is_eos",
             "LONG_EVAL": bad_inputs / "long_eval"}
    args = [names.get(a, a) if isinstance(a, str) else a for a in args]
    out = tmp_path / "out"
    error = main_error(reft, ["--model", warmup, "--data", minigsm, "--batch_size", 16, "--eval_every", 5,
                              "--output_dir", out, *args])
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not out.exists()


def test_bad_input_on_the_command_line(minigsm, warmup, tmp_path):
    p = run([PY, "reft.py", "--model", warmup, "--data", minigsm, "--max_length", 30, "--output_dir", tmp_path / "o"],
            check=False, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: --max_length 30 leaves no room")
    assert not (tmp_path / "o").exists()


def test_adaptive_beta_is_zieglers_proportional_controller():
    # KL twice the target: the error clips at +0.2, and 32 sequences move β by 0.2 × 32 / 10,000.
    assert reft.adaptive_beta(0.05, 2.0, 1.0, 32) == pytest.approx(0.05 * (1 + 0.2 * 32 / 10_000))
    # KL 10% under the target: β shrinks by 0.1 × n / horizon; on target it stays.
    assert reft.adaptive_beta(0.05, 0.9, 1.0, 1000) == pytest.approx(0.05 * (1 - 0.1 * 1000 / 10_000))
    assert reft.adaptive_beta(0.05, 1.0, 1.0, 1000) == 0.05


def test_rollout_forwards_match_per_sequence_forwards():
    """Micro-batched step 3 against one sequence at a time: log-probs as logprobs_of gives them, entropy from a
    separate log-softmax, values, and the reference's log-probs."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=0, eos_token_id=1)
    model, ref = reft.PolicyWithValueHead(LlamaForCausalLM(config)), reft.PolicyWithValueHead(
        LlamaForCausalLM(config), value_head=False)
    ids = torch.randint(2, 40, (5, 9))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a left-padded row
    responses = ids[:, 4:]
    rollout = reft.Rollout(rows=list(range(5)), input_ids=ids, attn=attn, P=4, responses=responses,
                           mask=torch.ones_like(responses).float(), ended=torch.zeros(5, dtype=torch.bool))
    out = reft.rollout_forwards(model, ref, rollout, 2, 0.7)
    out = (out.old_logprobs, out.old_values, out.ref_logprobs, out.entropy)
    for b in range(5):
        with torch.no_grad():
            logits, values = model(ids[b:b + 1], attn[b:b + 1], 4)
            ref_logits, _ = ref(ids[b:b + 1], attn[b:b + 1], 4)
        p = torch.softmax(logits / 0.7, -1)
        expected = (reft.logprobs_of(logits, responses[b:b + 1], 0.7), values,
                    reft.logprobs_of(ref_logits, responses[b:b + 1], 0.7), -(p * p.log()).sum(-1))
        for got, want in zip(out, expected):
            torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


def test_a_question_gets_other_random_streams_at_each_step():
    """A question drawn again at a later step (the next epoch, or a resumed run's later step) must get new samples:
    its seeds at two steps differ for every sample, no two rows of either step share one, a question's seeds do not
    depend on the other questions of its batch (or rank), and sampling with them draws other responses at the other
    step and the same ones again at the same step (what a resumed run repeats)."""
    qids, k = [3, 5, 8], 4
    seeds = {step: reft.rollout_seeds(7, step, qids, k) for step in (1, 2)}
    assert len(set(seeds[1] + seeds[2])) == 2 * len(qids) * k
    for step in (1, 2):
        for i, q in enumerate(qids):
            assert reft.rollout_seeds(7, step, [q], k) == seeds[step][i * k:(i + 1) * k]
    lm = tiny_lm(3)
    ids, mask = reft.left_pad([[5, 6, 7]] * len(seeds[1]), 0, "cpu")  # every row the same prompt
    draws = {step: reft.sample(lm, ids, mask, 10, 1, 0, 1.0, seeds[step]) for step in (1, 2)}
    assert torch.equal(reft.sample(lm, ids, mask, 10, 1, 0, 1.0, seeds[1]), draws[1])
    for b in range(len(seeds[1])):
        assert draws[1][b].tolist() != draws[2][b].tolist(), b


def test_rollout_seeds_never_collide_over_a_mathqa_sized_range():
    """Every (step, question, sample) of 3 steps over 30,000 questions × 4 samples (MathQA's training split has
    ~30,000 questions) gets a seed of its own, among them the pair the old mix (seed·p + step)·p + 101·q + s gave one
    seed: step 0, question 9,901, sample 2 and step 1, question 0, sample 0. A sample's seed does not depend on
    --num_samples, and each fits torch.Generator's 64 bits."""
    seeds = [s for step in range(3) for s in reft.rollout_seeds(42, step, range(30_000), 4)]
    assert len(set(seeds)) == len(seeds) == 3 * 30_000 * 4
    assert reft.rollout_seeds(42, 0, [9_901], 3)[2] != reft.rollout_seeds(42, 1, [0], 1)[0]
    assert reft.rollout_seeds(42, 5, [7], 2) == reft.rollout_seeds(42, 5, [7], 8)[:2]
    assert reft.rollout_seeds(43, 5, [7], 2) != reft.rollout_seeds(42, 5, [7], 2)
    torch.Generator().manual_seed(max(seeds))

def sized_checkpoint(path, shards):
    """A checkpoint folder whose safetensors headers declare one uint8 tensor of each size in `shards` (with an index
    over them when there are several, as a 7B model is saved), without writing the data: the files are sparse, so a
    "50 M parameter" checkpoint takes a few KB. Its config allows 4096 positions."""
    path.mkdir()
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                           for i in range(len(shards))]
    for name, n in zip(names, shards):
        header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        with open(path / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            f.truncate(8 + len(header) + n)
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            f"w{i}": name for i, name in enumerate(names)}}))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "max_position_embeddings": 4096}))
    return str(path)


def test_the_paper_recipe_fills_every_automatic_flag_from_50m_parameters(tmp_path):
    """A checkpoint of 50 M parameters or more (counted over its shards, from the headers) is a pretrained model:
    every flag left at -1 that RECIPES covers takes the paper's value in reft.py (its KL coefficient per CoT kind)
    and rerank.py (sized by --init when given, the model the verifier starts from), and evaluate.py's budget is
    rerank.py's paper one; one parameter fewer is the tiny model and takes the small recipe. A flag given keeps its
    value."""
    import evaluate
    import rerank
    big = sized_checkpoint(tmp_path / "big", [25_000_000, 25_000_000])
    small = sized_checkpoint(tmp_path / "small", [49_999_999])
    cases = [(reft, {"model": big}, "paper"), (reft, {"model": small}, "small"), (rerank, {"model": big}, "paper"),
             (rerank, {"model": small, "init": big}, "paper"), (rerank, {"model": big, "init": small}, "small")]
    for stage, checkpoints, recipe in cases:
        for cot in ("nl", "python"):
            args = stage.Args(cot=cot, **checkpoints)
            assert all(getattr(args, flag) == -1 for flag in stage.RECIPES[recipe])
            said = stage.fill_recipe(args)
            assert said.startswith(f"{recipe} (50.0 M parameters): "), said
            for flag, value in stage.RECIPES[recipe].items():
                assert getattr(args, flag) == (value[cot] if isinstance(value, dict) else value), (stage, flag)
    args = reft.Args(model=big, cot="nl", lr=1e-5)
    reft.fill_recipe(args)
    assert args.lr == 1e-5 and args.kl_coef == reft.RECIPES["paper"]["kl_coef"]["nl"]
    for model, recipe in ((big, "paper"), (small, "small")):
        args = evaluate.Args(model=model, output_dir=str(tmp_path / "eval"))
        evaluate.check_args(args)
        assert args.max_new_tokens == rerank.RECIPES[recipe]["max_new_tokens"]
