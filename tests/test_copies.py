"""Each stage is one self-contained file, so a few setup helpers are repeated in several of them. The copies must
stay identical: a fix made in one file and forgotten in another is how the stages drifted apart before."""
import ast

import pytest

from conftest import ROOT

COPIES = {
    "init_distributed": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "compute_dtype": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "fsdp_groups": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "shard": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "without_empty_attention_rows": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "load_sharded": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "gathered_for_generation": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "LoRALinear": ["sft.py", "reft.py", "rerank.py"],
    "add_lora": ["sft.py", "reft.py", "rerank.py"],
    "lora_params": ["sft.py", "reft.py", "rerank.py"],
    "merge_lora": ["sft.py", "reft.py", "rerank.py"],
    "save_adapter": ["sft.py", "reft.py", "rerank.py"],
    "device_memory": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "config_params": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "memory_estimate": ["sft.py", "reft.py", "rerank.py", "evaluate.py", "scripts/quickstart.py"],
    "memory_advice": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "parse_args": ["sft.py", "reft.py", "rerank.py", "evaluate.py", "scripts/quickstart.py"],
    "epochs_to_save": ["sft.py", "reft.py"],
    "greedy_accuracy": ["sft.py", "reft.py"],
    "check_ranges": ["sft.py", "reft.py", "rerank.py", "evaluate.py", "scripts/quickstart.py"],
    "check_output_dir": ["sft.py", "reft.py", "rerank.py", "evaluate.py", "scripts/quickstart.py"],
    "check_checkpoint": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "read_json": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "check_model_config": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "resolve_cot": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
    "checkpoint_params": ["reft.py", "rerank.py", "evaluate.py"],
    "fill_recipe": ["reft.py", "rerank.py"],
    "trained_state": ["sft.py", "reft.py", "rerank.py"],
    "find_resume_state": ["sft.py", "reft.py", "rerank.py"],
    "run_entries": ["sft.py", "reft.py", "rerank.py"],
    "run_progress": ["sft.py", "reft.py", "rerank.py"],
    "plan_run": ["sft.py", "reft.py", "rerank.py"],
    "begin_run": ["sft.py", "reft.py", "rerank.py"],
    "eval_questions": ["sft.py", "reft.py"],
    "summary": ["sft.py", "reft.py", "rerank.py"],
    "lr_lambda": ["sft.py", "rerank.py"],
    "file_digest": ["sft.py", "reft.py", "rerank.py"],
    "damaged_file": ["sft.py", "reft.py", "rerank.py"],
    "save_resume_state": ["sft.py", "reft.py", "rerank.py"],
    "load_resume_state": ["sft.py", "reft.py", "rerank.py"],
    "check_disk_space": ["sft.py", "reft.py", "rerank.py"],
    "stop_if_disk_full": ["sft.py", "reft.py", "rerank.py"],
    "append_metrics": ["sft.py", "reft.py", "rerank.py"],
    "trim_metrics": ["sft.py", "reft.py", "rerank.py"],
    "stop_on_interrupt": ["sft.py", "reft.py", "rerank.py"],
    "load": ["rerank.py", "evaluate.py"],
    "num_calls": ["rerank.py", "evaluate.py"],
}
# Same name, different job: not copies. Files that define a name of COPIES outside its list are named here.
DIFFERENT = {"collate": ["sft.py", "rerank.py"],
             "sample": ["reft.py", "rerank.py"],
             "load_tokenizer": ["sft.py", "reft.py"], "score": ["reft.py", "rerank.py"],
             "memory_error": ["sft.py", "reft.py", "rerank.py", "evaluate.py"],
             "check_args": ["sft.py", "rerank.py", "evaluate.py"], "check_memory": ["sft.py", "rerank.py", "evaluate.py"],
             "resume": ["sft.py", "reft.py"]}


def function_source(path, name):
    """The source of the top-level function or class `name` of `path`."""
    tree = ast.parse(path.read_text())
    found = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name]
    assert len(found) == 1, f"{path.name} defines {name} {len(found)} times"
    return ast.get_source_segment(path.read_text(), found[0])


