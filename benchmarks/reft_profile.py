"""Where the time goes in one reft.py PPO step (batch 32, `tiny`), and reft.sample's rate against HF generate.

    python benchmarks/reft_profile.py                  # 1 warm-up + 5 timed steps, 7 generation pairs
    python benchmarks/reft_profile.py --steps 2 --pairs 2

Part 1 replays reft.main's step with reft's own functions (load_models, shard on a 1-process group,
gathered_for_generation, sample, response_mask, reward.compute_rewards, logprobs_of, kl_shaped_rewards,
compute_gae, masked_whiten, policy_loss, value_loss, the same AdamW and clipping) and a timer around each phase.
It covers the case of one process with minibatch = micro-batch = the whole batch (reft.py's defaults), so each
PPO epoch is one forward, one backward and one optimizer step. The rollout is a fixed --response_length tokens
(--max_length = prompt length + response_length; the near-random policy never ends all rows early, checked).

Part 2 times reft.sample (per-row inverse-CDF sampling, preallocated KV cache), eager and with reft.py --compile's
decode step (its compile timed once first: compile_s), against `model.generate(do_sample=True, top_k=0, top_p=1.0)`
on the same plain LlamaForCausalLM, the same 32 prompts and --response_length new tokens, interleaved so load
drifts hit all three. The figures are each sampler's rate relative to generate's, best time against best time (min
is the least load-sensitive estimate of each one's own cost; the median of the per-pair ratios is reported too for
the eager one). Target >= 0.95.
"""
import argparse
import collections
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_checkpoint, median, same_length_prompts, write_json  # noqa: E402

import reft  # noqa: E402  (common put the repo root on sys.path)
import reward  # noqa: E402

PHASES = ["generation", "scoring", "old policy/value forward", "reference forward", "rewards + GAE + whiten",
          "PPO policy/value forward", "PPO losses", "PPO backward", "PPO optimizer (clip + AdamW)", "PPO stats"]


class Timer:
    def __init__(self):
        self.total = collections.defaultdict(float)

    @contextmanager
    def __call__(self, name):
        t = time.perf_counter()
        yield
        self.total[name] += time.perf_counter() - t


