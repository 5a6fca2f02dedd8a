"""Prompt format, answer extraction and rewards for ReFT, with a sandbox for model-written programs.

    python reward.py --data ../shared/data/mwp_reft/svamp_python_sdp.json --cot python   # gold CoTs must score
    python reward.py --data minigsm --split test --cot nl --limit 100                    # a prepared dataset

Format (the paper's code): prompt "Question:\\n{q}\\nAnswer reasoning:\\n"; the target is the CoT, then EOS.
  nl      "{answer_cot}\\nTherefore, the answer is: {answer_value}"
  python  the program 'def solution():\\n    \"\"\"{q}\"\"\"\\n    ...\\n    return result'. For rollouts and
          evaluation the prompt ends with that header up to the closing quotes (not the newline after them: see
          program_header) and the model writes the body: extract_answer rebuilds the header from `question`
          when the completion does not start with "def solution".
Tokens    BOS first where the tokenizer puts one, no template EOS inside a prompt, and an SFT example tokenized as
          one string so that its rollout prompt's ids are a prefix of it: every stage tokenizes through
          encode_prompt and encode_sft_example.
Extraction
  nl      the text after the LAST "Therefore, the answer is:" (leading newline optional; blanks and newlines
          after the colon skipped) up to the end of that line. No trigger -> None.
  python  the program from the first "def solution" line up to the first blank line (as the paper's code does)
          is run with `math` and `sympy` pre-imported; the answer is solution()'s value: a number (int, float,
          bool, Fraction, Decimal, sympy number; True -> 1.0) -> float, a str -> parsed like nl text, anything
          else (list, dict, None, symbolic expression, nan/inf), an exception or a timeout -> None.
  numbers parse when the whole answer is one number: optional sign (- + or U+2212) and "$", digits with
          optional thousands commas ("1,234" but not "12,34"), decimals or exponent, an optional fraction
          "a/b" (-> a/b), an optional "%" (dropped: "25%" -> 25.0), optional "<...>" around it, trailing ".".
          Anything else ("5 apples", "3 + 4", "five", "True") -> None.
  MathQA  (the question's last line holds the options "a ) 38 , b ) 27.675 , ..."): a letter ("c", "C", "(c)",
          "c )", "c ) 30", "c.") is taken as-is; a number maps to the option whose value is within 1e-2 (the
          closest); an option's exact text maps to it; otherwise None. Without options in the question a lone
          letter a-e is still returned as a letter.
Comparison  numbers are equal when |pred - gold| <= 1e-2 (+1e-9 float slack, so 1.01 == 1); a gold that is one
          letter a-e (quotes and case ignored) needs that letter.
Reward    1.0 correct; PARTIAL_REWARD (0.1) when a number was extracted but is wrong, for numeric gold only (on
          multiple choice any letter would earn it); else 0.0 (nothing extracted, or a letter for numeric gold).
Paper     compute_rewards(..., scoring="paper") and extract_answers_paper/paper_correct follow the paper code
          instead, exactly: float() of the text after the last "\nTherefore, the answer is: " (None when it fails:
          "1,234", "$18", a missing trigger), MathQA letters compared as written, 0.1 for any wrong prediction that
          is not None (on MathQA every wrong answer). evaluate.py --scoring paper uses them.

Sandbox. A pool of worker processes (start_pool(workers), default usable CPUs / LOCAL_WORLD_SIZE), each started as
`python -I reward.py --worker` (fork+exec: the trainer is never forked, and unlike multiprocessing's spawn the
trainer's __main__ with torch is not re-imported). Messages are JSON lines, never pickle. A worker is a supervisor
that never runs model code: after importing what programs may use it points fds 0-2 at /dev/null, drops root to
uid/gid 65534 and sets rlimits (1 GiB address space, no file growth, few fds). For each batch it forks a child
that closes the channel to the trainer, sets RLIMIT_NPROC=0 (no processes or threads) and CPU time, installs an
audit hook refusing every event outside an allow-list (file opens, sockets, subprocess/exec/fork/kill, ctypes, gc
and frame access, imports outside ALLOWED_IMPORTS, more audit hooks, ...), then runs the programs one by one,
each with fresh globals, a copy of a restricted builtins (no open/exec/eval/compile/input/globals/...), an import
limited to ALLOWED_IMPORTS that hands out copies of modules, and a stdout that stops it after 1 MiB. A result
carries a random per-program token the program cannot read, so it cannot forge another's result. The supervisor
kills the child when a program outlives its timeout, dies or garbles the channel, scores it None and goes on in
a new child; the child itself hands over to a new one after a program changed builtins, a pre-imported module,
one of their classes or a function's code. The trainer kills a worker silent for timeout + 0.5 s and starts
another. Known limit: a change to sympy's classes or submodules survives until the end of its batch (<= 32
programs), where it can only change those programs' scores.
"""
import argparse
import atexit
import collections
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

INSTRUCTION = "Question:\n"
COT_TRIGGER = "\nAnswer reasoning:\n"
ANSWER_TRIGGER = "\nTherefore, the answer is: "
COTS = ("nl", "python")
SCORINGS = ("lenient", "paper")  # compute_rewards: this project's rules, or the paper code's
TOLERANCE = 1e-2
PARTIAL_REWARD = 0.1
ALLOWED_IMPORTS = ("math", "fractions", "decimal", "datetime", "statistics", "itertools", "functools",
                   "collections", "sympy")
