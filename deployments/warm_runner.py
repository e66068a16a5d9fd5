"""A warm interpreter that starts flow runs in milliseconds instead of seconds.

It imports Prefect's engine and the project's flows (with the OCI SDK, fabric and the
rest) once, then listens on a unix socket. For each :mod:`deployments.warm_client` that
connects it forks a child, which takes over the client's environment, working directory
and standard streams and runs ``prefect.engine`` as ``python -m prefect.engine`` would.

The child dies with its client (a watchdog reads the client's socket), so killing the
process the Prefect worker started still kills the run. When a project source file
changes, the runner re-executes itself to load the new code, at once (a watcher looks
every second), so the next run finds it warm again; a run that arrives in between is
declined and cold-started by its client.

    python -m deployments.warm_runner /path/to/socket
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from deployments.warm_client import send_message

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("blocks", "deployments", "diskimport", "flows", "function_trigger")


def code_stamp() -> float:
    """The newest modification time among the project's Python files, its sub-packages' too."""
    return max((p.stat().st_mtime for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")), default=0.0)


def preload() -> None:
    import prefect.deployments.steps  # noqa: F401  (a flow run's pull steps)
    import prefect.engine  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.runner  # noqa: F401  (imported by loading a flow from its deployment)
    import flows.import_disk  # noqa: F401
    import flows.import_machine  # noqa: F401
    import flows.export_volume  # noqa: F401
    import flows.copy_to_region  # noqa: F401
    import flows.rollback_sync  # noqa: F401
    import flows.migration  # noqa: F401
    import flows.sweep  # noqa: F401
    import flows.worker_pool  # noqa: F401
    share_tls_contexts()


SHARING: set[Any] = set()  # the sharing create_default_context, once installed


def share_tls_contexts() -> None:
    """One TLS context per CA bundle for the whole process and the runs forked from it.

    Every Prefect API client a flow run opens (about eight: the engine's, its events, its logs,
    its suspension observer...) builds a verifying context from the CA bundle, which parses the
    whole bundle: some 30 ms of CPU apiece, more than the rest of setting the client up. A context
    made from the same bundle is the same context; it is made once here, before any fork. Only
    ``create_default_context(cafile=...)`` calls are shared, the form those clients use; a
    context made any other way (no bundle, an insecure one) is made afresh as before.
    """
    import ssl

    create = ssl.create_default_context
    if create in SHARING:
        return
    made: dict[tuple[Any, str], ssl.SSLContext] = {}

    def create_default_context(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: Any = None, capath: Any = None,
                               cadata: Any = None) -> ssl.SSLContext:
        if cafile is None or capath is not None or cadata is not None:
            return create(purpose, cafile=cafile, capath=capath, cadata=cadata)
        key = (purpose, os.fspath(cafile))
        if key not in made:
            made[key] = create(purpose, cafile=cafile)
        return made[key]

    SHARING.add(create_default_context)
    ssl.create_default_context = create_default_context


def logging_inputs() -> tuple[Any, ...] | None:
    """What Prefect's logging setup is made from under the current settings: the logging settings,
    the levels its default configuration file names, and the ``PREFECT_LOGGING_*`` environment
    overrides. None when a logging file of the user's own is in use (it may name any setting)."""
    import prefect.logging.configuration as configuration
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.logging.config_path and Path(settings.logging.config_path).exists():
        return None
    overrides = sorted((k, v) for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING_"))
    return (settings.logging.model_dump_json(), settings.server.logging_level, settings.internal.logging_level,
            str(configuration.DEFAULT_LOGGING_SETTINGS_PATH), tuple(overrides))


def run_child(conn: socket.socket, message: dict, fds: list[int]) -> None:
    """In the forked child: become the flow-run process the client stands for."""
    exit_code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(message["env"])
        os.chdir(message["cwd"])
        sys.argv = ["prefect.engine", *message["argv"]]
        send_message(conn, {"pid": os.getpid()})

        def watchdog() -> None:  # the client went away (killed): so does the run
            try:
                while conn.recv(1):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watchdog, daemon=True).start()

        import prefect.context
        import prefect.logging.configuration

        prefect.context.refresh_global_settings_context()
        # Logging as the run's settings say: set up again only if they say otherwise than the
        # runner's own, which it set up once (parsing the configuration costs a run 0.1 s of CPU).
        if PRELOADED_LOGGING is None or logging_inputs() != PRELOADED_LOGGING:
            prefect.logging.configuration.setup_logging()
        try:
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
            exit_code = 0
        except SystemExit as exc:
            exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            send_message(conn, {"exit": exit_code})
        finally:
            os._exit(exit_code)


def reload(path: str) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "deployments.warm_runner", path])


def watch_code(path: str, stamp: float, interval: float = 1.0) -> None:
    """Reload as soon as a project source file changes, not when the next run arrives."""
    while True:
        time.sleep(interval)
        try:
            if code_stamp() != stamp:
                reload(path)
        except OSError:  # a file vanished mid-edit: look again next time
            continue


PRELOADED_LOGGING: tuple[Any, ...] | None = None


def serve(path: str) -> None:
    global PRELOADED_LOGGING
    preload()
    import prefect.logging.configuration

    prefect.logging.configuration.setup_logging()
    PRELOADED_LOGGING = logging_inputs()
    stamp = code_stamp()
    threading.Thread(target=watch_code, args=(path, stamp), daemon=True, name="watch-code").start()
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    print(f"warm runner ready on {path} (pid {os.getpid()})", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            message, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        if message is None:
            conn.close()
            continue
        if code_stamp() != stamp:
            send_message(conn, {"stale": True})
            conn.close()
            for fd in fds:
                os.close(fd)
            listener.close()
            reload(path)
        if os.fork() == 0:
            listener.close()
            run_child(conn, message, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def _receive(conn: socket.socket) -> tuple[dict | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    if len(data) < 4:
        return None, fds
    length = int.from_bytes(data[:4], "big")
    body = data[4:]
    while len(body) < length:
        more = conn.recv(length - len(body))
        if not more:
            return None, fds
        body += more
    return json.loads(body), fds


if __name__ == "__main__":
    serve(sys.argv[1])