def ppo_step(model, ref, opt, tok, prompts, records, qids, step, a, tm, device):
    """reft.main's steps 1-6 for one batch on one process, with a timer per phase."""
    T = a.temperature
    model.eval()
    with tm("generation"):
        prompt_ids, prompt_mask = reft.left_pad([prompts[q] for q in qids], tok.pad_token_id, device)  # (B, P)
        P = prompt_ids.size(1)
        with reft.gathered_for_generation(model):
            responses = reft.sample(model.lm, prompt_ids, prompt_mask, a.max_length - P, tok.eos_token_id,
                                    tok.pad_token_id, T, reft.rollout_seeds(a.seed, step, qids, 1))  # (B, R)
        mask = reft.response_mask(responses, tok.eos_token_id)
        responses = torch.where(mask.bool(), responses, tok.pad_token_id)
    with tm("scoring"):
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        scores = torch.tensor(reward.compute_rewards(texts, [records[q]["answer_value"] for q in qids], a.cot,
                                                     [records[q]["question"] for q in qids], a.partial_reward))
    input_ids = torch.cat([prompt_ids, responses], 1)
    attn = torch.cat([prompt_mask, mask.long()], 1)
    with torch.no_grad():
        with tm("old policy/value forward"):
            logits, old_values = model(input_ids, attn, P)
            old_logprobs = reft.logprobs_of(logits, responses, T)
            logp = torch.log_softmax(logits.float() / T, -1)
            entropy = -(logp.exp() * logp).sum(-1)
        with tm("reference forward"):
            ref_logits, _ = ref(input_ids, attn, P)
            ref_logprobs = reft.logprobs_of(ref_logits, responses, T)
    with tm("rewards + GAE + whiten"):
        rewards, kl = reft.kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, 0.05)
        advantages, returns = reft.compute_gae(rewards, old_values, mask, a.gamma, a.lam)
        advantages = reft.masked_whiten(advantages, mask)
    model.train()
    for e in range(a.ppo_epochs):
        idx = torch.randperm(len(qids), generator=torch.Generator().manual_seed(a.seed + step * 1000 + e))
        with tm("PPO policy/value forward"):
            logits, values = model(input_ids[idx], attn[idx], P)
        with tm("PPO losses"):
            logprobs = reft.logprobs_of(logits, responses[idx], T)
            pg, pg_clip, approx_kl = reft.policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx],
                                                      a.clip_range)
            vf, vf_clip = reft.value_loss(values, old_values[idx], returns[idx], mask[idx], a.clip_range_value)
            loss = (pg + a.vf_coef * vf).sum() / len(qids)
        with tm("PPO backward"):
            model.set_requires_gradient_sync(True)
            loss.backward()
        with tm("PPO stats"):
            for v in (pg.mean(), vf.mean(), pg_clip, vf_clip, approx_kl,
                      reft.masked_mean(torch.exp(logprobs - old_logprobs[idx]), mask[idx])):
                v.item()
        with tm("PPO optimizer (clip + AdamW)"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if torch.isfinite(grad_norm):
                opt.step()
            opt.zero_grad(set_to_none=True)
    return responses.size(1), bool((responses == tok.eos_token_id).any(1).all())


def profile_steps(ckpt, prompt_file, L, args):
    a = reft.Args(model=str(ckpt), data=str(prompt_file), cot="nl", max_length=L + args.response_length,
                  max_prompt_length=L, batch_size=args.batch_size, ppo_epochs=args.ppo_epochs, num_samples=1, lr=5e-5,
                  kl_coef=0.05, vf_coef=5.0, lam=0.95)  # as ppo_vs_trl.py's reft.py runs
    rank, world, device, mesh = reft.init_distributed()
    tok, model, ref = reft.load_models(a, mesh, device)
    records = reward.load_records(a.data, "train", a.cot)
    prompts = [tok(reward.build_prompt(r["question"], a.cot, sampling=True), add_special_tokens=False).input_ids
               for r in records]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, eps=1e-8, weight_decay=0.0)
    with torch.no_grad():
        model(*reft.left_pad(prompts[:1], tok.pad_token_id, device), len(prompts[0]))
    per_step = []
    for step in range(args.warmup + args.steps):
        qids = torch.randperm(len(records), generator=torch.Generator().manual_seed(step))[:a.batch_size].tolist()
        tm = Timer()
        t = time.perf_counter()
        R, all_ended = ppo_step(model, ref, opt, tok, prompts, records, qids, step, a, tm, device)
        tm.total["step (wall)"] = time.perf_counter() - t
        if R != args.response_length or all_ended:
            raise SystemExit(f"error: step {step} sampled {R} tokens, not {args.response_length}")
        if step >= args.warmup:
            per_step.append(tm.total)
    phases = {k: median([s[k] for s in per_step]) for k in PHASES + ["step (wall)"]}
    return phases