MAX_PROGRAM_CHARS = 20_000  # longer programs are not run (None)
MAX_ANSWER_CHARS = 200  # a str returned by a program is cut to this
MAX_OUTPUT_CHARS = 1 << 20  # a program that prints more is stopped
BATCH = 32  # programs per message to a worker (and per child process)
GRACE = 0.5  # seconds the trainer waits past the timeout before it kills a silent worker
STARTUP_TIMEOUT = 60.0
GOLD_TIMEOUT = 20.0  # seconds per gold program in gold_failures (see there)

_TRIGGER = ANSWER_TRIGGER.strip()
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_NUMBER = re.compile(rf"([-+]?)\$?\s*({_NUM})(?:\s*/\s*({_NUM}))?\s*%?")
_LETTER = re.compile(r"\(?([a-e])\s*(?:\)(?:\s+.*)?|\.)?")
_OPTION = re.compile(r"(?:^|,)\s*([a-e])\s*\)\s*(.*?)\s*(?=,\s*[a-e]\s*\)|$)")


# ---------------------------------------------------------------- format
def _check_cot(cot):
    if cot not in COTS:
        raise ValueError(f"cot must be one of {COTS}, got {cot!r}")


def program_header(question):
    """The rollout prompt's end for python CoTs. It stops before the newline: byte-level BPE tokenizers merge
    "\n" with the next line's indent into one token, so a prompt ending in "\n" would start the body on a token
    boundary that SFT never trained (the body then comes out as noise)."""
    return f'def solution():\n    """{question.strip()}"""'


def build_prompt(question, cot, sampling=False):
    """The model input. sampling=True gives the prompt every generation starts from (rollouts, sampling,
    evaluation): for the python CoT it ends with the program header, whose tokens SFT trained as target."""
    _check_cot(cot)
    prompt = f"{INSTRUCTION}{question.strip()}{COT_TRIGGER}"
    return prompt + program_header(question) if cot == "python" and sampling else prompt


def build_target(record, cot):
    """The SFT target without EOS."""
    _check_cot(cot)
    if cot == "python":
        return record["answer_cot"].strip()
    return f"{record['answer_cot'].strip()}{ANSWER_TRIGGER}{record['answer_value']}"


