"""Optuna storage URLs as the drivers want them: the Redis password from the
environment, the PostgreSQL driver this project installs. No Optuna here."""

from __future__ import annotations

import importlib.util
import os
from urllib.parse import quote, urlsplit, urlunsplit


def with_redis_password(url: str) -> str:
    """`url` with `REDIS_PASSWORD` from the environment, when it names none itself."""
    password, parts = os.environ.get("REDIS_PASSWORD"), urlsplit(url)
    if not password or parts.password or parts.scheme == "unix":
        return url
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def with_driver(url: str) -> str:
    """SQLAlchemy >= 2.1 reads a bare `postgresql://` as psycopg 3; this project installs
    psycopg2, so name it unless psycopg 3 is there."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url
