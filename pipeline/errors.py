"""The one exception type for expected, user-fixable problems.

The CLI prints a `UserError` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment the user can fix: the message says what and how."""


class Pruned(Exception):  # noqa: N818 (Optuna's word, kept)
    """A trial stopped early on purpose: by the pruner, or refused before training. The
    message says why."""