# ---------------------------------------------------------------- tokenization (every stage, one rule)
def bos_ids(tok):
    """[BOS] when the tokenizer's own template starts a sequence with it, else []: a model was trained as its
    tokenizer encodes. Llama/CodeLlama SentencePiece tokenizers put <s> there; GPT-2-style byte BPEs such as
    SmolLM2's, and the tiny tokenizer, put nothing and so keep exactly the ids they had without special tokens."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok("a").input_ids[:1] == [bos] else []


def encode_prompt(tok, text):
    """Token ids of a sequence that starts with `text`, as every stage feeds it to a model (rollout, sampling and
    evaluation prompts, verifier inputs): BOS where the tokenizer puts one, then `text` tokenized as one string,
    then nothing. The template itself is not used: some append an EOS, which would tell the model the text is over."""
    return bos_ids(tok) + tok(text, add_special_tokens=False).input_ids


def encode_sft_example(tok, prompt, target):
    """(ids, n_prompt): encode_prompt of `prompt + target` (the caller appends EOS), and how many of its first ids
    are encode_prompt(prompt), the ids that carry no loss.

    One string, not prompt and target tokenized apart: a SentencePiece tokenizer marks the start of every string
    with "▁", so a target tokenized alone would start with "▁def" where the python rollout prompt, which ends with
    the program header (the target's first line), has "def". As one string, the rollout prompt's ids are a prefix of
    the example's. The prompt ends with a newline, which neither byte-level BPEs nor Llama's SentencePiece merge
    with what follows, so its ids are a prefix too and byte-level BPEs give the ids of tokenizing apart. A tokenizer
    that merges across it raises ValueError: the loss would start inside a token that no rollout prompt ends with."""
    ids, prompt_ids = encode_prompt(tok, prompt + target), encode_prompt(tok, prompt)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the tokenizer merges the prompt's end with the target's start: {prompt[-20:]!r} + "
                         f"{target[:20]!r}")
    return ids, len(prompt_ids)


# ---------------------------------------------------------------- parsing and comparison
def parse_number(text):
    """The number the whole of `text` states (rules in the module docstring), else None."""
    s = str(text).strip().replace("\u2212", "-").rstrip(".").strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    if s.startswith("$") and s[1:2] in ("-", "+"):  # "$-5" -> "-5"
        s = s[1:]
    m = _NUMBER.fullmatch(s)
    if not m:
        return None
    value = float(m.group(2).replace(",", ""))
    if m.group(3) is not None:
        denominator = float(m.group(3).replace(",", ""))
        value = value / denominator if denominator else math.inf
    value = -value if m.group(1) == "-" else value
    return value if math.isfinite(value) else None


def parse_letter(text):
    """'c', 'C', '(c)', 'c )', 'c ) 30', 'c.' -> 'c'; else None."""
    m = _LETTER.fullmatch(str(text).strip().lower().replace('"', "").replace("'", ""))
    return m.group(1) if m else None


def parse_options(question):
    """{'a': '38', 'b': '27.675', ...} from a MathQA question's last line ("a ) 38 , b ) 27.675 , ..." or the
    same as a Python list "['a ) 38', 'b ) 27.675', ...]"), or {} when it has no options."""
    line = re.sub(r"[\[\]'\"]", "", (question or "").strip().split("\n")[-1])
    if not re.match(r"\s*a\s*\)", line):
        return {}
    return {k: re.sub(rf"^{k}\s*\)\s*", "", text) for k, text in _OPTION.findall(line)}  # also "a ) a ) 2"


def _option_value(text):
    """An option's number, when it is one number among words: '27.675', '$ 1,354', '15 / 8 ohms' (1.875),
    '7 1 / 2' (7.5), 'rs . 1200', '288 cm 2', '36 km / hr', '− 60'; else None ('2 : 3', '9 / π', 'none')."""
    text = re.sub(r"(?<=[a-z])\s*\^?\s*[23]\b", "", text.replace("\u2212", "-"))  # unit powers: cm 2, m ^ 3
    text = re.sub(r"(?<=[a-z]) / (?=[a-z])", " per ", text)  # km / hr
    mixed = re.fullmatch(r"(\d+) (\d+) / ([1-9]\d*)[a-z .%\u00b0]*", text)
    if mixed:
        return int(mixed[1]) + int(mixed[2]) / int(mixed[3])
    for m in _NUMBER.finditer(text):
        if re.fullmatch(r"[a-z .$%\u00b0=]*", text[:m.start()] + text[m.end():]):
            return parse_number(m[0])
    return None


def _interpret(raw, question):
    """A raw answer (the text after the trigger, or a program's result) -> float, letter or None."""
    if raw is None:
        return None
    value = raw if isinstance(raw, float) else parse_number(raw)
    letter = None if isinstance(raw, float) else parse_letter(raw)
    options = parse_options(question)
    if not options:
        return value if value is not None else letter
    if letter in options:
        return letter
    if value is not None:
        close = [(abs(v - value), k) for k, v in ((k, _option_value(t)) for k, t in options.items())
                 if v is not None and abs(v - value) <= TOLERANCE + 1e-9]
        return min(close)[1] if close else None
    return next((k for k, t in options.items() if t.lower() == str(raw).strip().lower()), None)


def _gold(gold):
    """A gold answer_value -> float or letter (the paper strips commas, and quotes for MathQA)."""
    if gold is None or isinstance(gold, (int, float)):
        return None if gold is None else float(gold)
    s = str(gold).strip().lower().replace('"', "").replace("'", "")
    return s if re.fullmatch(r"[a-e]", s) else parse_number(s)


def answers_equal(pred, gold):
    """True when a prediction (float, letter or text) matches a gold answer_value."""
    gold = _gold(gold)
    if pred is None or gold is None:
        return False
    if isinstance(gold, str):
        return isinstance(pred, str) and parse_letter(pred) == gold
    value = float(pred) if isinstance(pred, (int, float)) else parse_number(pred)
    return value is not None and abs(value - gold) <= TOLERANCE + 1e-9


def extract_program(completion, question=None):
    """The program to run: from the first 'def solution' line to the first blank line. A completion that does
    not start with 'def solution' is a body written after the rollout prompt's header: the header is rebuilt
    from `question` (without a question, only when no line starts with 'def solution')."""
    if not completion.lstrip("\n").startswith("def solution"):
        if question is not None:
            completion = program_header(question) + "\n" + completion.lstrip("\n")
        elif not re.search(r"^def solution", completion, re.M):
            completion = "def solution():\n" + completion.lstrip("\n")
    lines = completion.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("def solution")), 0)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def extract_answers(completions, cot, questions=None, timeout=2.0):
    """extract_answer for a batch; programs run in parallel in the sandbox, `timeout` seconds each."""
    _check_cot(cot)
    questions = [None] * len(completions) if questions is None else list(questions)
    if len(questions) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(questions)} questions")
    if cot == "python":
        raws = run_programs([extract_program(c, q) for c, q in zip(completions, questions)], timeout)
    else:
        raws = [c[c.rfind(_TRIGGER) + len(_TRIGGER):].lstrip().split("\n")[0] if _TRIGGER in c else None
                for c in completions]
    return [_interpret(raw, q) for raw, q in zip(raws, questions)]


def extract_answer(completion, cot, question=None):
    """The predicted answer of one completion (the text after the prompt): float, letter a-e, or None."""
    return extract_answers([completion], cot, [question])[0]


def compute_rewards(completions, gold_answers, cot, questions=None, partial_reward=True, timeout=2.0,
                    scoring="lenient"):
    """Per completion, in order: 1.0 correct, PARTIAL_REWARD for a wrong number (numeric gold), else 0.0.
    scoring="paper": the paper code's rule instead (paper_rewards)."""
    if len(gold_answers) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(gold_answers)} gold answers")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "paper":
        return paper_rewards(completions, gold_answers, cot, questions, partial_reward, timeout)
    return rewards_of_answers(extract_answers(completions, cot, questions, timeout), gold_answers, partial_reward)


