"""The commands as users type them: `--help` documents every flag, and closed sets of values are enforced."""
import ast
import json
import re
import sys

import pytest

from conftest import PY, ROOT, SHARED_DATA, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import reward  # noqa: E402

SCRIPTS = ["sft.py", "reft.py", "rerank.py", "evaluate.py", "scripts/quickstart.py"]


def documented_fields(path):
    """(name, default source, docstring) of every field of the script's `Args` dataclass, read independently of
    parse_args."""
    tree = ast.parse(path.read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args").body
    return [(a.target.id, ast.literal_eval(a.value), b.value.value) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)]


def flat(text):
    """Without whitespace: argparse wraps help text, also after hyphens."""
    return "".join(text.split())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_with_its_docstring_and_default(script):
    fields = documented_fields(ROOT / script)
    assert len(fields) >= 10
    out = flat(run([PY, script, "--help"], timeout=120).stdout)
    for name, default, doc in fields:
        assert f"--{name}" in out, f"--{name} missing from {script} --help"
        assert flat(doc) in out, f"the docstring of --{name} is not in {script} --help"
        after = out[out.index(flat(doc)) + len(flat(doc)):]
        if default == "":  # "not given": its docstring says what that means, and no "(default: )" follows
            assert not after.startswith("(default:"), f"--{name} shows an empty default: {after[:40]}"
            continue
        assert after.startswith(f"(default:{flat(str(default))})"), f"--{name}'s default {default!r}: {after[:40]}"


OTHER_SCRIPTS = ["reward.py", "data/minigsm/prepare.py", "data/gsm8k/prepare.py", "data/gsm_symbolic/prepare.py",
                 "data/mwp_reft/prepare.py", "scripts/walkthrough.py", "scripts/compare.py",
                 "scripts/compare_methods.py", "scripts/cot_diagnostics.py", "scripts/pretrain_arithmetic.py",
                 "benchmarks/fsdp_rollout.py", "benchmarks/gpu_check.py", "benchmarks/grpo_vs_trl.py",
                 "benchmarks/kv_cache_bytes.py", "benchmarks/lora_memory.py",
                 "benchmarks/mfu.py", "benchmarks/ppo_vs_trl.py", "benchmarks/reft_profile.py",
                 "benchmarks/reward_throughput.py", "benchmarks/run_all.py"]
NO_DEFAULT = object()  # a default the source computes (a path), so its value is not checked


def declared_arguments(path):
    """{name: (suppressed, expected default text or NO_DEFAULT)} of every add_argument call in the source, read
    with ast (independently of argparse); name is the first flag ("--out_dir") or the positional's name."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        suppressed = isinstance(kw.get("help"), ast.Attribute) and kw["help"].attr == "SUPPRESS"
        action = kw["action"].value if isinstance(kw.get("action"), ast.Constant) else None
        if "default" in kw:
            try:
                default = str(ast.literal_eval(kw["default"]))
            except ValueError:
                default = NO_DEFAULT
        else:
            default = {"store_true": "False", "store_false": "True"}.get(action, "None")
        out[node.args[0].value] = (suppressed, default)
    return out


def help_entries(text, section):
    """{first option string or positional name: its description, wrapped lines joined} of one section of
    argparse's --help output ("options" or "positional arguments")."""
    lines = text.splitlines()
    titles = {f"{section}:", "optional arguments:"} if section == "options" else {f"{section}:"}  # < 3.10: optional
    heads = [i for i, line in enumerate(lines) if line in titles]
    if not heads:
        return {}
    entries, name = {}, None
    for line in lines[heads[0] + 1:]:
        if m := re.fullmatch(r"  (\S.*?)(?: {2,}(\S.*))?", line):  # "  --flag VALUE   description"
            name = re.split(r"[ ,]", m.group(1))[0]
            entries[name] = m.group(2) or ""
        elif name and (m := re.fullmatch(r" {3,}(\S.*)", line)):  # a wrapped description line
            entries[name] = f"{entries[name]} {m.group(1)}".strip()
        else:  # a blank line or the epilog ends the section
            break
    return entries


