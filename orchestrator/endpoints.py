"""Network addresses: RPC worker `HOST:PORT`s checked and normalised, whether a host is this machine's loopback (what
servers and workers bind by default), and whether an address can be listened on before anything is printed."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

from orchestrator.errors import FlashflexError

DEFAULT_RPC_PORT = 50052
MAX_WORKER_DEVICES = 16  # GGML_RPC_MAX_SERVERS, and llama.cpp's LLAMA_MAX_DEVICES on CPU builds
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def parse_endpoint(text: str) -> str:
    """`HOST:PORT` checked and normalised (surrounding spaces dropped), or FlashflexError saying what is wrong."""
    value = str(text).strip()
    if not value:
        raise FlashflexError("an RPC worker address is empty", "give HOST:PORT, e.g. 127.0.0.1:50052")
    if value.startswith("[") or value.count(":") > 1:
        raise FlashflexError(f"RPC worker {value!r}: IPv6 addresses are not supported by ggml's RPC client",
                             "give a host name or an IPv4 address, e.g. 192.168.1.10:50052")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise FlashflexError(f"RPC worker {value!r} is not HOST:PORT",
                             f"e.g. {value or '127.0.0.1'}:{DEFAULT_RPC_PORT}")
    if not _HOST.match(host):
        raise FlashflexError(f"RPC worker {value!r}: {host!r} is not a host name or IPv4 address",
                             "give HOST:PORT, e.g. 127.0.0.1:50052")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FlashflexError(f"RPC worker {value!r}: the port must be a number from 1 to 65535",
                             f"e.g. {host}:{DEFAULT_RPC_PORT}")
    return f"{host}:{int(port)}"


def parse_endpoints(value: Any) -> list[str]:
    """A comma-separated string or a list of `HOST:PORT` → the checked list (no duplicates, at most 16)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    if isinstance(value, str) and not value.strip():
        raise FlashflexError("--rpc is empty", "give HOST:PORT[,HOST:PORT...], or leave --rpc out")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise FlashflexError(f"RPC worker {item!r} is not HOST:PORT", "write each worker as a string HOST:PORT")
        endpoint = parse_endpoint(item)
        if endpoint in out:
            raise FlashflexError(f"RPC worker {endpoint} is listed twice", "list each worker once")
        out.append(endpoint)
    if len(out) > MAX_WORKER_DEVICES:
        raise FlashflexError(f"{len(out)} RPC workers; ggml's RPC backend takes at most {MAX_WORKER_DEVICES}",
                             "use fewer workers")
    return out


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_can_listen(host: str, port: int) -> None:
    """One clear line, before anything is printed, when the port is taken or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise FlashflexError(f"port {port} on {host} is already in use: cannot listen there",
                                     "stop the other program or pick another --port") from None
            raise FlashflexError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                 "give an address of this machine with --host (default 127.0.0.1)") from None
