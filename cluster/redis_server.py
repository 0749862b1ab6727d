"""A private Redis server for one run: loopback, a random password, AOF on, data in the run folder."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.parent_death import term_on_parent_death


class RedisStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    process: subprocess.Popen
    host: str
    port: int
    password: str
    data_dir: Path

    @property
    def url(self) -> str:
        # The password is kept out of the URL so that the URL can be logged.
        return f"redis://{self.host}:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM makes Redis flush its AOF and exit; the process group is killed if it lingers."""
        if self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout)


def _stored_password(data_dir: Path) -> str:
    """The password kept with the data (0600), so that a restart on the same AOF keeps working."""
    path = data_dir / "password"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(password)
    return password


def start_redis(
    data_dir: Path,
    *,
    executable: str = "redis-server",
    host: str = "127.0.0.1",
    port: int | None = None,
    password: str | None = None,
    timeout: float = 15.0,
) -> RedisServer:
    binary = shutil.which(executable)
    if binary is None:
        raise RedisStartError(
            f"{executable!r} not found: install Redis (Debian/Ubuntu: `apt-get install -y redis-server`) "
            "or set redis.url to an existing server"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    password = password or _stored_password(data_dir)
    port = port or free_port(host)
    conf = data_dir / "redis.conf"
    # The password goes in a 0600 config file, not on the command line where `ps` shows it.
    conf.write_text(
        f"bind {host}\nport {port}\nrequirepass {password}\nprotected-mode yes\n"
        f"dir {data_dir}\nappendonly yes\nappendfsync everysec\nsave \"\"\n"
        f"daemonize no\nlogfile {data_dir / 'redis.log'}\n"
    )
    os.chmod(conf, 0o600)
    # Its own session, so that a terminal's Ctrl-C reaches only the CLI, which stops Redis in order
    # (AOF flushed); the parent-death signal covers the CLI being killed outright.
    proc = subprocess.Popen(
        [binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=term_on_parent_death,
    )
    server = RedisServer(proc, host, port, password, data_dir)
    deadline = time.monotonic() + timeout
    import redis

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log = (
                (data_dir / "redis.log").read_text(errors="replace")[-2000:]
                if (data_dir / "redis.log").exists()
                else ""
            )
            raise RedisStartError(f"redis-server exited with code {proc.returncode}: {err or log}")
        try:
            if server.client().ping():
                return server
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    server.stop()
    raise RedisStartError(f"redis-server did not answer on {host}:{port} within {timeout:.0f} s")
