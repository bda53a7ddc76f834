"""The code-execution sandbox against hostile programs: each is scored, none takes the caller down.

Limits are small (1-3 s, 256 MiB, 1 MiB files, 64 KiB output) so that the file runs in seconds.
"""

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest

from olmoe.eval.sandbox import (
    EXECUTION_ENV,
    EXECUTION_OFF_NOTE,
    OUTPUT_KEPT,
    ExecutionResult,
    SandboxLimits,
    execution_enabled,
    run_program,
    run_programs,
)

LIMITS = SandboxLimits(
    timeout=3.0, memory_bytes=256 << 20, file_bytes=1 << 20, output_bytes=64 << 10
)
REFUSED = "PermissionError: not allowed in the olmoe sandbox"


def run(program: str, **changes) -> ExecutionResult:
    return run_program(program, dataclasses.replace(LIMITS, **changes))


def test_a_correct_program_passes_with_its_output():
    result = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('done')\n")
    assert result.passed and result.status == "passed" and result.message == ""
    assert result.output == "done\n"
    assert 0 < result.seconds < LIMITS.timeout


@pytest.mark.parametrize(
    "program, message",
    [
        ("assert 1 + 1 == 3, 'wrong sum'", "AssertionError: wrong sum"),
        ("def f(:\n    pass", "SyntaxError: invalid syntax"),
        ("print(undefined_name)", "NameError: name 'undefined_name' is not defined"),
        ("input()", "EOFError: EOF when reading a line"),  # stdin is /dev/null
        # As in human-eval, leaving early is not passing, even with status 0.
        ("import sys\nsys.exit(0)", "SystemExit: 0"),
    ],
)
def test_a_program_that_raises_fails_with_the_exception_as_message(program, message):
    result = run(program)
    assert (result.status, result.message) == ("failed", message)
    assert not result.passed
    assert result.output.rstrip().endswith(message)


def test_an_endless_wait_hits_the_wall_clock_limit():
    result = run("import time\ntime.sleep(60)", timeout=1.5)
    assert result.status == "timeout" and "wall-clock" in result.message
    assert 1.5 <= result.seconds < 3.0


def test_a_cpu_burn_hits_the_cpu_limit_before_the_wall_clock_limit():
    result = run("while True:\n    pass", timeout=20, cpu_seconds=1)
    assert (result.status, result.message) == ("timeout", "CPU time limit of 1 s reached")
    assert result.seconds < 10


def test_a_program_that_closes_its_output_is_still_timed():
    result = run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)", timeout=1.0)
    assert result.status == "timeout"


@pytest.mark.parametrize(
    "program",
    [
        "import os\nwhile True:\n    os.fork()",  # fork bomb
        "import subprocess\nsubprocess.run(['echo', 'hi'])",
        "import os\nos.system('echo hi')",
        "import os\nos.execv(os.sys.executable, ['python', '-c', 'pass'])",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",  # the evaluator itself
        "import os\nos.setsid()",  # leaving the process group that is killed at the end
    ],
)
def test_processes_and_signals_are_refused(program):
    result = run(program)
    assert (result.status, result.message) == ("failed", REFUSED)


@pytest.mark.parametrize(
    "program",
    [
        "import os\nos.remove({file!r})",
        "import os\nos.unlink({file!r})",
        "import os\nos.rename({file!r}, {file!r} + '.moved')",
        "import os\nos.truncate({file!r}, 0)",
        "import os\nos.chmod({file!r}, 0)",
        "import shutil\nshutil.rmtree({directory!r})",
        "import shutil\nshutil.move({file!r}, '.')",
        "import pathlib\npathlib.Path({file!r}).unlink()",
    ],
)
def test_the_callers_files_survive_destructive_calls(tmp_path, program):
    directory = tmp_path / "victim"
    directory.mkdir()
    file = directory / "data.txt"
    file.write_text("precious")
    result = run(program.format(file=str(file), directory=str(directory)))
    assert (result.status, result.message) == ("failed", REFUSED)
    assert sorted(p.name for p in directory.iterdir()) == ["data.txt"]
    assert file.read_text() == "precious" and file.stat().st_mode & 0o777 != 0


# A child started behind the guard's back (libc's fork through ctypes) that would write a marker
# file after its parent is gone; the whole process group is killed, so it never does.
GRANDCHILD = """
import ctypes, time
libc = ctypes.CDLL(None)
if libc.fork() == 0:
    time.sleep({delay})
    with open({marker!r}, "w") as file:
        file.write("still alive")
    libc._exit(0)
{parent}
"""


@pytest.mark.parametrize(
    "parent, delay, status",
    [("pass", 0.5, "passed"), ("time.sleep(60)", 1.5, "timeout")],
    ids=["parent-exits", "parent-times-out"],
)
def test_a_grandchild_dies_with_the_program(tmp_path, parent, delay, status):
    marker = tmp_path / "marker"
    result = run(GRANDCHILD.format(delay=delay, marker=str(marker), parent=parent), timeout=1.0)
    assert result.status == status
    time.sleep(delay + 0.5)
    assert not marker.exists()


@pytest.mark.parametrize(
    "program",
    ["x = bytearray(1 << 30)", "x = []\nwhile True:\n    x.append(bytearray(1 << 20))"],
    ids=["at-once", "growing"],
)
def test_a_memory_bomb_fails_with_memory_error(program):
    result = run(program)
    assert (result.status, result.message) == ("failed", "MemoryError")


