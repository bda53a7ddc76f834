"""Chat and preference data for fine-tuning: the formats TRL names, rendered with the model's
chat template, with loss masks.

Records come from `.jsonl`, `.json`, `.parquet` or a Hugging Face `save_to_disk` directory; each
record's keys say its format:

    messages                      a conversation (role/content dicts)          -> sft
    prompt + completion           a prompt and its answer                      -> sft
    prompt + chosen + rejected    a preference pair (`prompt` may be implicit:  -> dpo
                                  the conversations' shared leading messages)
    prompt + completion + label   an unpaired preference (label: desirable)    -> kto

A prompt or answer is a string (a user message, an assistant message) or a list of messages.
Each conversation is rendered by the tokenizer's chat template, the one `olmoe chat` and the
server use (the Tulu format unless the checkpoint brings its own). Only the content of the
assistant messages being trained on, and the end-of-text token that closes each, count in the
loss (labels elsewhere are -100); in the prompt/completion formats that is the completion only.
Sequences are cut to `max_length` tokens, and an example left with nothing to learn from is
dropped and counted.

`prepare_chat` streams a file into a directory of flat arrays (tokens, loss mask, offsets; and
for preferences which sequences pair up or are desirable), written atomically with a
metadata.json; `ChatExamples` reads it back.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from olmoe.data.tokens import NpyWriter
from olmoe.errors import ConfigError, DataError
from olmoe.fileio import atomic_directory, write_atomic

KINDS = ("sft", "dpo", "kto")
FORMAT = "olmoe-chat-v1"
METADATA_FILE = "metadata.json"
ARRAYS = ("tokens", "mask", "offsets")  # + "desirable" for kto
# The kind each record format trains.
FORMAT_KIND = {
    "messages": "sft",
    "prompt_completion": "sft",
    "preference": "dpo",
    "unpaired": "kto",
}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


# ---------------------------------------------------------------------------- reading
def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a .jsonl, .json (a list of objects), .parquet file or `save_to_disk`
    directory, one at a time."""
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield _as_record(_json_line(line, path, number), path, number)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
        for number, record in enumerate(data, 1):
            yield _as_record(record, path, number)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    else:
        raise DataError(
            f"{path}: read .jsonl, .json, .parquet or a save_to_disk directory, not "
            f"{path.suffix or 'a file without a suffix'}"
        )


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None


