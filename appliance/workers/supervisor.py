"""The parent of `appliance serve --workers N`: starts N worker processes, forwards SIGTERM
and SIGINT to them (each drains as a single server does: /readyz 503, the listener closes,
in-flight requests finish), restarts one that dies, and exits when all have stopped.

Each worker binds its own listening socket with SO_REUSEPORT and the kernel spreads new
connections across them. uvicorn's own supervisor (uvicorn.supervisors.Multiprocess) binds
one socket in the parent and hands it to every child, so all of them wake for each
connection on one accept queue, and it needs the app as an import string; the app here is
built from a Settings object, so this small loop is used instead.

Workers are started with `spawn`: a fresh interpreter each, so no onnxruntime thread pool
or SQLite connection is inherited half-made through fork. Each is in its own process group,
so a Ctrl-C at the terminal reaches only this parent, which forwards it once (a second
signal to a worker means "stop now", as for a single server).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

import msgspec

from appliance.config import Settings

log = logging.getLogger("appliance.server")

RESTART_DELAY_SECONDS = 1.0
"""A worker that keeps dying is restarted at most this often (doubling up to 30 s while it
dies within a minute of its start), so a broken config does not spin the CPU."""
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT (not yet listening: the server listens once its
    models are loaded, so the kernel sends no connection to a worker still starting)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings. With [cluster], each worker is a replica to the shared
    backends under its own name (replica_id-wN): under one name two workers would both hold
    a job's lease and each would ignore the other's events as its own."""
    if not settings.cluster.enabled:
        return settings
    cluster = msgspec.structs.replace(
        settings.cluster, replica_id=f"{settings.cluster.replica_id}-w{index}"
    )
    return msgspec.structs.replace(settings, cluster=cluster)


def _worker_main(settings: Settings, index: int) -> None:
    """A worker's body (a fresh interpreter): logging, then one server on its own socket."""
    os.setpgrp()
    from appliance.logs import configure_logging
    from appliance.server import serve_worker

    settings = worker_settings(settings, index)
    configure_logging(settings.server.log_level, settings.server.log_format)
    log.info("worker %d (pid %d) starting", index, os.getpid())
    serve_worker(settings, listening_socket(settings.server.host, settings.server.port))


def _bootstrap_main(settings: Settings) -> None:
    """The first-start admin key, made once before any worker starts (N workers starting
    together would each see no key and make one). In a child of its own, so that the
    supervisor never imports the server stack (it stays a small process)."""
    from appliance.app import bootstrap_admin_key
    from appliance.gateway.keys import KeyStore
    from appliance.logs import configure_logging

    configure_logging(settings.server.log_level, settings.server.log_format)
    settings.data_path.mkdir(parents=True, exist_ok=True)
    bootstrap_admin_key(settings, KeyStore(settings.keys_path))


@dataclass
class _Slot:
    index: int
    process: BaseProcess
    started: float
    delay: float = RESTART_DELAY_SECONDS


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        target: Callable[[Settings, int], None] = _worker_main,
    ) -> None:
        self.settings = settings
        self.target = target
        self.count = settings.server.workers
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._stopping = False
        self._wake = threading.Event()

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=self.target, args=(self.settings, index), name=f"appliance-worker-{index}"
        )
        process.start()
        return process

    def _signal(self, sig: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("shutdown requested: stopping %d workers", self.count)
        self._stopping = True
        self._forward()
        self._wake.set()

    def _forward(self) -> None:
        for slot in self._slots:
            if slot.process.is_alive() and slot.process.pid is not None:
                # SIGTERM whatever came in: a worker drains on it, and a second one (another
                # Ctrl-C) makes it stop at once, as a single server does.
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    os.kill(slot.process.pid, signal.SIGTERM)

    def _check_port(self) -> None:
        """Fail at once, in the parent, when the port is taken, rather than in a restart loop
        of every worker: by a server without SO_REUSEPORT (the bind fails), or by one with it
        (another appliance started twice on one port: the bind would succeed and the kernel
        would quietly split the connections between the two, so a listener that answers a
        connect is refused too)."""
        host, port = self.settings.server.host, self.settings.server.port
        listening_socket(host, port).close()
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        try:
            socket.create_connection((probe, port), timeout=0.5).close()
        except OSError:
            return  # nobody listens: the port is ours
        raise OSError(errno.EADDRINUSE, "another server already listens on this port")

    def run(self) -> int:
        """Serve until every worker has stopped; 0 if all of them stopped cleanly."""
        server = self.settings.server
        log.info(
            "serving models from %s, state in %s, on http://%s:%d with %d workers",
            self.settings.models_path,
            self.settings.data_path,
            server.host,
            server.port,
            self.count,
        )
        try:
            self._check_port()
        except OSError as exc:
            log.error(
                "cannot listen on %s:%d: %s",
                self.settings.server.host,
                self.settings.server.port,
                exc,
            )
            return 1
        bootstrap = self._context.Process(target=_bootstrap_main, args=(self.settings,))
        bootstrap.start()
        bootstrap.join()
        if bootstrap.exitcode != 0:
            log.error("start-up failed (the admin key bootstrap exited %s)", bootstrap.exitcode)
            return 1
        # Every worker writes its counters to files in one folder and /metrics on any of
        # them sums all (prometheus_client's multiprocess mode); a fresh folder per run.
        metrics_dir = tempfile.mkdtemp(prefix="appliance-metrics-")
        os.environ[METRICS_ENV] = metrics_dir  # the spawned workers inherit it
        previous = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            now = time.monotonic()
            self._slots = [_Slot(i, self._spawn(i), now) for i in range(self.count)]
            if self._stopping:  # a signal came while they were being started
                self._forward()
            self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.environ.pop(METRICS_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
        codes = [slot.process.exitcode for slot in self._slots]
        log.info("all workers stopped (exit codes %s)", codes)
        # uvicorn re-raises the SIGTERM it drained on once it is done, so a worker that
        # stopped as asked ends "killed by SIGTERM": that is a clean stop here.
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1

    def _watch(self) -> None:
        while True:
            self._wake.wait(0.2)
            self._wake.clear()
            alive = 0
            for slot in self._slots:
                if slot.process.is_alive():
                    alive += 1
                elif not self._stopping:
                    self._restart(slot)
                    alive += 1
            if self._stopping and alive == 0:
                return

    def _restart(self, slot: _Slot) -> None:
        now = time.monotonic()
        if now - slot.started < slot.delay:
            return  # died soon after its start: wait a little before the next try
        old = slot.process
        log.error(
            "worker %d (pid %s) exited with code %s: restarting it",
            slot.index,
            old.pid,
            old.exitcode,
        )
        from prometheus_client import multiprocess

        if old.pid is not None:
            multiprocess.mark_process_dead(old.pid)  # its live gauges, not its counters
        # Dying within a minute of starting again and again: back off, up to 30 s apart.
        slot.delay = min(30.0, slot.delay * 2) if now - slot.started < 60 else RESTART_DELAY_SECONDS
        slot.process = self._spawn(slot.index)
        slot.started = now
