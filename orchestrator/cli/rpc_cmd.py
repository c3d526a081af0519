"""`flashflex rpc-server`: serve this host's devices to other flashflex processes over ggml's RPC protocol.

The server is ggml's own (ggml_backend_rpc_start_server, through our library: no separate binary). It blocks in C
forever, so it runs on a thread of its own while the main thread waits for SIGINT/SIGTERM and then ends the
process at once (nothing of the worker's needs saving: a client's buffers die with the connection).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import typer

from orchestrator.cli.common import JsonOpt, err_console
from orchestrator.endpoints import check_can_listen
from orchestrator.errors import FlashflexError

UNSAFE_HOST_WARNING = (
    "WARNING: this RPC worker listens on {host}, reachable from other machines. ggml's RPC protocol has NO "
    "authentication and is experimental: anyone who can reach port {port} can allocate memory on this host, read "
    "and write it, and run computations here. Use it only on a trusted, private network (or a tunnel), never on an "
    "open one."
)
LOOPBACK_NOTE = (
    "note: ggml's RPC protocol has no authentication: any local user or process that can reach {endpoint} can "
    "allocate memory here, read and write it, and run computations"
)
# ggml's server reads these (ggml/src/ggml-rpc, our patch): seconds a new connection has to send its HELLO, and
# seconds a client may then stay silent
HELLO_TIMEOUT_ENV = "GGML_RPC_HELLO_TIMEOUT"
CLIENT_TIMEOUT_ENV = "GGML_RPC_CLIENT_TIMEOUT"


def client_hint(host: str, port: int) -> str:
    """The line telling clients how to reach this worker: a wildcard address is not one they can use (M13)."""
    if host == "0.0.0.0":
        return f"clients: flashflex run --rpc ADDRESS:{port} ... (ADDRESS: this machine's address on their network)"
    return f"clients: flashflex run --rpc {host}:{port} ..."


def _served_devices(all_devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What upstream's rpc-server serves: every local accelerator (GPU, iGPU), else the CPU."""
    local = [d for d in all_devices if d["backend"] != "RPC"]
    accelerators = [d for d in local if d["type"] in ("gpu", "igpu")]
    return accelerators or [d for d in local if d["type"] == "cpu"][:1]


def _announce(mem: str, devices: list[dict[str, Any]]) -> tuple[int, str]:
    """(bytes each device announces, 0 = its own figure; how that was decided)."""
    from orchestrator.sizes import DEFAULT_HEADROOM, available_memory, format_size, is_auto, parse_size

    if not is_auto(mem):
        n = parse_size(mem, what="--mem")
        if n <= 0:
            raise FlashflexError("--mem must be greater than zero", "give a size such as 8GiB, or auto")
        return n, "--mem"
    if all(d["type"] == "cpu" for d in devices):
        # ggml's CPU device reports all of physical RAM as free; announce what is really available
        headroom = DEFAULT_HEADROOM
        n = max(available_memory() - headroom, 1 << 20)
        return n, f"auto: available memory minus {format_size(headroom)}"
    return 0, "the device's own figure"


