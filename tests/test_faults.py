"""Faults at the worst moment lose nothing a completed save held: a kill at each rename of a save, a metrics line cut
by a kill, a kill while resume rewrites the metrics, flipped bytes in a resume state, a full disk, a killed rerank
sampling. Each replay ends in the uninterrupted run's weights and metrics (or samples), or in one error line.

sft.py stands for reft.py and rerank.py's verifier training: the three share the resume-state and metrics code
(tests/test_copies.py). The runs are a tiny model on 64 examples, 4 steps with a resume state after each."""
import errno
import json
import os
import re
import shutil
import sys
import textwrap
import types

import pytest
import torch

from conftest import PY, ROOT, main_error, read_metrics, run, torchrun

sys.path.insert(0, str(ROOT))
import rerank  # noqa: E402
import sft  # noqa: E402

TINY = ["--epochs", 1, "--batch_size", 16, "--micro_batch_size", 16, "--save_steps", 1, "--save_epochs", "none",
        "--seed", 3, "--tiny_hidden", 64, "--tiny_layers", 2, "--tiny_intermediate", 128, "--tiny_vocab", 300,
        "--log_every", 0, "--no-eval_every_epoch",
        "--warmup_epoch", 0]  # one epoch: no warm-up checkpoint, and so no warning that none is written