def generation_rate(ckpt, prompt_file, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    lm = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    records = reward.load_records(str(prompt_file))[:args.batch_size]
    ids, mask = reft.left_pad([tok(reward.build_prompt(r["question"], "nl", sampling=True),
                                   add_special_tokens=False).input_ids for r in records], tok.pad_token_id, "cpu")
    R = args.response_length

    def run_sample(seed, compiled=False):
        return reft.sample(lm, ids, mask, R, tok.eos_token_id, tok.pad_token_id, 1.0,
                           [seed * 1000 + b for b in range(len(ids))], compiled)

    def run_compiled(seed):
        return run_sample(seed, compiled=True)

    def run_generate(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, max_new_tokens=R, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
        return out[:, ids.size(1):]

    t = time.perf_counter()
    run_compiled(0)  # reft.py --compile's first rollout: the compile, then the rollout
    compile_s = time.perf_counter() - t
    run_sample(0), run_generate(0)  # warm-up
    t_sample, t_compiled, t_generate = [], [], []
    same = []
    for k in range(args.pairs):
        outs = []
        for fn, times in ((run_sample, t_sample), (run_compiled, t_compiled), (run_generate, t_generate)):
            t = time.perf_counter()
            outs.append(fn(k + 1))
            times.append(time.perf_counter() - t)
            if outs[-1].size(1) != R:
                raise SystemExit(f"error: {fn.__name__} made {outs[-1].size(1)} tokens, not {R}")
        same.append(float((outs[0] == outs[1]).float().mean()))
    tokens = len(ids) * R
    return {"batch": len(ids), "new_tokens": R, "sample_s": min(t_sample), "generate_s": min(t_generate),
            "sample_tok_per_s": tokens / min(t_sample), "generate_tok_per_s": tokens / min(t_generate),
            "rate_ratio": min(t_generate) / min(t_sample),
            "rate_ratio_median_of_pairs": median([g / s for g, s in zip(t_generate, t_sample)]),
            "sample_compiled_s": min(t_compiled), "sample_compiled_tok_per_s": tokens / min(t_compiled),
            "compiled_rate_ratio": min(t_generate) / min(t_compiled),
            "compiled_vs_eager": min(t_sample) / min(t_compiled), "compile_s": compile_s,
            "compiled_same_tokens": min(same),
            "sample_s_all": t_sample, "sample_compiled_s_all": t_compiled, "generate_s_all": t_generate}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=5, help="timed PPO steps (median per phase)")
    p.add_argument("--warmup", type=int, default=1, help="PPO steps run first and not timed")
    p.add_argument("--pairs", type=int, default=7, help="interleaved sample/generate timings")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per PPO step and per generation timing")
    p.add_argument("--response_length", type=int, default=32, help="tokens sampled per prompt")
    p.add_argument("--ppo_epochs", type=int, default=2, help="PPO passes over each batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", help="write the figures to this JSON file (None: print only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = ensure_checkpoint()
    prompt_file, L = same_length_prompts(ckpt)

    phases = profile_steps(ckpt, prompt_file, L, args)
    wall = phases["step (wall)"]
    print(f"one reft.py PPO step, batch {args.batch_size}, prompt {L} + response {args.response_length} tokens, "
          f"{args.ppo_epochs} PPO epochs ({args.threads} threads), median of {args.steps}:")
    for k in PHASES:
        print(f"  {k:32s} {phases[k]:7.3f} s  {100 * phases[k] / wall:5.1f}%")
    print(f"  {'sum of phases':32s} {sum(phases[k] for k in PHASES):7.3f} s   step wall {wall:.3f} s")

    gen = generation_rate(ckpt, prompt_file, args)
    print(f"generation, batch {gen['batch']} x {gen['new_tokens']} new tokens, best of {args.pairs}: reft.sample "
          f"{gen['sample_tok_per_s']:.0f} tok/s, HF generate {gen['generate_tok_per_s']:.0f} tok/s; sample/generate "
          f"rate {gen['rate_ratio']:.2f} (median of pairs {gen['rate_ratio_median_of_pairs']:.2f}; target >= 0.95)")
    print(f"  reft.sample with --compile's decode step {gen['sample_compiled_tok_per_s']:.0f} tok/s: "
          f"{gen['compiled_rate_ratio']:.2f} x generate's rate, {gen['compiled_vs_eager']:.2f} x the eager sampler's; "
          f"compile {gen['compile_s']:.1f} s (once per process); same tokens {gen['compiled_same_tokens']:.2%}")
    write_json(args.json, {"setting": {"prompt_tokens": L, **vars(args)}, "phases_s": phases, "generation": gen})


if __name__ == "__main__":
    main()
