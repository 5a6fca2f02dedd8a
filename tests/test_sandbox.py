"""Hostile programs against reward.py's sandbox: each must score no answer (or a harmless value) within
timeout + 1 s, leave no file and no process behind, and the pool must go on scoring correct programs."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reward  # noqa: E402

TIMEOUT = 1.0
OK = "def solution():\n    a = 3\n    b = 4\n    result = a + b\n    return result"
# Reaches real modules the way an attacker would: through the globals of any class's __init__.
ESCAPE = '''def solution():
    def find(name):
        for c in ().__class__.__base__.__subclasses__():
            g = getattr(getattr(c, "__init__", None), "__globals__", None)
            if isinstance(g, dict) and name in g:
                return g[name]
    sys = find("sys")
    os = sys.modules["os"]
    builtins = sys.modules["builtins"]
    importlib = sys.modules["importlib"]
'''
NOT_666 = "not 666"  # the program's answer may be harmless, but never the marker of a successful attack

HOSTILE = {
    # --- time
    "infinite_loop": ("def solution():\n    while True:\n        pass", None),
    "loop_catching_the_timeout": ("def solution():\n    while True:\n        try:\n            while True:\n"
                                  "                pass\n        except BaseException:\n            pass", None),
    "sleep_import_time": ("def solution():\n    import time\n    time.sleep(30)\n    return 666", None),
    "sleep_through_event_wait": (ESCAPE + '    ev = [c for c in ().__class__.__base__.__subclasses__() if '
                                 'c.__name__ == "Event" and c.__module__ == "threading"][0]\n'
                                 '    ev().wait(30)\n    return 666', None),
    "ignore_alarm_then_loop": (ESCAPE + '    signal = sys.modules["signal"]\n'
                               '    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass', None),
    "cancel_timer_then_loop": (ESCAPE + '    signal = sys.modules["signal"]\n'
                               '    signal.setitimer(signal.ITIMER_REAL, 0)\n    while True:\n        pass', None),
    "default_alarm_kills_worker": (ESCAPE + '    signal = sys.modules["signal"]\n'
                                   '    signal.signal(signal.SIGALRM, signal.SIG_DFL)\n    signal.alarm(1)\n'
                                   '    while True:\n        pass', None),
    "huge_int_power": ("def solution():\n    return 7 ** (7 ** 12)", None),
    "read_own_stdin": (ESCAPE + '    return len(os.read(3, 100))', None),
    # --- memory and recursion
    "deep_recursion": ("def solution():\n    def f(n):\n        return f(n + 1) + 1\n    return f(0)", None),
    "recursion_limit_raised": (ESCAPE + '    sys.setrecursionlimit(10 ** 7)\n    def f(n):\n'
                               '        return f(n + 1) + 1\n    return f(0)', None),
    "memory_bomb": ("def solution():\n    x = [0] * 10 ** 10\n    return 666", None),
    "memory_growth": ('def solution():\n    a = []\n    while True:\n        a.append(" " * 10 ** 7)', None),
    # --- processes and threads
    "fork_bomb": (ESCAPE + '    while True:\n        os.fork()', None),
    "subprocess_run": (ESCAPE + '    sys.modules["subprocess"].run(["touch", "{tmp}"])\n    return 666', None),
    "popen_execute_child": (ESCAPE + '    sp = sys.modules["subprocess"]\n    p = object.__new__(sp.Popen)\n'
                            '    p._execute_child(["touch", "{tmp}"], "/usr/bin/touch", None, True, (), None, None, None,'
                            ' 0, False, -1, -1, -1, -1, -1, -1, True, None, None, None, -1, False, -1)\n'
                            '    return 666', None),
    # _posixsubprocess.fork_exec raises no audit event: only the process limit (RLIMIT_NPROC=0) stops it
    "fork_exec_without_audit_event": (ESCAPE + '    r, w = os.pipe()\n    sys.modules["_posixsubprocess"].fork_exec('
                                      '[b"/usr/bin/touch", b"{tmp}"], [b"/usr/bin/touch"], True, (), None, None, -1,'
                                      ' -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\n'
                                      '    return 666', None),
    "os_system": (ESCAPE + '    os.system("touch {tmp}")\n    return 666', None),
    "os_exec": (ESCAPE + '    os.execv("/usr/bin/touch", ["touch", "{tmp}"])', None),
    "wrap_close_escape": ('def solution():\n    for c in ().__class__.__base__.__subclasses__():\n'
                          '        if c.__name__ == "_wrap_close":\n'
                          '            c.__init__.__globals__["system"]("touch {tmp}")\n            return 666', None),
    "popen_via_subclasses": ('def solution():\n    for c in ().__class__.__base__.__subclasses__():\n'
                             '        if c.__name__ == "Popen":\n            c(["touch", "{tmp}"])\n'
                             '            return 666', None),
    "thread_keeps_running": (ESCAPE + '    t = sys.modules["threading"].Thread(target=lambda: [0 for _ in '
                             'iter(int, 1)])\n    t.start()\n    return 666', None),
    "raw_thread": (ESCAPE + '    sys.modules["_thread"].start_new_thread(lambda: [0 for _ in iter(int, 1)], ())\n'
                   '    return 666', None),
    "setsid_then_sleep": (ESCAPE + '    os.setsid()\n    ev = [c for c in ().__class__.__base__.__subclasses__() if '
                          'c.__name__ == "Event" and c.__module__ == "threading"][0]\n    ev().wait(30)', None),
    "kill_parent": (ESCAPE + '    os.kill(os.getppid(), 9)\n    return 666', None),
    "kill_everything": (ESCAPE + '    os.kill(-1, 9)\n    return 666', None),
    "kill_self": (ESCAPE + '    os.kill(os.getpid(), 9)\n    return 666', None),
    "os_exit": (ESCAPE + '    os._exit(0)', None),
    "sys_exit": (ESCAPE + '    sys.exit(0)', None),
    "raise_system_exit": (ESCAPE + "    raise builtins.SystemExit(666)", None),
    "keyboard_interrupt": (ESCAPE + "    raise builtins.KeyboardInterrupt", None),
    "base_exception": (ESCAPE + "    raise builtins.BaseException", None),
    "site_exit": (ESCAPE + "    builtins.exit(666)", None),
    # --- files and network
    "open_builtin_write": ('def solution():\n    open("{tmp}", "w").write("x")\n    return 666', None),
    "io_open_write": (ESCAPE + '    sys.modules["io"].open("{tmp}", "w").write("x")\n    return 666', None),
    "real_builtins_open": (ESCAPE + '    builtins.open("{tmp}", "w").write("x")\n    return 666', None),
    "pathlib_write": (ESCAPE + '    importlib.import_module("pathlib").Path("{tmp}").write_text("x")\n'
                      '    return 666', None),
    "os_open_create": (ESCAPE + '    os.open("{tmp}", os.O_CREAT | os.O_WRONLY)\n    return 666', None),
    "read_etc_passwd": (ESCAPE + '    return len(builtins.open("/etc/passwd").read())', None),
    "remove_a_file": (ESCAPE + '    os.remove("{keep}")\n    return 666', None),
    "shutil_rmtree": (ESCAPE + '    importlib.import_module("shutil").rmtree("{keep_dir}")\n    return 666', None),
    "socket": (ESCAPE + '    s = importlib.import_module("socket").socket()\n    s.connect(("127.0.0.1", 22))\n'
               '    return 666', None),
    "ctypes_system": (ESCAPE + '    ctypes = importlib.import_module("ctypes")\n'
                      '    ctypes.CDLL(None).system(b"touch {tmp}")\n    return 666', None),
    "env_vars": (ESCAPE + '    return 666 if "HOME" in os.environ or "PYTHONPATH" in os.environ else 0', NOT_666),
    "raise_rlimit": (ESCAPE + '    r = sys.modules["resource"]\n    r.setrlimit(r.RLIMIT_AS, (-1, -1))\n'
                     '    return 666', None),
    # --- imports, exec, introspection
    "dunder_import_os": ('def solution():\n    return __import__("os").getpid() * 0 + 666', None),
    "import_os": ("def solution():\n    import os\n    return 666", None),
    "builtins_dunder_import": (ESCAPE + '    builtins.__import__("os").system("touch {tmp}")\n    return 666', None),
    "importlib_import_module_os": (ESCAPE + '    importlib.import_module("os").system("touch {tmp}")\n'
                                   '    return 666', None),
    "importlib_reload": (ESCAPE + '    importlib.reload(sys.modules["json"])\n    return 666', None),
    "exec_eval_compile": ('def solution():\n    exec("x = 1")\n    return eval("666")', None),
    "real_exec": (ESCAPE + '    builtins.exec("open(\'{tmp}\', \'w\')", {"__builtins__": builtins})\n'
                  '    return 666', None),
    "gc_get_objects": (ESCAPE + '    return len(importlib.import_module("gc").get_objects()) * 0 + 666', None),
    "traceback_frames": ("def solution():\n    try:\n        1 / 0\n    except Exception as e:\n"
                         "        f = e.__traceback__.tb_frame.f_back\n    return len(f.f_locals) * 0 + 666", None),
    "sys_getframe": (ESCAPE + '    return len(sys._getframe(1).f_locals) * 0 + 666', None),
    "forge_result_lines": (ESCAPE + '    for fd in range(3, 16):\n        try:\n'
                           '            os.write(fd, b\'[666.0]\\n["x", 666.0]\\n"ready"\\n\')\n'
                           '        except Exception:\n            pass\n    return 1', NOT_666),
    # --- output and results
    "huge_print": ('def solution():\n    print("x" * 10 ** 8)\n    return 666', None),
    "print_loop": ('def solution():\n    while True:\n        print("spam" * 100)', None),
    "generator_result": ("def solution():\n    return (i for i in range(10))", None),
    "huge_list_result": ("def solution():\n    return list(range(10 ** 7))", None),
    "huge_int_result": ("def solution():\n    return 10 ** 100000", None),
    "huge_str_result": ('def solution():\n    return "6" * 10 ** 7', NOT_666),
    "evil_float": ("def solution():\n    class F:\n        def __float__(self):\n            while True:\n"
                   "                pass\n    return F()", None),
    "huge_source": ("def solution():\n" + "    x = 1\n" * 5000 + "    return 666", None),
}

# Tampering: the program itself may answer anything; programs after it must still be right. Every batch runs
# in a fresh child process, so nothing survives into the next batch; within a batch the child checks builtins,
# the pre-imported modules and their (non-sympy) classes, and starts over in a new child after a change.
# (tamper, probe answering 7, whether the probe is also right later in the SAME batch)
TAMPER = {
    "program_builtins": ('def solution():\n    __builtins__["int"] = lambda *a: 666\n    return 1',
                         'def solution():\n    return int("7")', True),
    "real_builtins": (ESCAPE + '    builtins.float = lambda *a: 666.0\n    builtins.int = lambda *a: 666\n'
                      '    return 1', 'def solution():\n    return float("7")', True),
    "math_copy": ('def solution():\n    import math\n    math.sqrt = lambda x: 666\n    return 1',
                  'def solution():\n    import math\n    return math.sqrt(49)', True),
    "real_math": (ESCAPE + '    sys.modules["math"].sqrt = lambda x: 666\n    return 1',
                  'def solution():\n    return math.sqrt(49)', True),
    "fraction_class": (ESCAPE + '    sys.modules["fractions"].Fraction.__add__ = lambda *a: 666\n    return 1',
                       'def solution():\n    from fractions import Fraction\n    return Fraction(13, 2) + Fraction(1, 2)',
                       True),
    "sympy_module": (ESCAPE + '    sys.modules["sympy"].Rational = lambda *a: 666\n    return 1',
                     'def solution():\n    return sympy.Rational(14, 2)', True),
    "sympy_class": ('def solution():\n    sympy.Integer.__add__ = lambda *a: 666\n    return 1',
                    'def solution():\n    return sympy.Integer(3) + sympy.Integer(4)', False),
    "sys_modules_cleared": (ESCAPE + '    sys.modules.clear()\n    return 1',
                            'def solution():\n    x = sympy.symbols("x")\n    return sympy.solve(x - 7, x)[0]', True),
    "function_code": (ESCAPE + '    st = sys.modules["statistics"]\n    st.mean.__code__ = (lambda d: 666).__code__\n'
                      '    return 1', 'def solution():\n    import statistics\n    return statistics.mean([6, 8])', True),
    "add_audit_hook": (ESCAPE + '    sys.addaudithook(lambda *a: 1 / 0)\n    return 1', OK, True),
}


ESCAPE_CONTROL = textwrap.dedent("""
    import json, runpy, sys
    root, prefix = sys.argv[1], sys.argv[2]
    worker = runpy.run_path(f"{root}/reward.py", run_name="worker")  # a worker's module: its top-level imports
    import _thread, builtins, importlib, os, resource, select, types  # noqa: F401  and what _worker_main imports
    modules = {}
    for name in worker["ALLOWED_IMPORTS"]:
        try:
            modules[name] = __import__(name)
        except ImportError:
            pass
    if "sympy" in modules:
        worker["_warm_up"](modules["sympy"])
    namespace = {"__builtins__": {n: getattr(builtins, n) for n in worker["_SAFE_BUILTINS"]}, "__name__": "program"}
    exec(prefix + "    return sys, os, builtins, importlib\\n", namespace)
    got = namespace["solution"]()
    print(json.dumps({"real": [a is b for a, b in zip(got, (sys, os, builtins, importlib))],
                      "modules": sorted(sys.modules)}))
