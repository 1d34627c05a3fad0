"""Workers as separate hosts: independent `failfirst worker` commands, killed whole.

A host here is what an operator would start on another machine: one
`failfirst worker -n N` with its own data directory, in its own process group
(its own session), sharing nothing with the chaos run or the other hosts but the
store URL and the Redis URL it is given. Killing a host SIGKILLs its whole
group (supervisor, scheduler, reconciler and workers at once, like a machine
losing power); it comes back after a pause, as a rebooted machine would. The
orders it held must be finished by the others through leases and reconcilers
alone, which is what makes this a test of the multi-host claim and not of
the in-process supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from failfirst.config import Settings, settings_env
from failfirst.processes import terminate
from failfirst.supervisor import WorkerEvent

# How long a killed host stays down before it is started again.
RESTART_DELAY = 1.0


class Hosts:
    """`count` worker hosts of `workers` processes each, for one chaos run."""

    def __init__(self, settings: Settings, count: int, workers: int, run_dir: Path, redis_url: str) -> None:
        self.settings = settings
        self.count = count
        self.workers = workers
        self.run_dir = run_dir
        self.redis_url = redis_url
        self.procs: list[subprocess.Popen[bytes]] = []
        self.events: list[WorkerEvent] = []
        self._due: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stopped = False

    def home(self, index: int) -> Path:
        return self.run_dir / f"host-{index + 1}"

    def _env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(settings_env(replace(self.settings, home=self.home(index))))
        env["REDIS_URL"] = self.redis_url
        return env

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        home = self.home(index)
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "host.log", "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "failfirst", "worker", "-n", str(self.workers), "--quiet"],
                env=self._env(index),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        self.events.append(WorkerEvent(time.time(), "started", proc.pid, f"host-{index + 1}"))
        return proc

    def start(self) -> None:
        with self._lock:
            self.procs = [self._spawn(i) for i in range(self.count)]

    def pids(self) -> list[int]:
        """Process-group ids of the hosts that are up (each host's `failfirst worker`)."""
        with self._lock:
            return [p.pid for i, p in enumerate(self.procs) if i not in self._due and p.poll() is None]

    def kill(self, pgid: int) -> str:
        """SIGKILL one host's whole process group; it restarts after RESTART_DELAY (see `tick`)."""
        with self._lock:
            index = next(i for i, p in enumerate(self.procs) if p.pid == pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.procs[index].wait()
            self._due[index] = time.monotonic() + RESTART_DELAY
        return f"host-{index + 1}"

    def tick(self) -> None:
        """Restart the hosts whose pause is over, and pause the ones that ended on their own.

        A host's `failfirst worker` exits by itself when it cannot start, for
        instance when it is restarted while Redis is down; like a service
        manager, the lab starts it again after RESTART_DELAY instead of running
        on with one host fewer.
        """
        now = time.monotonic()
        with self._lock:
            if self._stopped:
                return
            for index, proc in enumerate(self.procs):
                if index not in self._due and proc.poll() is not None:
                    self.events.append(
                        WorkerEvent(time.time(), "died", proc.pid, f"host-{index + 1} exit {proc.returncode}")
                    )
                    self._due[index] = now + RESTART_DELAY
            for index, due in list(self._due.items()):
                if now >= due:
                    del self._due[index]
                    self.procs[index] = self._spawn(index)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every host's `failfirst worker` (it stops its own workers), then SIGKILL each group.

        Only the group leader gets SIGTERM: a second SIGTERM sent straight to an
        RQ worker would turn its warm shutdown into a cold one.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._due.clear()
            procs = list(self.procs)
        terminate(procs, grace, group=True)
