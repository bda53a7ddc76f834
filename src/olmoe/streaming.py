"""Text as it is generated: pieces that never split a character and join to the full decode.

A byte-level tokenizer may spread one character (an emoji, a CJK ideograph) over several tokens;
decoding a prefix that ends inside it gives U+FFFD. So each piece is the difference between the
decoded text of all tokens so far and what was already given out, holding back a trailing U+FFFD
until the character completes, and holding back a tail that could still turn into a stop string.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence

import torch

from olmoe.errors import InputError
from olmoe.generation import SamplingParams, StopStrings, generate_tokens, plan_new_tokens

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Turns token ids, pushed a few at a time, into text pieces.

    `"".join(pieces)` equals `tokenizer.decode(all_ids, skip_special_tokens)`, cut before the
    first stop string when `stop_strings` are given (the stop string itself is not emitted, as
    OpenAI's API does). `stopped` tells when one was seen.
    """

    def __init__(
        self,
        tokenizer,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = tuple(stop_strings)
        # With clean-up on, a later token can delete a space already decoded (" ." -> "."),
        # so text from the last space on is not final yet.
        self.hold_from_space = bool(getattr(tokenizer, "cleans_up_spaces", False))
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add tokens; return the newly final text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """The rest of the text, once no more tokens will come."""
        return "" if self.stopped else self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        end = len(text)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            end, self.stopped = cut, True
        elif not final:
            end = self._stable_end(text)
        if not text.startswith(self.emitted) or end < len(self.emitted):
            return ""  # the tail is still changing; wait for it to settle
        piece = text[len(self.emitted) : end]
        self.emitted += piece
        return piece

    def _stable_end(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1  # an incomplete multi-byte character
        if self.hold_from_space and text.rfind(" ", 0, end) >= 0:
            end = text.rfind(" ", 0, end)
        for stop in self.stop_strings:  # a tail that may be the start of a stop string
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:size], 0, end):
                    end -= size
                    break
        return end


class TextStreamer:
    """transformers' streamer protocol (`put(token_ids)`, `end()`) writing text as it comes.

    Pass it as `generate(..., streamer=TextStreamer(tokenizer))`. `skip_prompt` leaves out the
    prompt (the first `put`); `callback` receives each piece instead of printing it.
    """

    def __init__(
        self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True, callback=None
    ):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.callback = callback or self._print
        self._prompt_pending = True

    def put(self, token_ids: torch.Tensor) -> None:
        if token_ids.dim() > 1:
            if token_ids.shape[0] != 1:
                raise InputError("TextStreamer streams a single sequence, not a batch")
            token_ids = token_ids[0]
        if self._prompt_pending and self.skip_prompt:
            self._prompt_pending = False
            return
        self._prompt_pending = False
        piece = self.decoder.push(token_ids.tolist())
        if piece:
            self.callback(piece)

    def end(self) -> None:
        piece = self.decoder.flush()
        if piece:
            self.callback(piece)

    @staticmethod
    def _print(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()


class TextStream:
    """One prompt's continuation as an iterator of text pieces.

    Ends at eos, at a stop string (left out of the text), after `max_new_tokens` (default: no
    limit), or at the context window, whichever comes first. Afterwards `finish_reason` is
    "stop" (eos or a stop string) or "length", and `new_tokens` counts the tokens generated.
    """

    def __init__(
        self,
        model,
        tokenizer,
        input_ids: torch.Tensor | Sequence[int],
        max_new_tokens: int | None = None,
        params: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        skip_special_tokens: bool = True,
    ):
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
        self.input_ids = ids.to(model.device)
        # Stops quietly at the context window: a chat or a server cannot know the room left.
        context = model.config.max_position_embeddings
        wanted = context if max_new_tokens is None else max_new_tokens
        self.max_new_tokens = plan_new_tokens(
            ids.shape[1], context, max_new_tokens=wanted, warn=False
        )
        self.model = model
        self.params = params or SamplingParams()
        self.stops = StopStrings(tokenizer, stop_strings) if stop_strings else None
        self.eos_token_id = model.config.eos_token_id if eos_token_id is None else eos_token_id
        self.generator = generator
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens, stop_strings)
        self.finish_reason: str | None = None
        self.new_tokens = 0

    def __iter__(self) -> Iterator[str]:
        steps = generate_tokens(
            self.model,
            self.input_ids,
            self.max_new_tokens,
            params=self.params,
            eos_token_id=self.eos_token_id,
            stop_strings=self.stops,
            generator=self.generator,
        )
        for step in steps:
            self.new_tokens += 1
            piece = self.decoder.push(step.tokens.tolist())
            if piece:
                yield piece
            if bool(step.finished[0]):
                self.finish_reason = "stop"
        piece = self.decoder.flush()
        if piece:
            yield piece
        if self.finish_reason is None:
            self.finish_reason = "length"
