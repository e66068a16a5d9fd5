"""The warm runner's savings (deployments/warm_runner.py) change nothing a run sees: one TLS
context per CA bundle, shared, and any other context made afresh; Prefect's logging set up again
for a run whose settings say otherwise than the runner's own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_one_tls_context_per_ca_bundle_and_any_other_made_afresh():
    out = run_python("""
        import ssl, certifi
        from deployments.warm_runner import share_tls_contexts
        share_tls_contexts()
        share_tls_contexts()  # twice: still one layer
        a = ssl.create_default_context(cafile=certifi.where())
        b = ssl.create_default_context(cafile=certifi.where())
        plain1, plain2 = ssl.create_default_context(), ssl.create_default_context()
        client = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certifi.where())
        assert a is b and plain1 is not plain2 and a is not plain1 and client is not a
        assert a.verify_mode == ssl.CERT_REQUIRED and a.check_hostname and a.cert_store_stats()["x509_ca"] > 0
        # Prefect's API clients, made the usual way, share theirs
        from prefect.client.orchestration import get_client
        first, second = (get_client()._client._transport._pool._ssl_context for _ in range(2))
        assert first is second and first.verify_mode == ssl.CERT_REQUIRED
        print("ok")
    """, PREFECT_API_URL="http://127.0.0.1:9/api")  # never contacted; without it, a client starts a server
    assert out.strip() == "ok"


def test_logging_is_set_up_again_only_for_other_settings():
    out = run_python("""
        import os
        import prefect.context
        from deployments.warm_runner import logging_inputs
        runner = logging_inputs()
        prefect.context.refresh_global_settings_context()
        print(logging_inputs() == runner)
        os.environ["PREFECT_LOGGING_LEVEL"] = "DEBUG"
        prefect.context.refresh_global_settings_context()
        print(logging_inputs() == runner)
        del os.environ["PREFECT_LOGGING_LEVEL"]
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "ERROR"  # an override of the file's
        prefect.context.refresh_global_settings_context()
        print(logging_inputs() == runner)
    """, PREFECT_LOGGING_LEVEL="INFO")
    assert out.split() == ["True", "False", "False"]