# Runs a stage (`python faulty.py STAGE.py ARGS...`) and dies as kill -9 does (os._exit: no cleanup, no flush of
# Python's buffers) at the fault named by $FAULT.
FAULTY = textwrap.dedent('''
    """FAULT=rename:N          at the N-th os.rename/os.replace onto a path that names "checkpoint"
    FAULT=truncate:NAME       at the first write to a file NAME* opened with mode "w"
    FAULT=cut:NAME:N          in the N-th write to a file NAME* opened with mode "a", after its first line and
                              half of the next"""
    import builtins, os, runpy, sys
    sys.path.insert(0, os.getcwd())
    kind, *spec = os.environ["FAULT"].split(":")
    count = [0]

    def die():
        os._exit(137)

    def dying(real):
        def rename(src, dst, *a, **kw):
            if "checkpoint" in os.fspath(dst):
                count[0] += 1
                if count[0] == int(spec[0]):
                    die()
            return real(src, dst, *a, **kw)
        return rename

    class Dying:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def writelines(self, lines):
            self.write("".join(lines))

        def write(self, data):
            count[0] += 1
            if kind == "truncate":
                die()
            if count[0] == int(spec[1]):
                first = data.index("\\n") + 1
                self.f.write(data[:first + (data.index("\\n", first) - first) // 2])
                self.f.flush()
                die()
            return self.f.write(data)

    real_open = builtins.open

    def faulty_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        hit = isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)).startswith(spec[0])
        return Dying(f) if hit and mode.startswith({"truncate": "w", "cut": "a"}.get(kind, "-")) else f

    if kind == "rename":
        os.rename, os.replace = dying(os.rename), dying(os.replace)
    builtins.open = faulty_open
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')


@pytest.fixture(scope="module")
def pool(minigsm, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "pool.jsonl"
    path.write_text("".join((minigsm / "train_nl.jsonl").read_text().splitlines(keepends=True)[:64]))
    return path


@pytest.fixture(scope="module")
def uninterrupted(pool, tmp_path_factory):
    """(output folder, final weights, losses by step) of the run never interrupted."""
    out = tmp_path_factory.mktemp("faults") / "full"
    run([PY, "sft.py", "--data", pool, *TINY, "--output_dir", out])
    return out, weights(out), losses(out)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faulty.py"
    path.write_text(FAULTY)
    return path


def weights(out):
    from safetensors.torch import load_file
    return load_file(out / "final" / "model.safetensors")


def losses(out):
    return [(m["step"], m["loss"]) for m in read_metrics(out / "metrics.jsonl")]


def killed(faulty, fault, *cmd):
    p = run([PY, faulty, *cmd], check=False, env={"FAULT": fault})
    assert p.returncode == 137, f"the fault {fault} never struck (exit {p.returncode})\n{p.stderr[-3000:]}"


def assert_same_run(out, uninterrupted):
    _, want, want_losses = uninterrupted
    got = weights(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert losses(out) == want_losses


@pytest.mark.parametrize("n", [3, 4, 5])
def test_a_kill_at_each_rename_of_a_save_resumes_from_the_newest_whole_state(pool, uninterrupted, faulty, tmp_path,
                                                                            n):
    """Killed at the 1st or 2nd rename of the second save (step 2), or at the first of the third: the save of step 1
    is never lost (a kill between the renames of an earlier design restarted from step 0), and the state of step 2
    counts once its manifest is in. The resumed run says which state it took, ends in the uninterrupted run's
    weights and losses and leaves the last two states, no partial folder."""
    out = tmp_path / "run"
    killed(faulty, f"rename:{n}", "sft.py", "--data", pool, *TINY, "--output_dir", out)
    p = run([PY, "sft.py", "--data", pool, *TINY, "--output_dir", out, "--resume"])
    taken = re.findall(r"^resumed from (\S+)$", p.stdout, re.M)
    # 3: DCP's own rename of its .metadata (step 2), 4: the manifest's (step 2, whole after it), 5: DCP's of step 3
    assert taken == [str(out / {3: "checkpoint-1", 4: "checkpoint-1", 5: "checkpoint-2"}[n])], p.stdout
    assert_same_run(out, uninterrupted)
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-3",
                                                                                       "checkpoint-4"]


def test_a_resume_given_only_its_folder_ends_as_the_uninterrupted_run(pool, uninterrupted, faulty, tmp_path):
    """`sft.py --output_dir D --resume` takes every other flag from the run's args.json: it used to take their
    defaults and refuse the resume (--data, --batch_size, ... differ), or with them all typed again, put the flags
    that may change back to their defaults (--save_steps 1 -> 0)."""
    out = tmp_path / "run"
    killed(faulty, "rename:4", "sft.py", "--data", pool, *TINY, "--output_dir", out)
    run([PY, "sft.py", "--output_dir", out, "--resume"])
    assert_same_run(out, uninterrupted)
    launches = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert [(x["resumed"], x["changed"]) for x in launches] == [(False, {}), (True, {})]


def interrupted(cmd, out, processes):
    """Run `cmd` in a session of its own, Ctrl-C it (SIGINT to its process group, as a terminal does) once a step is
    logged, and return (each rank's exit status, stderr). Under torchrun each rank runs in a shell that writes the
    rank's status to out.rank{RANK}."""
    import signal
    import subprocess
    import time
    if processes > 1:
        shell = f"{PY} \"$@\"; echo $? > {out}.rank$RANK"
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "--no-python",
               "bash", "-c", shell, "rank", *cmd]
    else:
        cmd = [PY, *cmd]
    p = subprocess.Popen([str(a) for a in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    if processes == 1:
        return [p.returncode], stderr
    return [int((out.parent / f"{out.name}.rank{r}").read_text()) for r in range(processes)], stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_is_one_line_and_130_on_every_rank_and_the_resume_continues(pool, uninterrupted, tmp_path,
                                                                            processes):
    """Ctrl-C printed a KeyboardInterrupt traceback per rank (~80 lines of [rank0]: ...) and no word of --resume.
    Now every rank exits 130 at once, rank 0 with one line saying how far the run got and the command that
    continues it, and that command ends on the uninterrupted run's weights."""
    out = tmp_path / "run"
    statuses, stderr = interrupted(["sft.py", "--data", pool, *TINY, "--micro_batch_size", 16 // processes,
                                    "--output_dir", out], out, processes)
    assert statuses == [130] * processes, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if "interrupted" in line or "[rank" in line]
    # torchrun's own SignalException traceback is the launcher's, not a rank's
    assert stderr.count("Traceback") == stderr.count("elastic.multiprocessing.api.SignalException: Process"), stderr
    assert len(ours) == 1 and re.fullmatch(rf"interrupted at step \d \(.*\); continue with: sft.py --output_dir "
                                           rf"{out} --resume", ours[0]), stderr[-3000:]
    if processes == 1:
        run([PY, "sft.py", "--output_dir", out, "--resume"])
        assert_same_run(out, uninterrupted)
    else:
        torchrun(2, "sft.py", "--output_dir", out, "--resume")
        assert [step for step, _ in losses(out)] == [1, 2, 3, 4]


def test_a_cut_metrics_line_is_dropped_with_one_warning(pool, uninterrupted, faulty, tmp_path):
    """A kill in the middle of a metrics line made every later --resume crash on it (JSONDecodeError)."""
    out = tmp_path / "run"
    killed(faulty, "rename:4", "sft.py", "--data", pool, *TINY, "--output_dir", out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0.75, "lo')
    p = run([PY, "sft.py", "--data", pool, *TINY, "--output_dir", out, "--resume"])
    assert [line for line in p.stdout.splitlines() if line.startswith("warning:")] == [
        f"warning: {out / 'metrics.jsonl'}: dropped its last line, cut by a kill ('{{\"step\": 3, \"epoch\": 0.75, "
        f"\"lo')"]
    assert_same_run(out, uninterrupted)


def test_a_kill_while_resume_trims_the_metrics_keeps_them(pool, uninterrupted, faulty, tmp_path):
    """The trim rewrote metrics.jsonl in place: a kill after its truncation left it empty, and the next resume went
    on silently with the history gone (and the quickstart picks the best SFT epoch from that file)."""
    out = tmp_path / "run"
    killed(faulty, "rename:5", "sft.py", "--data", pool, *TINY, "--output_dir", out)
    before = (out / "metrics.jsonl").read_text()
    killed(faulty, "truncate:metrics.jsonl", "sft.py", "--data", pool, *TINY, "--output_dir", out, "--resume")
    assert (out / "metrics.jsonl").read_text() == before
    run([PY, "sft.py", "--data", pool, *TINY, "--output_dir", out, "--resume"])
    assert_same_run(out, uninterrupted)


def flip(path, n=48):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_fall_back_to_the_previous_state_or_stop_with_one_line(pool, uninterrupted, tmp_path):
    """48 flipped bytes in the newest state's shard resumed silently with wrong weights. Now the damaged file is
    named, the state set aside and the previous one taken: the run repeats its last step and ends as the
    uninterrupted one. With every state damaged it stops with one error line naming the file."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    flip(out / "checkpoint-4" / "__0_0.distcp")
    p = run([PY, "sft.py", "--data", pool, *TINY, "--output_dir", out, "--resume"])
    assert (f"warning: the resume state {out / 'checkpoint-4'} is damaged (__0_0.distcp does not match its sha256)"
            in p.stdout), p.stdout
    assert f"resumed from {out / 'checkpoint-3'}\n" in p.stdout
    assert_same_run(out, uninterrupted)

    for name in ("checkpoint-3", "checkpoint-4"):
        flip(out / name / "__0_0.distcp")
    error = main_error(sft, ["--data", pool, *TINY, "--output_dir", out, "--resume"])
    assert error == (f"error: --output_dir {out}: no intact resume state to continue from (checkpoint-4: "
                     f"__0_0.distcp does not match its sha256; checkpoint-3: __0_0.distcp does not match its "
                     f"sha256)"), error


def test_two_processes_hash_their_own_files_and_share_the_check(pool, tmp_path):
    """Under torchrun each rank hashes the files it wrote and rank 0 records them all; at resume the ranks split the
    check (sorted names, every second one: rank 1 takes __0_0.distcp). A same-size corruption there is found by rank
    1, named by rank 0's one warning, and the previous state, whose files both ranks check, is taken."""
    out = tmp_path / "run"
    torchrun(2, "sft.py", "--data", pool, *TINY, "--micro_batch_size", 8, "--output_dir", out)
    want = weights(out)
    manifest = json.loads((out / "checkpoint-4" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "loop_state_rank0.pt",
                                         "loop_state_rank1.pt"]
    flip(out / "checkpoint-4" / "__0_0.distcp")
    p = torchrun(2, "sft.py", "--output_dir", out, "--resume")
    assert [line for line in p.stdout.splitlines() if line.startswith(("warning:", "resumed from"))] == [
        f"warning: the resume state {out / 'checkpoint-4'} is damaged (__0_0.distcp does not match its sha256); set "
        f"aside as {out / 'checkpoint-4.damaged'}, trying the previous one", f"resumed from {out / 'checkpoint-3'}"]
    got = weights(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_state(pool, tmp_path, monkeypatch):
    """Every write of the resume state's shards goes to /dev/full (ENOSPC, as on a full disk): one error line
    naming the folder and its free space instead of a traceback ([enforce fail at inline_container.cc]), and the
    partial checkpoint folder removed instead of left to keep the disk full (DCP fails on every rank)."""
    from contextlib import contextmanager
    from torch.distributed.checkpoint.filesystem import FileSystem
    real = FileSystem.create_stream

    @contextmanager
    def full_disk(self, path, mode):
        if "w" in mode and not dev_full:  # a sandbox's /dev/full accepts writes: the error a full disk gives
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        with (open("/dev/full", mode) if "w" in mode else real(self, path, mode)) as stream:
            yield stream

    try:
        with open("/dev/full", "w") as f:
            f.write("x")
        dev_full = False
    except OSError:
        dev_full = True
    monkeypatch.setattr(FileSystem, "create_stream", full_disk)
    out = tmp_path / "run"
    error = main_error(sft, ["--data", pool, *TINY, "--output_dir", out])
    assert error.startswith(f"error: no space left on the disk of {out} while writing {out / 'checkpoint-1'} (") \
        and error.endswith(" GB free now): make room, then continue with --resume") and "\n" not in error, error
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint")]


@pytest.mark.parametrize("folder", ["init", "final"])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line(pool, tmp_path, monkeypatch, folder):
    """safetensors' writer on a full disk raises SafetensorError("... No space left on device (os error 28)", the
    message measured on a 200 KB tmpfs), not an OSError: writing init/ or final/ ended in a traceback. Now one line
    naming the folder."""
    import transformers.modeling_utils
    from safetensors import SafetensorError
    real = transformers.modeling_utils.safe_save_file

    def full_disk(tensors, path, *a, **kw):
        if os.path.basename(os.path.dirname(path)) == folder:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "run"
    error = main_error(sft, ["--data", pool, *TINY, "--output_dir", out])
    assert error.startswith(f"error: no space left on the disk of {out} while writing {out / folder} (") \
        and error.endswith("GB free now): make room, then continue with --resume") and "\n" not in error, error


def test_too_little_disk_for_two_states_is_refused_before_training(pool, tmp_path, monkeypatch):
    """A save needs room for two states during the switch, 12 bytes per parameter each (101,440 parameters)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=10**9, free=10**6))
    out = tmp_path / "run"
    error = main_error(sft, ["--data", pool, *TINY, "--output_dir", out])
    assert error == (f"error: --output_dir {out}: 0.001 GB free, saving the resume state needs 0.00243 GB (two "
                     f"states during the switch, 12 bytes per parameter each)"), error
    assert not (out / "metrics.jsonl").exists()


def test_a_killed_sampling_is_resumed_with_the_rows_of_the_uninterrupted_one(pool, uninterrupted, faulty, tmp_path):
    """Killed while writing the samples of the second pair of questions, after one whole line: that question
    counted as done with fewer samples, and the questions after it were drawn from a generator reseeded at the
    start (from seed + rank). Now the question is sampled again and every question's samples depend only on (seed,
    question): the file ends byte for byte as the uninterrupted one, made by 2 processes."""
    cmd = ["rerank.py", "--model", uninterrupted[0] / "final", "--data", pool, "--limit", 4, "--num_samples", 3,
           "--gen_batch_size", 6, "--max_new_tokens", 24, "--epochs", 1, "--batch_size", 2, "--holdout_fraction",
           0.25, "--gold_samples"]  # the gold CoTs as correct samples: the tiny model's own may all be wrong
    torchrun(2, *cmd, "--output_dir", tmp_path / "full")  # and 2 processes write the file 1 process writes
    want = (tmp_path / "full" / "samples.jsonl").read_text()
    out = tmp_path / "run"
    killed(faulty, "cut:samples.jsonl:2", *cmd, "--output_dir", out)
    whole = [line for line in (out / "samples.jsonl").read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert want.startswith("".join(whole))
    ids = [json.loads(line)["item_id"] for line in want.splitlines()]
    assert ids.count(ids[len(whole) - 1]) > ids[:len(whole)].count(ids[len(whole) - 1])  # a question cut short
    p = run([PY, *cmd, "--output_dir", out, "--resume"])
    assert "questions with fewer rows than they were sampled with dropped" in p.stdout
    assert (out / "samples.jsonl").read_text() == want
    assert rerank.read_samples(out / "samples.jsonl")


def test_the_quickstart_resumes_a_stage_from_any_whole_state_a_kill_left(tmp_path, capfd):
    """The quickstart adds --resume exactly when a stage would refuse the folder without it (run_progress): any state
    a kill left, whole or not. It looked for checkpoint/ only. With --resume the stage takes the newest whole state
    (find_resume_state): a checkpoint-STEP/ with its manifest counts, a partial one or a .damaged one does not.
    Once the stage has finished, the quickstart removes its resume states (it never reruns a finished stage)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import quickstart
    out = tmp_path / "stage"
    cmd = [PY, "-c", "import sys; print('argv', sys.argv[1:])", "--output_dir", out]
    out.mkdir()
    quickstart.stage("stage", tmp_path / "never_done", cmd, {})
    assert "--resume" not in capfd.readouterr().out and sft.run_progress(out) is None
    for folder, whole in (("checkpoint-4", False), ("checkpoint-3.damaged", False), ("checkpoint-2", True)):
        (out / folder).mkdir(parents=True)
        if folder != "checkpoint-4":
            (out / folder / "manifest.json").write_text("{}")
        assert sft.run_progress(out) is not None
        assert (sft.find_resume_state(out) is not None) == whole
        quickstart.stage("stage", tmp_path / "never_done", cmd, {})
        assert "argv ['--output_dir', '%s', '--resume']" % out in capfd.readouterr().out
        assert not list(out.glob("checkpoint-*"))


def test_a_run_saving_every_step_leaves_its_two_newest_states(uninterrupted):
    """--save_steps 1 over 4 steps: each save removes every state but the newest one before it, so the disk holds the
    last two (a kill during a save still leaves one whole state), never all four."""
    assert sorted(name for name in os.listdir(uninterrupted[0]) if name.startswith("checkpoint")) == [
        "checkpoint-3", "checkpoint-4"]


@pytest.fixture
def one_process():
    """The 1-process group a stage run by plain python makes (init_distributed), in this process."""
    import torch.distributed as dist
    sft.init_distributed()
    yield
    dist.destroy_process_group()


def test_a_resume_takes_the_newest_intact_of_several_states_and_names_it(one_process, tmp_path, capsys):
    """The resume-state functions every stage shares (sft.py's copies), on a linear layer whose weights are its
    step: six saves leave at most two states, the newest; of four states on disk (written by separate saves, as
    runs resumed from earlier states can leave them) and a partial one, a resume takes the newest intact one and
    says which; a corruption that keeps the file's size (only the sha256 can see it) is set aside with one warning
    naming the file, and the previous state is taken; the next save leaves only it and the new one."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()

    def save(step, out):
        with torch.no_grad():
            model.weight.fill_(step)
        sft.save_resume_state(model, opt, {"step": step}, str(out))

    def states(out):
        return sorted(name for name in os.listdir(out) if name.startswith("checkpoint"))

    def resume(out):
        step = sft.load_resume_state(model, opt, str(out))["step"]
        assert torch.equal(model.weight, torch.full_like(model.weight, step))
        return step

    out = tmp_path / "every_step"
    out.mkdir()
    for step in range(1, 7):
        save(step, out)
        assert states(out) == [f"checkpoint-{s}" for s in range(max(1, step - 1), step + 1)]

    out = tmp_path / "run"
    out.mkdir()
    for step in range(1, 5):
        (tmp_path / f"alone{step}").mkdir()
        save(step, tmp_path / f"alone{step}")
        shutil.move(tmp_path / f"alone{step}" / f"checkpoint-{step}", out)
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-5")  # killed before its manifest: partial
    os.remove(out / "checkpoint-5" / "manifest.json")
    assert sft.find_resume_state(out) == (str(out / "checkpoint-4"), 4)
    capsys.readouterr()
    assert resume(out) == 4
    assert capsys.readouterr().out == f"resumed from {out / 'checkpoint-4'}\n"

    shard = out / "checkpoint-4" / "__0_0.distcp"
    size = shard.stat().st_size
    flip(shard)
    assert shard.stat().st_size == size
    assert sft.damaged_file(out / "checkpoint-4") == "__0_0.distcp does not match its sha256"
    assert resume(out) == 3
    assert capsys.readouterr().out == (
        f"warning: the resume state {out / 'checkpoint-4'} is damaged (__0_0.distcp does not match its sha256); set "
        f"aside as {out / 'checkpoint-4.damaged'}, trying the previous one\nresumed from {out / 'checkpoint-3'}\n")
    assert states(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4.damaged", "checkpoint-5"]

    save(4, out)  # the resumed run's next save
    assert states(out) == ["checkpoint-3", "checkpoint-4"]
    assert resume(out) == 4