def rewards_of_answers(answers, gold_answers, partial_reward=True):
    """compute_rewards of answers already extracted (extract_answers). The stages extract once, to log which
    completions have no answer, and score those same answers: a program does not run twice in the sandbox."""
    if len(gold_answers) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(gold_answers)} gold answers")
    return [1.0 if answers_equal(p, g) else
            PARTIAL_REWARD if partial_reward and isinstance(p, float) and isinstance(_gold(g), float) else 0.0
            for p, g in zip(answers, gold_answers)]


def load_reward(spec):
    """The function that a stage's --reward names as `module:function`: a callable with compute_rewards' signature
    (`reward:compute_rewards` names that one). The module is looked up on sys.path, then in the current directory.
    The stages call this before loading any model, so a bad spec costs one error line and nothing else."""
    import importlib
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise SystemExit(f"error: --reward {spec!r}: expected module:function, such as reward:compute_rewards")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # whatever the user's module raises on import
        raise SystemExit(f"error: --reward {spec}: cannot import {module_name} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"error: --reward {spec}: {getattr(module, '__file__', None) or module_name} has no "
                         f"function {name}")
    return fn


def score_completions(reward_fn, texts, answers, records, cot, partial_reward):
    """The --reward of each completion: texts[i] answers records[i], and answers[i] is its extract_answers.
    This file's own reward scores those answers (rewards_of_answers), so no program runs twice in the sandbox;
    any other function gets the texts."""
    golds = [r["answer_value"] for r in records]
    if reward_fn is compute_rewards:
        return rewards_of_answers(answers, golds, partial_reward)
    scores = [float(s) for s in reward_fn(texts, golds, cot, [r["question"] for r in records],
                                          partial_reward=partial_reward)]
    if len(scores) != len(texts):
        raise SystemExit(f"error: --reward {reward_fn.__module__}:{reward_fn.__qualname__} returned {len(scores)} "
                         f"rewards for {len(texts)} completions")
    return scores


def gold_failures(records, cot):
    """Indices of records whose gold target (build_target) does not score 1.0: the check every prepare.py runs
    before writing a record, and the gold-data tests run on what they wrote.

    Gold programs take microseconds, but once, on a heavily loaded 2-core machine, one of SVAMP's 3,043 failed
    (not reproduced; the 2 s sandbox deadline is the likely cause) and the record was dropped. Trusted data gets
    GOLD_TIMEOUT."""
    scores = compute_rewards([build_target(r, cot) for r in records], [r["answer_value"] for r in records], cot,
                             timeout=GOLD_TIMEOUT)
    return [i for i, s in enumerate(scores) if s != 1.0]


# ---------------------------------------------------------------- the paper code's scoring, exactly
# For numbers that can be set beside the paper's (evaluate.py --scoring paper): its post_process_final_answer_fn_mapper,
# post_process_answer_cot_fn_mapper and compare_answer_fn_mapper (train_rl_reft.py, sampling.py), one function each.
# The dataset kind the paper reads from item_id ("mathqa_12") is read from the gold answer here: a letter a-e is
# MathQA multiple choice, anything else numeric. Programs run in this module's sandbox (restricted builtins and
# imports, a `timeout`; the paper's exec allows everything and waits 10 s) and report a float or a str, so an int
# result reads "30.0" on MathQA where the paper has "30" (wrong either way), and nan/inf results give None where
# the paper keeps them (0.1 partial reward instead of 0).

def _floatify(value):
    """The paper's floatify: float(value), None on any exception ("1,234", "$5", "5 apples", None -> None)."""
    try:
        return float(value)
    except Exception:
        return None


def _paper_mcq_text(value):
    """The paper's MathQA post-processing of an answer: str(), lower-cased, quotes removed, stripped (never None)."""
    return str(value).lower().replace('"', "").replace("'", "").strip()


def paper_gold(gold):
    """The paper code's gold value: a MathQA letter lower-cased without quotes; else float() of it without commas
    (gsm8k, svamp), None where that fails (the paper's code would stop with an exception)."""
    letter = _paper_mcq_text(gold)
    return letter if re.fullmatch(r"[a-e]", letter) else _floatify(str(gold).replace(",", "").strip())


def paper_cot(completion, cot, question=None):
    """The text the paper's code extracts from: its decoded prompt + completion, stripped, after the last
    "\nAnswer reasoning:\n", stripped. The prompt is build_prompt(question, cot, sampling=True), whose python
    header then starts the text, unless the completion writes the header itself (it follows the plain prompt)."""
    _check_cot(cot)
    sampling = not completion.lstrip().startswith("def solution")
    return (build_prompt(question or "", cot, sampling) + completion).strip().split(COT_TRIGGER)[-1].strip()


def paper_program(text):
    """The paper's process_code: "sys.exit" becomes "print", `import math` and `import sympy` go first, then the
    lines of `text` up to the first blank line."""
    lines = ["import math", "import sympy"]
    for line in text.replace("sys.exit", "print").split("\n"):
        if not line.strip():
            break
        lines.append(line)
    return "\n".join(lines)


