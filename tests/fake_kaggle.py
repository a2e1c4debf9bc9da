"""A fake Kaggle API on 127.0.0.1, for tests that run the official `kaggle` client for real.

The client is pointed here with `KAGGLE_API_ENVIRONMENT=LOCALHOST` (host `http://localhost`)
plus `HTTP_PROXY=http://127.0.0.1:PORT`, so this server receives absolute-form requests such
as `POST http://localhost/api/v1/competitions.CompetitionApiService/DownloadDataFiles` and
routes on the path. `kaggle` reads its config dir when imported, so run it in a subprocess
with the environment from `FakeKaggle.client_env` (see /work/shared/notes/kaggle-client.md).

    with FakeKaggle(zip_bytes=make_zip(...)) as fake:
        env = fake.client_env(tmp_path / "home", credentials="env")
        subprocess.run([...], env=env, cwd=tmp_path)
        assert fake.api_calls("DownloadDataFiles")
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

API_PREFIX = "/api/v1/"
COMPETITIONS = "competitions.CompetitionApiService"
# Fixed and old: the client parses it (`%Z` wants GMT) and skips a download only when a
# local copy is at least as large and no older than this.
LAST_MODIFIED = "Mon, 01 Jan 2001 00:00:00 GMT"
TEST_USERNAME = "fake-user"
TEST_KEY = "0123456789abcdef-secret-key"
_DROPPED_ENV = ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class Request:
    """One request as the fake saw it; `path` has no scheme, host or query."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body or b"{}")

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """(username, key) from an `Authorization: Basic` header, else None."""
        value = self.headers.get("authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, key = base64.b64decode(value[6:]).decode().partition(":")
        return user, key


def make_zip(files: dict[str, str | bytes]) -> bytes:
    """Zip bytes holding `files` (archive name -> content), deflated like Kaggle's."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


class FakeKaggle:
    """The competition endpoints the pipeline uses, served from a background thread.

    `zip_bytes` is what a competition download returns; `status`, when set, is the HTTP
    status every `/api/v1/` call answers with (401, 403, 429, ...). Both may be changed
    while the server runs. `requests` lists everything received, `uploads` the bytes of
    each PUT to an upload URL, keyed by its token.
    """

    def __init__(self, zip_bytes: bytes = b"", *, status: int | None = None) -> None:
        self.zip_bytes = zip_bytes
        self.status = status
        self.requests: list[Request] = []
        self.uploads: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeKaggle:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> FakeKaggle:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeKaggle is not running"
        return self._server.server_address[1]

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what tests set and read -------------------------------------------------------

    def client_env(
        self,
        home: Path,
        *,
        credentials: str | None = "env",
        username: str = TEST_USERNAME,
        key: str = TEST_KEY,
        base: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """A full environment for a subprocess whose Kaggle client must talk to this fake.

        `base` (default `os.environ`) loses every `KAGGLE_*` and proxy variable; `HOME`,
        `XDG_CONFIG_HOME` and `KAGGLE_CONFIG_DIR` point into `home`. `credentials` is
        `"env"` (KAGGLE_USERNAME/KAGGLE_KEY), `"file"` (`kaggle.json`, mode 600), `"token"`
        (`key` as KAGGLE_API_TOKEN, checked online through IntrospectToken) or None.
        """
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith("KAGGLE_") and k not in _DROPPED_ENV
        }
        config_dir = home / ".kaggle"
        config_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            KAGGLE_CONFIG_DIR=str(config_dir),
            KAGGLE_API_ENVIRONMENT="LOCALHOST",
            HTTP_PROXY=self.proxy_url,
            http_proxy=self.proxy_url,
        )
        if credentials == "env":
            env.update(KAGGLE_USERNAME=username, KAGGLE_KEY=key)
        elif credentials == "file":
            path = config_dir / "kaggle.json"
            path.write_text(json.dumps({"username": username, "key": key}))
            path.chmod(0o600)
        elif credentials == "token":
            env["KAGGLE_API_TOKEN"] = key
        elif credentials is not None:
            raise ValueError(f"credentials: 'env', 'file', 'token' or None, not {credentials!r}")
        return env

    def api_calls(self, method: str | None = None) -> list[Request]:
        """Requests to `/api/v1/`, optionally only those to one RPC method."""
        with self._lock:
            calls = [r for r in self.requests if r.path.startswith(API_PREFIX)]
        return [r for r in calls if method is None or r.path.rsplit("/", 1)[-1] == method]

    # -- routing -----------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _answer(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        if request.path.startswith(API_PREFIX):
            if self.status is not None:
                return _json(self.status, {"code": self.status, "message": "forced by test"})
            route = self._routes().get(request.path[len(API_PREFIX) :])
            if route is None:
                return _json(404, {"code": 404, "message": f"no fake for {request.path}"})
            return route(request)
        if request.method == "GET" and request.path.startswith("/files/"):
            return (
                200,
                {
                    "Content-Type": "application/zip",
                    "Last-Modified": LAST_MODIFIED,
                },
                self.zip_bytes,
            )
        if request.method == "PUT" and request.path.startswith("/upload/"):
            with self._lock:
                self.uploads[request.path.rsplit("/", 1)[-1]] = request.body
            return _json(200, {})
        return 404, {"Content-Type": "text/plain"}, b"not found"

    def _routes(self) -> dict:
        competitions = {
            f"{COMPETITIONS}/{name}": getattr(self, f"_rpc_{name}")
            for name in (
                "DownloadDataFiles",
                "ListDataFiles",
                "StartSubmissionUpload",
                "CreateSubmission",
                "GetSubmissionLimits",
            )
        }
        return {**competitions, "security.OAuthService/IntrospectToken": self._rpc_IntrospectToken}

    def _rpc_DownloadDataFiles(self, request: Request):
        name = request.json.get("competitionName", "competition")
        return 302, {"Location": f"http://localhost/files/{name}.zip"}, b""

    def _rpc_ListDataFiles(self, request: Request):
        files = []
        try:
            with zipfile.ZipFile(io.BytesIO(self.zip_bytes)) as archive:
                files = [
                    {
                        "name": info.filename,
                        "totalBytes": info.file_size,
                        "creationDate": "2001-01-01T00:00:00.000Z",
                    }
                    for info in archive.infolist()
                    if not info.is_dir()
                ]
        except zipfile.BadZipFile:
            pass
        return _json(200, {"files": files, "nextPageToken": ""})

    def _rpc_StartSubmissionUpload(self, request: Request):
        token = f"blob-{len(self.api_calls('StartSubmissionUpload'))}"
        return _json(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})

    def _rpc_CreateSubmission(self, request: Request):
        name = request.json.get("competitionName", "")
        return _json(200, {"message": f"Successfully submitted to {name}", "ref": 1})

    def _rpc_GetSubmissionLimits(self, request: Request):
        return _json(200, {"numToday": 1, "numTotal": 1, "numAllowedNow": 4})

    def _rpc_IntrospectToken(self, request: Request):
        return _json(200, {"active": True, "username": TEST_USERNAME})


def _json(status: int, payload: dict) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKaggle  # set on the per-server subclass

    def _handle(self) -> None:
        request = Request(
            method=self.command,
            path=urlsplit(self.path).path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        self.fake._record(request)
        status, headers, body = self.fake._answer(request)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def log_message(self, format, *args) -> None:
        pass  # keep pytest output clean; `FakeKaggle.requests` is the log
