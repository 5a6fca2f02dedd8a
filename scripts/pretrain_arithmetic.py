"""An experiment, not a pipeline stage: teach the `tiny` model arithmetic before SFT, standing in for what a
pretrained model already knows. docs/experiments.md ("What was tried") reports what it did to SFT and ReFT on minigsm.

    python scripts/pretrain_arithmetic.py --data D --output_dir D/pretrained     # ~6 minutes on 2 cores
    python sft.py --model D/pretrained --data D --epochs 40 --eval_every_epoch --max_new_tokens 48 --output_dir ...

The model and its tokenizer are built exactly as `sft.py --model tiny --data D --seed S` builds them (the tokenizer
from D's training texts), then trained with a plain LM loss on random chains of CoT lines, without words:

    14 + 10 = 24
    24 - 3 = 21
    21 * 2 = 42

Counts run 0..40 and step numbers 1..10, the range of minigsm's numbers <= 10. At the end it prints greedy
accuracy on the last line of 200 fresh chains.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reward  # noqa: E402
import sft  # noqa: E402


def chain(rng):
    """1-4 CoT lines: +n (n <= 10), -n (n <= count), or *2 (count <= 20), from a random count 0..40."""
    count, lines = rng.randint(0, 40), []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.15 and count <= 20:
            lines.append(f"{count} * 2 = {2 * count}")
            count *= 2
        elif r < 0.55 or count == 0:
            n = rng.randint(1, 10)
            lines.append(f"{count} + {n} = {count + n}")
            count += n
        else:
            n = rng.randint(1, min(count, 10))
            lines.append(f"{count} - {n} = {count - n}")
            count -= n
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", required=True, help="the minigsm folder whose training texts build the tokenizer")
    p.add_argument("--output_dir", required=True, help="where the pretrained model and its tokenizer are saved")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=64, help="random CoT chains per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr: 5%% linear warm-up, then linear decay to 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the tokenizer and the chains")
    args = p.parse_args(argv)
    records = reward.load_records(args.data, "train", "nl", require_cot=True)
    texts = [reward.build_prompt(r["question"], "nl") + reward.build_target(r, "nl") for r in records]
    tiny = sft.Args(model="tiny", seed=args.seed)
    tok = sft.load_tokenizer(tiny, texts)
    model = sft.tiny_model(tiny, tok)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = 0.05 * args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * max(0.0, 1 - s / args.steps))
    t0, n_tok = time.time(), 0
    bar = tqdm(range(args.steps), desc="pretrain")
    for _ in bar:
        seqs = [tok(chain(rng), add_special_tokens=False).input_ids + [tok.eos_token_id]
                for _ in range(args.batch_size)]
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), tok.pad_token_id)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        n_tok += int(mask.sum())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{n_tok / (time.time() - t0):.0f}")
    model.save_pretrained(args.output_dir)
    tok.save_pretrained(args.output_dir)
    model.eval()
    right = 0
    with torch.no_grad():
        for _ in range(200):
            lhs, rhs = chain(rng).split("\n")[-1].split(" = ")
            prompt = tok(lhs + " =", add_special_tokens=False).input_ids
            out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            right += tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip().split("\n")[0] == rhs
    print(f"pretrained model in {args.output_dir}; greedy right on {right} of 200 fresh equations")


if __name__ == "__main__":
    main()
