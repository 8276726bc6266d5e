"""Start and stop the local serving stack: ``redis-server``, ``tritonserver`` and the controller.

Used by ``make serve``/``make stop``, the demo, the benchmark and the integration-test fixtures, so every one of them
runs the same real processes the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from triton_backend.server import ServerPorts, assemble_backends, server_command, server_environment

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / "build" / "run"


_PORTS_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range and not handed out before by this process.

    A port the kernel picks for ``bind(0)`` comes from the ephemeral range, which outgoing connections (gRPC and
    Redis clients, Triton's stubs) draw from too: between this call and the server's bind one of them could take it
    (a CI run failed so: "Address already in use"). Ports below that range are only ever taken by a
    listener asking for them by number."""
    candidates = list(_below_ephemeral_range())
    random.shuffle(candidates)
    for port in candidates:
        if port in _PORTS_HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:  # no room below the ephemeral range: let the kernel pick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _below_ephemeral_range() -> range:
    """Up to 16,384 unprivileged ports just below the kernel's ephemeral range (Linux's default 32768-60999)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 16384), low)


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (log: {log})")


@dataclass
class Process:
    """A started child process with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux ``/proc``; 0 once it has exited)."""
        stat = _proc_stat(self.popen.pid)
        return stat[1] if stat else 0.0

    def cpu_by_process(self) -> dict[int, tuple[str, float]]:
        """CPU seconds used so far, by pid, with the owner they are charged to: this process (``tritonserver``:
        Triton's core, gRPC and batchers) and each of its Python-backend stubs (the model's name, the folder the
        stub was started for). Subtract two readings with ``cpu_used``."""
        used = {self.popen.pid: ("tritonserver", self.cpu_seconds())}
        for entry in Path("/proc").iterdir():
            stat = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
            if stat is None or stat[0] != self.popen.pid:
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            owner = Path(argv[1].decode()).parent.parent.name if len(argv) > 1 else entry.name
            used[int(entry.name)] = (owner, stat[1])
        return used

    def stop(self, timeout: float = 15.0) -> None:
        """Stop gracefully, then make sure nothing it started outlives it (Triton's Python stubs are its children
        and would otherwise keep running, and keep the stub binary busy, after a killed server)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # what Kubernetes sends, so tests stop processes the same way
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # its own process group: see _spawn


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per owner between two ``Process.cpu_by_process`` readings, over the processes alive at the
    second: a stub started in between counts from its start; one that exited in between (an instance a reload
    replaced) is missed rather than subtracted, so no owner's use comes out negative."""
    used: dict[str, float] = {}
    for pid, (owner, seconds) in after.items():
        earlier = before.get(pid)
        used[owner] = used.get(owner, 0.0) + seconds - (earlier[1] if earlier and earlier[0] == owner else 0.0)
    return used


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """Parent pid and CPU seconds (user + system) of a live process, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(name: str, command: list[str], log_dir: Path, env: dict[str, str] | None = None,
           detach: bool = False) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    handle = log.open("ab")
    # Each child leads its own process group (a new session when detached), so stopping it can reap its children.
    popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=detach, process_group=None if detach else 0)
    handle.close()
    return Process(name, popen, log)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise FileNotFoundError("redis-server not found; run `make setup` (installs the Debian package redis-server)")
    return binary


def start_redis(port: int, log_dir: Path, detach: bool = False) -> Process:
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = _spawn("redis", command, log_dir, detach=detach)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    _wait(ping, 15, "redis-server", process.popen, process.log)
    return process


def start_triton(repository: Path, ports: ServerPorts, redis_url: str, log_dir: Path, models: list[str] | None = None,
                 detach: bool = False, timeout: float = 120, env: dict[str, str] | None = None) -> Process:
    """Start ``tritonserver`` and wait until it is ready; ``env`` adds to its environment (several replicas against
    one Redis: ``APPARATE_REPLICA_ID``, each in its own ``log_dir``)."""
    backends = assemble_backends(ROOT / "build" / "triton" / "backends")
    command = server_command(repository.resolve(), backends.resolve(), ports, models)
    environment = {**server_environment(redis_url, http_port=ports.http), **(env or {})}
    process = _spawn("triton", command, log_dir, env=environment, detach=detach)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=1) as response:
            return response.status == 200

    _wait(ready, timeout, "tritonserver", process.popen, process.log)
    return process


def start_controller(redis_url: str, log_dir: Path, extra: list[str] | None = None, detach: bool = False) -> Process:
    command = [sys.executable, "-m", "controller", "--redis-url", redis_url, *(extra or [])]
    return _spawn("controller", command, log_dir, detach=detach)


@dataclass
class Stack:
    """A running Redis + Triton (+ optional controller)."""

    redis_port: int
    ports: ServerPorts
    processes: list[Process] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def start_controller(self, log_dir: Path, extra: list[str] | None = None) -> Process:
        """Start a controller against this stack's Redis, stopped with the stack unless stopped before (a benchmark
        interrupted mid-phase leaves no controller behind)."""
        process = start_controller(self.redis_url, log_dir, extra)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def reload(self, model: str, parameters: dict[str, str], timeout: float = 30.0, **fields: Any) -> None:
        """Reload ``model`` with ``parameters`` and top-level configuration ``fields`` (``instance_group=...``) set
        in its configuration: an override through Triton's model-control API; nothing changes on disk. Returns once
        the instances it replaced have exited too: Triton answers when the new ones are ready and unloads the old
        ones after, and until then an old instance still follows Redis and reports on the model's metrics (when no
        new instance started, nothing was replaced and nothing is waited for)."""
        triton = self.process("triton")

        def stubs() -> set[int]:
            return {pid for pid, (owner, _) in triton.cpu_by_process().items() if owner == model}

        replaced = stubs()
        client = grpcclient.InferenceServerClient(self.grpc_url)
        config = client.get_model_config(model, as_json=True)["config"]
        config.setdefault("parameters", {}).update({k: {"string_value": v} for k, v in parameters.items()})
        config.update(fields)
        client.load_model(model, config=json.dumps(config))
        if not stubs() - replaced:
            return
        deadline = time.monotonic() + timeout
        while replaced & stubs():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model}: the instances a reload replaced still run after {timeout:.0f} s")
            time.sleep(0.05)


@contextlib.contextmanager
def running_stack(
    repository: Path,
    models: list[str] | None = None,
    controller_args: list[str] | None = None,
    with_controller: bool = True,
    log_dir: Path | None = None,
    redis_port: int | None = None,
    ports: ServerPorts | None = None,
) -> Iterator[Stack]:
    """Start Redis, Triton and (optionally) the controller on free ports; stop them all on exit, Ctrl-C and SIGTERM
    included (a terminated benchmark would otherwise leave its servers running, each child in its own process
    group)."""
    stack = Stack(redis_port or free_port(), ports or ServerPorts(free_port(), free_port(), free_port()))
    log_dir = log_dir or RUN_DIR
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if in_main_thread else None
    try:
        stack.processes.append(start_redis(stack.redis_port, log_dir))
        stack.processes.append(start_triton(repository, stack.ports, stack.redis_url, log_dir, models))
        if with_controller:
            stack.start_controller(log_dir, controller_args)
        yield stack
    finally:
        stack.stop()
        if in_main_thread:  # ``None``: the previous handler was not set from Python; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def servable_models(repository: Path) -> list[str]:
    """Entries of ``repository`` that can load: early-exit and vanilla entries whose artifacts are built, models of
    other backends (pre-processing), and ensembles whose every step is servable."""
    entries = {path.parent.name: path.read_text() for path in sorted(repository.glob("*/config.pbtxt"))}

    def built(name: str) -> bool:
        return (repository / name / "1" / "manifest.json").is_file()

    def sources(config: str) -> list[str]:  # the entry whose artifacts an E3 block model serves
        return re.findall(r'key:\s*"source"\s*value:\s*\{\s*string_value:\s*"([^"]+)"', config)

    ready = {name for name, config in entries.items()
             if 'platform: "ensemble"' not in config
             and ('backend: "apparate"' not in config or built(name))
             and ('backend: "apparate_e3"' not in config or (repository / name / "1" / "plan.json").is_file())
             and all(built(source) for source in sources(config))}
    # An E3 router serves only with every block model of its plan.
    ready -= {name for name, config in entries.items() if 'backend: "apparate_e3"' in config
              and not all(block in ready for block in entries if re.fullmatch(rf"{re.escape(name)}_b\d+", block))}
    for name, config in entries.items():
        steps = re.findall(r'model_name:\s*"([^"]+)"', config)
        if 'platform: "ensemble"' in config and steps and all(step in ready for step in steps):
            ready.add(name)
    return sorted(ready)


def _up(args: argparse.Namespace) -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    args.model = args.model or servable_models(args.repository)
    redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
    ports = ServerPorts(args.http_port, args.grpc_port, args.metrics_port)
    started = [start_redis(args.redis_port, RUN_DIR, detach=True)]
    started.append(start_triton(args.repository, ports, redis_url, RUN_DIR, args.model, detach=True))
    started.append(start_controller(redis_url, RUN_DIR, detach=True))
    for process in started:
        (RUN_DIR / f"{process.name}.pid").write_text(str(process.popen.pid))
    print(f"serving {', '.join(args.model)}: Triton HTTP :{ports.http} gRPC :{ports.grpc} metrics :{ports.metrics}, "
          f"Redis :{args.redis_port}; logs in {RUN_DIR}")
    return 0


def _down() -> int:
    for name in ("controller", "triton", "redis"):
        pid_file = RUN_DIR / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        pid_file.unlink()
        print(f"stopped {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload.stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, Triton and the controller in the background")
    up.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    up.add_argument("--redis-port", type=int, default=6379)
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--grpc-port", type=int, default=8001)
    up.add_argument("--metrics-port", type=int, default=8002)
    up.add_argument("--model", action="append", default=None,
                    help="entry to serve (repeatable; default: every entry of the repository that can load)")
    sub.add_parser("down", help="stop what `up` started")
    args = parser.parse_args(argv)
    return _up(args) if args.command == "up" else _down()


if __name__ == "__main__":
    sys.exit(main())
