"""remote.py: job-server addresses, the cluster token, and the refusal of plain http to
another machine without one (pure logic; the real job server is in
tests/runtime/test_jobs.py)."""

from __future__ import annotations

import pytest

from metapeft_dist.remote import (DEFAULT_ADDRESS, RemoteError, check_job_id, find_token,
                                  is_loopback, job_server, parse_address)


@pytest.mark.parametrize("address, expected", [
    ("http://127.0.0.1:8265", ("http", "127.0.0.1", 8265)),
    ("127.0.0.1:9000", ("http", "127.0.0.1", 9000)),
    ("head.local", ("http", "head.local", 8265)),
    ("https://head.example:443/", ("https", "head.example", 443)),
    ("http://[::1]:8265", ("http", "::1", 8265)),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
    ("LOCALHOST", True), ("10.0.0.5", False), ("192.168.1.2", False),
    ("head.local", False),  # names are not resolved: remote unless proven otherwise
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_token_lookup_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home-0001\n")
    other = tmp_path / "other"
    other.write_text("from-path-0002")
    given = tmp_path / "given"
    given.write_text("from-option-3")
    env = {"HOME": str(home)}
    assert find_token(env=env) == ("from-home-0001", str(home / ".ray" / "auth_token"))
    env["RAY_AUTH_TOKEN_PATH"] = str(other)
    assert find_token(env=env)[0] == "from-path-0002"
    env["RAY_AUTH_TOKEN"] = "from-env-00004"
    assert find_token(env=env) == ("from-env-00004", "RAY_AUTH_TOKEN")
    assert find_token(str(given), env=env)[0] == "from-option-3"
    assert find_token(env={"HOME": str(tmp_path / "nobody")}) == (None, None)


def test_plain_http_to_another_machine_needs_a_token_or_insecure(tmp_path):
    nobody = {"HOME": str(tmp_path)}  # no token anywhere
    with pytest.raises(RemoteError, match="refusing to use http://10.0.0.5:8265"):
        job_server("http://10.0.0.5:8265", env=nobody)
    with pytest.raises(RemoteError, match="refusing"):
        job_server("head.local:8265", env=nobody)
    assert job_server("http://10.0.0.5:8265", insecure=True, env=nobody).token is None
    assert job_server("https://10.0.0.5:8265", env=nobody).url == "https://10.0.0.5:8265"
    assert job_server("127.0.0.1:8265", env=nobody).headers() == {}
    with_token = job_server("http://10.0.0.5:8265",
                            env={**nobody, "RAY_AUTH_TOKEN": "secret-token-1"})
    assert with_token.headers() == {"Authorization": "Bearer secret-token-1"}
    assert job_server(None, env=nobody).url == DEFAULT_ADDRESS
    assert job_server(None, env={**nobody, "METAPEFT_ADDRESS": "10.0.0.5:1"},
                      insecure=True).url == "http://10.0.0.5:1"


@pytest.mark.parametrize("job_id", ["metapeft-tiny-20261126-230435-a06f",
                                    "raysubmit_AbC123", "job.1:2"])
def test_job_ids_accepted(job_id):
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "a/b", "two words", "-x", "x" * 129, "a?b"])
def test_job_ids_refused(job_id):
    with pytest.raises(RemoteError, match="is malformed"):
        check_job_id(job_id)