def extract_answers_paper(completions, cot, gold_answers, questions=None, timeout=2.0):
    """The paper code's prediction per completion. Numeric gold: float() of the text after the last
    "\nTherefore, the answer is: " (the whole CoT when the trigger is missing), or of the program's value; None when
    float() fails. MathQA gold: that text or str(the program's value) lower-cased without quotes, never None (a
    failed program gives "none")."""
    _check_cot(cot)
    questions = [None] * len(completions) if questions is None else list(questions)
    if not len(questions) == len(gold_answers) == len(completions):
        raise ValueError(f"{len(completions)} completions, {len(gold_answers)} gold answers and "
                         f"{len(questions)} questions")
    texts = [paper_cot(c, cot, q) for c, q in zip(completions, questions)]
    if cot == "python":
        raws = run_programs([paper_program(t) for t in texts], timeout)
    else:
        raws = [t.split(ANSWER_TRIGGER)[-1].strip() for t in texts]
    return [_paper_mcq_text(raw) if isinstance(paper_gold(g), str) else _floatify(raw)
            for raw, g in zip(raws, gold_answers)]


def paper_correct(pred, gold):
    """The paper's comparison: |pred - gold| <= 1e-2 for numbers (no float slack: 1.01 against 1 is wrong), the
    same string for a MathQA letter ("(c)" against "c" is wrong); a None prediction is wrong."""
    gold = paper_gold(gold)
    if pred is None or gold is None:
        return False
    if isinstance(gold, str):
        return pred == gold
    return not isinstance(pred, str) and abs(pred - gold) <= TOLERANCE


def paper_rewards(completions, gold_answers, cot, questions=None, partial_reward=True, timeout=2.0):
    """The paper's reward: 1.0 correct, else PARTIAL_REWARD for any prediction that is not None (partial_reward),
    else 0.0. On MathQA no prediction is None, so every wrong answer gets 0.1."""
    preds = extract_answers_paper(completions, cot, gold_answers, questions, timeout)
    return [1.0 if paper_correct(p, g) else PARTIAL_REWARD if partial_reward and p is not None else 0.0
            for p, g in zip(preds, gold_answers)]


# ---------------------------------------------------------------- data
def _read_items(path):
    """[(where, item)] from a .json list or a .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path}: not UTF-8 text")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{e.lineno}: malformed JSON ({e.msg})")
        if not isinstance(items, list):
            raise SystemExit(f"error: {path}: expected a JSON list of records")
        return list(enumerate(items))
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            items += [(f"line {lineno}", json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{lineno}: malformed JSON ({e.msg})")
    return items


def is_data_file(data):
    """Whether --data names one file (.json/.jsonl, or any file that exists) rather than a prepared dataset or folder.
    A file is one split: the training data of a training stage, the evaluated questions of evaluate.py."""
    path = Path(data)
    return not path.is_dir() and (path.suffix in (".json", ".jsonl") or path.is_file())


def _splits(folder, cot):
    """The splits a prepared folder holds for `cot`, as a phrase for an error line."""
    found = sorted(p.name[:-len(f"_{cot}.jsonl")] for p in folder.glob(f"*_{cot}.jsonl"))
    return f"its {cot} splits: {', '.join(found)}" if found else f"it holds no {cot} split"


def _resolve(data, split, cot):
    """The file of `split` (and `cot`) in --data: a prepared dataset name under data/, a prepared folder, or one file.
    A file is its own single split: asking it for another (a validation or test split) is an error, so that no
    evaluation scores the training file under another split's name. split None takes a file as it is."""
    path = Path(data)
    if is_data_file(data):
        if split not in (None, "train"):
            raise SystemExit(f"error: --data {data} is one file, the training data: it has no {split} split (pass a "
                             f"prepared dataset or folder, or the questions to evaluate as a file of their own)")
        if not path.is_file():
            raise SystemExit(f"error: data file not found: {path}")
        return path
    if split is None:
        raise SystemExit(f"error: --data {data} is not a .json/.jsonl file")
    root = Path(__file__).resolve().parent / "data"
    folder = path if path.is_dir() else root / str(data)  # a prepared folder anywhere, e.g. prepare.py --out_dir
    if not folder.is_dir() and os.sep in str(data):
        raise SystemExit(f"error: --data {data}: no such folder or file")
    if (folder / f"{split}_{cot}.jsonl").is_file():
        return folder / f"{split}_{cot}.jsonl"
    if folder.is_dir() and any(folder.glob("*.jsonl")):
        raise SystemExit(f"error: --data {data}: no {split} split for {cot} CoTs ({folder / f'{split}_{cot}.jsonl'} "
                         f"not found; {_splits(folder, cot)})")
    if (folder / "prepare.py").is_file():
        raise SystemExit(f"error: {folder / f'{split}_{cot}.jsonl'} not found; run `python data/{data}/prepare.py` "
                         f"first")
    if path.is_dir():
        raise SystemExit(f"error: --data {data}: a folder without prepared splits (*_{cot}.jsonl)")
    prepared = ", ".join(sorted({p.parent.name for p in root.glob("*/*.jsonl")})) or "none"
    raise SystemExit(f"error: unknown dataset {data!r} (prepared datasets: {prepared}); "
                     f"pass a .jsonl/.json file or a folder name under {root}")


