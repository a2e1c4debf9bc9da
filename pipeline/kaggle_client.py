"""The official Kaggle client, wrapped: credentials lookup and one-line errors.

`kaggle_api(competition)` authenticates and turns the client's failures (missing or
rejected credentials, 401, 403 when the rules were not accepted, 429 when the daily
submission limit is reached, no network) into `UserError`s that say what to do. The
client's own help text goes to a buffer, and the key is never part of any message.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.errors import UserError

KAGGLE_HELP = (
    "create an API token at https://www.kaggle.com/settings (Account > API > Create New "
    "Token) and save it as ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and "
    "KAGGLE_KEY; or download the zip by hand and set data.source: zip, data.zip: PATH"
)


def kaggle_config_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("KAGGLE_CONFIG_DIR") or Path(env.get("HOME", "~")) / ".kaggle")


def has_kaggle_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """True when the official client would find credentials (it is not asked)."""
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return True
    if env.get("KAGGLE_API_TOKEN"):
        return True
    folders = [
        kaggle_config_dir(env).expanduser(),
        Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")) / ".config").expanduser()
        / "kaggle",
    ]
    names = ("kaggle.json", "access_token", "credentials.json")  # the last: `kaggle auth login`
    return any((folder / name).is_file() for folder in folders for name in names)


def explain_http_error(status: int | None, competition: str) -> str:
    rules = f"https://www.kaggle.com/competitions/{competition}/rules"
    if status == 401:
        return f"Kaggle said 401 Unauthorized: the API key is wrong or expired; {KAGGLE_HELP}"
    if status == 403:
        return (
            f"Kaggle said 403 Forbidden for {competition!r}: accept the competition rules at "
            f"{rules} (signed in as the account of your API key), then run again"
        )
    if status == 404:
        return f"Kaggle has no competition named {competition!r}; check data.competition"
    if status == 429:
        return (
            f"Kaggle said 429 Too Many Requests for {competition!r}: the daily submission "
            "limit (or the API rate limit) is reached; try again after it resets (UTC midnight)"
        )
    return f"Kaggle API request failed with HTTP {status} for competition {competition!r}"


@contextlib.contextmanager
def kaggle_api(competition: str) -> Iterator[object]:
    """An authenticated `KaggleApi`; every expected failure becomes a `UserError`."""
    if not has_kaggle_credentials():
        raise UserError(f"no Kaggle credentials found: {KAGGLE_HELP}")
    import requests

    # authenticate() is inside the HTTP handlers: an access token is checked online.
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                from kaggle.api.kaggle_api_extended import KaggleApi

                api = KaggleApi()
                api.authenticate()
            except SystemExit:
                raise UserError(f"Kaggle credentials were rejected: {KAGGLE_HELP}") from None
            yield api
    except requests.HTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        raise UserError(explain_http_error(status, competition)) from None
    except requests.ConnectionError:
        raise UserError(
            "cannot reach the Kaggle API (no network?); for data, download the zip by hand "
            "and set data.source: zip, data.zip: PATH"
        ) from None
