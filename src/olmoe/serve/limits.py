"""What one request may ask of `olmoe serve`: the limits behind its --max-prompt-tokens,
--max-new-tokens, --max-input-chars, --max-body-bytes and --request-timeout flags.

Standard library only, so that `olmoe serve --help` shows the defaults without importing the
server's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# The default bound on text tokenized per request, per allowed prompt token. English runs about 4
# characters a token; a prompt longer than this many characters a token cannot be one that fits.
INPUT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Limits:
    """None means no bound of its own: the context window bounds prompts and new tokens, and
    `input_chars` derives the tokenizer's bound from the prompt bound."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_input_chars: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S  # seconds, arrival to last token

    def input_chars(self, context_window: int) -> int:
        """Most characters of text one request may hand the tokenizer."""
        if self.max_input_chars is not None:
            return self.max_input_chars
        return INPUT_CHARS_PER_TOKEN * (self.max_prompt_tokens or context_window)
