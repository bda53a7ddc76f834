"""A run directory belongs to one trainer at a time, and a crash never leaves it locked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from olmoe.errors import UsageError
from olmoe.train.lock import LOCK_NAME, RunLock

HOLD = """
import sys, time
from olmoe.train.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_trainer_is_stopped_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"process {holder.pid}: a run directory"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # as a crash: no release, the OS drops the lock
        holder.wait()
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text().strip() != str(holder.pid)
    lock.release()
    RunLock(tmp_path).acquire().release()  # released: free again


HOLD_AND_FORK = """
import os, sys, time
from olmoe.train.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
if os.fork() == 0:  # a program being started: it shares the lock until its exec
    time.sleep(0.3)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_its_dead_holders_child_still_shares_is_waited_for(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL, while its child still holds the lock
    holder.wait()
    RunLock(tmp_path).acquire().release()  # once the child lets go, well within the wait


def test_the_trainer_holds_the_lock_while_it_runs(tmp_path):
    from olmoe.train import load_config
    from olmoe.train.trainer import Trainer

    config = load_config(None, [f"--run_dir={tmp_path}", f"--data.path={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError):
        Trainer(config, progress=False)  # fails after taking the lock ...
    RunLock(tmp_path).acquire().release()  # ... and gives it back
