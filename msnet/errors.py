"""Errors the user can fix: `msnet` prints their message as one line, without a traceback (exit code 2).

An error derives from `UserError` when its message alone tells the user what to change: a bad config
value, an unknown stage, a missing or unreadable input file, a stage that has not run yet, a busy port.
Each keeps the builtin base it had (ValueError, FileNotFoundError, ...), so `except ValueError` and
`pytest.raises(FileNotFoundError)` still catch it. The message names the thing, the cause and the fix.
"""

from __future__ import annotations


class UserError(Exception):
  """Base of the errors a user fixes by changing a flag, a config value, a file or the order of commands."""


class MissingInputError(UserError, FileNotFoundError):
  """A file or an earlier command's output is absent; the message names what makes it ("run X first")."""


class InvalidInputError(UserError, ValueError):
  """A name or a file the user gave cannot be used (an unknown stage, an image smaller than the input)."""