def load_records(data, split="train", cot="nl", require_cot=False, check_answers=True):
    """Records {item_id, question, answer_cot?, answer_value} of `split` from a prepared dataset name or folder, or
    from a file (which is the train split, or with split None just the file). Bad input raises
    SystemExit("error: ...") naming the file and the line or record: a repeated item_id (questions are told apart by
    it: counted once, scored as one) and, with `check_answers`, gold answers that are neither a number nor an option
    letter (no answer can ever equal them: they train and score as wrong, silently); `python reward.py --data` lists
    those instead."""
    _check_cot(cot)
    path = _resolve(data, split, cot)
    fields = ("question", "answer_value") + (("answer_cot",) if require_cot else ())
    records = []
    for where, item in _read_items(path):
        if not isinstance(item, dict):
            raise SystemExit(f"error: {path}: record {where} is not a JSON object")
        name = item.get("item_id", where)
        for field in fields:
            if not isinstance(item.get(field), (str, int, float)) or not str(item[field]).strip():
                raise SystemExit(f"error: {path}: record {name} has no '{field}'")
        records.append(dict(item, item_id=str(name), answer_value=str(item["answer_value"])))
    if not records:
        raise SystemExit(f"error: {path}: no records")
    repeated = [f"{i!r} ×{n}" for i, n in collections.Counter(r["item_id"] for r in records).items() if n > 1]
    if repeated:
        raise SystemExit(f"error: {path}: {len(repeated)} item_ids name more than one record ({_first_few(repeated)}); "
                         f"each question needs its own")
    unreadable = [f"{r['item_id']!r}: {r['answer_value']!r}" for r in records
                  if check_answers and _gold(r["answer_value"]) is None]
    if unreadable:
        raise SystemExit(f"error: {path}: {len(unreadable)} gold answer_values are neither a number nor an option "
                         f"letter a-e ({_first_few(unreadable)}); no answer can match them")
    return records


def _first_few(names, n=3):
    """The first `n` of `names` for an error line, and how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------- sandbox: worker (supervisor) process
_SAFE_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr", "classmethod",
    "complex", "dict", "divmod", "enumerate", "filter", "float", "format", "frozenset", "getattr", "hasattr",
    "hash", "hex", "id", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next",
    "object", "oct", "ord", "pow", "print", "property", "range", "repr", "reversed", "round", "set", "slice",
    "sorted", "staticmethod", "str", "sum", "super", "tuple", "type", "zip", "__build_class__", "NotImplemented",
    "Ellipsis", "Exception", "ArithmeticError", "AssertionError", "AttributeError", "IndexError", "KeyError",
    "LookupError", "NameError", "NotImplementedError", "OverflowError", "RuntimeError", "StopIteration",
    "TypeError", "ValueError", "ZeroDivisionError")
_ALLOWED_EVENTS = {"compile", "exec", "builtins.id", "marshal.loads"}


class _Sink:
    """A program's stdout/stderr: counts what it prints and stops it past MAX_OUTPUT_CHARS."""
    size = 0

    def write(self, text):
        self.size += len(text)
        if self.size > MAX_OUTPUT_CHARS:
            raise OSError("output limit reached")
        return len(text)

    def flush(self):
        pass


def _to_result(value):
    """What is reported for solution()'s value: a float, a short str, or None."""
    if isinstance(value, str):
        return str.__str__(value)[:MAX_ANSWER_CHARS]
    number = float(value)
    return number if math.isfinite(number) else None


def _warm_up(sympy):
    """Run sympy's lazy imports now, before the audit hook forbids reading files."""
    x, y = sympy.symbols("x y")
    sympy.solve([x + y - 10, x - y - 2], [x, y]), sympy.solve(sympy.Eq(3 * x + 2, 11), x)
    sympy.simplify((x ** 2 - 1) / (x - 1)), sympy.expand((x + 1) ** 3), sympy.nsimplify(0.75)
    float(sympy.sqrt(2) * sympy.pi + sympy.Rational(3, 4)), sympy.N(sympy.E)
    sympy.factorial(5), sympy.binomial(5, 2), sympy.isprime(7), sympy.gcd(4, 6), sympy.lcm(4, 6)


def _audit_hook(package_dirs, changes):
    """Refuse every audited action outside an allow-list; note changes to functions in `changes`."""
    roots = set(ALLOWED_IMPORTS) | {"mpmath"}

    def hook(event, args):
        if event in _ALLOWED_EVENTS:
            return
        if event in ("object.__setattr__", "object.__delattr__"):
            return changes.append(event)
        if event == "object.__getattr__" and not str(args[1]).endswith("_frame"):  # frames lead out
            return
        if event == "import" and str(args[0]).partition(".")[0] in roots:
            return
        if event in ("open", "os.listdir") and isinstance(args[0], str) and (event == "os.listdir" or
                                                                              args[1] in ("r", "rb")):
            if os.path.normpath(args[0]).startswith(package_dirs):  # a lazy sympy import reads its files
                return
        raise RuntimeError(f"sandbox: {event} is not allowed")  # RuntimeError also refuses sys.addaudithook
    return hook


