"""Shared fixtures, built once per session: a small prepared minigsm folder, a tiny SFT warm-up checkpoint and a
tiny Llama-style SentencePiece tokenizer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PY = sys.executable

sys.path.insert(0, str(ROOT))
import reward  # noqa: E402


def run(args, check=True, timeout=900, env=None, cwd=ROOT, **kw):
    """Run a command from the repo root (or `cwd`); on failure show its output in the assertion message."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e, **kw)
    if check:
        assert p.returncode == 0, f"{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def torchrun(n, script, *args, **kw):
    return run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *args], **kw)


def main_error(module, argv):
    """The SystemExit message of `module.main` on `argv`, run in this process: bad input is refused before any
    training, so a stage's whole bad-input table costs model loads instead of a Python start per case. SystemExit
    with a message is what the command line prints as its one line, exiting 1 (test_bad_input_on_the_command_line
    in each stage's tests checks one case there). The process group main() made is destroyed."""
    import torch.distributed as dist
    try:
        with pytest.raises(SystemExit) as e:
            module.main(module.parse_args(module.Args, [str(a) for a in argv]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return str(e.value)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def minigsm(tmp_path_factory):
    """A prepared minigsm folder (small splits, the easy end: 1-2 steps, numbers up to 9) that every stage takes
    as --data; easy so that the short warm-up below already solves some questions and PPO has a signal."""
    out = tmp_path_factory.mktemp("minigsm")
    run([PY, "data/minigsm/prepare.py", "--out_dir", out, "--n_train", 256, "--n_validation", 64, "--n_test", 64,
         "--min_steps", 1, "--max_steps", 2, "--max_number", 9])
    return out


@pytest.fixture(scope="session")
def warmup(minigsm, tmp_path_factory):
    """A tiny warm-up checkpoint: sft.py on minigsm long enough that some greedy answers are right. With
    REFT_TEST_CACHE set to a folder (tests/mutants.py does), it is made there once and reused by later sessions."""
    cache = os.environ.get("REFT_TEST_CACHE")
    out = Path(cache) / "warmup" if cache else tmp_path_factory.mktemp("warmup")
    if not (out / "final" / "config.json").is_file():
        run([PY, "sft.py", "--data", minigsm, "--cot", "nl", "--epochs", 12, "--batch_size", 32, "--micro_batch_size",
             32, "--no-eval_every_epoch", "--output_dir", out, "--save_epochs", "none", "--save_steps", 1000])
    return out / "final"


@pytest.fixture(scope="session")
def verifier(warmup, tmp_path_factory):
    """A verifier checkpoint as rerank.py saves it (trunk from the warm-up, untrained head): enough to run rerank."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out = tmp_path_factory.mktemp("verifier")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(warmup)
    model = AutoModelForSequenceClassification.from_pretrained(warmup, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.model_max_length = 256
    tok.save_pretrained(out)
    return out


def train_llama_tokenizer(texts, vocab_size, path):
    """A tokenizer built as transformers builds Llama/CodeLlama's: BPE over "▁"-marked text (a "▁" put before the
    first word of every string, none after a newline), byte fallback for characters outside the vocabulary ("\n"
    among them, as in Llama), digits one by one, <s> put first by the template and <unk>, <s>, </s> at ids 0, 1, 2;
    no pad token (CodeLlama has none). Trained offline on `texts` line by line (so no token spans a newline and none
    a "▁" inside it, as SentencePiece trains), saved with save_pretrained to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    bpe.train_from_iterator((line for text in texts for line in text.split("\n")),
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_tokenizer(minigsm, tmp_path_factory):
    """Folder of a tiny Llama-style SentencePiece tokenizer (train_llama_tokenizer) trained on minigsm's nl and
    python training examples; load it with AutoTokenizer.from_pretrained."""
    texts = [reward.build_prompt(r["question"], cot) + reward.build_target(r, cot)
             for cot in ("nl", "python") for r in reward.load_records(str(minigsm / f"train_{cot}.jsonl"))]
    return train_llama_tokenizer(texts, 1000, tmp_path_factory.mktemp("llama_tokenizer"))
