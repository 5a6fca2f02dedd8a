"""One PPO step of ReFT with real numbers: reft.py's own functions on 2 questions × 2 samples, every per-token tensor
printed in the order Algorithm 1 computes it, each with one line on what it is.

    python scripts/walkthrough.py                        # makes a tiny warm-up first (~1 minute on 2 cores)
    python scripts/walkthrough.py --model runs/sft/final --data minigsm --out docs/walkthrough.md

docs/walkthrough.md is this script's output, linked from reft.py's module docstring. tests/test_walkthrough.py
recomputes the printed quantities from one another (the KL from the log-probs, the shaped rewards from the KL, the
TD errors, advantages and returns from the rewards and values, the clipped losses from the ratios).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import reft  # noqa: E402
import reward  # noqa: E402

COLUMNS = [  # (name, what it is): one line each, printed above the tables
    ("t", "position in the response (the action index)"),
    ("token", "the sampled token a_t"),
    ("mask", "1 on the response up to and including EOS (reft.response_mask), 0 on the padding after it"),
    ("logp_old", "log π_θold(a_t | s_t) from the rollout policy (reft.rollout_forwards)"),
    ("logp_ref", "log π_ref(a_t | s_t) from the frozen warm-up model"),
    ("kl", "log π_θold - log π_ref: the k1 estimate of the per-token KL (reft.kl_shaped_rewards)"),
    ("r", "shaped reward r_t = -β·kl_t, plus the score on the last valid token (the total reward of ReFT, sec. 3)"),
    ("V", "value V(s_t) of the value head on the shared trunk (new: random at the first step)"),
    ("delta", "TD error δ_t = r_t + γ·V(s_{t+1}) - V(s_t), V = 0 past the last token (GAE eq. 11)"),
    ("A", "GAE advantage A_t = δ_t + γλ·A_{t+1} (reft.compute_gae; GAE eq. 16)"),
    ("A_white", "A_t whitened over all valid tokens of the batch (reft.masked_whiten): what the policy loss uses"),
    ("R", "return R_t = A_t + V(s_t): the value head's target"),
    ("ratio", "π_θ(a_t) / π_θold(a_t) after one optimizer step on this batch"),
    ("loss_pg", "clipped surrogate max(-Â·ratio, -Â·clip(ratio, 1-ε, 1+ε)) at that ratio (PPO eq. 7)"),
]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="", help="a warm-up checkpoint; empty: make a tiny one in --work_dir")
    p.add_argument("--data", default="", help="prepared dataset or folder; empty: prepare minigsm in --work_dir")
    p.add_argument("--work_dir", default="runs/walkthrough", help="where the tiny warm-up and its data go")
    p.add_argument("--out", default="", help="also write the output to this file (docs/walkthrough.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (questions: the first two)")
    p.add_argument("--max_new_tokens", type=int, default=40, help="generation budget of each sample")
    p.add_argument("--lr", type=float, default=-1, help="learning rate of the one optimizer step; -1: the recipe's")
    return p.parse_args()


def make_warmup(work):
    """A tiny warm-up as the tests make it: minigsm's easy end, 12 SFT epochs (some greedy answers right)."""
    data, out = work / "data", work / "warmup"
    if not (data / "train_nl.jsonl").is_file():
        subprocess.run([sys.executable, "data/minigsm/prepare.py", "--out_dir", data, "--n_train", "256",
                        "--n_validation", "64", "--n_test", "64", "--min_steps", "1", "--max_steps", "2",
                        "--max_number", "9"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not (out / "final" / "config.json").is_file():
        subprocess.run([sys.executable, "sft.py", "--data", data, "--cot", "nl", "--epochs", "12", "--batch_size", "32",
                        "--save_epochs", "none", "--output_dir", out, "--overwrite"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(out / "final"), str(data)


def table(rows):
    """A markdown table of per-token rows (dicts with the COLUMNS keys)."""
    names = [n for n, _ in COLUMNS]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        lines.append("| " + " | ".join(r[n] if isinstance(r[n], str) else f"{r[n]:.6f}" if isinstance(r[n], float)
                                       else str(r[n]) for n in names) + " |")
    return "\n".join(lines)


def main():
    a = parse()
    torch.manual_seed(a.seed)
    model_path, data = a.model, a.data
    if not model_path:
        model_path, data = make_warmup(ROOT / a.work_dir)
    args = reft.Args(model=model_path, data=data or "minigsm", batch_size=2, num_samples=2, seed=a.seed, lr=a.lr,
                     ppo_epochs=1)
    reft.resolve_cot(args, {"--model": model_path})
    recipe = reft.fill_recipe(args)  # the flags at -1 as `python reft.py` fills them for this model (RECIPES)
    rank, world, device, mesh = reft.init_distributed()
    tok, model, ref = reft.load_models(args, mesh, device)
    beta = args.kl_coef
    records = reward.load_records(args.data, "train", args.cot)[:2]
    qids = [0, 1]
    prompts = [reward.encode_prompt(tok, reward.build_prompt(r["question"], args.cot, sampling=True)) for r in records]
    args.max_length = max(len(p) for p in prompts) + a.max_new_tokens
    out = []
    say = out.append

    with torch.no_grad():  # FSDP2 picks its root at the first forward, as in reft.main: before any manual unshard()
        model(*reft.left_pad(prompts[:1], tok.pad_token_id, device), len(prompts[0]))
    # Step 1 of Algorithm 1: sample a CoT for each (question, sample) from the policy; step 2: score each answer.
    rollout = reft.sample_rollout(model, tok, prompts, qids, 0, args, device)
    rows, responses, mask = rollout.rows, rollout.responses, rollout.mask
    scores, _ = reft.score(tok, reward.compute_rewards, records, rollout, args)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    answers = reward.extract_answers(texts, args.cot, [records[q]["question"] for q in rows])
    # Steps 3-5: old and reference log-probs and values, the KL-shaped rewards, GAE, whitening.
    forwards = reft.rollout_forwards(model, ref, rollout, args.micro_batch_size, args.temperature)
    old_logprobs, old_values = forwards.old_logprobs, forwards.old_values
    rewards, kl = reft.kl_shaped_rewards(scores, old_logprobs, forwards.ref_logprobs, mask, beta)
    advantages, returns = reft.compute_gae(rewards, old_values, mask, args.gamma, args.lam)
    whitened = reft.masked_whiten(advantages, mask)
    next_values = torch.cat([old_values[:, 1:] * mask[:, 1:], torch.zeros_like(old_values[:, :1])], 1)
    deltas = (rewards + args.gamma * next_values - old_values * mask) * mask
    # Step 6: one PPO epoch of one minibatch (the whole batch), one optimizer step; then the new ratio of each token.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-8, weight_decay=0.0)
    stats, _, _ = reft.ppo_update(model, opt, rollout, forwards, whitened, returns, beta, len(rows), 0, args)
    pg, vf = stats["pg_loss"][0], stats["vf_loss"][0]
    with torch.no_grad():
        new_logprobs = reft.logprobs_of(model(rollout.input_ids, rollout.attn, rollout.P)[0], responses,
                                        args.temperature)
    ratio = torch.exp(new_logprobs - old_logprobs)
    clipped = ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
    loss_pg = torch.max(-whitened * ratio, -whitened * clipped)

    say("# One PPO step of ReFT, with real numbers\n")
    say(f"Made by `python scripts/walkthrough.py` (reft.py's own functions; model `{os.path.relpath(model_path, ROOT)}`"
        f", {args.cot} CoTs, seed {args.seed}). Two training questions, two samples each, β = {beta}, "
        f"γ = {args.gamma}, λ = {args.lam}, ε = {args.clip_range}, vf_coef = {args.vf_coef}, lr = {args.lr:g}: "
        f"the recipe `python reft.py` takes for this model, {recipe} (reft.RECIPES, by the model's size).\n")
    say("The step runs main()'s functions in main()'s order: reft.sample_rollout, reft.score, reft.rollout_forwards, "
        "reft.kl_shaped_rewards, reft.compute_gae and reft.masked_whiten (what reft.estimate_advantages does with "
        "--advantage gae), reft.ppo_update. The columns, in the order Algorithm 1 computes them:\n")
    say("\n".join(f"- `{n}`: {d}" for n, d in COLUMNS) + "\n")
    say("Why `kl` is 0 and `r` is -0.000000 (that is -β × 0) on every token but the last: this is the first step, "
        "when the policy is still the reference (both are the warm-up checkpoint), so `logp_old` equals `logp_ref`. "
        "The KL penalty grows only as PPO moves the policy away from the warm-up model. The last valid token, the one "
        "that emits EOS, carries the score.\n")
    say("Why `V` looks like noise: the value head Linear(hidden, 1) is new, initialised at random on top of the "
        "warm-up model's trunk (the SFT stage trains no value head). Its values are not yet estimates of the return, "
        "so at first the advantages measure mostly their errors; the value loss fits V to the returns `R` as "
        "training goes on." + (" With γ = λ = 1, as here, A_t = R_t - V(s_t), and R_t is the sum of the rewards from "
                               "t on: at this first step, the score." if args.gamma == args.lam == 1.0 else "") + "\n")
    say(f"The first minibatch's ratio is exactly 1 (the old log-probs come from the same forward): its loss is "
        f"{pg + args.vf_coef * vf:.6f} (policy {pg:.6f} + {args.vf_coef} × value {vf:.6f}). "
        f"After that one step the ratio moves; a second PPO epoch would take the `loss_pg` column.\n")
    for b, q in enumerate(rows):
        n = int(mask[b].sum())  # the response up to EOS, then one padding position if there is one
        say(f"## Question {q + 1}, sample {b % 2 + 1}\n")
        say(f"Question: {records[q]['question']!r}  \nGold answer: {records[q]['answer_value']}  \n"
            f"Sampled CoT: {texts[b]!r}  \nExtracted answer: {answers[b]}  \nscore: {scores[b].item():g}  \n"
            f"Response tokens up to EOS: {n}\n")
        per_token = []
        for t in range(min(n + 1, responses.size(1))):
            per_token.append({
                "t": t, "token": repr(tok.decode([int(responses[b, t])])).replace("|", "\\|"),
                "mask": int(mask[b, t]), "logp_old": old_logprobs[b, t].item(),
                "logp_ref": forwards.ref_logprobs[b, t].item(),
                "kl": kl[b, t].item(), "r": rewards[b, t].item(), "V": old_values[b, t].item(),
                "delta": deltas[b, t].item(), "A": advantages[b, t].item(), "A_white": whitened[b, t].item(),
                "R": returns[b, t].item(), "ratio": ratio[b, t].item(), "loss_pg": loss_pg[b, t].item()})
        say(table(per_token) + "\n")
    text = "\n".join(out)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
