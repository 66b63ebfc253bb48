"""Where a cluster's Ray job server is, and how to talk to it safely.

Anyone who reaches an unauthenticated Ray job server can run any code on every node of
its cluster. So: addresses default to 127.0.0.1; the cluster's token (Ray's token
authentication) is found the way Ray finds it and sent with every request; and a plain
``http://`` address on another machine is refused without a token unless the user says
``--insecure``. Pure: no Ray, no network (runtime/jobs.py does the talking).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_PORT = 8265  # the Ray dashboard, which serves the job API
ADDRESS_ENV = "METAPEFT_ADDRESS"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path(".ray") / "auth_token"  # under the home directory

# Ray accepts any submission id, but ours travel in URL paths and shell words.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_TOKEN = re.compile(r"[\x21-\x7e]{8,4096}")  # printable, no whitespace


class RemoteError(ValueError):
    """A bad address, token or job id: one line naming the problem (exit status 2)."""


@dataclass(frozen=True)
class JobServer:
    """A job server's URL and the credentials to send it."""

    url: str
    host: str
    port: int
    token: str | None = None
    token_source: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def parse_address(address: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a job-server address: ``http(s)://HOST[:PORT]`` or
    ``HOST[:PORT]`` (http), port 8265 when absent."""
    text = address.strip()
    if not text:
        raise RemoteError("the job-server address is empty; give --address "
                          "http://HOST:8265 (default http://127.0.0.1:8265)")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise RemoteError(f"job-server address {address!r} is malformed: {err}") from None
    if parts.scheme == "ray":
        raise RemoteError(f"{address!r} is a Ray Client address; metapeft submits through "
                          "the job server: http://HOST:8265")
    if parts.scheme not in ("http", "https"):
        raise RemoteError(f"job-server address {address!r} must start with http:// or "
                          f"https://, not {parts.scheme}://")
    host = parts.hostname
    if not host:
        raise RemoteError(f"job-server address {address!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise RemoteError(f"job-server address {address!r} must be scheme://HOST:PORT, "
                          "without a path")
    if parts.username or parts.password:
        raise RemoteError(f"job-server address {address!r} must not carry credentials; "
                          "the token goes in ~/.ray/auth_token, RAY_AUTH_TOKEN or "
                          "--token-file")
    if port == 0:
        raise RemoteError(f"job-server address {address!r} has port 0")
    return parts.scheme, host, port or DEFAULT_PORT


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs. Other names are not resolved: a name counts
    as remote, which errs on the safe side."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_token(token_file: str | None = None,
               env: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """The cluster token and where it came from, looked up as Ray does: ``token_file``
    (``--token-file``), then ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, and
    ``~/.ray/auth_token``. ``(None, None)`` when there is none. A named file that is
    missing, unreadable or holds no token is an error, never silently skipped."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), f"--token-file {token_file}"), \
            f"--token-file {token_file}"
    if env.get(TOKEN_ENV):
        value = env[TOKEN_ENV].strip()
        if not _TOKEN.fullmatch(value):
            raise RemoteError(f"{TOKEN_ENV} does not hold a token (8 or more printable "
                              "characters without spaces)")
        return value, TOKEN_ENV
    if env.get(TOKEN_PATH_ENV):
        path = env[TOKEN_PATH_ENV]
        return _read_token(Path(path).expanduser(), f"{TOKEN_PATH_ENV}={path}"), path
    default = (Path(env["HOME"]) if env.get("HOME") else Path.home()) / DEFAULT_TOKEN_PATH
    if default.is_file():
        return _read_token(default, str(default)), str(default)
    return None, None


def _read_token(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise RemoteError(f"token file not found: {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RemoteError(f"cannot read the token file ({what}): "
                          f"{getattr(err, 'strerror', None) or err}") from None
    if not _TOKEN.fullmatch(value):
        raise RemoteError(f"the token file ({what}) does not hold a token (8 or more "
                          "printable characters without spaces)")
    return value


def job_server(address: str | None = None, token_file: str | None = None,
               insecure: bool = False, env: Mapping[str, str] = os.environ) -> JobServer:
    """The job server to talk to, with its token; refuses plain http to another machine
    without a token unless ``insecure``."""
    if address is None:
        address = env.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    scheme, host, port = parse_address(address)
    token, source = find_token(token_file, env)
    if scheme == "http" and not is_loopback(host) and token is None and not insecure:
        raise RemoteError(
            f"refusing to use http://{host}:{port} without a token: anyone who reaches an "
            "unauthenticated Ray job server can run code on every node. Put the cluster's "
            "token in ~/.ray/auth_token (or RAY_AUTH_TOKEN, or --token-file), or pass "
            "--insecure if only trusted machines can reach this network")
    shown = f"[{host}]" if ":" in host else host
    return JobServer(url=f"{scheme}://{shown}:{port}", host=host, port=port, token=token,
                     token_source=source)


def check_job_id(job_id: str) -> str:
    """``job_id`` if it can be a submission id, else one line saying why not."""
    if not _JOB_ID.fullmatch(job_id or ""):
        raise RemoteError(f"job id {job_id!r} is malformed: expected letters, digits, "
                          "'_', '.', ':' or '-' (as `metapeft list` shows them)")
    return job_id