def _as_record(value: Any, path: Path, number: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{path}:{number}: a record must be a JSON object")
    return value


def _read_saved_dataset(directory: Path) -> Iterator[dict[str, Any]]:
    """A `datasets.Dataset.save_to_disk` directory: arrow stream files named in state.json."""
    import pyarrow as pa

    state = directory / "state.json"
    if state.is_file():
        files = [directory / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(directory.glob("*.arrow"))
    if not files:
        raise DataError(
            f"{directory} holds no .arrow files: pass a save_to_disk directory or a data file"
        )
    for file in files:
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                yield from batch.to_pylist()


def record_format(record: dict[str, Any]) -> str:
    """Which of the formats in this module's doc a record is in, from its keys."""
    keys = set(record)
    if {"chosen", "rejected"} <= keys:  # before messages: some preference sets carry both
        return "preference"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise DataError(
        f"a record with keys {sorted(keys)} is in no known format: use messages; prompt + "
        "completion; prompt + chosen + rejected; or prompt + completion + label"
    )


def _messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(
        "a prompt or answer must be a string or a list of {role, content} messages with string "
        f"values, got {type(value).__name__}"
    )


def _split_implicit_prompt(chosen, rejected) -> tuple[list, list, list]:
    """A pair given as two whole conversations: their shared leading messages are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _without_prefix(messages: list, prefix: list) -> list:
    return messages[len(prefix) :] if messages[: len(prefix)] == prefix else messages


# ---------------------------------------------------------------------------- encoding
@dataclass
class TokenSequence:
    """One tokenised conversation: its ids, labels (the id where it counts, else -100), and
    whether `max_length` cut it."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(label != -100 for label in self.labels)


def encode_conversation(
    messages: list[dict[str, str]], tokenizer, max_length: int, train_from: int = 0
) -> TokenSequence:
    """Render `messages` with the tokenizer's chat template and label the content and closing
    eos of each assistant message from index `train_from` on; cut to `max_length` tokens.

    The spans come from rendering the conversation up to each message as text (a template
    renders a conversation's beginning as the beginning of its text) and the tokens' character
    offsets, so a token belongs to the loss exactly when it starts inside an assistant span."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if index < train_from or message["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(
            messages[:index], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
            raise DataError(
                "the chat template does not render a conversation's beginning as the beginning "
                "of its text, so the assistant's tokens cannot be found: use a template that does "
                "(the Tulu one does)"
            )
        spans.append((len(head), len(upto)))
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids, labels = list(encoding.ids[:max_length]), []
    for token, (start, _) in zip(ids, encoding.offsets):
        inside = any(begin <= start < end for begin, end in spans)
        labels.append(token if inside else -100)
    return TokenSequence(ids, labels, truncated=len(encoding.ids) > max_length)


def encode_record(record: dict[str, Any], tokenizer, max_length: int) -> tuple[str, list, Any]:
    """A record as (kind, sequences, extra): sft -> [conversation]; dpo -> [chosen, rejected];
    kto -> [conversation] with extra = desirable. Sequences that carry no loss are kept; the
    caller drops the example."""
    fmt = record_format(record)
    kind = FORMAT_KIND[fmt]
    if fmt == "messages":
        return kind, [encode_conversation(_messages(record["messages"], "user"), tokenizer,
                                          max_length)], None  # fmt: skip
    if fmt == "preference":
        chosen = _messages(record["chosen"], "assistant")
        rejected = _messages(record["rejected"], "assistant")
        if "prompt" in record:
            prompt = _messages(record["prompt"], "user")
            # Conversations that repeat the prompt (UltraFeedback's files): keep their answers.
            chosen, rejected = (_without_prefix(c, prompt) for c in (chosen, rejected))
        else:
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        return (
            kind,
            [
                encode_conversation(prompt + chosen, tokenizer, max_length, len(prompt)),
                encode_conversation(prompt + rejected, tokenizer, max_length, len(prompt)),
            ],
            None,
        )
    prompt = _messages(record["prompt"], "user")
    completion = _messages(record["completion"], "assistant")
    sequence = encode_conversation(prompt + completion, tokenizer, max_length, len(prompt))
    if fmt == "unpaired":
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(f"an unpaired preference's label must be true or false, got {label!r}")
        return kind, [sequence], label
    return kind, [sequence], None


# ---------------------------------------------------------------------------- preparing
@dataclass
class ChatSummary:
    out_dir: Path
    metadata: dict[str, Any]
    seconds: float


def prepare_chat(
    source: str | Path,
    tokenizer,
    out_dir: str | Path,
    max_length: int = 4096,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ChatSummary:
    """Encode every record of `source` (all of one kind) into `out_dir`, streaming; examples
    with no trained token after truncation are dropped and counted. `progress(n)` is called
    with the number of records read. `force` replaces whatever `out_dir` holds."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists: pass force=True (--force) to replace it")
    started = time.perf_counter()
    counts: Counter = Counter()
    kind = None
    with atomic_directory(out_dir) as staging:
        writers = {
            "tokens": NpyWriter(staging / "tokens.npy", np.uint32),
            "mask": NpyWriter(staging / "mask.npy", np.uint8),
            "offsets": NpyWriter(staging / "offsets.npy", np.int64),
            "desirable": NpyWriter(staging / "desirable.npy", np.uint8),
        }
        try:
            writers["offsets"].write(np.zeros(1, dtype=np.int64))
            end = 0
            for record in read_records(source):
                counts["records"] += 1
                if progress is not None:
                    progress(1)
                try:
                    record_kind, sequences, extra = encode_record(record, tokenizer, max_length)
                except DataError as exc:
                    raise DataError(f"{source}: record {counts['records']}: {exc}") from None
                if kind is None:
                    kind = record_kind
                elif record_kind != kind:
                    raise DataError(
                        f"record {counts['records']} of {source} is {record_kind} data among "
                        f"{kind} data: one file holds one kind"
                    )
                if any(s.trained_tokens == 0 for s in sequences):
                    counts["dropped_no_assistant_tokens"] += 1
                    continue
                counts["examples"] += 1
                for sequence in sequences:
                    writers["tokens"].write(np.asarray(sequence.input_ids))
                    writers["mask"].write(np.asarray(sequence.labels) != -100)
                    end += len(sequence.input_ids)
                    writers["offsets"].write(np.asarray([end]))
                    counts["tokens"] += len(sequence.input_ids)
                    counts["trained_tokens"] += sequence.trained_tokens
                    counts["truncated"] += sequence.truncated
                if extra is not None:
                    writers["desirable"].write(np.asarray([extra]))
                    counts["desirable"] += int(extra)
        except BaseException:
            for writer in writers.values():
                writer.discard()
            raise
        for writer in writers.values():
            writer.close()
        if kind != "kto":
            (staging / "desirable.npy").unlink()
        if not counts["examples"]:
            raise DataError(
                f"{source} gave no example with an assistant token to train on "
                f"({counts['records']} records read)"
            )
        metadata = {
            "format": FORMAT,
            "kind": kind,
            "source": str(source),
            "max_length": max_length,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            **{key: counts[key] for key in ("records", "examples", "tokens", "trained_tokens",
                                            "truncated", "dropped_no_assistant_tokens")},
        }  # fmt: skip
        if kind == "kto":
            metadata["desirable"] = counts["desirable"]
        write_atomic(staging / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    return ChatSummary(out_dir, metadata, time.perf_counter() - started)


# ---------------------------------------------------------------------------- reading back
class ChatExamples:
    """A prepared directory: `len()` examples, each one (sft, kto) or two (dpo: chosen,
    rejected) sequences of (input_ids, labels) int64 arrays; `desirable[i]` for kto."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        try:
            self.metadata = json.loads((directory / METADATA_FILE).read_text())
        except FileNotFoundError:
            raise DataError(
                f"{directory} is no prepared chat directory (no {METADATA_FILE}): prepare it with "
                "`olmoe data chat`"
            ) from None
        if self.metadata.get("format") != FORMAT:
            raise DataError(f"{directory} is not in olmoe's chat format {FORMAT}")
        self.kind = self.metadata["kind"]
        self.tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        self.mask = np.load(directory / "mask.npy", mmap_mode="r")
        self.offsets = np.load(directory / "offsets.npy")
        self.per_example = 2 if self.kind == "dpo" else 1
        self.desirable = (
            np.load(directory / "desirable.npy").astype(bool) if self.kind == "kto" else None
        )

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.per_example

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[index], self.offsets[index + 1]
        ids = np.asarray(self.tokens[start:end], dtype=np.int64)
        labels = np.where(np.asarray(self.mask[start:end], dtype=bool), ids, -100)
        return ids, labels

    def __getitem__(self, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        first = index * self.per_example
        return [self.sequence(first + i) for i in range(self.per_example)]