def register(app: typer.Typer) -> None:
    @app.command("rpc-server")
    def rpc_server_cmd(
        host: str = typer.Option("127.0.0.1", "--host", help="IPv4 address to listen on. Anything but a loopback "
                                 "address is reachable from other machines, and ggml's RPC protocol has no "
                                 "authentication: use a trusted network only (a loud warning is printed)."),
        port: int = typer.Option(50052, "--port", min=1, max=65535, help="TCP port to listen on."),
        threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1,
                                              help="CPU compute threads (default: the physical cores)."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Keep the tensors clients send in this "
                                                 "directory (by hash), so a client loading the same model again "
                                                 "sends only hashes of its large tensors. Created when missing."),
        mem: str = typer.Option("auto", "--mem", help="Memory each device announces to clients, whose planner puts "
                                "no more than that on it: a size (8GiB, 0.5 = 512 MiB) or auto (a CPU worker: "
                                "available memory minus 1 GiB; an accelerator: its own free memory). Announced, not "
                                "enforced: confine the worker (a memory cgroup) to make it a limit."),
        client_timeout: int = typer.Option(0, "--client-timeout", min=0, help="Seconds a client connection may "
                                           "stay silent (or not read an answer) before the worker drops it; 0 (the "
                                           "default) = never. The worker serves one client at a time, so an idle "
                                           "connection holds it for everyone meanwhile; but a client idle longer "
                                           "than this (a serve or chat session between requests) then ends with "
                                           "'stopped answering' at its next request, so it is off unless asked for."),
        hello_timeout: int = typer.Option(10, "--hello-timeout", min=1, help="Seconds a new connection has to "
                                          "send ggml's HELLO before the worker drops it: a connection that says "
                                          "nothing cannot hold the worker (a real client says it at once)."),
        json_out: JsonOpt = False,
    ) -> None:
        """Serve this host's devices (accelerators, else the CPU) to flashflex runs elsewhere (--rpc HOST:PORT),
        over ggml's RPC protocol; Ctrl-C or SIGTERM stops it."""
        import psutil

        from orchestrator import native, rpc
        from orchestrator.sizes import format_size

        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise FlashflexError(f"--host {host!r} is not an IPv4 address (ggml's RPC server listens on IPv4 only)",
                                 "give an address such as 127.0.0.1 or 192.168.1.10") from None
        endpoint = f"{host}:{port}"
        check_can_listen(host, port)
        protocol = rpc.library_protocol()
        devices = _served_devices(native.devices())
        if not devices:
            raise FlashflexError("this host has no device to serve", "check the build (flashflex doctor)")
        announce, how = _announce(mem, devices)
        n_threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
        cache = None
        if cache_dir is not None:
            cache = cache_dir.expanduser().resolve()
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FlashflexError(f"cannot create the cache directory {cache}: {exc.strerror}",
                                     "give a writable directory") from None
            if not os.access(cache, os.W_OK):
                raise FlashflexError(f"the cache directory {cache} is not writable", "give a writable directory")

        served = [{**d, "announced": announce or d["free"]} for d in devices]
        if not rpc.is_loopback(host):
            err_console.print(f"[bold red]{UNSAFE_HOST_WARNING.format(host=host, port=port)}[/]")
        else:
            err_console.print(LOOPBACK_NOTE.format(endpoint=endpoint))
        if json_out:
            lines = [json.dumps({"endpoint": endpoint, "protocol": ".".join(map(str, protocol)),
                                 "threads": n_threads, "cache_dir": str(cache) if cache else None,
                                 "hello_timeout_s": hello_timeout, "client_timeout_s": client_timeout or None,
                                 "announced_by": how, "devices": served}, indent=2)]
        else:
            lines = [f"flashflex rpc-server: serving on {endpoint} (ggml RPC protocol {'.'.join(map(str, protocol))}), "
                     f"{n_threads} thread(s), tensor cache {cache or 'off'}"]
            lines += [f"  {d['name']} ({d['description']}): announces {format_size(d['announced'])} ({how}; the "
                      f"device reports {format_size(d['free'])} free of {format_size(d['total'])})" for d in served]
            lines.append(f"{client_hint(host, port)} · silent connections dropped after {hello_timeout}s, idle "
                         f"clients after {f'{client_timeout}s' if client_timeout else 'never'} · Ctrl-C stops the "
                         "worker")
        os.environ[HELLO_TIMEOUT_ENV] = str(hello_timeout)
        if client_timeout:
            os.environ[CLIENT_TIMEOUT_ENV] = str(client_timeout)
        else:
            os.environ.pop(CLIENT_TIMEOUT_ENV, None)
        _serve_until_signal(endpoint, str(cache) if cache else None, n_threads, announce,
                            [d["index"] for d in devices], "\n".join(lines) + "\n")


def _listening(host: str, port: int) -> bool:
    """Whether something listens on host:port now, read from /proc/net/tcp (Linux: no connection made, so the worker
    logs no client); elsewhere a connection attempt."""
    import socket

    table = Path("/proc/net/tcp")
    if table.exists():
        want = f"{port:04X}"
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(":" + want) and fields[3] == "0A":  # 0A = LISTEN
                return True
        return False
    try:
        with socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _serve_until_signal(endpoint: str, cache_dir: str | None, threads: int, announce: int, indices: list[int],
                        announcement: str) -> None:
    """Start ggml's server on a thread, print `announcement` on stdout once it listens, and end the process on
    SIGINT/SIGTERM/SIGHUP."""
    import time

    from orchestrator import native

    host, _, port = endpoint.rpartition(":")
    failure: list[str] = []

    def serve() -> None:
        failure.append(native.rpc_serve(endpoint, cache_dir, threads, announce, indices))

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # ggml's own log lines (printf: "Starting RPC server", "Accepted client connection", ...) go to stderr; stdout
    # gets only the announcement, printed once the server listens (so a script that read it can connect at once).
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    server = threading.Thread(target=serve, name="flashflex-rpc-server", daemon=True)
    server.start()
    deadline = time.monotonic() + 30
    while server.is_alive() and not stop.is_set() and not _listening(host, int(port)) and time.monotonic() < deadline:
        time.sleep(0.02)
    with os.fdopen(stdout, "w") as out:
        if server.is_alive() and not stop.is_set():
            out.write(announcement)
    while server.is_alive() and not stop.wait(0.2):
        pass
    if received:
        print(f"flashflex rpc-server: stopped by {signal.Signals(received[0]).name}", file=sys.stderr, flush=True)
        # The server thread is blocked in C (accept or a client's request) and cannot be joined: end the process.
        os._exit(0)
    server.join(timeout=1)
    raise FlashflexError(failure[0] if failure and failure[0] else f"the RPC server on {endpoint} stopped",
                         "pick another --port, or an address of this host for --host")