""")


def test_escape_prefix_reaches_the_real_modules_outside_the_sandbox(tmp_path):
    """Positive control for ESCAPE, the start of most hostile and tamper programs: run alone outside the sandbox
    (no audit hook, no limits), in a fresh `python -I` with the modules a worker has loaded and the builtins a
    program gets, it returns the real sys, os, builtins and importlib, and every module those programs then take
    from sys.modules is loaded. Should the prefix break (a renamed attribute, a module no longer loaded), the
    programs would fail inside the sandbox for that reason and the tests above would pass without testing."""
    script = tmp_path / "control.py"
    script.write_text(ESCAPE_CONTROL)
    p = subprocess.run([sys.executable, "-I", str(script), str(Path(reward.__file__).parent), ESCAPE],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["real"] == [True] * 4
    programs = [source for source, _ in HOSTILE.values()] + [tamper for tamper, _, _ in TAMPER.values()]
    escaping = [source for source in programs if source.startswith(ESCAPE)]
    assert len(escaping) >= 40
    taken = {name for source in escaping for name in re.findall(r'sys\.modules\["(\w+)"\]', source)}
    assert {"signal", "subprocess", "_posixsubprocess", "threading", "_thread", "io", "resource"} <= taken
    assert taken <= set(out["modules"]), taken - set(out["modules"])


def processes():
    """{pid: (ppid, session id)} for every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def warm_pool():
    """Run correct programs until every worker is up, so a timing covers only the program itself."""
    assert reward.run_programs([OK] * 4) == [7.0] * 4
    deadline = time.monotonic() + 60
    while not all(w.ready for w in reward._POOL.workers):
        assert time.monotonic() < deadline, "sandbox workers did not start"
        reward.run_programs([OK])
        time.sleep(0.05)


