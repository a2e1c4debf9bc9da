"""The one exception type for expected, user-fixable problems.

The CLI prints a `UserError` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment the user can fix: the message says what and how."""
