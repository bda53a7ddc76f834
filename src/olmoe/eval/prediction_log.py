"""The generations file: one JSON line per problem, appended as soon as the problem is done, so
that an interrupted `olmoe eval` picks up where it stopped.

Each line is written with one `write` on a file opened for appending, so a crash leaves at most
one cut-off last line; that line is dropped when the file is opened again. Every line carries a
fingerprint of what made it (the model and the task's generation settings): a rerun reuses only
lines made the same way, and refuses a file that holds the same problems made another way rather
than mixing them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from olmoe.errors import UsageError


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of JSON-able settings, the same for equal settings in any key order."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PredictionLog:
    """Reads the lines already in `path` (creating the file), then appends new ones."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise UsageError(f"--generations: cannot open {self.path} ({exc.strerror})") from None
        self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):  # a line cut off by a crash: dropped, written again
            os.truncate(self._fd, len(complete))
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
                key = (record["task"], int(record["doc_id"]))
                if not {"fingerprint", "generations"} <= record.keys():
                    raise KeyError("fingerprint")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UsageError(
                    f"--generations: line {number} of {self.path} is not an olmoe generation "
                    "record; pass a new file"
                ) from None
            self.done[key] = record

    def check(self, task: str, print_: str) -> None:
        """Refuse to mix generations of `task` made another way with new ones."""
        other = {r["fingerprint"] for (t, _), r in self.done.items() if t == task} - {print_}
        if other:
            raise UsageError(
                f"--generations: {self.path} holds {task} generations made with another model or "
                "other settings; pass another file (or delete it) to start afresh"
            )

    def get(self, task: str, doc_id: int) -> dict[str, Any] | None:
        return self.done.get((task, doc_id))

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: the cut line is dropped on the next start
            raise OSError(f"{self.path}: only {written} of {len(line)} bytes written")
        self.done[(record["task"], int(record["doc_id"]))] = record

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> PredictionLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
