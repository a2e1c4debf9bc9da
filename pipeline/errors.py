"""What users are told: `UserError` for expected, user-fixable problems (the CLI prints
it as a single line and exits non-zero; anything else is a bug and keeps its traceback),
`Pruned` for a trial stopped on purpose, and `redact` for every URL a message shows.
"""

from urllib.parse import urlsplit


def redact(url: str) -> str:
    """`url` without its password."""
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url


class UserError(Exception):
    """Bad input or environment the user can fix: the message says what and how."""


class Pruned(Exception):
    """A trial stopped early on purpose: by the pruner, or refused before training. The
    message says why."""
