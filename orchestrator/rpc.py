"""Other machines' devices through ggml's RPC backend: worker addresses, a bounded check of each worker before
anything is loaded, and the client side's registration with the library.

A worker is `flashflex rpc-server` (cli/rpc_cmd.py) on another host: it serves that host's devices over ggml's RPC
protocol, which has NO authentication — whoever can reach its port can allocate memory and run graphs there. It
binds 127.0.0.1 unless told otherwise.

Before a model loads, every worker is checked here in Python, with timeouts: connect, the protocol handshake
(HELLO: the worker's protocol version must be one this build speaks), its device count and each device's memory.
ggml's own client would abort the whole process on a worker that is down, and wait forever on one that accepts
but never answers; this check turns each of those into one line naming the worker. Only then does
`connect_workers` hand the workers to the library (native.rpc_add_server), whose devices join llama.cpp's device
list. A worker that goes away later, during a run, is reported by the library's abort callback (one line naming
it, exit status 1): ggml's client cannot recover from it.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from orchestrator.endpoints import (  # noqa: F401 (the addresses' helpers, where RPC code looks for them)
    DEFAULT_RPC_PORT,
    MAX_WORKER_DEVICES,
    is_loopback,
    parse_endpoint,
    parse_endpoints,
)
from orchestrator.errors import FlashflexError
from orchestrator.sizes import format_size

# ggml's RPC protocol at our pin (ggml/include/ggml-rpc.h: RPC_PROTO_*_VERSION); the library reports the version it
# was built with (native.info()["rpc_protocol"]) and tests keep the two equal.
RPC_PROTOCOL = (7, 0, 0)
DEFAULT_PORT = DEFAULT_RPC_PORT

_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_MAX_REPLY = 1 << 20  # far above any answer of the commands probe sends
_CONN_CAPS_SIZE = 24  # transport capabilities in HELLO (RDMA negotiation); zero = plain TCP


# --------------------------------------------------------------------------------------------------
# The check before loading


@dataclass(frozen=True)
class WorkerDevice:
    """One device a worker serves, with the memory it announces."""

    index: int  # on the worker
    free: int
    total: int
    name: str = ""  # the backend's name for it (this host's GPUs: Vulkan0, CUDA0, ...)
    capacity: int | None = None  # what the plan may use of it (this host's GPUs: the device budget); None = free
    compute: int | None = None  # its compute buffer as llama.cpp sized it (measured); None = the planner's estimate
    kv_layers: tuple[int, ...] | None = None  # each layer's KV cache as llama.cpp sized it; None = the formula


@dataclass
class Worker:
    """A worker that answered the check: its protocol version and devices."""

    endpoint: str
    protocol: tuple[int, int, int]
    devices: list[WorkerDevice] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "protocol": ".".join(map(str, self.protocol)),
                "devices": [{"index": d.index, "free": d.free, "total": d.total} for d in self.devices]}


def _fail(endpoint: str, problem: str, fix: str) -> FlashflexError:
    return FlashflexError(f"RPC worker {endpoint} {problem}", fix)


_START_FIX = "start it there (flashflex rpc-server --host ADDRESS --port PORT) or fix --rpc"


def _closed(endpoint: str, what: str) -> FlashflexError:
    return _fail(endpoint, f"closed the connection during {what}: it is not a ggml RPC worker, or it speaks another "
                 f"version of the protocol than this build ({'.'.join(map(str, RPC_PROTOCOL))})",
                 "run the same flashflex version (flashflex rpc-server) on both machines")


def _recv_exact(sock: socket.socket, n: int, endpoint: str, what: str) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            raise _closed(endpoint, what) from None
        except socket.timeout:
            raise _fail(endpoint, f"accepted the connection but did not answer {what} within "
                        f"{sock.gettimeout():g}s: it is busy serving another client (a worker serves one client at "
                        "a time), or it is not a ggml RPC worker",
                        "wait for the other client to finish, or check the address (--rpc-timeout waits longer)"
                        ) from None
        except OSError as exc:
            raise _fail(endpoint, f"dropped the connection during {what} ({exc.strerror or exc})",
                        "check the worker's log") from None
        if not chunk:
            raise _closed(endpoint, what)
        data += chunk
    return data


def _command(sock: socket.socket, endpoint: str, cmd: int, payload: bytes, reply_size: int, what: str) -> bytes:
    try:
        sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    except (ConnectionResetError, BrokenPipeError):
        raise _closed(endpoint, what) from None
    except socket.timeout:
        raise _fail(endpoint, f"did not take {what} within {sock.gettimeout():g}s", "check the worker") from None
    except OSError as exc:
        raise _fail(endpoint, f"dropped the connection during {what} ({exc.strerror or exc})",
                    "check the worker's log") from None
    raw = _recv_exact(sock, 8, endpoint, what)
    (size,) = struct.unpack("<Q", raw)
    if size != reply_size and size > _MAX_REPLY:  # no RPC answer is this long: another kind of server
        shown = raw.decode("ascii", "replace") if all(32 <= b < 127 for b in raw) else raw.hex()
        raise _fail(endpoint, f"is not an RPC worker: it answered {what} with {shown!r}",
                    "check the address: --rpc takes the HOST:PORT of a `flashflex rpc-server`")
    if size != reply_size:
        raise _fail(endpoint, f"answered {what} with {size} bytes instead of {reply_size}: it speaks another version "
                    f"of ggml's RPC protocol than this build ({'.'.join(map(str, RPC_PROTOCOL))})",
                    "run the same flashflex version (flashflex rpc-server) on both machines")
    return _recv_exact(sock, size, endpoint, what)


def probe(endpoint: str, timeout: float = 3.0, protocol: tuple[int, int, int] = RPC_PROTOCOL) -> Worker:
    """Connect to a worker, check its protocol version and read its devices' memory, each step within `timeout`
    seconds; FlashflexError naming the worker otherwise (down, refusing, unreachable, silent, another protocol)."""
    host, _, port = endpoint.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)  # ggml's client is IPv4
    except socket.gaierror as exc:
        raise _fail(endpoint, f"cannot be found: the host name does not resolve ({exc.strerror})",
                    "check the host name in --rpc") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            raise _fail(endpoint, "refused the connection: nothing listens on that port", _START_FIX) from None
        except socket.timeout:
            raise _fail(endpoint, f"did not accept a connection within {timeout:g}s (host down, or a firewall drops "
                        "the packets)", "check that the host is up and the port reachable from here") from None
        except OSError as exc:
            raise _fail(endpoint, f"cannot be reached ({exc.strerror or exc})",
                        "check the address and the network") from None
        hello = _command(sock, endpoint, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), 4 + _CONN_CAPS_SIZE, "the handshake")
        version = (hello[0], hello[1], hello[2])
        if version[0] != protocol[0] or version[1] > protocol[1]:
            raise _fail(endpoint, f"speaks ggml RPC protocol {'.'.join(map(str, version))}, and this build speaks "
                        f"{'.'.join(map(str, protocol))}",
                        "run the same flashflex (or llama.cpp) version on both machines")
        (count,) = struct.unpack("<I", _command(sock, endpoint, _CMD_DEVICE_COUNT, b"", 4, "the device count"))
        if count == 0:
            raise _fail(endpoint, "serves no devices", "check the worker's log")
        devices = []
        for i in range(count):
            reply = _command(sock, endpoint, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16, "the memory query")
            free, total = struct.unpack("<QQ", reply)
            devices.append(WorkerDevice(i, free, total))
        return Worker(endpoint, version, devices)
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------------
# The client side in the library


def library_protocol() -> tuple[int, int, int]:
    """The RPC protocol version the installed library speaks; NotPatched/FlashflexError when it has no RPC."""
    from orchestrator import native

    native.lib()  # NotPatched unless built from this tree's series, which builds every library with RPC
    proto = native.info().get("rpc_protocol")
    if not proto:
        raise FlashflexError("the installed flashflex build has no RPC backend", "rebuild it: flashflex build")
    return (int(proto[0]), int(proto[1]), int(proto[2]))


def workers_for(endpoints: list[str], timeout: float) -> list[Worker]:
    """Each worker's devices and memory, for the planner. A worker this process already uses is asked through the
    library (it serves one client at a time: this process); the others are probed with timeouts."""
    from orchestrator import native

    protocol = library_protocol()
    out = []
    for endpoint in endpoints:
        if endpoint in native.rpc_registered():
            devs = native.rpc_worker_devices(endpoint)
            out.append(Worker(endpoint, protocol, [WorkerDevice(i, d["free"], d["total"])
                                                   for i, d in enumerate(devs)]))
        else:
            out.append(probe(endpoint, timeout, protocol))
    return out


# The endpoint of this host's own accelerators in a placement (their device indices are the library's).
LOCAL = "local"


# What the default device budget leaves free on a GPU: other programs' allocations come and go, and the backend
# allocates beyond its buffers (command pools, staging). Smaller devices keep a quarter of their free memory instead.
DEVICE_MARGIN = 1 << 30


def device_budget(free: int, budget: int | None) -> int:
    """What the plan may use of a GPU with `free` bytes free: `budget` when given, else free minus the margin."""
    if budget is not None:
        return budget
    return max(0, free - min(DEVICE_MARGIN, free // 4))


def local_gpus(budget: int | None = None) -> Worker | None:
    """This host's accelerators (the GPUs of a Vulkan, CUDA or Metal build) as one pseudo-worker with endpoint LOCAL,
    each device's index being its index in the library's device list and its capacity the device budget
    (`budget` bytes each, or its free memory minus a margin); None when the build sees none (CPU only). A budget
    above a device's free memory is refused: the load would fail there, or evict another program's memory."""
    from orchestrator import native

    indices = native.local_accelerators()
    if not indices:
        return None
    listed = {d["index"]: d for d in native.devices()}
    out = []
    for i in indices:
        d = listed[i]
        if budget is not None and budget > d["free"]:
            raise FlashflexError(f"--gpu-budget {format_size(budget)} is more than {d['name']} has free "
                                 f"({format_size(d['free'])} of {format_size(d['total'])})",
                                 f"give --gpu-budget {format_size(device_budget(d['free'], None))} or less, or free "
                                 "memory on the device")
        out.append(WorkerDevice(i, d["free"], d["total"], name=d["name"],
                                capacity=device_budget(d["free"], budget)))
    return Worker(LOCAL, library_protocol(), out)


def _no_gpu_fix() -> tuple[str, str]:
    """(the build's backend, what to do) when a run asks for a GPU the build does not see."""
    from orchestrator import cpufeatures

    built = (cpufeatures.installed_build_record() or {}).get("backend") or "cpu"
    if built == "cpu":
        return built, "build for a GPU (flashflex build --backend vulkan or cuda, or metal on a Mac)"
    if built == "vulkan":  # ggml skips a CPU-type Vulkan device (lavapipe) unless told to use it
        return built, ("install your GPU's Vulkan driver, or set GGML_VK_VISIBLE_DEVICES=0 to use a CPU-type Vulkan "
                       "device (lavapipe)")
    return built, f"check the {built} driver (flashflex doctor lists the devices ggml sees)"


def uses_local_gpus(cfg: Any) -> bool:
    """Whether a RunConfig puts layers on this host's GPUs when it has some: -ngl N or auto; -ngl unset without
    RPC workers (auto is the default where a GPU is present); not -ngl 0, and not --rpc alone."""
    layers = cfg.gpu.layers
    return cfg.gpu.asks_count or layers == "auto" or (layers is None and not cfg.rpc.servers)


def gpus_for(cfg: Any) -> Worker | None:
    """This host's GPUs a RunConfig puts layers on (uses_local_gpus), with its device budget; None when it puts none
    there or the build sees none."""
    if not uses_local_gpus(cfg):
        return None
    from orchestrator import native

    # -ngl unset or auto: a tree without the patched library yet (plan --estimate) just has no GPU to use
    if cfg.offloads or cfg.gpu.budget is not None or native.is_patched():
        return local_gpus(cfg.gpu.budget_bytes)
    return None


def offload_targets(cfg: Any) -> list[Worker] | None:
    """The devices a RunConfig offloads layers to, in llama.cpp's device order: this host's GPUs (uses_local_gpus),
    then the RPC workers (checked with timeouts); None when it offloads nothing. -ngl N or --gpu-budget with
    nothing to put it on is refused in one line."""
    local = gpus_for(cfg)
    if cfg.gpu.budget is not None and local is None:
        if not uses_local_gpus(cfg):
            why = "-ngl 0 puts nothing there" if cfg.gpu.layers == 0 else "--rpc alone uses only the workers"
            raise FlashflexError(f"--gpu-budget {cfg.gpu.budget} is for this host's GPUs, and {why}",
                                 "give -ngl auto (or a number of layers) to use the GPUs too, or drop --gpu-budget")
        built, fix = _no_gpu_fix()
        raise FlashflexError(f"--gpu-budget {cfg.gpu.budget}: this {built} build sees no GPU",
                             f"{fix}, or drop --gpu-budget")
    out = [local] if local is not None else []
    if cfg.rpc.servers:
        out += workers_for(cfg.rpc.servers, cfg.rpc.timeout_s)
    if not out and cfg.gpu.asks_count:
        built, fix = _no_gpu_fix()
        raise FlashflexError(f"--gpu-layers {cfg.gpu.layers}: this {built} build sees no GPU, and no RPC worker is "
                             "given", f"{fix}, give --rpc HOST:PORT, or drop --gpu-layers")
    return out or None


def connect_workers(endpoints: list[str], timeout: float) -> dict[str, list[int]]:
    """Register each worker with the library (checked first when this process does not use it yet): endpoint →
    the indices of its devices in the library's device list (native.devices())."""
    from orchestrator import native

    protocol = library_protocol()
    out = {}
    for endpoint in endpoints:
        if endpoint not in native.rpc_registered():
            probe(endpoint, timeout, protocol)
            native.rpc_add_server(endpoint)
        out[endpoint] = [d["index"] for d in native.rpc_worker_devices(endpoint)]
    return out


# --------------------------------------------------------------------------------------------------
# ggml's connections during a run: a bound on each answer, and the bytes they carried

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, u64 at these offsets (Linux 4.2+)
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCPI_SIZE = 136


def _peers(endpoints: list[str]) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for endpoint in endpoints:
        if endpoint == LOCAL:
            continue
        host, _, port = endpoint.rpartition(":")
        try:
            for info in socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM):
                out.add((str(info[4][0]), int(port)))  # AF_INET: (host, port)
        except OSError:
            continue
    return out


