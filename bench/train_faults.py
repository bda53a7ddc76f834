"""Crash-anywhere training: SIGKILL `olmoe train` at many instants, resume it, and require the
result of an uninterrupted run, bit for bit.

    .venv/bin/python bench/train_faults.py                    # the campaign (~25 min, 2 cores)
    .venv/bin/python bench/train_faults.py --random 30 --json faults.json
    .venv/bin/python bench/train_faults.py --only torchrun     # the 2-process part alone
    .venv/bin/python bench/train_faults.py --only disk         # a full disk (root, mount)
    .venv/bin/python bench/train_faults.py --only single --points run.X  # a few targeted kills

A tiny model trains for 8 steps in float32 on one thread, with a checkpoint every 2 steps of
which 2 are kept (so every save after the second deletes one), a revision every 4 and an
evaluation every 4. Each training process is this script run as `train_faults.py --inject --
train ...`: it imports olmoe, installs the fault hooks below and runs the `olmoe` command line,
so the library carries no test code. The hooks are points where a process can die:

    forward     a decoder layer's forward pass begins
    backward    the gradient of a decoder layer's output is being computed
    step        an optimizer step begins          stepped   an optimizer step has updated
    write       Path.write_text / write_bytes: half the bytes written, then killed
    save_file   a safetensors file written and cut to half its length, then killed
    fsync       a file or directory is about to be flushed to disk (after a rename: its folder)
    replace     os.replace is about to rename (a checkpoint into place, `latest`, a staging)
    rmtree      shutil.rmtree on an existing directory: half its files deleted, then killed

Each hit of a hook has a key, `hook@path` with the path relative to the run directory and its
step numbers and temporary names made generic (`save_file@checkpoints/..step-N.partial.X.partial
/model.safetensors`), and OLMOE_FAULT_KILL=KEY:N makes the process SIGKILL itself at the N-th hit
of KEY. An uninterrupted reference run lists every key it reaches; the campaign then kills:

- targeted: a fresh run at the first and at the last hit of every key (and at a hit in the
  middle of the many-hit ones), each followed by `olmoe train --resume RUN` to the end;
- random: at instants drawn uniformly over a run's working time (after its imports), in
  episodes of up to three kills, each resumed from whatever the kill left;
- torchrun: the same job on 2 processes (gloo, FSDP2), one rank killed (targeted on either rank,
  or at random), the other left to torchrun, which must end the job within the timeout; then
  resumed on 2 processes;
- disk: the job (keeping every checkpoint) with its run directory on a tmpfs too small for it,
  one size for each file the disk should fill during (DISK_SIZES), then the disk grown and the
  run resumed (`full_disk`); and `olmoe eval --output`, `data prepare`, `analyze` and
  `quantize` rerun over their earlier output on a tmpfs without room for a second copy
  (`full_disk_commands`). It needs root and the right to mount; where either is missing it is
  skipped, and says why.

After every kill it checks what a user would find: the run lock is free (so the resume starts at
once); every `step-N` under checkpoints/ is complete (its state says step N, its model loads,
its optimizer state reads), `latest` names one of them, and the checkpoint a resume picks is
complete; every revision and the run's own model, where present, load; every line of the log
parses. Nothing that looks complete may be incomplete; hidden leftovers (staging, temporary
files) are counted. After the last resume, the final model, the last checkpoint's model and
optimizer state (AdamW moments, RNG states), the revisions and every logged value but the
timings must equal the uninterrupted run's (torch.equal, float32). Exit status 0 only if every
kill and every disk size passed. tests/train/test_faults.py runs a few targeted kills of this
harness.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve()
PYTHON = Path(sys.executable)
TORCHRUN = PYTHON.parent / "torchrun"
STEPS = 8
KILL_ENV, TRACE_ENV, ROOT_ENV, RANK_ENV = (
    "OLMOE_FAULT_KILL",
    "OLMOE_FAULT_TRACE",
    "OLMOE_FAULT_ROOT",
    "OLMOE_FAULT_RANK",
)
# The disk part's tmpfs sizes. Its job keeps every checkpoint, so its use of the disk only grows
# (in whole 4 KiB pages): 12 KiB at the start, 0.5 MiB once step 2's checkpoint is written, 1.2
# once step 4's revision and checkpoint are, 1.7 after step 6, 2.4 after step 8's revision and
# checkpoint, 2.6 with the final model. These sizes fill it while writing step 2's weights and
# its optimizer state, step 4's checkpoint, step 8's revision and the final model.
DISK_SIZES = ["128k", "256k", "1m", "1792k", "2560k"]
# mkstemp's and mkdtemp's random part of a temporary's name (tempfile's alphabet, 8 letters)
_TEMPORARY = re.compile(r"(?<=\.)[a-z0-9_]{8}(?=\.)")


# ---------------------------------------------------------------------------- in the trainer
class _Faults:
    """The hooks of one training process: count each key's hits, trace them, and die at the
    armed one. A trace line is written (and flushed) before the hook acts, so the last line of
    a killed process's trace is where it died."""

    def __init__(self, armed: str | None, trace: Path, root: str):
        self.armed = armed.rsplit(":", 1) if armed else None
        self.trace = open(trace, "a", encoding="utf-8")  # noqa: SIM115 - open until killed
        self.fired = trace.with_name(f"fired-{trace.name}")
        self.root = root
        self.hits: Counter = Counter()

    def key(self, hook: str, *paths) -> str:
        if not paths:
            return hook
        names = [os.path.relpath(os.path.abspath(p), self.root) for p in paths]
        return f"{hook}@" + re.sub(r"\d+", "N", _TEMPORARY.sub("X", " -> ".join(names)))

    def hit(self, hook: str, *paths) -> bool:
        """Whether this hit is the armed one (the caller then does its damage and calls die)."""
        key = self.key(hook, *paths)
        self.hits[key] += 1
        self.trace.write(f"{key}\n")
        self.trace.flush()
        return self.armed is not None and self.armed == [key, str(self.hits[key])]

    def die(self) -> None:
        self.fired.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _install(faults: _Faults) -> None:
    """Patch the process's I/O and register torch hooks; each calls `faults.hit` first."""
    import pathlib

    import torch
    from torch.nn.modules.module import register_module_forward_hook
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    import olmoe.checkpoint
    import olmoe.train.state
    from olmoe.model import OlmoeDecoderLayer

    def on_forward(module, inputs, output):
        if not isinstance(module, OlmoeDecoderLayer):
            return
        if faults.hit("forward"):
            faults.die()
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: faults.die() if faults.hit("backward") else None)

    register_module_forward_hook(on_forward)
    register_optimizer_step_pre_hook(lambda *_: faults.die() if faults.hit("step") else None)
    register_optimizer_step_post_hook(lambda *_: faults.die() if faults.hit("stepped") else None)

    for method in ("write_text", "write_bytes"):
        real = getattr(pathlib.Path, method)

        def write(self, data, *args, _real=real, **kwargs):
            if faults.hit("write", self):
                _real(self, data[: len(data) // 2], *args, **kwargs)
                faults.die()
            return _real(self, data, *args, **kwargs)

        setattr(pathlib.Path, method, write)

    real_save_file = olmoe.train.state.save_file

    def save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        if faults.hit("save_file", path):
            os.truncate(path, os.path.getsize(path) // 2)
            faults.die()

    olmoe.checkpoint.save_file = olmoe.train.state.save_file = save_file

    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(descriptor):
        if faults.hit("fsync", os.readlink(f"/proc/self/fd/{descriptor}")):
            faults.die()
        real_fsync(descriptor)

    def replace(source, destination, **kwargs):
        if faults.hit("replace", source, destination):
            faults.die()
        real_replace(source, destination, **kwargs)

    def rmtree(path, *args, **kwargs):
        if os.path.isdir(path) and faults.hit("rmtree", path):
            files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
            for name in files[: (len(files) + 1) // 2]:
                os.unlink(name)
            faults.die()
        real_rmtree(path, *args, **kwargs)

    os.fsync, os.replace, shutil.rmtree = fsync, replace, rmtree
    torch.set_num_threads(1)


def inject(argv: list[str]) -> int:
    """`train_faults.py --inject -- ARGS`: `olmoe ARGS` with the hooks armed per the environment
    (a rank other than OLMOE_FAULT_RANK, when set, only traces) and tracing into the folder
    OLMOE_FAULT_TRACE, where `ready-RANK` (its pid) appears once its imports are done, for the
    campaign's timed kills."""
    from olmoe.cli import main

    rank = os.environ.get("RANK", "0")
    armed = os.environ.get(KILL_ENV)
    if os.environ.get(RANK_ENV, rank) != rank:
        armed = None
    folder = Path(os.environ[TRACE_ENV])
    _install(_Faults(armed, folder / f"trace-{rank}", os.environ[ROOT_ENV]))
    with open(folder / f"ready-{rank}", "w") as ready:  # not Path.write_text: that is hooked
        ready.write(f"{os.getpid()}\n")
    return main(argv)


# ---------------------------------------------------------------------------- the job
def make_job(folder: Path, processes: int, run_dir: Path, keep: int = 2) -> Path:
    """Token data and a config for an 8-step run in `folder` that keeps `keep` checkpoints (0:
    all); returns the config's path. Two processes take micro-batches of 2 so that a step is the
    same 256 tokens either way."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    stream = np.tile(np.arange(2, 100, dtype=np.uint16), 40)
    np.save(folder / "train.npy", stream)
    np.save(folder / "valid.npy", stream[:2000])
    config = folder / f"job-{processes}.yaml"
    config.write_text(
        f"""run_dir: {run_dir}
model: {{preset: tiny}}
data: {{path: {folder / "train.npy"}, valid_path: {folder / "valid.npy"}, seq_len: 32}}
optim: {{lr: 1.0e-2}}
schedule: {{warmup_steps: 3}}
train: {{max_steps: {STEPS}, global_batch_tokens: 256, micro_batch_size: {4 // processes},
         precision: fp32, threads: 1}}
eval: {{every: 4, batches: 2}}
checkpoint: {{every: 2, keep: {keep}, revisions_every: 4}}
"""
    )
    return config


@dataclass
class Outcome:
    """One training process (or torchrun job): how it ended and where its killed rank died."""

    returncode: int
    killed: bool
    seconds: float
    work_seconds: float | None  # from the end of its imports to its exit
    died_at: str | None  # the last hook key of the killed rank
    hits: dict[str, Counter]  # per rank: key -> hits
    stderr: str


def launch(
    config: Path,
    run_dir: Path,
    scratch: Path,
    processes: int = 1,
    resume: bool = False,
    kill: str | None = None,
    kill_rank: int = 0,
    kill_after: float | None = None,
    timeout: float = 300,
) -> Outcome:
    """Run `olmoe train CONFIG` (or `--resume RUN`) through the hooks, on `processes` ranks
    under torchrun when more than one. `kill`: the KEY:N to die at, on rank `kill_rank`;
    `kill_after`: seconds after that rank's imports at which this process SIGKILLs it."""
    args = ["train", "--resume", str(run_dir)] if resume else ["train", str(config)]
    command = [str(PYTHON), str(SCRIPT), "--inject", "--", *args]
    if processes > 1:
        command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.update({TRACE_ENV: str(scratch), ROOT_ENV: str(run_dir)})
    env.pop("OLMOE_DEBUG", None)
    if kill:
        env.update({KILL_ENV: kill, RANK_ENV: str(kill_rank)})
    started = time.perf_counter()
    with open(scratch / "stderr", "w+") as stderr:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        killed_by_us = False
        if kill_after is not None:
            killed_by_us = _kill_later(process, scratch / f"ready-{kill_rank}", kill_after)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: end the whole job, report it
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            stderr.write(f"\n[harness] still running after {timeout} s: killed\n")
        stderr.seek(0)
        text = stderr.read()
    seconds = time.perf_counter() - started
    ready = scratch / f"ready-{kill_rank}"
    work = time.time() - ready.stat().st_mtime if ready.exists() else None
    hits = {}
    for rank in range(processes):
        trace = scratch / f"trace-{rank}"
        hits[rank] = Counter(trace.read_text().splitlines()) if trace.exists() else Counter()
    trace = scratch / f"trace-{kill_rank}"
    lines = trace.read_text().splitlines() if trace.exists() else []
    killed = killed_by_us or (scratch / f"fired-trace-{kill_rank}").exists()
    died_at = (lines[-1] if lines else "(before the first hook)") if killed else None
    return Outcome(returncode, killed, seconds, work, died_at, hits, text)


def _kill_later(process: subprocess.Popen, ready: Path, delay: float) -> bool:
    """SIGKILL the process whose pid `ready` will hold, `delay` s after it appears; False if
    the job ended first."""
    while not ready.exists():
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    pid = int(ready.read_text() or 0)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------- the checks
def inspect_run(run_dir: Path) -> tuple[list[str], list[str], int | None]:
    """What a user finds in `run_dir` after a kill: its problems (anything that looks complete
    but is not, a lock still held), its hidden leftovers, and the step a resume starts from
    (None: no checkpoint yet, start afresh)."""
    from olmoe.errors import OlmoeError
    from olmoe.train import state
    from olmoe.train.lock import RunLock

    if not run_dir.exists():
        return [], [], None
    problems, leftovers = [], []
    try:
        RunLock(run_dir).acquire().release()
    except OlmoeError as exc:
        problems.append(f"the run lock is still held: {exc}")
    root = run_dir / state.CHECKPOINTS_DIR
    complete = set()
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith("."):
            leftovers.append(f"checkpoints/{entry.name}")
        elif re.fullmatch(r"step-\d{8}", entry.name):
            trouble = _incomplete_checkpoint(entry)
            if trouble:
                problems.append(f"{entry.name} looks complete but {trouble}")
            else:
                complete.add(entry.name)
        elif entry.name != state.LATEST_NAME:
            problems.append(f"unexpected checkpoints/{entry.name}")
    latest = root / state.LATEST_NAME
    if latest.exists() and latest.read_text().strip() not in complete:
        problems.append(f"latest names {latest.read_text().strip()!r}, not a complete checkpoint")
    step = None
    if complete:
        chosen = state.find_checkpoint(run_dir)
        if chosen.name not in complete:
            problems.append(f"a resume would start from {chosen.name}, which is incomplete")
        step = state.read_state(chosen)["step"]
    problems += _model_problems(run_dir)
    leftovers += _leftovers(run_dir)
    log = run_dir / "log.jsonl"
    for number, line in enumerate(log.read_text().splitlines() if log.exists() else [], 1):
        try:
            json.loads(line)
        except ValueError:
            problems.append(f"log.jsonl line {number} is not JSON: {line[:60]!r}")
    return problems, leftovers, step


def _incomplete_checkpoint(directory: Path) -> str | None:
    from safetensors.torch import load_file

    from olmoe import OlmoeForCausalLM
    from olmoe.train import state

    try:
        saved = state.read_state(directory)["step"]
        OlmoeForCausalLM.from_pretrained(directory)
        load_file(directory / state.OPTIMIZER_NAME)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return f"does not load: {' '.join(str(exc).split())[:200]}"
    if saved != int(directory.name.split("-")[1]):
        return f"its state says step {saved}"
    return None


def _model_problems(run_dir: Path) -> list[str]:
    """The revisions and the run's final model, where present, load."""
    from olmoe import OlmoeForCausalLM

    problems = []
    models = [run_dir] if (run_dir / "model.safetensors").exists() else []
    models += [p for p in run_dir.glob("revisions/*") if not p.name.startswith(".")]
    for model in models:
        try:
            OlmoeForCausalLM.from_pretrained(model)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{model.relative_to(run_dir.parent)} does not load: {exc}")
    return problems


def _leftovers(run_dir: Path) -> list[str]:
    """Hidden entries in the run directory and its revisions/ (staging, temporary files), and
    beside it (the final model's staging); the lock is not one."""
    found = [p for p in [*run_dir.glob(".*"), *run_dir.glob("revisions/.*")] if p.name != ".lock"]
    found += run_dir.parent.glob(f".{run_dir.name}.*")
    return [os.path.relpath(p, run_dir) for p in found]


def compare_runs(run_dir: Path, reference: Path) -> list[str]:
    """Where the resumed run's results differ from the uninterrupted run's: the final model,
    the last checkpoint (model, AdamW state, RNG states), the revisions, the logged values."""
    import torch
    from safetensors.torch import load_file

    from olmoe.train import state

    last = Path(state.CHECKPOINTS_DIR) / state.checkpoint_name(STEPS)
    files = [Path("model.safetensors"), last / "model.safetensors", last / state.OPTIMIZER_NAME]
    files += [p.relative_to(reference) for p in reference.glob("revisions/*/model.safetensors")]
    problems = []
    for name in files:
        if not (run_dir / name).is_file():
            problems.append(f"{name} is missing")
            continue
        ours, theirs = load_file(run_dir / name), load_file(reference / name)
        differ = [k for k in theirs if k not in ours or not torch.equal(ours[k], theirs[k])]
        problems += [f"{name}: {len(differ)} tensors differ, e.g. {differ[0]}"] if differ else []
    if _log_values(run_dir) != _log_values(reference):
        problems.append("log.jsonl's values differ from the uninterrupted run's")
    return problems


def _log_values(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


# ---------------------------------------------------------------------------- the campaign
@dataclass
class Kill:
    """One kill and what the run directory held after it."""

    mode: str  # targeted, random, torchrun-targeted, torchrun-random
    fault: str  # KEY:N on a rank, or a delay
    died_at: str | None
    resumed_from: int | None
    problems: list[str]
    leftovers: list[str]
    seconds: float


@dataclass
class Episode:
    """A fresh run, killed one or more times, each time resumed, until it completes."""

    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the end result's differences


class Campaign:
    def __init__(self, work: Path, processes: int, timeout: float):
        self.work, self.processes, self.timeout = work, processes, timeout
        self.run_dir = work / f"job-{processes}" / "run"
        self.config = make_job(work / f"job-{processes}", processes, self.run_dir)
        self.reference = work / f"reference-{processes}"
        self.launches = 0

    def start_reference(self) -> Outcome:
        """The uninterrupted run, traced: every key it reaches, and how long it works."""
        outcome = self._launch(resume=False)
        if outcome.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{outcome.stderr[-3000:]}")
        shutil.copytree(self.run_dir, self.reference)
        return outcome

    def episode(self, mode: str, faults: list[dict]) -> Episode:
        """A fresh run killed by faults[0] (`kill`, `kill_rank` or `kill_after` for launch),
        resumed under faults[1], ... (a fault that does not fire ends the episode early), then
        resumed with no fault, and compared with the reference."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        episode, resume = Episode(), False
        for fault in [*faults, {}]:  # the last run, with no fault, cannot be killed
            outcome = self._launch(resume=resume, **fault)
            if "kill" in fault and not outcome.killed:
                episode.problems.append(f"{fault['kill']} was never reached")
            if not outcome.killed:
                if outcome.returncode != 0:
                    episode.problems.append(f"a run ended with {outcome.returncode} unkilled: "
                                            f"{outcome.stderr[-1500:]}")  # fmt: skip
                break
            problems, leftovers, step = inspect_run(self.run_dir)
            if "[harness] still running" in outcome.stderr:
                problems.append(f"the job did not end after the kill: {outcome.stderr[-800:]}")
            label = fault.get("kill") or f"{fault.get('kill_after', 0):.2f} s"
            if self.processes > 1:
                label += f" on rank {fault.get('kill_rank', 0)}"
            episode.kills.append(Kill(mode, label, outcome.died_at, step, problems, leftovers,
                                      outcome.seconds))  # fmt: skip
            resume = step is not None
        if not episode.problems:
            problems, leftovers, _ = inspect_run(self.run_dir)
            episode.problems += problems + compare_runs(self.run_dir, self.reference)
            episode.problems += [f"left behind at the end: {name}" for name in leftovers]
        return episode

    def _launch(self, resume: bool, **fault) -> Outcome:
        self.launches += 1
        folder = self.work / "launches"
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(
            tempfile.mkdtemp(prefix=f"{self.processes}-{self.launches:04d}-", dir=folder)
        )
        return launch(self.config, self.run_dir, scratch, self.processes, resume,
                      timeout=self.timeout, **fault)  # fmt: skip


def full_disk(work: Path, size: str, reference: Path, timeout: float) -> dict:
    """A fresh run whose run directory is on a tmpfs of `size` (mount's size=, e.g. 256k).
    Where the disk fills, the run must stop with one line on stderr (status 1) and leave a run
    directory with no problem and no leftover (the failed write cleans up after itself); with
    the disk grown to 64 MiB, `--resume` (or a fresh start, if no checkpoint was complete) must
    finish with the uninterrupted run's results. The job keeps every checkpoint, so that its use
    of the disk only grows and each size fills it during one file (see DISK_SIZES)."""
    mount = Path(tempfile.mkdtemp(prefix=f"disk-{size}-", dir=work))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
    try:
        run_dir = mount / "run"
        config = make_job(work / f"disk-job-{size}", 1, run_dir, keep=0)
        scratch = Path(tempfile.mkdtemp(dir=work))
        first = launch(config, run_dir, scratch, timeout=timeout)
        lines = first.stderr.strip().splitlines()
        # The failed write is not traced (its hook comes after it); the cleanup that followed
        # it is, and names the staging it was writing into.
        last_hook = (scratch / "trace-0").read_text().splitlines()[-1]
        problems, leftovers, step = inspect_run(run_dir)
        if first.returncode not in (0, 1) or (first.returncode and len(lines) != 1):
            problems.append(f"status {first.returncode}, stderr: {first.stderr[-2000:]}")
        problems += [f"left behind: {name}" for name in leftovers]
        subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
        resume = step is not None
        second = launch(config, run_dir, Path(tempfile.mkdtemp(dir=work)), resume=resume,
                        timeout=timeout)  # fmt: skip
        if second.returncode != 0:
            problems.append(f"the resume failed: {second.stderr[-2000:]}")
        else:
            problems += compare_runs(run_dir, reference)
        error = lines[0] if first.returncode and lines else None
        return {"size": size, "error": error, "last_hook": last_hook, "resumed_from": step,
                "problems": problems}  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


# olmoe's other commands that write: their arguments (MODEL and TEXT filled in) and output.
WRITERS = {
    "eval": (["eval", "{model}", "--text", "{text}", "--max-length", "16", "--dtype", "fp32",
              "--no-progress", "--output"], "results.json"),
    "data prepare": (["data", "prepare", "{text}", "--quiet", "--force", "--out"], "tokens"),
    "analyze": (["analyze", "load", "{model}", "--data", "{text}", "--max-tokens", "100",
                 "--chunk-length", "32", "--dtype", "fp32", "--quiet", "--out"], "analysis"),
    "quantize": (["quantize", "{model}"], "int8"),
}  # fmt: skip


def full_disk_commands(work: Path, timeout: float) -> list[dict]:
    """Each of WRITERS run twice into a tmpfs: once with room, leaving its output; then, the
    tmpfs shrunk to what it holds plus half that output's size, again. The second run must
    stop with one line on stderr (status 1) and leave the folder as it was, byte for byte: the
    earlier output intact, no staging left."""
    from olmoe import OlmoeConfig, OlmoeForCausalLM

    inputs = work / "writer-inputs"
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=128)
    OlmoeForCausalLM(config).save_pretrained(inputs / "model")  # OLMo's vocabulary: its tokenizer
    (inputs / "text").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (inputs / "text" / f"{i}.txt").write_text(f"Document {i}: the quick brown fox. " * 20)
    values = {"model": str(inputs / "model"), "text": str(inputs / "text")}
    return [_writer_on_full_disk(work, name, values, timeout) for name in WRITERS]


def _writer_on_full_disk(work: Path, name: str, values: dict, timeout: float) -> dict:
    mount = Path(tempfile.mkdtemp(prefix=f"disk-{name.replace(' ', '-')}-", dir=work))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount], check=True)
    try:
        arguments, output = WRITERS[name]
        command = [*(a.format(**values) for a in arguments), str(mount / output)]
        run = _olmoe(command, timeout)
        if run.returncode != 0:
            return {"command": name, "error": None, "problems": [f"with room: {run.stderr}"]}
        before, page = _files(mount), os.statvfs(mount).f_frsize
        room = sum(len(data) for path, data in before.items() if path.startswith(output)) // 2
        size = _used_bytes(mount) + room // page * page  # tmpfs rounds a size up to pages
        subprocess.run(["mount", "-o", f"remount,size={size}", "tmpfs", mount], check=True)
        run = _olmoe(command, timeout)
        lines, problems = run.stderr.strip().splitlines(), []
        if run.returncode != 1 or len(lines) != 1:
            problems.append(f"status {run.returncode}, stderr: {run.stderr[-2000:]}")
        if _files(mount) != before:
            problems.append("the folder changed: the earlier output or a leftover")
        return {"command": name, "error": lines[-1] if lines else None, "problems": problems}
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


def _olmoe(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("OLMOE_DEBUG", None)
    return subprocess.run([str(PYTHON), "-m", "olmoe", *arguments], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _used_bytes(folder: Path) -> int:
    disk = os.statvfs(folder)
    return (disk.f_blocks - disk.f_bfree) * disk.f_frsize


def cannot_mount(work: Path) -> str | None:
    """Why this process cannot mount a tmpfs (the disk part needs root and the right to
    mount, which containers often withhold), or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    folder = Path(tempfile.mkdtemp(prefix="mount-check-", dir=work))
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if tried.returncode != 0:
        return f"mount -t tmpfs failed: {tried.stderr.strip()}"
    subprocess.run(["umount", folder], check=True)
    return None


def targeted_faults(hits: Counter, rng: random.Random) -> list[tuple[str, int]]:
    """(KEY, N) to kill at: the first and the last hit of every key, and one in between for
    keys hit more than 4 times (the forward and backward passes, the optimizer steps)."""
    chosen = []
    for key, count in sorted(hits.items()):
        picks = {1, count} | ({rng.randint(2, count - 1)} if count > 4 else set())
        chosen += [(key, n) for n in sorted(picks)]
    return chosen


def run_campaign(args) -> dict:
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="olmoe-faults-"))
    results: dict = {"work": str(work), "episodes": {}, "seconds": {}}
    for name, part in (("single", _single), ("torchrun", _torchrun), ("disk", _disk)):
        if args.only in (None, name):
            started = time.perf_counter()
            part(args, rng, work, results)
            results["seconds"][name] = time.perf_counter() - started
    return results


def _single(args, rng: random.Random, work: Path, results: dict) -> None:
    campaign = Campaign(work, 1, args.timeout)
    reference = campaign.start_reference()
    results["reference_hits"] = dict(reference.hits[0])
    points = [(key, n) for key, n in targeted_faults(reference.hits[0], rng)
              if re.search(args.points, key)]  # fmt: skip
    episodes = [campaign.episode("targeted", [{"kill": f"{key}:{n}"}]) for key, n in points]
    kills = 0
    while kills < args.random:
        delays = [rng.uniform(0, reference.work_seconds) for _ in range(3)]
        episodes.append(campaign.episode("random", [{"kill_after": d} for d in delays]))
        kills += max(1, len(episodes[-1].kills))
    results["episodes"]["single"] = [asdict(e) for e in episodes]


def _torchrun(args, rng: random.Random, work: Path, results: dict) -> None:
    campaign = Campaign(work, 2, args.timeout)
    reference = campaign.start_reference()
    episodes = []
    for rank, count in ((1, args.torchrun_targeted), (0, args.torchrun_targeted)):
        faults = targeted_faults(reference.hits[rank], rng)
        for key, n in rng.sample(faults, min(count, len(faults))):
            fault = {"kill": f"{key}:{n}", "kill_rank": rank}
            episodes.append(campaign.episode("torchrun-targeted", [fault]))
    for _ in range(args.torchrun_random):
        fault = {"kill_after": rng.uniform(0, reference.work_seconds),
                 "kill_rank": rng.randint(0, 1)}  # fmt: skip
        episodes.append(campaign.episode("torchrun-random", [fault]))
    results["episodes"]["torchrun"] = [asdict(e) for e in episodes]


def _disk(args, rng: random.Random, work: Path, results: dict) -> None:
    reason = cannot_mount(work)
    if reason:
        results["disk_skipped"] = reason
        return
    reference = work / "reference-1"
    if not reference.exists():  # --only disk: the single-process part did not make it
        Campaign(work, 1, args.timeout).start_reference()
    results["disk"] = [full_disk(work, size, reference, args.timeout) for size in args.disk_sizes]
    results["disk_commands"] = full_disk_commands(work, args.timeout)


def summary(results: dict) -> str:
    lines, failed = [], 0
    for part, episodes in results["episodes"].items():
        kills = [k for e in episodes for k in e["kills"]]
        by_mode = Counter(k["mode"] for k in kills)
        points = {k["died_at"] for k in kills}
        targeted = {k["fault"].rsplit(":", 1)[0] for k in kills if "targeted" in k["mode"]}
        bad = [e for e in episodes if e["problems"] or any(k["problems"] for k in e["kills"])]
        failed += len(bad)
        leftovers = sum(len(k["leftovers"]) for k in kills)
        lines.append(
            f"{part}: {len(kills)} kills ({', '.join(f'{n} {m}' for m, n in by_mode.items())}) "
            f"in {len(episodes)} episodes; {len(targeted)} distinct targeted points, "
            f"{len(points)} distinct last hooks before death; resumed from "
            f"{dict(sorted(Counter(str(k['resumed_from']) for k in kills).items()))}; "
            f"{leftovers} hidden leftovers seen after kills; "
            f"{len(episodes) - len(bad)}/{len(episodes)} episodes passed "
            f"({results['seconds'][part]:.0f} s)"
        )
        for episode in bad:
            for kill in episode["kills"]:
                for problem in kill["problems"]:
                    lines.append(f"  after {kill['mode']} {kill['fault']}: {problem}")
            faults = ", ".join(k["fault"] for k in episode["kills"])
            lines += [f"  end of [{faults}]: {p}" for p in episode["problems"]]
    disk_lines, disk_failed = _disk_summary(results)
    lines += disk_lines
    failed += disk_failed
    lines.append("PASS" if failed == 0 else f"FAIL: {failed} episodes or disk sizes")
    return "\n".join(lines)


def _disk_summary(results: dict) -> tuple[list[str], int]:
    """The disk part's lines (where each size filled, what the resume started from) and how
    many of its sizes failed."""
    if "disk_skipped" in results:
        return [f"disk: skipped, {results['disk_skipped']}"], 0
    runs, writers = results.get("disk", []), results.get("disk_commands", [])
    if not runs:
        return [], 0
    bad = [run for run in [*runs, *writers] if run["problems"]]
    seconds = results["seconds"]["disk"]
    total = len(runs) + len(writers)
    lines = [f"disk: {total - len(bad)}/{total} passed ({seconds:.0f} s)"]
    for run in runs:
        lines.append(f"  train on {run['size']}: {run['error'] or 'never filled'} (last hook "
                     f"{run['last_hook']}); resumed from {run['resumed_from']}")  # fmt: skip
        lines += [f"    {problem}" for problem in run["problems"]]
    for run in writers:
        lines.append(f"  {run['command']}: {run['error']}")
        lines += [f"    {problem}" for problem in run["problems"]]
    return lines, len(bad)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inject"]:
        return inject(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", type=int, default=24, help="random kills, one process")
    parser.add_argument("--torchrun-targeted", type=int, default=4,
                        help="targeted kills per rank, 2 processes")  # fmt: skip
    parser.add_argument("--torchrun-random", type=int, default=4, help="random kills, 2 processes")
    parser.add_argument("--only", choices=["single", "torchrun", "disk"],
                        help="one part of the campaign")  # fmt: skip
    parser.add_argument("--disk-sizes", nargs="+", default=DISK_SIZES, metavar="SIZE",
                        help="tmpfs sizes for the disk part (mount's size=)")  # fmt: skip
    parser.add_argument("--points", default="", metavar="REGEX",
                        help="targeted kills (one process) only at keys that match, to recheck a "
                        "fix; the random kills stay those of the whole campaign")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds a run may take")
    parser.add_argument("--work", help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args(argv)
    results = run_campaign(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    text = summary(results)
    print(text)
    return 0 if text.endswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