def _worker_main():
    """`python reward.py --worker`: read JSON batches on stdin, run each in forked children, write one JSON line
    per program ([result]) on stdout."""
    import _thread
    import builtins
    import resource
    import select
    import types
    inp, out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    modules = {}
    for name in ALLOWED_IMPORTS:
        try:
            modules[name] = __import__(name)
        except ImportError:
            continue
    if "sympy" in modules:
        _warm_up(modules["sympy"])
    package_dirs = tuple(os.path.dirname(sys.modules[n].__file__) + os.sep for n in ("sympy", "mpmath")
                         if n in sys.modules)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getuid() == 0:  # root ignores RLIMIT_NPROC and may write anywhere: become nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    for limit, value in ((resource.RLIMIT_AS, 1 << 30), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, 32)):
        resource.setrlimit(limit, (value, value))
    sys.dont_write_bytecode = True
    safe_builtins = {name: getattr(builtins, name) for name in _SAFE_BUILTINS}

    def clone(module):  # a program changing a module's attributes changes only its own copy
        copy = types.ModuleType(module.__name__)
        copy.__dict__.update(module.__dict__)
        return copy

    def safe_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name.partition(".")[0] not in modules:
            raise ImportError(f"import of {name!r} is not allowed")
        return clone(__import__(name, None, None, fromlist, 0))

    def run(source):
        namespace = {"__builtins__": dict(safe_builtins, __import__=safe_import), "__name__": "program"}
        namespace.update((name, clone(modules[name])) for name in ("math", "sympy") if name in modules)
        sys.stdout = sys.stderr = _Sink()
        try:
            exec(compile(source, "<program>", "exec"), namespace)
            return _to_result(namespace["solution"]())
        except BaseException:
            return None

    watched = [builtins, json, *modules.values()] + [m for n, m in sys.modules.items() if n.startswith("json.")]
    watched += [v for m in watched if m.__name__ != "sympy" for v in vars(m).values()  # mutable classes
                if isinstance(v, type) and not v.__flags__ & 1 << 8]  # 1 << 8: Py_TPFLAGS_IMMUTABLETYPE
    snapshot, loaded = [(m.__dict__, dict(m.__dict__)) for m in watched], dict(sys.modules)

    def intact():  # identity checks only: a program's objects could lie to ==
        return all(sys.modules.get(k) is v for k, v in loaded.items()) and all(
            len(d) == len(copy) and all(d.get(k) is v for k, v in copy.items()) for d, copy in snapshot)

    def child(sources, tokens, pipe):
        """In a forked child: no way back to the trainer, no processes, every action audited."""
        os.close(inp.fileno())
        os.close(out.fileno())
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (600, 600))  # should the supervisor be gone
        changes = []
        sys.addaudithook(_audit_hook(package_dirs, changes))
        for k, source in enumerate(sources):
            os.write(pipe, json.dumps([tokens[k], run(source)]).encode() + b"\n")
            if k + 1 < len(sources) and (changes or _thread._count() or not intact()):
                os.write(pipe, json.dumps([tokens[k + 1]]).encode() + b"\n")  # hand over to a fresh child
                break
        os._exit(0)

    def report(result):
        out.write(json.dumps([result]).encode() + b"\n")
        out.flush()

    def supervise(pipe, tokens, k, timeout):
        """Forward a child's results from program k on. Returns (the first program without a result, whether
        it failed: outlived the timeout, killed the child or garbled the channel)."""
        buffer, deadline = b"", time.monotonic() + timeout
        while k < len(tokens):
            if b"\n" not in buffer:
                ready = select.select([pipe, inp], [], [], max(0.0, deadline - time.monotonic()))[0]
                if inp in ready:  # mid-batch the trainer sends nothing: this is EOF, the trainer is gone
                    raise SystemExit
                data = os.read(pipe, 1 << 16) if ready else b""
                buffer += data
                if not data or len(buffer) > 1 << 16:
                    return k, True
                continue
            line, buffer = buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                message = None
            if message == [tokens[k]]:  # the child handed over before program k
                return k, False
            if not (isinstance(message, list) and len(message) == 2 and message[0] == tokens[k]):
                return k, True
            report(message[1])
            k, deadline = k + 1, time.monotonic() + timeout
        return k, False

    out.write(b'"ready"\n')
    out.flush()
    for line in inp:  # EOF: the trainer is gone or shut the pool down
        batch = json.loads(line)
        sources, timeout = batch["programs"], batch["timeout"]
        tokens, k = [os.urandom(8).hex() for _ in sources], 0  # in the child, out of its programs' reach
        while k < len(sources):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                child(sources[k:], tokens[k:], write_end)
            os.close(write_end)
            try:
                k, failed = supervise(read_end, tokens, k, timeout)
            finally:  # also when the trainer is gone (BrokenPipeError): never leave a child behind
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(read_end)
            if failed:  # reported only now, so the program's process is gone when the trainer hears of it
                report(None)
                k += 1
    os._exit(0)


