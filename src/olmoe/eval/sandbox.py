"""Runs generated Python programs (a completion plus its tests) in a separate, limited process.

A code task (HumanEval, MBPP) counts a sample as correct when its program runs to the end. Each
program runs in a fresh `sys.executable -I` process, in a new session (its own process group),
with a fresh empty temporary directory as its working directory (removed afterwards), and is
scored as a failure, never as an error of the evaluation, when it hangs, forks, floods its output,
runs out of memory or crashes the interpreter. This follows OpenAI's human-eval `execution.py`
(a process per program, a time limit, `reliability_guard`) with the program in its own
interpreter rather than a forked copy of the evaluator.

What is enforced, by the kernel, on the program's process:
- wall-clock time (`timeout`): the whole process group is killed with SIGKILL when it runs out,
  and also as soon as the program's process exits, so children it managed to start die with it;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), size of any file it writes (RLIMIT_FSIZE),
  open files (RLIMIT_NOFILE), no core files; RLIMIT_NPROC is set to 0, which stops forks and
  threads for an unprivileged user but not for root (root is exempt from it);
- output: stdout and stderr (merged) are read up to `output_bytes`; past that the process group
  is killed, so a flood never fills the evaluator's memory;
- no network when the kernel lets the process enter a new, empty network namespace
  (`unshare(CLONE_NEWNET)`, which needs root or CAP_SYS_ADMIN): not even loopback is up there;
- a scrubbed environment (PATH, LANG, HOME and TMPDIR at the temporary directory, nothing else),
  stdin from /dev/null, none of the evaluator's file descriptors.

What is only guarded inside the program's own interpreter, like human-eval's `reliability_guard`
(a program that means harm gets around it, through ctypes for example): creating processes
(os.fork, os.system, os.exec*, os.spawn*, posix_spawn, subprocess), signalling other processes,
leaving the process group (os.setsid), deleting, renaming, truncating or changing the owner or
mode of files, and creating sockets (the only network barrier where no namespace could be made).

What is not enforced at all: reading any file the evaluator's user can read and writing files
outside the temporary directory through absolute paths (the program runs as the same user);
disk space used inside the temporary directory beyond RLIMIT_FSIZE per file; a process that
escapes the process group (setsid through ctypes) outliving the program; and, as root, a program
can leave the network namespace again. This is not a security boundary: for untrusted code, run
the evaluation in a container or VM without network, or at least as an unprivileged user without
network (for example `unshare --user --map-root-user --net olmoe eval ...`).

`execution_enabled()` is the switch the code tasks check first: with OLMOE_CODE_EXECUTION=0 in
the environment nothing is run and the tasks are skipped with `EXECUTION_OFF_NOTE`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

EXECUTION_ENV = "OLMOE_CODE_EXECUTION"
EXECUTION_OFF_NOTE = (
    "skipped: running generated code is turned off (OLMOE_CODE_EXECUTION=0); "
    "code tasks are scored by running each sample's program in a sandbox"
)
STATUSES = ("passed", "failed", "timeout", "crashed", "output_limit", "error")
OUTPUT_KEPT = 2000  # characters of output kept in a result: the end of a traceback
_POLL_SECONDS = 0.02  # how often a running program is checked for having exited
_REAP_SECONDS = 5.0


def execution_enabled() -> bool:
    """False when the user turned execution off (OLMOE_CODE_EXECUTION=0)."""
    return os.environ.get(EXECUTION_ENV, "1") != "0"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds, from the process's start
    cpu_seconds: int | None = None  # None: the wall-clock timeout, rounded up
    memory_bytes: int = 2 << 30  # address space
    file_bytes: int = 16 << 20  # the largest file the program may write
    output_bytes: int = 1 << 20  # stdout and stderr together
    open_files: int = 64

    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout)


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    status: str  # one of STATUSES
    message: str  # why it did not pass ("" when it did)
    seconds: float  # wall-clock, process start to end
    output: str = ""  # the last OUTPUT_KEPT characters of stdout and stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the sandboxed interpreter, before and around the program: isolates the network where
# the kernel allows, sets the limits, disables the dangerous calls (as human-eval's
# reliability_guard does), runs the program and reports on a private pipe whether it finished
# ("passed") or raised ("failed"). Silence on that pipe means the interpreter died: os._exit, a
# signal, a crash. Exit skips atexit handlers and non-daemon threads the program left behind.
_CHILD = r"""
import sys


def _sandbox(program_path, status_fd, cpu_seconds, memory_bytes, file_bytes, open_files):
    # Everything the preamble needs is imported before the memory limit is set.
    import _posixsubprocess, _socket, ctypes, os, resource, socket, traceback

    write_status, hard_exit = os.write, os._exit
    with open(program_path, encoding="utf-8") as file:
        source = file.read()
    try:
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
    except (AttributeError, OSError):
        pass  # not Linux: the socket guard below is the only barrier
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1)),
        (resource.RLIMIT_AS, (memory_bytes, memory_bytes)),
        (resource.RLIMIT_FSIZE, (file_bytes, file_bytes)),
        (resource.RLIMIT_NOFILE, (open_files, open_files)),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (0, 0)),
    ):
        resource.setrlimit(limit, value)

    def blocked(*args, **kwargs):
        raise PermissionError("not allowed in the olmoe sandbox")

    class RefusedSocket(_socket.socket):
        __init__ = blocked

    _posixsubprocess.fork_exec = blocked  # subprocess binds it on import, after this
    # Sockets fail when made, but their classes stay classes (ssl and urllib subclass them).
    socket.socket.__init__ = blocked
    _socket.socket = _socket.SocketType = RefusedSocket
    _socket.socketpair = blocked
    for name in (
        "fork forkpty system popen posix_spawn posix_spawnp spawnl spawnle spawnlp spawnlpe "
        "spawnv spawnve spawnvp spawnvpe execl execle execlp execlpe execv execve execvp "
        "execvpe kill killpg setsid setpgid setpgrp setuid seteuid setreuid setresuid chroot "
        "remove unlink rmdir removedirs rename renames replace truncate chmod fchmod lchmod "
        "chown fchown lchown chflags lchflags"
    ).split():
        if hasattr(os, name):
            setattr(os, name, blocked)

    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException as error:  # SystemExit too: the tests must run to the end
        write_status(status_fd, b"failed")
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        outcome = 1
    else:
        write_status(status_fd, b"passed")
        outcome = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    hard_exit(outcome)