def check_no_leftovers(old_pids):
    """No process from the sandbox but the workers; a batch's child process may take a moment to exit."""
    workers = set(reward.worker_pids())
    deadline = time.monotonic() + 1.0
    while any(ppid in workers for ppid, _ in processes().values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    table = processes()
    for pid, (ppid, session) in table.items():
        assert ppid not in workers | old_pids, f"process {pid} was started by a sandbox worker"
        assert session not in (workers | old_pids) or pid in workers, f"process {pid} escaped from a worker"
        if ppid == os.getpid():
            assert pid in workers, f"unexpected child process {pid}"
    assert not (old_pids - workers) & set(table), "a replaced worker is still running"


def check_pool_still_scores():
    assert reward.compute_rewards([OK] * 6, ["7"] * 6, "python", timeout=TIMEOUT) == [1.0] * 6


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program(name, tmp_path):
    source, expected = HOSTILE[name]
    keep_dir = tmp_path / "keep_dir"
    keep_dir.mkdir()
    (keep_dir / "file").write_text("keep")
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    tmp = tmp_path / "created"
    source = source.replace("{tmp}", str(tmp)).replace("{keep}", str(keep)).replace("{keep_dir}", str(keep_dir))
    warm_pool()
    old_pids = set(reward.worker_pids())
    start = time.monotonic()
    result = reward.run_programs([source], timeout=TIMEOUT)[0]
    elapsed = time.monotonic() - start
    if expected is None:
        assert result is None, f"{name} answered {result!r}"
    else:
        assert result != 666.0 and result != "666"
    assert elapsed < TIMEOUT + 1.0, f"{name} took {elapsed:.2f} s"
    assert not tmp.exists(), f"{name} created a file"
    assert keep.read_text() == "keep" and (keep_dir / "file").read_text() == "keep"
    assert not Path("/tmp/created").exists()
    check_no_leftovers(old_pids)
    check_pool_still_scores()
    check_no_leftovers(old_pids)


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_tampering_does_not_persist(name):
    tamper, probe, same_batch = TAMPER[name]
    warm_pool()
    results = reward.run_programs([tamper, probe, probe], timeout=TIMEOUT)  # results[0]: its own business
    if same_batch:
        assert results[1:] == [7.0, 7.0]
    assert reward.run_programs([probe] * 6, timeout=TIMEOUT) == [7.0] * 6
    check_pool_still_scores()


def test_batch_with_hostile_programs_keeps_order_and_answers():
    warm_pool()
    hang, crash = HOSTILE["infinite_loop"][0], HOSTILE["os_exit"][0]
    programs = [OK, hang, OK, crash, OK, "def solution():\n    return 8", OK, crash, OK]
    results = reward.run_programs(programs, timeout=TIMEOUT)
    assert results == [7.0, None, 7.0, None, 7.0, 8.0, 7.0, None, 7.0]


def test_programs_that_are_not_strings_or_too_long_score_none():
    assert reward.run_programs([None, 7, "x" * (reward.MAX_PROGRAM_CHARS + 1), OK]) == [None, None, None, 7.0]


def test_workers_are_unprivileged_and_isolated():
    warm_pool()
    for pid in reward.worker_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert uid == (str(65534) if os.getuid() == 0 else str(os.getuid()))
        ppid, session = processes()[pid]
        assert ppid == os.getpid() and session == pid


def test_shutdown_leaves_no_process_and_pool_restarts():
    warm_pool()
    pids = set(reward.worker_pids())
    reward.shutdown_pool()
    assert not pids & set(processes())
    assert reward.run_programs([OK]) == [7.0]
    assert set(reward.worker_pids()).isdisjoint(pids)


def test_trainer_killed_mid_batch_leaves_nothing_behind(tmp_path):
    """SIGKILL the process that owns the pool while a program hangs: its workers and their children go too."""
    script = tmp_path / "trainer.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(reward.__file__).parent)!r})\nimport reward\n"
                      "reward.start_pool(2)\nprint(*reward.worker_pids(), flush=True)\n"
                      f"reward.run_programs([{HOSTILE['infinite_loop'][0]!r}] * 2, timeout=60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = {int(p) for p in proc.stdout.readline().split()}
    assert len(pids) == 2
    time.sleep(3)  # the workers start and begin the hanging programs
    assert any(ppid in pids for ppid, _ in processes().values()), "no program was running"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid in pids or ppid in pids or sid in pids
                                              for pid, (ppid, sid) in processes().items()):
        time.sleep(0.05)
    left = [pid for pid, (ppid, sid) in processes().items() if pid in pids or ppid in pids or sid in pids]
    assert not left, f"processes left behind: {left}"