# ---------------------------------------------------------------- sandbox: trainer side
class _Worker:
    """A sandbox worker process, what is still to be sent to it, and the programs it owes results for."""

    def __init__(self):
        import subprocess
        self.proc = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/",
                                     env={"PATH": os.defpath}, start_new_session=True)
        self.write_fd, self.read_fd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.write_fd, False)
        os.set_blocking(self.read_fd, False)
        self.outbox, self.inbox, self.ready, self.jobs = b"", b"", False, []
        self.deadline = time.monotonic() + STARTUP_TIMEOUT

    def receive(self, results, timeout):
        """Take in what the worker sent; ValueError when it exited or sent something unexpected."""
        data = os.read(self.read_fd, 1 << 16)
        if not data:
            raise ValueError("sandbox worker exited")
        *lines, self.inbox = (self.inbox + data).split(b"\n")
        if len(self.inbox) > 1 << 16:
            raise ValueError("overlong line from a sandbox worker")
        for message in map(json.loads, lines):
            if message == "ready" and not self.ready:
                self.ready = True
            elif isinstance(message, list) and len(message) == 1 and self.jobs:
                value = message[0]
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    results[self.jobs[0]] = float(value)
                elif isinstance(value, str) and len(value) <= MAX_ANSWER_CHARS:
                    results[self.jobs[0]] = value
                self.jobs.pop(0)
                self.deadline = time.monotonic() + timeout + GRACE
            else:
                raise ValueError(f"unexpected message from a sandbox worker: {message!r:.100}")

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and its child
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class _Pool:
    def __init__(self, size):
        self.pid = os.getpid()
        self.workers = [_Worker() for _ in range(size)]

    def run(self, programs, timeout):
        import select
        from collections import deque
        results = [None] * len(programs)
        queue = deque(i for i, p in enumerate(programs) if isinstance(p, str) and len(p) <= MAX_PROGRAM_CHARS)
        batch = max(1, min(BATCH, len(queue) // (4 * len(self.workers))))
        while queue or any(w.jobs for w in self.workers):
            poll = select.poll()
            for w in self.workers:
                if w.ready and not w.jobs and queue:
                    w.jobs = [queue.popleft() for _ in range(min(batch, len(queue)))]
                    w.outbox = json.dumps({"timeout": timeout, "programs": [programs[i] for i in w.jobs]}).encode()
                    w.outbox += b"\n"
                    w.deadline = time.monotonic() + timeout + GRACE
                poll.register(w.read_fd, select.POLLIN)
                if w.outbox:
                    poll.register(w.write_fd, select.POLLOUT)
            wait = min([w.deadline for w in self.workers if w.jobs or not w.ready], default=0) - time.monotonic()
            events = dict(poll.poll(max(0.0, wait) * 1000))
            for i, w in enumerate(self.workers):
                try:
                    if w.write_fd in events:
                        w.outbox = w.outbox[os.write(w.write_fd, w.outbox):]
                    if w.read_fd in events:
                        w.receive(results, timeout)
                    elif (w.jobs or not w.ready) and time.monotonic() > w.deadline:
                        raise TimeoutError("sandbox worker is silent")
                except BlockingIOError:
                    continue
                except (OSError, ValueError):  # died, hung or garbled: its current program gets no answer
                    w.kill()
                    if not w.ready:
                        raise RuntimeError(f"sandbox worker failed to start (exit code {w.proc.returncode})")
                    queue.extendleft(reversed(w.jobs[1:]))
                    self.workers[i] = _Worker()
        return results

    def close(self):
        if self.pid == os.getpid():  # a forked child must not kill its parent's workers
            for worker in self.workers:
                worker.kill()
        self.workers = []


_POOL = None
_LOCK = threading.RLock()


def start_pool(workers=None):
    """(Re)start the sandbox pool with `workers` processes. The default shares the usable CPUs among the ranks
    of this node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun): every rank starts its own pool, and 8 ranks
    on a 96-core node must start 96 workers in all, not 768 that fight over the cores and the memory."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            atexit.register(shutdown_pool)
        else:
            _POOL.close()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        _POOL = _Pool(workers or max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def shutdown_pool():
    """Kill the sandbox processes (also registered with atexit)."""
    with _LOCK:
        if _POOL is not None:
            _POOL.close()


def worker_pids():
    return [w.proc.pid for w in _POOL.workers] if _POOL is not None and _POOL.pid == os.getpid() else []


def run_programs(programs, timeout=2.0):
    """Run each `def solution():` program in the sandbox: solution()'s value (float or str), or None."""
    with _LOCK:
        if _POOL is None or _POOL.pid != os.getpid() or not _POOL.workers:
            start_pool()
        return _POOL.run(list(programs), timeout)


# ---------------------------------------------------------------- CLI: score the gold CoTs of a dataset
def main():
    parser = argparse.ArgumentParser(description="Score each record's gold CoT as if a model had written it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--data", required=True, help="a .jsonl/.json file, a folder, or a prepared dataset name")
    parser.add_argument("--cot", choices=COTS, default="nl", help="chain-of-thought kind of the gold CoTs")
    parser.add_argument("--split", default="train", help="split of a prepared dataset (a file is its own split)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per program")
    args = parser.parse_args()
    records = load_records(args.data, args.split, args.cot, require_cot=True, check_answers=False)[:args.limit]
    start = time.perf_counter()
    preds = extract_answers([build_target(r, args.cot) for r in records], args.cot,
                            [r["question"] for r in records], args.timeout)
    failures = [(r, p) for r, p in zip(records, preds) if not answers_equal(p, r["answer_value"])]
    no_answer = sum(p is None for _, p in failures)
    print(f"{len(records)} records, cot={args.cot}, {time.perf_counter() - start:.1f} s: "
          f"{len(records) - len(failures)} correct, {len(failures) - no_answer} wrong answer, {no_answer} no answer")
    for record, pred in failures[:5]:
        print(f"  {record['item_id']}: gold {record['answer_value']!r}, extracted {pred!r}")
    print(f"{len(records) - len(failures)}/{len(records)} correct")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        main()
