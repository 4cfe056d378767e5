"""Prefect's temporary server, when no PREFECT_API_URL is set: started by qsweep from the main thread so that
it dies with the process, even a SIGKILLed one, and waited for as long as it needs.

Prefect starts it on first use (`SubprocessASGIServer`, a `uvicorn` child) and stops it at exit; a killed
process never reaches its exit, and its server ran on for good (7 of 7 kills tried). On Linux the child now
asks the kernel for SIGKILL when its parent thread ends (PR_SET_PDEATHSIG), so it is started here, from the
thread that lives as long as the process. Prefect's wait gives up after 20 s, which a busy 2-core machine
exceeded; here it waits while the server is alive and says so at once if the server process exits.
"""

import ctypes
import os
import subprocess
import sys
import threading
import types

from prefect.server.api import server as prefect_server
from prefect.settings import get_current_settings

PR_SET_PDEATHSIG = 1
WAIT_SECONDS = 3600  # "as long as it needs": the wait ends early if the server process exits
START_TRIES = 3  # starts that exit with code 3 (Prefect retries those on another port) before giving up


class ServerDidNotStart(RuntimeError):
    pass


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server for this process unless a server is configured; its API URL, or None."""
    settings = get_current_settings()
    if settings.api.url is not None or not settings.server.ephemeral.enabled:
        return None
    assert threading.current_thread() is threading.main_thread(), "the server dies with the thread that starts it"
    server = TemporaryServer()
    prefect_server.SubprocessASGIServer._instances[None] = server  # the one Prefect's clients take ("any port")
    user_timeout = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ
    timeout = settings.server.ephemeral.startup_timeout_seconds if user_timeout else WAIT_SECONDS
    try:
        server.start(timeout=timeout)
    except RuntimeError as e:  # Prefect's "Timed out while attempting to connect"
        if isinstance(e, ServerDidNotStart):
            raise
        raise ServerDidNotStart(f"Prefect's temporary server did not answer within {timeout} s "
                                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): unset it to wait as long as the "
                                "server needs, or run a server and set PREFECT_API_URL") from e
    return server.api_url


class TemporaryServer(prefect_server.SubprocessASGIServer):
    def __new__(cls):  # a new instance, not the registry's: registered by start_temporary_server
        return object.__new__(cls)

    def _run_uvicorn_command(self):
        # Prefect builds the command and environment; only the Popen is ours (private, Prefect 3.9).
        real = prefect_server.subprocess
        prefect_server.subprocess = types.SimpleNamespace(Popen=_Child)
        try:
            return super()._run_uvicorn_command()
        finally:
            prefect_server.subprocess = real


class _Child(subprocess.Popen):
    """The server process: dies with its parent, and ends the start-up wait when it exits. Prefect's loop polls
    it and starts it again on another port after exit code 3, which it takes for a taken port; uvicorn exits 3
    for any failed start too (a database it cannot reach, say), and Prefect's loop then never ends."""
    exits = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, preexec_fn=_die_with_parent if sys.platform == "linux" else None, **kwargs)

    def poll(self):
        code = super().poll()
        if code is not None and not getattr(self, "counted", False):
            self.counted, _Child.exits = True, _Child.exits + 1
        if code not in (None, 3) or _Child.exits > START_TRIES:
            raise ServerDidNotStart(f"Prefect's temporary server exited with code {code} while starting (started "
                                    f"{_Child.exits} times); its output is in the run's log. Check PREFECT_* database "
                                    "settings, or run a server and set PREFECT_API_URL (README: Running it as a service)")
        return code


def _die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9)
