"""Real PostgreSQL, Redis and nginx servers for the cluster tests, started by the tests
themselves on free loopback ports in temporary folders and stopped afterwards. Nothing is
mocked and nothing relies on a server that happens to run; a server that cannot start fails
the test (the Makefile installs them on a fresh machine)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

UNPRIVILEGED = "nobody"  # PostgreSQL refuses to run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, seconds: float = 30
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds} s")


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(f"{name} not found: install the Debian package (make test does)")
    return found


def _as_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", UNPRIVILEGED, "--", *cmd] if os.geteuid() == 0 else cmd


def _private_dir(prefix: str) -> Path:
    """A temp dir the unprivileged server user owns (pytest's are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


@dataclass
class Postgres:
    port: int
    data: Path
    proc: subprocess.Popen[bytes] | None = None
    databases: int = 0

    @property
    def admin_url(self) -> str:
        return f"postgresql://{UNPRIVILEGED}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        postgres = _tool("postgres")
        self.proc = subprocess.Popen(
            _as_user(
                [
                    postgres,
                    "-D",
                    str(self.data / "db"),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.data}",
                    "-c",
                    "fsync=off",  # a test server: speed over crash safety of the test db
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=open(self.data / "server.log", "ab"),  # noqa: SIM115
        )
        wait_port(self.port, self.proc, "postgres")
        import psycopg

        for _ in range(100):  # listening comes a little before accepting logins
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError("postgres does not accept connections")

    def stop(self) -> None:
        """Fast shutdown of the postmaster itself (runuser, its parent, does not forward
        signals), waiting until it is gone."""
        pid_file = self.data / "db" / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # ProcessLookupError once it has exited
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None

    def new_database(self) -> str:
        """A fresh, empty database: tests share one server, never one database."""
        import psycopg

        self.databases += 1
        name = f"t{os.getpid()}_{self.databases}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://{UNPRIVILEGED}@127.0.0.1:{self.port}/{name}"


def start_postgres() -> Postgres:
    data = _private_dir("appliance-pg-")
    subprocess.run(
        _as_user(
            [
                _tool("initdb"),
                "-D",
                str(data / "db"),
                "-A",
                "trust",
                "-U",
                UNPRIVILEGED,
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    pg = Postgres(free_port(), data)
    pg.start()
    return pg


@dataclass
class Redis:
    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    db: int = 0

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError(
                "redis-server not found: install the Debian package (make test does)"
            )
        self.proc = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--databases",
                "256",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def new_url(self) -> str:
        """A fresh logical database (numbers 1..255) per test."""
        self.db += 1
        return f"redis://127.0.0.1:{self.port}/{self.db % 255 + 1}"


def start_redis() -> Redis:
    redis = Redis(free_port(), Path(tempfile.mkdtemp(prefix="appliance-redis-")))
    redis.start()
    return redis


@dataclass
class Nginx:
    """A round-robin load balancer in front of the replicas."""

    port: int
    folder: Path
    upstreams: list[int]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise RuntimeError("nginx not found: install the Debian package (make test does)")
        servers = "\n".join(
            f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in self.upstreams
        )
        user = "user root;" if os.geteuid() == 0 else ""
        (self.folder / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
daemon off;
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {self.folder}/body;
  proxy_temp_path {self.folder}/proxy;
  fastcgi_temp_path {self.folder}/fastcgi;
  uwsgi_temp_path {self.folder}/uwsgi;
  scgi_temp_path {self.folder}/scgi;
  client_max_body_size 200m;
  upstream replicas {{
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_read_timeout 120s;
      proxy_next_upstream error timeout http_502;
    }}
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [nginx, "-c", str(self.folder / "nginx.conf"), "-p", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc, "nginx")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Replica:
    """One `appliance serve` process."""

    port: int
    env: dict[str, str]
    cwd: Path
    name: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.cwd / f"{self.name}.log"

    def start(self) -> None:
        cli = Path(sys.executable).with_name("appliance")
        self.proc = subprocess.Popen(
            [str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            cwd=self.cwd,
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: no checkpoint, no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running(*servers: object) -> Iterator[None]:
    try:
        yield
    finally:
        for server in reversed(servers):
            with contextlib.suppress(Exception):
                server.stop()  # type: ignore[attr-defined]