@pytest.mark.parametrize("script", OTHER_SCRIPTS)
def test_help_of_every_other_script_gives_each_flag_a_text_and_its_default(script):
    """The data, scripts/ and benchmarks/ commands: `--help` works without a GPU, every flag the source declares is
    listed with a description and "(default: ...)" (the source's value where it is a literal), every positional
    has a description, and the flags that exist only for a script to call itself (help=SUPPRESS) are not listed."""
    declared = declared_arguments(ROOT / script)
    assert declared, f"no add_argument call found in {script}"
    text = run([PY, script, "--help"], timeout=120).stdout
    options, positionals = help_entries(text, "options"), help_entries(text, "positional arguments")
    options.pop("-h")
    flags = {name for name in declared if name.startswith("-")}
    shown = {name for name in flags if not declared[name][0]}
    assert set(options) == shown, f"{script} --help lists {sorted(options)}, the source declares {sorted(shown)}"
    for name, desc in options.items():
        m = re.search(r"\(default: (.*)\)$", desc)
        assert m, f"{script} {name}: no (default: ...) at the end of its description {desc!r}"
        assert desc[:m.start()].strip(), f"{script} {name}: no help text, only {desc!r}"
        default = declared[name][1]
        if default is not NO_DEFAULT:
            assert flat(m.group(1)) == flat(default), f"{script} {name}: shows default {m.group(1)!r}, not {default!r}"
    assert set(positionals) == set(declared) - flags, f"{script}: positionals {sorted(positionals)}"
    for name, desc in positionals.items():
        assert desc.strip(), f"{script}: the positional {name} has no help text"


@pytest.mark.parametrize("script, flag, bad", [("sft.py", "--cot", "latex"), ("reft.py", "--cot", "latex"),
                                               ("rerank.py", "--cot", "latex"), ("evaluate.py", "--mode", "best")])
def test_a_value_outside_its_set_is_one_error_line(script, flag, bad):
    p = run([PY, script, flag, bad], check=False, timeout=120)
    assert p.returncode == 2 and f"argument {flag}: invalid choice: '{bad}'" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"{script.split('/')[-1]}: error:")


def test_every_stage_runs_with_its_default_batch_flags_under_torchrun(minigsm, warmup, tmp_path):
    """The command that worked under `python` works under `torchrun --nproc_per_node 2` as typed: no batch flag
    needs changing with the number of processes."""
    torchrun(2, "sft.py", "--data", minigsm, "--max_steps", 2, "--save_epochs", "none", "--output_dir",
             tmp_path / "sft")
    torchrun(2, "reft.py", "--model", warmup, "--data", minigsm, "--max_steps", 1, "--max_length", 96,
             "--eval_every", 0, "--output_dir", tmp_path / "reft")
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)[:40]
    with open(tmp_path / "samples.jsonl", "w") as f:
        for r in records:
            for completion, correct in ((reward.build_target(r, "nl"), True), ("I do not know.", False)):
                f.write(json.dumps({"item_id": r["item_id"], "question": r["question"], "completion": completion,
                                    "correct": correct}) + "\n")
    torchrun(2, "rerank.py", "--samples", tmp_path / "samples.jsonl", "--model", warmup, "--data", minigsm,
             "--epochs", 1, "--output_dir", tmp_path / "verifier")
    torchrun(2, "evaluate.py", "--model", warmup, "--data", minigsm, "--limit", 6, "--max_new_tokens", 32,
             "--output_dir", tmp_path / "eval")
    for stage in ("sft", "reft", "verifier", "eval"):
        assert json.loads((tmp_path / stage / "args.json").read_text())["world_size"] == 2


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="../shared/data/gsm8k not present")
def test_the_headline_command_on_eight_processes(tmp_path):
    """`torchrun --nproc_per_node 8 reft.py --data gsm8k` from an sft.py warm-up: 8 CPU processes start, roll out
    and step (the tiny model; real GSM8K questions)."""
    data = tmp_path / "gsm8k"
    run([PY, "data/gsm8k/prepare.py", "--source", SHARED_DATA / "gsm8k", "--out_dir", data])
    run([PY, "sft.py", "--data", data, "--max_steps", 2, "--save_epochs", "none", "--output_dir", tmp_path / "sft"])
    torchrun(8, "reft.py", "--data", data, "--model", tmp_path / "sft" / "final", "--max_steps", 2,
             "--eval_every", 2, "--eval_limit", 8, "--max_length", 400, "--output_dir", tmp_path / "reft", timeout=900)
    m = read_metrics(tmp_path / "reft" / "metrics.jsonl")
    assert [row["step"] for row in m] == [1, 2] and "eval_accuracy" in m[-1]
    assert json.loads((tmp_path / "reft" / "args.json").read_text())["world_size"] == 8


def test_rerank_mode_without_flags_names_them_all_in_one_line(tmp_path):
    p = run([PY, "evaluate.py", "--mode", "rerank", "--output_dir", tmp_path / "eval"], check=False, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    line, = p.stderr.strip().splitlines()
    assert line.startswith("error: --model is required") and "; --mode rerank needs --verifier" in line
    assert not (tmp_path / "eval").exists()
