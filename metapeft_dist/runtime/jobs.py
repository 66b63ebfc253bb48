"""A cluster's jobs, through Ray's job server (``JobSubmissionClient``).

A submitted job is the spec (validated here first) in a runtime_env working directory,
with a ``jsonl`` family's task files beside it (``tasks/``, which the spec then names),
and the entrypoint ``metapeft run spec.yaml --address auto --run-dir DIR``: the job's
driver runs on the head node, joins the cluster and writes its run directory there.
Every request carries the cluster token (metapeft_dist/remote.py). Every failure is one
:class:`JobsError` line: unreachable server, refused token, unknown job.
"""

from __future__ import annotations

import logging
import re
import shlex
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from metapeft_dist.config import JobSpec
from metapeft_dist.remote import JobServer, check_job_id

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 60.0  # how long submit waits for a starting head's job agent
REMOTE_RUNS = "~/metapeft/runs"  # on the head node, when --run-dir is not given
TASKS = "tasks"  # a jsonl family's files, in the job's working directory
_META = "metapeft_"  # prefix of the job metadata keys this module writes
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception)(:|$)")


class JobsError(RuntimeError):
    """The job server cannot do what was asked: one line naming why (exit status 2)."""


class ClusterJobs:
    """Submit, follow, stop and list metapeft jobs on one cluster."""

    def __init__(self, server: JobServer, connect_timeout: float = 5.0):
        self.server = server
        _check_listening(server, connect_timeout)
        from ray.job_submission import JobSubmissionClient

        for name in ("ray.dashboard.modules.dashboard_sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)  # no "uploading package" chatter

        self.client = self._call(lambda: JobSubmissionClient(server.url,
                                                             headers=server.headers()))

    # --- jobs -------------------------------------------------------------------------

    def submit(self, spec: JobSpec, job_id: str | None = None,
               run_dir: str | None = None) -> dict[str, Any]:
        """Start ``spec`` on the cluster; returns the job's info (status PENDING)."""
        job_id = check_job_id(job_id) if job_id else new_job_id(spec.name)
        where = run_dir or f"{REMOTE_RUNS}/{job_id}"
        with tempfile.TemporaryDirectory(prefix="metapeft-submit-") as working_dir:
            if spec.family.name == "jsonl":  # the tasks go with the job (the run keeps them)
                from metapeft_dist.job import with_family_path
                from metapeft_dist.tasks.text import read_jsonl_files, write_task_files

                write_task_files(read_jsonl_files(spec.family.path), Path(working_dir) / TASKS)
                spec = with_family_path(spec, TASKS)
            (Path(working_dir) / "spec.yaml").write_text(
                yaml.safe_dump(spec.to_dict(), sort_keys=False))

            def send():
                return self.client.submit_job(
                    entrypoint=entrypoint(where), submission_id=job_id,
                    runtime_env={"working_dir": working_dir},
                    metadata={f"{_META}name": spec.name,
                              f"{_META}algorithm": spec.algorithm.name,
                              f"{_META}run_dir": where})

            # A head that has just started answers "No available agent to submit job,
            # please try again later" until its job agent is up: do as it says.
            deadline = time.monotonic() + AGENT_WAIT_SECONDS
            while True:
                try:
                    self._call(send, job_id=job_id)
                    break
                except JobsError as err:
                    if "No available agent" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
        return self.info(job_id)

    def info(self, job_id: str) -> dict[str, Any]:
        """Status, name, run directory, times and exit code of one job."""
        check_job_id(job_id)
        return job_info(self._call(lambda: self.client.get_job_info(job_id), job_id=job_id))

    def list(self) -> list[dict[str, Any]]:
        """Every job the cluster knows, oldest first."""
        jobs = [job_info(d) for d in self._call(self.client.list_jobs)]
        return sorted(jobs, key=lambda job: job["start_time"] or "")

    def logs(self, job_id: str) -> str:
        check_job_id(job_id)
        return self._call(lambda: self.client.get_job_logs(job_id), job_id=job_id)

    def follow(self, job_id: str, on_text: Callable[[str], None],
               on_status: Callable[[dict[str, Any]], None] = lambda info: None,
               poll: float = 1.0) -> dict[str, Any]:
        """Pass the job's log text to ``on_text`` as it grows and each status change to
        ``on_status``, until the job ends; returns its final info."""
        shown, last = 0, None
        while True:
            info = self.info(job_id)
            text = self.logs(job_id)
            if len(text) > shown:
                on_text(text[shown:])
                shown = len(text)
            if info["status"] != last:
                on_status(info)
                last = info["status"]
            if info["status"] in TERMINAL:
                return info
            time.sleep(poll)

    def wait(self, job_id: str, on_status: Callable[[dict[str, Any]], None] = lambda i: None,
             poll: float = 0.25, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job ends (or ``timeout`` seconds pass); ``on_status`` sees each
        status change. Returns the last info."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            info = self.info(job_id)
            if info["status"] != last:
                on_status(info)
                last = info["status"]
            if info["status"] in TERMINAL or (deadline and time.monotonic() > deadline):
                return info
            time.sleep(poll)

    def stop(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Ask the job to stop (its driver gets SIGTERM, then SIGKILL) and wait until it
        has; a job that already ended is left as it is. Returns its info."""
        check_job_id(job_id)
        self._call(lambda: self.client.stop_job(job_id), job_id=job_id)
        return self.wait(job_id, timeout=timeout)

    # --- nodes ------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes (Ray's state API): IP, head or not, state, resources."""
        import requests

        url = f"{self.server.url}/api/v0/nodes?limit=10000&detail=true"
        try:
            response = requests.get(url, headers=self.server.headers(), timeout=30)
            response.raise_for_status()
            rows = response.json()["data"]["result"]["result"]
        except (requests.RequestException, ValueError, KeyError, TypeError) as err:
            raise JobsError(f"cannot list the nodes of the cluster at {self.server.url}: "
                            f"{_first_line(err)}") from None
        return [{"node_id": row.get("node_id"), "ip": row.get("node_ip"),
                 "head": bool(row.get("is_head_node")), "state": row.get("state"),
                 "mlx": row.get("resources_total", {}).get("mlx", 0.0),
                 "cpus": row.get("resources_total", {}).get("CPU", 0.0),
                 "memory_bytes": row.get("resources_total", {}).get("memory", 0.0)}
                for row in rows]

    # --- errors -----------------------------------------------------------------------

    def _call(self, func: Callable[[], Any], job_id: str | None = None) -> Any:
        from ray.exceptions import AuthenticationError

        url = self.server.url
        try:
            return func()
        except AuthenticationError as err:
            if "invalid" in str(err).lower() or "forbidden" in str(err).lower():
                raise JobsError(f"the job server at {url} rejected the token from "
                                f"{self.server.token_source}: it is not this cluster's "
                                "token") from None
            raise JobsError(f"the job server at {url} requires the cluster's token: put it "
                            "in ~/.ray/auth_token, RAY_AUTH_TOKEN or --token-file") from None
        except ConnectionError as err:
            raise JobsError(f"cannot reach the Ray job server at {url}: "
                            f"{_first_line(err)}") from None
        except RuntimeError as err:
            text = str(err)
            if job_id is not None and "does not exist" in text:
                raise JobsError(f"no job {job_id!r} on the cluster at {url} "
                                "(`metapeft list` shows its jobs)") from None
            if "Version check returned 404" in text:
                raise JobsError(f"{url} does not answer as a Ray job server (HTTP 404 on "
                                "/api/version): is that the dashboard port, 8265?") from None
            if job_id is not None and "already exists" in text:
                raise JobsError(f"the cluster at {url} already has a job {job_id!r}; "
                                "choose another --job-id") from None
            raise JobsError(f"the job server at {url} failed: {_first_line(err)}") from None


def new_job_id(name: str) -> str:
    """``metapeft-NAME-YYYYmmdd-HHMMSS-xxxx``: sortable, readable, unique."""
    import secrets

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return check_job_id(f"metapeft-{name}-{stamp}-{secrets.token_hex(2)}"[:128])


def entrypoint(run_dir: str) -> str:
    """The job's shell command. A leading ``~/`` expands on the head node."""
    if run_dir.startswith("~/"):
        where = '"$HOME"/' + shlex.quote(run_dir[2:])
    else:
        where = shlex.quote(run_dir)
    return f"metapeft run spec.yaml --address auto --run-dir {where}"


def job_info(details: Any) -> dict[str, Any]:
    """Plain, JSON-ready info from Ray's JobDetails."""
    meta = details.metadata or {}
    start, end = details.start_time, details.end_time
    return {
        "job_id": details.submission_id or details.job_id,
        "status": getattr(details.status, "value", str(details.status)),
        "name": meta.get(f"{_META}name"),
        "algorithm": meta.get(f"{_META}algorithm"),
        "run_dir": meta.get(f"{_META}run_dir"),
        "message": details.message,
        "error": _error_line(details.message) if getattr(details.status, "value", None)
        == "FAILED" else None,
        "entrypoint": details.entrypoint,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "duration_s": round((end - start) / 1000, 1) if start and end else None,
        "exit_code": details.driver_exit_code,
    }


def _error_line(message: str | None) -> str | None:
    """Why a job failed, from Ray's message (which ends with the log's tail): the last
    ``error:`` line metapeft printed, else the last exception line of a traceback, else
    the message's first line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[0] if lines else None


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _check_listening(server: JobServer, timeout: float) -> None:
    """Fail in seconds, not minutes, when nothing listens at the address."""
    try:
        socket.create_connection((server.host, server.port), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise JobsError(f"cannot reach the Ray job server at {server.url}: {reason} (is the "
                        "cluster's head up? `ray start --head` serves jobs on port 8265)") \
            from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
