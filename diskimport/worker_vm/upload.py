"""The orchestrator's side of uploading a file from a worker VM into one object through a write PAR.

OCI's multipart upload through a pre-authenticated request: :func:`create_par_upload` creates
the upload (``PUT`` of the PAR's object URL with ``opc-multipart: true``; its metadata and
content type are the object's), and :func:`run_upload` runs :mod:`diskimport.agent.upload` on the
worker over its SSH session, which sends the file's parts to ``<endpoint><accessUri><N>``. The
caller commits the parts it returns (or aborts the upload): nothing here decides that.

The access URI is a bearer secret: it goes to the worker in a configuration file readable
only by the worker user, never onto a command line, and the worker's directory is removed
once the uploader has ended.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Mapping, Protocol

import oci
import requests

from ..cloud import with_backoff
from .commands import CommandFailed, CommandRunner
from .agent_archive import ARCHIVE_NAME, agent_archive
from .transfer import WorkerFiles, make_staging_dir, remove_staging


class UploadFailed(Exception):
    """The uploader ended without every part uploaded; ``code`` says why (``par-refused``: the PAR
    or the upload is gone; ``retries-exhausted``; ``file-error``; ``http-error``; ``bad-config``;
    ``internal``; ``uploader-failed``: it did not say, e.g. killed or no python3 on the worker)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Worker(CommandRunner, WorkerFiles, Protocol):
    """A :class:`~diskimport.worker_vm.session.WorkerSession` (or a :class:`~diskimport.worker_vm.commands.LocalRunner`)."""


def create_par_upload(par_url: str, metadata: Mapping[str, str] | None = None, content_type: str | None = None,
                      timeout: float = 60.0) -> dict[str, Any]:
    """Create a multipart upload through a write PAR (``par_url``: the endpoint and the PAR's object
    URL); OCI's reply: ``uploadId``, ``accessUri``, ``object``, ``namespace``, ``bucket``, ``timeCreated``.

    ``metadata`` keys become ``opc-meta-<key>`` headers (a key may already carry the prefix).
    429 and 5xx replies are retried with backoff; a retried create whose first reply was lost
    leaves that upload uncommitted, for the caller's sweep of stale uploads.
    """
    headers = {"opc-multipart": "true"}
    for key, value in (metadata or {}).items():
        headers[key if key.lower().startswith("opc-meta-") else f"opc-meta-{key}"] = value
    if content_type:
        headers["Content-Type"] = content_type

    def create() -> dict[str, Any]:
        reply = requests.put(par_url, headers=headers, timeout=timeout)
        if reply.status_code != 200:
            try:
                error = reply.json()
            except ValueError:
                error = {}
            raise oci.exceptions.ServiceError(reply.status_code, error.get("code", "Unknown"), dict(reply.headers),
                                              error.get("message", reply.text[:300]))
        return reply.json()

    try:
        return with_backoff(create)
    except oci.exceptions.ServiceError as exc:
        code = "par-refused" if exc.status in (401, 403, 404) else "http-error"
        raise UploadFailed(code, f"creating the multipart upload through the PAR: HTTP {exc.status} {exc.code} "
                                 f"{exc.message}") from None


def run_upload(worker: Worker, endpoint: str, access_uri: str, path: str, *, part_bytes: int,
               connections: int = 4, bind: str | None = "ssh", digest: str | None = "sha256",
               skip_parts: Mapping[int | str, str] | None = None, max_attempts: int = 10,
               follow: Mapping[str, Any] | None = None,
               on_event: Callable[[dict[str, Any]], None] | None = None,
               timeout: float = 24 * 3600) -> dict[str, Any]:
    """Upload the worker's file ``path`` as the parts of the upload at ``access_uri``; its ``done`` event.

    That is ``{"event": "done", "parts": {"N": etag}, "bytes": size, "uploaded": sent now,
    "sha256": hex or None, "seconds": s}``: the parts to commit, ``skip_parts`` (a resume's
    parts already uploaded, ``{N: etag}``) among them. Every event the uploader prints reaches
    ``on_event`` as it comes. ``follow`` (``{"done_file", "hold_back"}``) uploads a file another
    command is still writing, as :mod:`diskimport.agent.upload` says. Raises :class:`UploadFailed` with
    the uploader's failure code; an SSH failure propagates as it is (a lost worker).
    """
    directory = make_staging_dir(worker, "upload", 1024 * 1024)
    events: list[dict[str, Any]] = []

    def line(text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        if isinstance(event, dict):
            events.append(event)
            if on_event is not None:
                on_event(event)

    config = {"endpoint": endpoint.rstrip("/"), "access_uri": access_uri, "path": path, "part_bytes": int(part_bytes),
              "connections": int(connections), "bind": bind, "digest": digest, "max_attempts": int(max_attempts),
              "skip_parts": {str(n): etag for n, etag in (skip_parts or {}).items()},
              **({"follow": dict(follow)} if follow else {})}
    try:
        worker.put_private_file(agent_archive(), f"{directory}/{ARCHIVE_NAME}")
        worker.put_private_file(json.dumps(config), f"{directory}/upload.json")
        result = worker.run(["python3", f"{directory}/{ARCHIVE_NAME}", "upload", f"{directory}/upload.json"],
                            timeout=timeout, on_output=line)
    except BaseException:
        with contextlib.suppress(Exception):  # the session may be what failed: its error is the news
            remove_staging(worker, directory)
        raise
    remove_staging(worker, directory)
    done = next((e for e in events if e.get("event") == "done"), None)
    if result.returncode == 0 and done is not None:
        return done
    failed = next((e for e in reversed(events) if e.get("event") == "failed"), None)
    if failed is not None:
        raise UploadFailed(str(failed.get("code")), str(failed.get("message")))
    raise UploadFailed("uploader-failed", str(CommandFailed(result, "the uploader")))