def test_pool_is_shut_down_at_exit(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(reward.__file__).parent)!r})\nimport reward\n"
                      f"print(reward.run_programs([{OK!r}]), *reward.worker_pids(), flush=True)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer, *pids = result.stdout.split("]")[0] + "]", *result.stdout.split("]")[1].split()
    assert answer == "[7.0]" and pids
    time.sleep(0.2)
    assert not {int(p) for p in pids} & set(processes())


def test_ranks_of_a_node_share_the_cpus(tmp_path):
    """Each torchrun rank starts its own pool: together the ranks of a node start one worker per usable CPU."""
    script = tmp_path / "rank.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(Path(reward.__file__).parent)!r})\nimport reward\n"
                      f"assert reward.run_programs([{OK!r}]) == [7.0]\n"
                      f"with open(os.path.join({str(tmp_path)!r}, 'workers_' + os.environ['RANK']), 'w') as f:\n"
                      "    f.write(str(len(reward.worker_pids())))\n")
    torchrun(2, script, timeout=120)
    workers = [int((tmp_path / f"workers_{rank}").read_text()) for rank in (0, 1)]
    cpus = len(os.sched_getaffinity(0))
    assert workers == [max(1, cpus // 2)] * 2, (workers, cpus)  # 2 CPUs or more: as many workers as CPUs in all