def _connections(endpoints: list[str]):
    """This process's TCP sockets connected to the workers (ggml's RPC client keeps one per worker), each as a
    socket object on a duplicate of the descriptor (closed by the caller; the connection stays). Found through
    /proc/self/fd (Linux) or /dev/fd; nothing where neither lists descriptors."""
    peers = _peers(endpoints)
    listing = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
    if not peers or listing is None:
        return
    for name in os.listdir(listing):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except (ValueError, OSError):
            continue
        try:
            if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM and sock.getpeername() in peers:
                yield sock
        except OSError:
            pass
        finally:
            sock.close()


def limit_answer_time(endpoints: list[str], seconds: float) -> int:
    """Bound how long ggml's client waits for a worker to answer (send and receive timeouts on its connections):
    a worker that stops answering without closing the connection (a frozen host, a network that drops packets)
    then fails the wait instead of hanging the run, and the library's abort callback names it (exit status 1).
    Returns the number of connections bounded."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    n = 0
    for sock in _connections(endpoints):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        n += 1
    return n


def traffic(endpoints: list[str]) -> tuple[int, int] | None:
    """(bytes sent, bytes received) so far on the connections to the workers, as the kernel counts them (TCP_INFO);
    None where that is not available (not Linux, or no connection)."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    sent = received = 0
    found = False
    for sock in _connections(endpoints):
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_SIZE)
        except OSError:
            continue
        if len(info) < _TCPI_SIZE:
            continue
        found = True
        sent += struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]
        received += struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]
    return (sent, received) if found else None