@pytest.mark.parametrize("name", sorted(COPIES))
def test_repeated_helpers_are_identical_copies(name):
    files = COPIES[name]
    sources = {f: function_source(ROOT / f, name) for f in files}
    first = sources[files[0]]
    assert all(src == first for src in sources.values()), f"{name} differs between {files}"


def test_the_copy_list_is_complete():
    """A helper (function or class) defined in two stage files and missing from COPIES would drift unchecked; each
    stage's main() and Args (its flags) are its own."""
    stages = ["sft.py", "reft.py", "rerank.py", "evaluate.py"]
    defined = {}
    for f in stages:
        for node in ast.parse((ROOT / f).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(f)
    repeated = {name: files for name, files in defined.items() if len(files) > 1 and name not in ("main", "Args")}
    for name, files in repeated.items():
        copies = [f for f in COPIES.get(name, []) if f in stages]
        assert sorted(copies + DIFFERENT.get(name, [])) == sorted(files), f"{name}: defined in {files}"
    assert set(COPIES) <= set(repeated) and set(DIFFERENT) <= set(repeated)


MARKER = "# infrastructure: skip on a first read"
STAGES = ["sft.py", "reft.py", "rerank.py", "evaluate.py"]


@pytest.mark.parametrize("stage", ["sft.py", "reft.py", "rerank.py", "evaluate.py"])
def test_each_stage_reads_the_method_first(stage):
    """A stage file reads in this order: its guide, the arguments, the method, main(), and only then, after one marker,
    the infrastructure (checks, distributed setup, loading, saving)."""
    text = (ROOT / stage).read_text()
    assert text.count(MARKER) == 1
    assert text.index("\ndef main(") < text.index(MARKER) < text.index("\ndef init_distributed(")
    assert "Reading guide" in ast.get_docstring(ast.parse(text))



def sections_of(stage):
    """Each top-level function or class of a stage as (name, part): "method" above the marker, "own" in the section
    that names the stage right below it, "copies" after the next section line."""
    text = (ROOT / stage).read_text()
    lines = text.split("\n")
    marker = lines.index(MARKER) + 1
    own = lines.index(f"# {'-' * 77} {stage}'s own") + 1
    copies = next(i + 1 for i in range(own, len(lines)) if lines[i].startswith(f"# {'-' * 77} "))
    assert marker < own < copies
    return [(n.name, "method" if n.lineno < marker else "own" if n.lineno < copies else "copies")
            for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("stage", STAGES)
def test_the_marker_says_which_functions_are_copies(stage):
    """What the marker says holds: no copy above it (a reader would take it for the method), then this stage's own
    helpers under one section line that names the stage, then only copies."""
    for name, part in sections_of(stage):
        is_copy = stage in COPIES.get(name, [])
        assert is_copy == (part == "copies"), f"{stage}: {name} ({'a copy' if is_copy else 'its own'}) in {part}"


def test_the_copies_come_in_the_same_order_in_every_stage():
    """A reader who knows one stage's infrastructure finds each copy at the same place in the others."""
    order = {stage: [name for name, part in sections_of(stage) if part == "copies"] for stage in STAGES}
    for a in STAGES:
        for b in STAGES:
            common = set(order[a]) & set(order[b])
            assert [n for n in order[a] if n in common] == [n for n in order[b] if n in common], (a, b)

def test_reft_main_is_a_loop_of_calls():
    """reft.py's main() is the algorithm on one screen: its loop calls one function per step of Algorithm 1 (and the
    Online-ST branch), each result bound to a name main() passes on, and stays short."""
    tree = ast.parse((ROOT / "reft.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60
    loop = next(n for n in main.body if isinstance(n, ast.While))
    assert loop.end_lineno - loop.lineno + 1 <= 40
    called = {n.func.id for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"sample_rollout", "score", "rollout_forwards", "kl_shaped_rewards", "estimate_advantages", "ppo_update",
            "online_st_update", "count_skipped", "step_log"} <= called