def test_a_huge_file_write_is_stopped_at_the_file_size_limit():
    result = run("with open('big', 'wb') as file:\n    file.write(b'x' * (8 << 20))")
    assert (result.status, result.message) == ("failed", "OSError: [Errno 27] File too large")


@pytest.mark.parametrize(
    "program",
    [
        "while True:\n    print('x' * 1000)",
        "import sys\nsys.stdout.write('y' * (50 << 20))",
        "import sys\nwhile True:\n    sys.stderr.write('z' * 4096)",
    ],
    ids=["print-loop", "one-write", "stderr"],
)
def test_an_output_flood_is_cut_off(program):
    result = run(program)
    assert result.status == "output_limit"
    assert result.message == f"output passed {64 << 10} bytes"
    assert 0 < len(result.output) <= OUTPUT_KEPT
    assert result.seconds < LIMITS.timeout


@pytest.mark.parametrize(
    "program, message",
    [
        ("import ctypes\nctypes.string_at(0)", "killed by SIGSEGV"),
        ("import os\nos.abort()", "killed by SIGABRT"),
        ("import ctypes\nctypes.CDLL(None)['raise'](40)", "killed by signal 40"),  # no name
        ("import os\nos._exit(0)", "the interpreter exited with status 0 before the program ended"),
        ("import os\nos._exit(3)", "the interpreter exited with status 3 before the program ended"),
    ],
)
def test_a_dead_interpreter_is_a_crash(program, message):
    result = run(program)
    assert (result.status, result.message) == ("crashed", message)


CWD_PROGRAM = """
import os
assert os.listdir(".") == [], os.listdir(".")
assert os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"]
with open("scratch.txt", "w") as file:
    file.write("left behind")
print(os.getcwd())
"""


def test_each_program_gets_a_fresh_empty_directory_that_is_removed(tmp_path):
    first, second = run(CWD_PROGRAM), run(CWD_PROGRAM)
    assert first.passed and second.passed, (first, second)
    first_dir, second_dir = first.output.strip(), second.output.strip()
    assert first_dir != second_dir
    assert not os.path.exists(first_dir) and not os.path.exists(second_dir)
    assert os.path.realpath(first_dir) != os.path.realpath(os.getcwd())


def test_a_relative_path_does_not_reach_the_callers_directory(tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("the caller's file")
    monkeypatch.chdir(tmp_path)
    result = run("print(open('secret.txt').read())")
    assert result.status == "failed"
    assert result.message.startswith("FileNotFoundError")


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OLMOE_TEST_SECRET", "hunter2")
    program = "import os\nassert 'OLMOE_TEST_SECRET' not in os.environ\nprint(sorted(os.environ))"
    result = run(program)
    assert result.passed, result
    assert result.output.strip() == "['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'TMPDIR']"


@pytest.fixture
def listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        yield port


@pytest.mark.parametrize(
    "program",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "import socket\nsocket.socket().connect(('127.0.0.1', {port}))",
        "import _socket\n_socket.socket()",
        "import socket\nsocket.socketpair()",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
    ],
)
def test_sockets_are_refused(program, listening_port):
    result = run(program.format(port=listening_port))
    assert result.status == "failed"
    assert "not allowed in the olmoe sandbox" in result.message  # urllib wraps the error


def network_namespace_available() -> bool:
    probe = "import ctypes, sys\nsys.exit(ctypes.CDLL(None).unshare(0x40000000) != 0)"
    return subprocess.run([sys.executable, "-I", "-c", probe]).returncode == 0


# libc's socket and connect through ctypes get past the guard; the empty network namespace
# (no interface up, not even loopback) still stops the connection.
RAW_CONNECT = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
assert fd >= 0
address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
assert libc.connect(fd, address, len(address)) != 0, "connected"
"""


@pytest.mark.skipif(
    not network_namespace_available(), reason="no permission to unshare CLONE_NEWNET"
)
def test_the_network_namespace_stops_connections_that_bypass_the_guard(listening_port):
    result = run(RAW_CONNECT.format(port=listening_port))
    assert result.passed, result


def test_a_program_that_cannot_be_written_is_an_error_not_an_exception():
    result = run("bad = '\udcff'")  # a lone surrogate has no UTF-8
    assert result.status == "error" and "UnicodeEncodeError" in result.message


def test_a_program_with_a_nul_byte_fails():
    assert run("x = 1\x00").status == "failed"


def test_run_programs_keeps_the_order_and_runs_in_parallel():
    programs = [f"import time\ntime.sleep(0.6)\nprint({i})" for i in range(6)]
    start = time.monotonic()
    results = run_programs(programs, LIMITS, workers=3)
    elapsed = time.monotonic() - start
    assert [r.output.strip() for r in results] == [str(i) for i in range(6)]
    assert all(r.passed for r in results)
    assert elapsed < 3.0  # one at a time would take at least 3.6 s


def test_run_programs_survives_a_mix_of_hostile_programs():
    programs = [
        "assert True",
        "raise ValueError('x')",
        "import os\nos.fork()",
        "while True:\n    print('flood')",
        "import ctypes\nctypes.string_at(0)",
        "x = bytearray(1 << 30)",
    ]
    statuses = [r.status for r in run_programs(programs, LIMITS, workers=2)]
    assert statuses == ["passed", "failed", "failed", "output_limit", "crashed", "failed"]


def test_execution_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(EXECUTION_ENV, raising=False)
    assert execution_enabled()
    monkeypatch.setenv(EXECUTION_ENV, "0")
    assert not execution_enabled()
    assert EXECUTION_ENV in EXECUTION_OFF_NOTE and EXECUTION_OFF_NOTE.startswith("skipped")
