"""Nothing silent (issue #25): every bad invocation of a stage ends in one `error:` line naming the flag or path, before
any model loads, and a folder that holds a run is left byte for byte as it was; the four mistakes that used to give
wrong results or lose work without a word (reused samples, hidden resumes, a file scored as another split, the wrong
CoT kind) now say so.

The table runs each stage's main() in this process (conftest.main_error): a SystemExit with a message is what the
command line prints as its one line with exit status 1, and any other exception (a traceback) fails the case. A few
cases run as real commands too, for the exit status and stderr as a user sees them."""
import dataclasses
import json
import shutil
import sys
import time

import pytest

from conftest import PY, ROOT, main_error, read_metrics, run

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate  # noqa: E402
import quickstart  # noqa: E402
import reft  # noqa: E402
import rerank  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402

STAGES = {"sft.py": sft, "reft.py": reft, "rerank.py": rerank, "evaluate.py": evaluate}
REFT = ["--batch_size", 8, "--max_length", 96, "--eval_every", 0]


def snapshot(folder):
    """Every file under `folder` with its bytes: what "left as it was" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(minigsm, warmup, verifier, tmp_path_factory):
    """Run folders to point the cases at: the warm-up's own SFT run, a one-step ReFT run at --lr 0, a rerank.py run
    that sampled 2 CoTs for 8 questions, a copy of the warm-up checkpoint elsewhere, a verifier, a file, sample files
    whose labels are all correct or all wrong or whose item_ids name two questions, and data files with repeated
    item_ids or gold answers that are not answers."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(warmup.parent, root / "sft")
    run([PY, "reft.py", "--model", warmup, "--data", minigsm, *REFT, "--max_steps", 1, "--lr", 0,
         "--output_dir", root / "reft"])
    run([PY, "rerank.py", "--model", warmup, "--data", minigsm, "--limit", 8, "--num_samples", 2,
         "--max_new_tokens", 24, "--batch_size", 2, "--holdout_fraction", 0, "--epochs", 1,
         "--output_dir", root / "rerank"], check=False)  # the samples are what counts here, not the verifier
    shutil.copytree(warmup, root / "other_model")
    shutil.copytree(warmup, root / "cut_model")  # model.safetensors cut short, as by a full disk or a broken copy
    with open(root / "cut_model" / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    shutil.copytree(verifier, root / "verifier")
    (root / "a_file").write_text("not a folder\n")
    records = reward.load_records(str(minigsm), "train", "nl", require_cot=True)[:40]
    for name, correct in (("all_correct.jsonl", True), ("all_wrong.jsonl", False)):
        with open(root / name, "w") as f:
            for r in records:
                f.write(json.dumps({"item_id": r["item_id"], "question": r["question"], "completion": r["answer_cot"],
                                    "correct": correct}) + "\n")
    with open(root / "shared_ids.jsonl", "w") as f:  # two questions under each id, both kinds of label
        for i, r in enumerate(records):
            f.write(json.dumps({"item_id": f"q{i // 2}", "question": r["question"], "completion": r["answer_cot"],
                                "correct": i % 4 < 2}) + "\n")
    for name, change in (("repeated_ids.jsonl", lambda i, r: {"item_id": f"q{i % 20}"}),
                         ("bad_gold.jsonl", lambda i, r: {"answer_value": "abc"} if i in (3, 7) else {})):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(dict(r, **change(i, r))) + "\n" for i, r in enumerate(records))
    return root