_sandbox(sys.argv[1], *map(int, sys.argv[2:]))
"""


def run_program(program: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run `program` in the sandbox; never raises (a sandbox failure is status "error")."""
    limits = limits or SandboxLimits()
    start = time.monotonic()
    root = None
    try:
        root = tempfile.mkdtemp(prefix="olmoe-sandbox-")
        return _run_in(root, program, limits, start)
    except Exception as error:  # the evaluation goes on; the sample counts as not passed
        return ExecutionResult("error", f"sandbox: {error!r}", time.monotonic() - start)
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def run_programs(
    programs: Sequence[str], limits: SandboxLimits | None = None, workers: int | None = None
) -> list[ExecutionResult]:
    """Run many programs, `workers` at a time (default: one per CPU), results in input order.

    Threads suffice: each only waits on its program's process."""
    workers = workers or default_workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))


def default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_in(root: str, program: str, limits: SandboxLimits, start: float) -> ExecutionResult:
    # The program sits beside the working directory, not in it, so that starts empty.
    workdir = os.path.join(root, "work")
    os.mkdir(workdir)
    program_path = os.path.join(root, "program.py")
    with open(program_path, "w", encoding="utf-8") as file:
        file.write(program)
    status_read, status_write = os.pipe()
    try:
        try:
            process = _launch(program_path, workdir, status_write, limits)
        finally:
            os.close(status_write)
        with process.stdout:
            ended_by, output = _watch(process, limits, start + limits.timeout)
            report = _read_status(status_read)
            returncode = _reap(process)
    finally:
        os.close(status_read)
    text = output.decode("utf-8", errors="replace")
    status, message = _classify(ended_by, report, returncode, text, limits)
    return ExecutionResult(status, message, time.monotonic() - start, text[-OUTPUT_KEPT:])


def _launch(
    program_path: str, workdir: str, status_fd: int, limits: SandboxLimits
) -> subprocess.Popen:
    args = [program_path, status_fd, limits.cpu_limit(), limits.memory_bytes]
    args += [limits.file_bytes, limits.open_files]
    return subprocess.Popen(
        [sys.executable, "-I", "-c", _CHILD, *map(str, args)],
        cwd=workdir,
        env=_child_env(workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=(status_fd,),
        start_new_session=True,  # its own process group, killed as a whole
    )


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
    }


def _watch(process: subprocess.Popen, limits: SandboxLimits, deadline: float) -> tuple[str, bytes]:
    """Read the output until the process exits ("exit"), the deadline passes ("timeout") or the
    output passes its cap ("output_limit"); then kill the process group, whatever ended it."""
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    output = bytearray()
    ended_by = _read_until_end(process, fd, output, limits, deadline)
    _kill_group(process)
    if ended_by == "exit":  # take what the program wrote before it exited, and no more
        _read_available(fd, output, limits.output_bytes)
        if len(output) > limits.output_bytes:
            ended_by = "output_limit"
    return ended_by, bytes(output[: limits.output_bytes])


def _read_until_end(
    process: subprocess.Popen, fd: int, output: bytearray, limits: SandboxLimits, deadline: float
) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not _has_exited(process.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            wait = min(remaining, _POLL_SECONDS)
            if not selector.get_map():
                time.sleep(wait)  # end of file before the exit: the program closed its stdout
            elif selector.select(wait) and not _read_available(fd, output, limits.output_bytes):
                selector.unregister(fd)
            if len(output) > limits.output_bytes:
                return "output_limit"
    return "exit"


def _read_available(fd: int, output: bytearray, cap: int) -> bool:
    """Append what can be read without waiting, up to just past `cap`; False at end of file."""
    while len(output) <= cap:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        output += chunk
    return True


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the process a zombie, so its id (the process group's id) cannot be reused
    # before the group is killed.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone


def _read_status(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 16)
    except BlockingIOError:
        return b""


def _reap(process: subprocess.Popen) -> int | None:
    try:
        return process.wait(timeout=_REAP_SECONDS)
    except subprocess.TimeoutExpired:  # stuck in the kernel; subprocess reaps it later
        return None


def _classify(
    ended_by: str, report: bytes, returncode: int | None, output: str, limits: SandboxLimits
) -> tuple[str, str]:
    if ended_by == "timeout":
        return "timeout", f"wall-clock limit of {limits.timeout:g} s reached"
    if ended_by == "output_limit":
        return "output_limit", f"output passed {limits.output_bytes} bytes"
    if report == b"passed":
        return "passed", ""
    if report == b"failed":
        return "failed", _last_line(output) or "the program raised an exception"
    if returncode == -signal.SIGXCPU:
        return "timeout", f"CPU time limit of {limits.cpu_limit()} s reached"
    if returncode is not None and returncode < 0:
        return "crashed", f"killed by {_signal_name(-returncode)}"
    return "crashed", f"the interpreter exited with status {returncode} before the program ended"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal without a name
        return f"signal {number}"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""
