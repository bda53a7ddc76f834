"""The errors olmoe raises for mistakes a user can fix.

Everything a user can get wrong (a bad config value, a missing or foreign checkpoint, data in the
wrong format, a prompt longer than the context window) raises an `OlmoeError` whose message says
what to change. The command line prints those (and OSErrors: a missing file, the network) as one
line; any other exception is a bug in olmoe and keeps its traceback. Each class also derives from
the built-in type a caller would expect (`ValueError`, `KeyError`, ...), so `except ValueError`
written against earlier versions still catches them.
"""

from __future__ import annotations


class OlmoeError(Exception):
    """A mistake in how olmoe was called or what it was given; the message says what to change."""


class ConfigError(OlmoeError, ValueError):
    """A model, training, evaluation or server setting that is invalid or inconsistent."""


class CheckpointError(OlmoeError, ValueError):
    """A checkpoint that is missing, incomplete, corrupted or not an OLMoE one."""


class DataError(OlmoeError, ValueError):
    """Input data (token files, chat or task files, corpora) that cannot be read as asked."""


class InputError(OlmoeError, ValueError):
    """Arguments to a model or generation call that cannot work: shapes, token ids, lengths."""


class UsageError(OlmoeError):
    """A command-line call that cannot work as given, found after its flags were parsed."""