# (script, argv, what the error line says). Upper-case words name fixtures: WARMUP (the checkpoint, trained on nl
# CoTs), RUNS/x (a folder of the `runs` fixture), DATA (the prepared minigsm folder), TRAIN_FILE (its training split
# as a file), NEW (a fresh output folder). Every case gets --output_dir NEW unless it names its own.
CASES = [
    # numeric ranges
    ("sft.py", ["--batch_size", 0], "--batch_size must be at least 1, not 0"),
    ("sft.py", ["--micro_batch_size", 0], "--micro_batch_size must be -1 (automatic) or at least 1, not 0"),
    ("sft.py", ["--lr", -0.5], "--lr must be -1 (automatic) or at least 0, not -0.5"),
    ("sft.py", ["--warmup_ratio", 1.0], "--warmup_ratio must be in [0, 1), not 1.0"),
    ("reft.py", ["--num_samples", 0], "--num_samples must be -1 (by model size) or at least 1, not 0"),
    ("reft.py", ["--num_samples", -2], "--num_samples must be -1 (by model size) or at least 1, not -2"),
    ("reft.py", ["--batch_size", 0], "--batch_size must be at least 1, not 0"),
    ("reft.py", ["--ppo_epochs", 0], "--ppo_epochs must be at least 1, not 0"),
    ("reft.py", ["--micro_batch_size", 0], "--micro_batch_size must be at least 1, not 0"),
    ("reft.py", ["--temperature", 0], "--temperature must be above 0, not 0.0"),
    ("reft.py", ["--kl_coef", -0.5], "--kl_coef must be -1 (by model size) or at least 0, not -0.5"),
    ("reft.py", ["--lam", 1.5], "--lam must be -1 (by model size) or in [0, 1], not 1.5"),
    ("rerank.py", ["--top_p", 0], "--top_p must be in (0, 1], not 0.0"),
    ("rerank.py", ["--gen_batch_size", 0], "--gen_batch_size must be at least 1, not 0"),
    ("evaluate.py", ["--temperature", -1], "--temperature must be above 0, not -1.0"),
    ("evaluate.py", ["--max_new_tokens", 0], "--max_new_tokens must be -1 (by model size) or at least 1, not 0"),
    # checkpoints: a missing local folder never goes to the hub; a run folder suggests its checkpoint
    ("sft.py", ["--model", "runs/no_such_run/final"], "--model 'runs/no_such_run/final': no such checkpoint folder"),
    ("sft.py", ["--model", "RUNS/sft"], "--model RUNS/sft: not a checkpoint folder; did you mean RUNS/sft/final?"),
    ("reft.py", ["--model", "RUNS/sft"], "--model RUNS/sft: not a checkpoint folder; did you mean RUNS/sft/final?"),
    ("rerank.py", ["--model", "RUNS/sft"], "--model RUNS/sft: not a checkpoint folder; did you mean RUNS/sft/final?"),
    ("evaluate.py", ["--model", "RUNS/reft"], "--model RUNS/reft: not a checkpoint folder; did you mean "
                                              "RUNS/reft/final?"),
    ("evaluate.py", ["--verifier", "RUNS/other_model/no", "--mode", "rerank"],
     "--verifier 'RUNS/other_model/no': no such checkpoint folder"),
    # output folders
    ("sft.py", ["--output_dir", "RUNS/a_file"], "--output_dir RUNS/a_file: a file of that name is in the way"),
    ("reft.py", ["--output_dir", "RUNS/a_file"], "--output_dir RUNS/a_file: a file of that name is in the way"),
    ("reft.py", ["--output_dir", "RUNS/a_file/sub"], "--output_dir RUNS/a_file/sub: cannot be created (RUNS/a_file "
                                                     "is not a writable folder)"),
    ("rerank.py", ["--output_dir", "RUNS/a_file/sub"], "--output_dir RUNS/a_file/sub: cannot be created"),
    ("evaluate.py", ["--output_dir", "RUNS/a_file"], "--output_dir RUNS/a_file: a file of that name is in the way"),
    # data and splits
    ("reft.py", ["--data", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    ("sft.py", ["--eval_every_epoch", "--eval_split", "tset"], "--data DATA: no tset split for python CoTs"),
    ("evaluate.py", ["--split", "tset"], "its nl splits: test, test_larger, test_longer, train, validation"),
    ("rerank.py", ["--split", "tset"], "--data DATA: no tset split for nl CoTs"),
    ("reft.py", ["--data", "TRAIN_FILE", "--eval_every", 5], "--data TRAIN_FILE is a file, training data only"),
    ("sft.py", ["--data", "TRAIN_FILE", "--eval_every_epoch"], "--data TRAIN_FILE is a file, training data only"),
    ("evaluate.py", ["--data", "TRAIN_FILE", "--split", "test"], "--data TRAIN_FILE is one file, evaluated as it is: "
                                                                 "drop --split test"),
    ("rerank.py", ["--data", "TRAIN_FILE", "--split", "test"], "--data TRAIN_FILE is one file, the training data: "
                                                               "it has no test split"),
    # the CoT kind the checkpoint was trained on
    ("reft.py", ["--cot", "python"], "--cot python, but --model WARMUP was trained on nl CoTs"),
    ("evaluate.py", ["--cot", "python"], "--cot python, but --model WARMUP was trained on nl CoTs"),
    ("rerank.py", ["--cot", "python"], "--cot python, but --model WARMUP was trained on nl CoTs"),
    ("sft.py", ["--model", "WARMUP", "--cot", "python"], "--cot python, but --model WARMUP was trained on nl CoTs"),
    # a verifier needs correct and wrong samples
    ("rerank.py", ["--samples", "RUNS/all_correct.jsonl", "--init", "WARMUP"],
     "RUNS/all_correct.jsonl: all 36 training samples are correct, and a verifier needs both kinds"),
    ("rerank.py", ["--samples", "RUNS/all_wrong.jsonl", "--init", "WARMUP"], "training samples are wrong"),
    # a damaged checkpoint file: safetensors' SafetensorError traceback before; now safe_open's verdict in one line
    *[(script, ["--model", "RUNS/cut_model"], "--model RUNS/cut_model: model.safetensors is damaged (Error while "
       "deserializing header: incomplete metadata, file not fully covered); write it again") for script in STAGES],
    # run folders: never reused or overwritten without --resume or --overwrite
    ("sft.py", ["--output_dir", "RUNS/sft"], "--output_dir RUNS/sft holds a run (96 steps logged in metrics.jsonl"),
    ("reft.py", ["--output_dir", "RUNS/reft"], "--output_dir RUNS/reft holds a run (1 steps logged in metrics.jsonl, "
                                               "a resume state at step"),
    ("reft.py", ["--output_dir", "RUNS/reft", "--resume", "--batch_size", 16, "--kl_coef", 0.5],
     "--resume in RUNS/reft: flags differ from the run's args.json: --batch_size 16 (the run's: 8), --kl_coef 0.5 "
     "(the run's: -1.0); drop them to continue with the run's, or pass --overwrite to start over"),
    ("reft.py", ["--output_dir", "RUNS/reft", "--resume", "--overwrite"], "--resume continues the run in --output_dir "
                                                                          "and --overwrite starts it over: pass one"),
    ("rerank.py", ["--output_dir", "RUNS/rerank"], "--output_dir RUNS/rerank holds a run ("),
    ("sft.py", ["--output_dir", "RUNS/sft", "--resume", "--lr", 0.5], "--lr 0.5 (the run's: -1.0)"),
    # data that would give silently wrong results: repeated item_ids, gold answers no answer can equal
    *[(script, ["--data", "RUNS/repeated_ids.jsonl", "--no-eval_every_epoch"] if script == "sft.py" else
       ["--data", "RUNS/repeated_ids.jsonl"], "RUNS/repeated_ids.jsonl: 20 item_ids name more than one record ('q0' "
       "×2, 'q1' ×2, 'q2' ×2 and 17 more); each question needs its own") for script in STAGES],
    *[(script, ["--data", "RUNS/bad_gold.jsonl", "--no-eval_every_epoch"] if script == "sft.py" else
       ["--data", "RUNS/bad_gold.jsonl"], "RUNS/bad_gold.jsonl: 2 gold answer_values are neither a number nor an "
       "option letter a-e ('minigsm_train_3': 'abc', 'minigsm_train_7': 'abc')") for script in STAGES],
    ("rerank.py", ["--samples", "RUNS/shared_ids.jsonl", "--init", "WARMUP"],
     "RUNS/shared_ids.jsonl: 20 item_ids name more than one question ('q0', 'q1', 'q2' …)"),
    # a verifier is not a policy
    *[(script, ["--model", "RUNS/verifier"], "--model RUNS/verifier: a verifier (LlamaForSequenceClassification, as "
       "rerank.py writes), not a policy; pass a checkpoint written by sft.py or reft.py") for script in STAGES],
    # a checkpoint is never picked on the test split
    ("sft.py", ["--eval_split", "test"], "--eval_split test: the evaluation during training picks a checkpoint, "
                                         "never on a test split; pass --eval_split validation"),
    ("reft.py", ["--eval_every", 5, "--eval_split", "test"], "--eval_split test: the evaluation during training"),
    # a warm-up epoch the run never reaches (--max_steps -1: the table's sft.py runs are --max_steps 1 smoke runs)
    ("sft.py", ["--epochs", 2, "--warmup_epoch", 5, "--max_steps", -1], "--warmup_epoch 5 is after the last of "
     "--epochs 2: the run would write no warm-up checkpoint; pass --warmup_epoch 2 or less (0: none)"),
    # lengths past the model's positions (the tiny model has 1,024)
    ("sft.py", ["--max_length", 100000000], "--max_length 100000000 is over the model's maximum of 1024 positions "
                                            "(--model tiny); pass at most 1024"),
    ("sft.py", ["--model", "WARMUP", "--max_new_tokens", 2000], "--max_new_tokens 2000 is over the model's maximum "
                                                                "of 1024 positions (--model WARMUP)"),
    ("evaluate.py", ["--max_new_tokens", 5000], "--max_new_tokens 5000 is over the model's maximum of 1024 positions "
                                                "(--model WARMUP); pass at most 1024"),
    ("reft.py", ["--max_length", 1025], "--max_length 1025 is over the model's maximum of 1024 positions"),
    ("reft.py", ["--max_length", 1000, "--max_prompt_length", 1500], "--max_prompt_length 1500 is over the model's "
                                                                     "maximum of 1024 positions"),
    ("rerank.py", ["--max_new_tokens", 5000], "--max_new_tokens 5000 is over the model's maximum of 1024 positions"),
    ("rerank.py", ["--samples", "RUNS/all_wrong.jsonl", "--init", "WARMUP", "--max_length", 4096],
     "--max_length 4096 is over the model's maximum of 1024 positions (--init WARMUP)"),
]


def expand(items, paths):
    """The case's words with the fixture names replaced by their paths."""
    out = []
    for item in items:
        text = str(item)
        for name, path in paths.items():
            text = text.replace(name, str(path))
        out.append(text)
    return out


def paths_of(runs, warmup, minigsm, tmp_path):
    return {"RUNS": runs, "WARMUP": warmup, "TRAIN_FILE": minigsm / "train_nl.jsonl", "DATA": minigsm,
            "NEW": tmp_path / "new"}


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{c[0]} {' '.join(map(str, c[1]))}" for c in CASES])
def test_bad_invocation_is_one_error_line(script, argv, message, runs, warmup, minigsm, tmp_path):
    paths = paths_of(runs, warmup, minigsm, tmp_path)
    argv = expand(argv, paths)
    defaults = {"sft.py": ["--data", minigsm, "--max_steps", 1],
                "reft.py": ["--model", warmup, "--data", minigsm, *REFT[:4]],
                "rerank.py": ["--model", warmup, "--data", minigsm],
                "evaluate.py": ["--model", warmup, "--data", minigsm]}[script]
    out = tmp_path / "new"
    folder = next((runs / name for name in ("sft", "reft", "rerank") if str(runs / name) in argv), None)
    before = snapshot(folder) if folder else None
    t0 = time.time()
    error = main_error(STAGES[script], [*defaults, "--output_dir", out, *argv])
    seconds = time.time() - t0
    assert error.startswith("error: ") and "\n" not in error, error
    assert expand([message], paths)[0] in error, error
    assert seconds < 20, f"{seconds:.1f} s before the error"
    assert not out.exists()  # nothing written
    if folder:
        assert snapshot(folder) == before, f"{folder} changed"


@pytest.mark.parametrize("argv, message", [
    (["--reft_steps", 0], "--reft_steps must be at least 1, not 0"),
    (["--lam", 2.0], "--lam must be in [0, 1], not 2.0"),
    (["--out_dir", "RUNS/a_file"], "--out_dir RUNS/a_file: a file of that name is in the way"),
    (["--warmup_epoch", 50], "--warmup_epoch 50 is after the last of --sft_epochs 40"),
])
def test_quickstart_checks_its_flags_first(argv, message, runs, warmup, minigsm, tmp_path):
    paths = paths_of(runs, warmup, minigsm, tmp_path)
    with pytest.raises(SystemExit) as e:
        quickstart.quickstart_args(expand(argv, paths))
    assert str(e.value).startswith("error: " + expand([message], paths)[0]) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["sft.py", "--batch_size", 0], "error: --batch_size must be at least 1, not 0"),
    (["reft.py", "--model", "RUNS/reft", "--ppo_epochs", 0], "error: --ppo_epochs must be at least 1, not 0"),
    (["reft.py", "--model", "RUNS/reft"], "error: --model RUNS/reft: not a checkpoint folder; did you mean "
                                          "RUNS/reft/final?"),
    (["reft.py", "--model", "RUNS/reft/final", "--data", "DATA", "--output_dir", "RUNS/reft"],
     "error: --output_dir RUNS/reft holds a run"),
    (["evaluate.py", "--model", "RUNS/reft/final", "--data", "DATA", "--split", "tset"],
     "error: --data DATA: no tset split"),
    (["scripts/quickstart.py", "--out_dir", "RUNS/a_file"], "error: --out_dir RUNS/a_file: a file of that name is in "
                                                            "the way (it must be a folder)"),
])
def test_bad_invocation_on_the_command_line(argv, message, runs, warmup, minigsm, tmp_path):
    """As a user sees it: exit status 1, one line on stderr, no traceback, within seconds."""
    paths = paths_of(runs, warmup, minigsm, tmp_path)
    before = snapshot(runs / "reft")
    t0 = time.time()
    p = run([PY, *expand(argv, paths)], check=False, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [line for line in p.stderr.strip().splitlines() if line.startswith("error")]
    assert p.stderr.strip().splitlines()[0].startswith(expand([message], paths)[0]), p.stderr
    assert time.time() - t0 < 20
    assert snapshot(runs / "reft") == before


# ---------------------------------------------------------------------------- the four silent mistakes

def test_rerank_does_not_reuse_samples_drawn_otherwise(runs, warmup, minigsm):
    """It printed "8 already in samples.jsonl, 0 to do" and trained a python verifier on the nl samples of another
    model. Now the folder is refused, and with --resume every sampling flag that differs is named."""
    before = snapshot(runs / "rerank")
    assert (runs / "rerank" / "samples.jsonl").stat().st_size > 0
    common = ["--data", minigsm, "--output_dir", runs / "rerank", "--model", runs / "other_model", "--num_samples", 8]
    error = main_error(rerank, common)
    assert error.startswith(f"error: --output_dir {runs / 'rerank'} holds a run (") and "samples drawn" in error
    assert "pass --resume to continue it or --overwrite to start over" in error
    error = main_error(rerank, [*common, "--resume"])
    assert f"--model {runs / 'other_model'} (the run's: {warmup})" in error
    assert "--num_samples 8 (the run's: 2)" in error
    assert snapshot(runs / "rerank") == before


def test_resume_says_what_it_does(runs, warmup, minigsm, tmp_path):
    """--resume on an empty folder starts at 0 and says so; a resume that only runs longer keeps args.json as the run
    started and records the launch beside it; forgetting --resume refuses instead of emptying the metrics."""
    fresh = tmp_path / "fresh"
    p = run([PY, "reft.py", "--model", warmup, "--data", minigsm, *REFT, "--max_steps", 1, "--output_dir", fresh,
             "--resume"])
    assert f"no resume state in {fresh}: starting at step 0" in p.stdout
    assert [m["step"] for m in read_metrics(fresh / "metrics.jsonl")] == [1]

    folder = tmp_path / "reft"
    shutil.copytree(runs / "reft", folder)
    args_json = (folder / "args.json").read_bytes()
    run([PY, "reft.py", "--model", warmup, "--data", minigsm, *REFT, "--lr", 0, "--max_steps", 2, "--output_dir",
         folder, "--resume"])
    assert (folder / "args.json").read_bytes() == args_json
    launches = [json.loads(line) for line in (folder / "launches.jsonl").read_text().splitlines()]
    assert [(x["resumed"], x["changed"], x["world_size"]) for x in launches] == [
        (False, {}, 1), (True, {"max_steps": [1, 2], "output_dir": [str(runs / "reft"), str(folder)]}, 1)]
    assert [m["step"] for m in read_metrics(folder / "metrics.jsonl")] == [1, 2]


@dataclasses.dataclass
class Flags:
    output_dir: str = "runs/x"
    resume: bool = False
    overwrite: bool = False
    k: int = 8
    lr: float = -1.0
    cot: str = "auto"
    save_steps: int = 0
    save_best: bool = True
    note: str = "default"
    eval_data: str = ""
    """a flag whose default is empty: --help shows no default for it (argparse.SUPPRESS)"""


def test_resume_takes_every_flag_not_given_from_the_run(tmp_path):
    """`--output_dir D --resume` alone continues the run as it last ran: args.json's flags (an automatic -1 stays
    -1), with the flags its last launch changed; a flag given on the command line, in any spelling (`-k`, `--no-x`),
    is this launch's. It used to take every flag not given from the defaults: the resume was refused unless every
    flag was typed again, and a flag that may change silently went back to its default (--save_steps 2 -> 0)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps({
        "output_dir": "elsewhere/run", "resume": False, "overwrite": True, "k": 4, "lr": -1.0, "cot": "nl",
        "save_steps": 2, "save_best": True, "eval_data": "val.jsonl", "gone": 1, "world_size": 2, "python": "3.11.0",
        "torch": "2.13.0"}))
    (folder / "launches.jsonl").write_text(
        json.dumps({"resumed": False, "changed": {}}) + "\n"
        + json.dumps({"resumed": True, "changed": {"save_steps": [2, 5], "note": ["default", "old"]}}) + "\n"
        + json.dumps({"resumed": True, "changed": {"note": ["default", "last"]}}) + "\n"
        + '{"resumed": true, "changed": {"note": ["default", "cut by a ki')
    parse = sft.parse_args
    assert parse(Flags, ["--output_dir", str(folder), "--resume"]) == Flags(
        output_dir=str(folder), resume=True, k=4, lr=-1.0, cot="nl", save_steps=2, save_best=True, note="last",
        eval_data="val.jsonl")
    assert parse(Flags, ["--output_dir", str(folder), "--resume", "-k", "8", "--no-save_best", "--save_steps",
                         "0", "--lr", "-1"]) == Flags(output_dir=str(folder), resume=True, k=8, lr=-1.0, cot="nl",
                                                       save_steps=0, save_best=False, note="last",
                                                       eval_data="val.jsonl")
    assert parse(Flags, ["--output_dir", str(folder), "--resume", "--eval_data", "b.jsonl"]).eval_data == "b.jsonl"
    assert parse(Flags, ["--output_dir", str(folder), "--resume", "--k", "3"]).k == 3
    assert parse(Flags, ["--output_dir", str(folder), "--resume", "--overwrite"]).overwrite is True
    assert parse(Flags, ["--output_dir", str(folder)]) == Flags(output_dir=str(folder))  # without --resume: defaults
    assert parse(Flags, ["--output_dir", str(tmp_path / "none"), "--resume"]) == Flags(
        output_dir=str(tmp_path / "none"), resume=True)
    (folder / "args.json").write_text("{cut")
    assert parse(Flags, ["--output_dir", str(folder), "--resume"]) == Flags(output_dir=str(folder), resume=True)


def test_no_flag_is_abbreviated(runs, tmp_path):
    """`--ov` was taken as --overwrite and erased the run; now it is argparse's unrecognized argument, and the folder
    stays as it was. Every parser of the project refuses abbreviations."""
    import ast
    before = snapshot(runs / "reft")
    p = run([PY, "reft.py", "--output_dir", runs / "reft", "--ov"], check=False, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == "reft.py: error: unrecognized arguments: --ov"
    assert snapshot(runs / "reft") == before
    parsers = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part.startswith((".venv", "runs")) for part in path.relative_to(ROOT).parts):
            continue  # not the project's: .venv, benchmarks/.venv-trl* (TRL's own venvs), runs/
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                parsers.append(path.relative_to(ROOT))
                assert any(k.arg == "allow_abbrev" and k.value.value is False for k in node.keywords), path
    assert len(parsers) > 20


def test_lr_zero_trains_at_zero(runs, warmup):
    """--lr 0 used to mean "the automatic rate"; the frozen-policy control needs it to mean 0."""
    from safetensors.torch import load_file
    assert json.loads((runs / "reft" / "final" / "train_args.json").read_text())["lr"] == 0.0
    trained, start = load_file(runs / "reft" / "final" / "model.safetensors"), load_file(warmup / "model.safetensors")
    assert trained.keys() == start.keys() and all(trained[k].equal(start[k]) for k in start)


def test_a_data_file_is_one_split(minigsm, warmup, tmp_path):
    """A --data file was returned whatever split was asked: the "validation" of sft.py and reft.py (and --save_best)
    scored the training file, and evaluate.py reported it as "test". Now a file is the training data, or with
    evaluate.py the questions it evaluates, named as the file."""
    train_file = minigsm / "train_nl.jsonl"
    assert len(reward.load_records(str(train_file), "train")) == 256
    with pytest.raises(SystemExit, match="has no validation split"):
        reward.load_records(str(train_file), "validation")
    run([PY, "evaluate.py", "--model", warmup, "--data", minigsm / "validation_nl.jsonl", "--limit", 4,
         "--max_new_tokens", 8, "--output_dir", tmp_path / "eval"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["split"] is None and results["data"] == str(minigsm / "validation_nl.jsonl")
    p = run([PY, "evaluate.py", "--model", warmup, "--data", minigsm, "--limit", 4, "--max_new_tokens", 8,
             "--output_dir", tmp_path / "eval"])
    assert f"overwriting the results in {tmp_path / 'eval'}" in p.stdout
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["split"] == "test"


@pytest.mark.parametrize("damage", ["cut in the data", "cut in the header", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_one_error_line(damage, tmp_path):
    """check_checkpoint opens each safetensors file's header with safe_open: a file cut anywhere, or not safetensors at
    all, is one line naming it, before any model loads."""
    import torch
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    sft.check_checkpoint(str(tmp_path), "--model")  # whole: no error
    damaged = {"cut in the data": data[:len(data) // 2], "cut in the header": data[:20],
               "garbage": b"not a safetensors file", "empty": b""}[damage]
    (tmp_path / "model.safetensors").write_bytes(damaged)
    with pytest.raises(SystemExit) as e:
        sft.check_checkpoint(str(tmp_path), "--model")
    error = str(e.value)
    assert error.startswith(f"error: --model {tmp_path}: model.safetensors is damaged (") and "\n" not in error


def test_the_checkpoint_names_its_cot(tmp_path):
    """Without --cot a stage takes the kind its checkpoints were trained on; an explicit other kind, or checkpoints of
    two kinds, is an error (a model trained on nl scores ~0 on python prompts, silently)."""
    for name, cot in (("nl", "nl"), ("py", "python"), ("none", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_args.json").write_text(json.dumps({"cot": cot} if cot else {}))
    for checkpoints, given, expected in (({"--model": "py"}, "auto", "python"), ({"--model": "nl"}, "auto", "nl"),
                                         ({"--model": "none"}, "auto", "nl"), ({"--model": "none"}, "python", "python"),
                                         ({"--model": "py", "--verifier": "none"}, "auto", "python"),
                                         ({"--model": "py"}, "python", "python")):
        args = evaluate.Args(cot=given)
        evaluate.resolve_cot(args, {flag: str(tmp_path / name) for flag, name in checkpoints.items()})
        assert args.cot == expected, (checkpoints, given)
    with pytest.raises(SystemExit, match=r"--cot nl, but --model .*/py was trained on python CoTs"):
        evaluate.resolve_cot(evaluate.Args(cot="nl"), {"--model": str(tmp_path / "py")})
    with pytest.raises(SystemExit, match="trained on different CoT kinds"):
        evaluate.resolve_cot(evaluate.Args(), {"--model": str(tmp_path / "py"), "--verifier": str(tmp_path / "nl")})


def test_overwrite_starts_over(runs, warmup, minigsm, tmp_path):
    """--overwrite removes the run's files (and only those) before the new run writes its own."""
    folder = tmp_path / "reft"
    shutil.copytree(runs / "reft", folder)
    (folder / "notes.txt").write_text("mine\n")
    p = run([PY, "reft.py", "--model", warmup, "--data", minigsm, *REFT, "--max_steps", 1, "--output_dir", folder,
             "--overwrite"])
    assert (f"--overwrite: removed {folder}/{{args.json, checkpoint-1/, final/, launches.jsonl, metrics.jsonl}}"
            in p.stdout.splitlines())
    launches = (folder / "launches.jsonl").read_text().splitlines()
    assert len(launches) == 1 and (folder / "notes.txt").read_text() == "mine\n"
    assert [m["step"] for m in read_metrics(folder / "metrics.jsonl")] == [1]


def test_a_flag_newer_than_the_run_counts_as_its_default(runs, warmup, minigsm, tmp_path, capsys):
    """A run started before a flag existed has no entry for it in args.json: it ran with that flag's default, so a
    resume that leaves the flag at its default is the same run; one that sets it is refused."""
    folder = tmp_path / "rerank"
    shutil.copytree(runs / "rerank", folder)
    saved = json.loads((folder / "args.json").read_text())
    del saved["top_k"]
    (folder / "args.json").write_text(json.dumps(saved))
    args = rerank.Args(**{k: v for k, v in saved.items() if k in rerank.Args.__dataclass_fields__})
    args.output_dir, args.resume = str(folder), True
    assert rerank.plan_run(args, dataclasses.asdict(args), rerank.MAY_CHANGE, ("samples.jsonl",)) is True
    args.top_k = 5
    with pytest.raises(SystemExit, match=r"--top_k 5 \(the run's: 0\)"):
        rerank.plan_run(args, dataclasses.asdict(args), rerank.MAY_CHANGE, ("samples.jsonl",))


def test_compile_may_change_on_resume(runs, tmp_path):
    """--compile changes how fast the rollout runs, not what is learned (MAY_CHANGE): a resume may turn it on, also in
    a run started before the flag existed."""
    folder = tmp_path / "reft"
    shutil.copytree(runs / "reft", folder)
    saved = json.loads((folder / "args.json").read_text())
    del saved["compile"]
    (folder / "args.json").write_text(json.dumps(saved))
    args = reft.Args(**{k: v for k, v in saved.items() if k in reft.Args.__dataclass_fields__})
    args.output_dir, args.resume, args.compile = str(folder), True, True
    assert reft.plan_run(args, dataclasses.asdict(args), reft.MAY_CHANGE) is True
    args.seed += 1
    with pytest.raises(SystemExit, match=r"--seed"):  # what is learned still may not change
        reft.plan_run(args, dataclasses.asdict(args), reft.MAY_CHANGE)


@pytest.mark.parametrize("stage", [reft, rerank], ids=["reft.py", "rerank.py"])
def test_a_missing_default_model_says_which_command_writes_it(stage, minigsm, tmp_path, monkeypatch):
    """The default --model runs/sft/warmup, missing (sft.py not run yet, or run too short to reach --warmup_epoch),
    was "no such checkpoint folder", with no word on where it comes from."""
    monkeypatch.chdir(tmp_path)  # no runs/ here
    error = main_error(stage, ["--data", minigsm, "--output_dir", tmp_path / "out"])
    assert error == ("error: --model runs/sft/warmup (the default) not found: `python sft.py` writes it (its epoch "
                     "--warmup_epoch, which --epochs must reach; with this run's --data and --cot), or pass --model "
                     "PATH, a checkpoint written by sft.py or reft.py")
    assert not (tmp_path / "out").exists()


def test_sft_says_before_training_that_it_writes_no_warmup(minigsm, tmp_path):
    """`sft.py --epochs 3` on tiny (automatic --warmup_epoch 24) trained for minutes and only then said that no
    warm-up checkpoint was written. Now one warning line before the model loads says so and what to pass; the run
    is not refused (a short run may not want a warm-up, and a --max_steps smoke run stays allowed)."""
    for flags, ends, fix in ((["--epochs", 1], "--epochs 1", "--warmup_epoch 1 or less"),
                             (["--max_steps", 1], "--max_steps 1", "--max_steps 192 or more")):
        out = tmp_path / ends.split()[0].strip("-")
        p = run([PY, "sft.py", "--data", minigsm, *flags, "--no-eval_every_epoch", "--save_epochs", "none",
                 "--output_dir", out])
        lines = p.stdout.splitlines()
        warning = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
        assert len(warning) == 1 and lines[warning[0]] == (
            f"warning: {ends} ends the run before epoch 24 (--warmup_epoch), so it writes no warm-up checkpoint "
            f"{out}/warmup (reft.py's and rerank.py's default --model is runs/sft/warmup); pass {fix} for one, "
            f"--warmup_epoch 0 for none"), p.stdout
        assert warning[0] < next(i for i, line in enumerate(lines) if line.startswith("model: "))
        assert (out / "final" / "config.json").is_file() and not (out / "warmup").exists()


def test_compare_refuses_repeated_item_ids(tmp_path):
    """scripts/compare.py kept one row per item_id and printed "n = 1 questions" for a file of 50 rows with one id."""
    import compare
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(
            json.dumps({"item_id": f"q{i % 3}" if name == "b" else f"q{i}", "greedy_correct": i % 2 == 0}) + "\n"
            for i in range(5)))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "a")])["n"] == 5
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert str(e.value) == (f"error: {tmp_path / 'b' / 'predictions.jsonl'}: 2 item_ids on more than one row ('q0' on "
                            f"lines 1, 4; 'q1' on lines 2, 5): each question must be evaluated once")
