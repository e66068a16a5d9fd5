"""``python -m localoci serve``: run the local OCI."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from . import regions
from .app import LocalOCI
from .config import ensure_client_config


def _loopback(host: str) -> str:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{host!r} is not a loopback address: the admin API takes no credentials")


def _regions(text: str) -> list[str]:
    try:
        return regions.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localoci", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve every local OCI service on one port a region")
    serve.add_argument("--host", type=_loopback, default="127.0.0.1", help="loopback address to listen on")
    serve.add_argument("--port", type=int, default=0, help="port the home region listens on (0: any free port)")
    serve.add_argument("--regions", type=_regions, default=None,
                       help="regions to serve, comma-separated, the home region first; each other region listens on "
                            "a free port of its own (default: those the data directory served last, else local-1)")
    serve.add_argument("--data-dir", type=Path, required=True, help="where state, objects and volumes live")
    serve.add_argument("--ssh-port", type=int, default=None,
                       help="port every instance's sshd listens on, at its own 127.0.0.N (default: a free port chosen once)")
    serve.add_argument("--transition-seconds", type=float, default=0.05,
                       help="base duration of every lifecycle transition")
    serve.add_argument("--ready-file", type=Path, default=None,
                       help="write a JSON description of the running server here once it listens")
    serve.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ssh_port = args.ssh_port
    if ssh_port is None and not (args.data_dir / "state.json").exists():
        ssh_port = _free_port()
    app = LocalOCI(args.data_dir, ssh_port=ssh_port, transition_seconds=args.transition_seconds, regions=args.regions)
    config_path = ensure_client_config(app.data_dir, app.tenancy_id, app.home_region)
    servers = [app.serve(args.host, args.port if region == app.home_region else 0, region) for region in app.regions]
    endpoints = {server.region: "http://{}:{}".format(*server.server_address[:2]) for server in servers}
    app.start()
    ready = {
        "endpoint": endpoints[app.home_region],
        "region": app.home_region,
        "regionEndpoints": endpoints,
        "namespace": app.namespace,
        "tenancyId": app.tenancy_id,
        "ociConfigFile": str(config_path),
        "ociProfile": "DEFAULT",
        "sshPort": app.meta["ssh_port"],
    }

    def on_signal(signum: int, frame: object) -> None:
        # Raising here is safe where taking a lock (Event.set) is not: the main
        # thread may be holding that very lock when the signal arrives.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(args.ready_file)
    logging.getLogger("localoci").info("serving %s", json.dumps(ready))
    try:
        while True:
            time.sleep(3600)
    except SystemExit:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for server in servers:
            server.shutdown()
            server.server_close()
        app.stop()
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
