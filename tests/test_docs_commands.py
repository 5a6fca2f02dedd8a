"""Commands in the docs cannot rot: every `python X.py ...` and `torchrun ... X.py ...` line in README.md, docs/*.md
and the module docstrings names a script that exists, only flags that script has, and a `--data NAME` that a prepare
script writes, with the CoT kind the command uses."""
import ast
import re
import shlex

import pytest

from conftest import ROOT

# The CoT kinds each prepared dataset name gets, from the prepare scripts (mwp_reft writes its --dataset's name,
# gsm8k_reft for gsm8k).
PREPARED = {"minigsm": {"nl", "python"}, "gsm_symbolic": {"nl", "python"}, "gsm8k": {"nl"},
            "gsm8k_reft": {"nl", "python"}, "svamp": {"nl", "python"}, "mathqa": {"nl", "python"},
            "mathqa-numeric": {"nl", "python"}}
SOURCES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
           *sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"),
                                                      *(ROOT / "data").glob("*/prepare.py"),
                                                      *(ROOT / "benchmarks").glob("*.py")])]


def doc_text(path):
    """A markdown file whole; a Python file's module docstring."""
    text = (ROOT / path).read_text()
    return text if path.endswith(".md") else (ast.get_docstring(ast.parse(text), clean=False) or "")


def commands(text):
    """Each command line (with its backslash continuations joined) that runs a project script."""
    lines, joined = text.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        joined.append(line)
        i += 1
    found = []
    for line in joined:
        m = re.search(r"(?:^|[`$(]|\s)((?:\.venv/bin/)?(?:python|torchrun)\s+[^`]*)", line)
        if m and re.search(r"[\w/]+\.py\b", m.group(1)):
            found.append(m.group(1).split(" # ")[0].split("  #")[0].strip().rstrip(")"))
    return found


def script_flags(script):
    """The flags a script accepts: its Args dataclass's fields (with --no- for booleans), or its add_argument calls."""
    source = (ROOT / script).read_text()
    tree = ast.parse(source)
    flags = {"--help", "-h"}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    name = item.target.id
                    flags.add(f"--{name}")
                    flags.add(f"-{name}") if len(name) == 1 else None
                    if isinstance(item.value, ast.Constant) and isinstance(item.value.value, bool):
                        flags.add(f"--no-{name}")
    flags |= set(re.findall(r"add_argument\(\s*\"(--?[\w-]+)\"", source))
    if script == "reward.py":
        flags.add("--worker")  # the sandbox's worker process, started by reward.py itself before argparse
    return flags


def cases():
    for path in SOURCES:
        for cmd in commands(doc_text(path)):
            yield pytest.param(path, cmd, id=f"{path}: {cmd[:70]}")


def without_substitutions(cmd):
    """The command with each shell substitution `$(...)` (balanced parentheses) replaced by a word."""
    while "$(" in cmd:
        start = cmd.index("$(")
        depth, end = 0, start + 1
        for end in range(start + 1, len(cmd)):
            depth += {"(": 1, ")": -1}.get(cmd[end], 0)
            if depth == 0:
                break
        cmd = cmd[:start] + "SUBSTITUTED" + cmd[end + 1:]
    return cmd


@pytest.mark.parametrize("path, cmd", list(cases()))
def test_a_documented_command_fits_its_script(path, cmd):
    try:
        words = shlex.split(without_substitutions(cmd))
    except ValueError:
        words = without_substitutions(cmd).split()
    script = next((w for w in words if w.endswith(".py")), None)
    assert script is not None, cmd
    if re.fullmatch(r"\w\.py", script):  # `python x.py`: any stage, in prose
        return
    if not (ROOT / script).is_file():
        pytest.fail(f"{path}: {script} does not exist: {cmd}")
    after = words[words.index(script) + 1:]
    known = script_flags(script)
    unknown = [w.split("=")[0] for w in after if w.startswith("-") and not re.fullmatch(r"-\d.*", w)
               and w.split("=")[0] not in known]
    assert not unknown, f"{path}: {script} has no {unknown}: {cmd}"
    values = {w: after[i + 1] for i, w in enumerate(after[:-1]) if w.startswith("--")}
    data = values.get("--data")
    if data and re.fullmatch(r"[\w-]+", data) and not data.isupper():  # upper case: a placeholder (D, DATA)
        assert data in PREPARED, f"{path}: no prepare script writes --data {data}: {cmd}"
        cot = values.get("--cot", "nl")
        assert cot == "auto" or cot in PREPARED[data], f"{path}: --data {data} has no {cot} CoTs: {cmd}"


def test_the_commands_are_found():
    """The parser sees the commands it is meant to check (a parser that finds none would pass everything)."""
    found = [cmd for path in SOURCES for cmd in commands(doc_text(path))]
    assert len(found) > 40
    assert any(cmd.startswith("torchrun --nproc_per_node 8 reft.py") for cmd in found)
    assert sum("sft.py" in cmd for cmd in found) > 5
