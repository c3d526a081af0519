"""A hostile client against a real `flashflex rpc-server` on 127.0.0.1 (review 2026-12-04: C8, C9, X4, X5; M11):
each malformed command is refused and its connection closed, with a line in the worker's log, and the worker stays
up and serves the next good client (checked with orchestrator.rpc.probe); a huge length prefix costs the worker no
memory; a silent connection holds the single-client worker no longer than its --hello-timeout (an idle client no
longer than its --client-timeout).

The client speaks ggml's RPC wire protocol at the pin (ggml/src/ggml-rpc/ggml-rpc.cpp): a 1-byte command, an 8-byte
little-endian length, the payload; HELLO first. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import rpc, synth
from orchestrator.errors import FlashflexError
from tests.test_rpc import Worker

from conftest import REPO

pytestmark = pytest.mark.native

# enum rpc_cmd at the pin
ALLOC_BUFFER, BUFFER_GET_BASE, SET_TENSOR, GET_TENSOR, GRAPH_COMPUTE = 0, 3, 6, 8, 10
GET_ALIGNMENT, GET_MAX_SIZE, GET_DEVICE_MEMORY, HELLO, DEVICE_COUNT = 1, 2, 11, 14, 15
GGML_TYPE_F32, GGML_TYPE_Q4_0, GGML_OP_NONE, GGML_OP_DUP = 0, 2, 0, 1
MAX_SRC = 10
TENSOR_SIZE = 296  # sizeof(rpc_tensor), packed
MiB = 1 << 20


def rpc_tensor(*, id: int = 1, buffer: int = 0, data: int = 0, op: int = GGML_OP_NONE, ne=(1, 1, 1, 1),
               src: tuple[int, ...] = (), view_src: int = 0, type: int = GGML_TYPE_F32, nb=None) -> bytes:
    """One serialized rpc_tensor (f32 unless told)."""
    nb = nb or (4, 4 * ne[0], 4 * ne[0] * ne[1], 4 * ne[0] * ne[1] * ne[2])
    srcs = list(src) + [0] * (MAX_SRC - len(src))
    out = struct.pack("<QIQ4I4II16ii", id, type, buffer, *ne, *nb, op, *([0] * 16), 0)
    out += struct.pack(f"<{MAX_SRC}Q", *srcs) + struct.pack("<QQQ", view_src, 0, data)
    out += b"hostile".ljust(64, b"\0") + struct.pack("<i", 0)
    assert len(out) == TENSOR_SIZE
    return out


class Client:
    """A raw connection to a worker, after HELLO."""

    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        assert self.call(HELLO, bytes(24), 28)[:3] == bytes(rpc.RPC_PROTOCOL)

    def send(self, cmd: int, payload: bytes) -> None:
        self.sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def call(self, cmd: int, payload: bytes, reply: int) -> bytes:
        self.send(cmd, payload)
        (size,) = struct.unpack("<Q", self.recv(8))
        assert size == reply
        return self.recv(size)

    def buffer(self, size: int) -> tuple[int, int, int]:
        """(remote handle, base address, size) of a new buffer of at least `size` bytes on device 0."""
        handle, got = struct.unpack("<QQ", self.call(ALLOC_BUFFER, struct.pack("<IQ", 0, size), 16))
        assert handle and got >= size
        (base,) = struct.unpack("<Q", self.call(BUFFER_GET_BASE, struct.pack("<Q", handle), 8))
        return handle, base, got

    def closed_by_worker(self, timeout: float = 10) -> bool:
        """Whether the worker closes this connection within `timeout` (it sends nothing before)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def worker(patched_llama, tmp_path):
    if "rpc" not in patched_llama.info()["features"]:
        pytest.skip("the installed build has no RPC backend; run flashflex build")
    started: list[Worker] = []

    def start(mem: str = "64MiB", *extra: str) -> Worker:
        w = Worker(tmp_path / f"worker-{len(started)}.log", mem, 1, *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL)


def serves_the_next_client(w: Worker) -> None:
    """The worker is still up and a good client gets its devices."""
    assert w.proc.poll() is None, w.log.read_text()
    seen = rpc.probe(w.endpoint, timeout=10)
    assert seen.devices and seen.devices[0].total > 0
    assert w.proc.poll() is None


def rss(w: Worker) -> int:
    for line in Path(f"/proc/{w.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------------------------------
# C8: a tensor whose data lies outside its buffer


@pytest.mark.parametrize("where", ["below", "past the end", "wraps around"])
def test_a_tensor_outside_its_buffer_is_refused_not_fatal(worker, where):
    w = worker()
    c = Client(w.port)
    try:
        handle, base, size = c.buffer(4096)
        data = {"below": 16, "past the end": base + size - 2, "wraps around": (1 << 64) - 2}[where]
        c.send(GET_TENSOR, rpc_tensor(buffer=handle, data=data) + struct.pack("<QQ", 0, 4))
        assert c.closed_by_worker()
    finally:
        c.close()
    serves_the_next_client(w)
    assert "tensor data outside its buffer" in w.log.read_text()


# Beyond the review: tensors ggml itself would abort on, and a buffer larger than the device


U32 = (1 << 32) - 1


@pytest.mark.parametrize("case,tensor,needle", [
    ("a row of partial q4_0 blocks", dict(type=GGML_TYPE_Q4_0, ne=(5, 1, 1, 1), nb=(18, 18, 18, 18)),
     "rows are not whole blocks"),
    ("a size that wraps 64 bits", dict(ne=(U32, U32, U32, U32), nb=(4, U32, U32, U32)), "tensor too large"),
])
def test_a_tensor_ggml_would_abort_on_is_refused(worker, case, tensor, needle):
    w = worker()
    c = Client(w.port)
    try:
        handle, base, _ = c.buffer(4096)
        c.send(GET_TENSOR, rpc_tensor(buffer=handle, data=base, **tensor) + struct.pack("<QQ", 0, 4))
        assert c.closed_by_worker()
    finally:
        c.close()
    serves_the_next_client(w)
    assert needle in w.log.read_text()


def test_a_buffer_larger_than_the_device_is_answered_as_a_failed_allocation(worker):
    w = worker("64MiB")  # the cap: the announced memory plus 256 MiB
    before = rss(w)
    c = Client(w.port)
    try:
        for size in (1 << 40, (1 << 64) - 1):
            handle, got = struct.unpack("<QQ", c.call(ALLOC_BUFFER, struct.pack("<IQ", 0, size), 16))
            assert (handle, got) == (0, 0)
        assert c.buffer(4096)[0]  # the connection stays usable
    finally:
        c.close()
    assert rss(w) - before < 64 * MiB
    serves_the_next_client(w)
    assert "more than the device has" in w.log.read_text()


# --------------------------------------------------------------------------------------------------
# C9: GRAPH_COMPUTE with an unknown op, or sources and views that do not exist


def graph(nodes: list[int], tensors: list[bytes]) -> bytes:
    return (struct.pack("<II", 0, len(nodes)) + struct.pack(f"<{len(nodes)}Q", *nodes)
            + struct.pack("<I", len(tensors)) + b"".join(tensors))


@pytest.mark.parametrize("case,needle", [
    ("op 4000", "invalid op received: 4000"),
    ("op 2^32-1", "invalid op received: 4294967295"),
    ("missing source", "failed to create source node"),
    ("missing view source", "failed to create view_src node"),
    ("node id 0", "failed to create graph node"),
    ("node outside its buffer", "tensor data outside its buffer"),
])
def test_a_bad_graph_is_refused_not_fatal(worker, case, needle):
    w = worker()
    c = Client(w.port)
    try:
        handle, base, size = c.buffer(MiB)
        a = dict(buffer=handle, data=base)
        tensors = {
            "op 4000": [rpc_tensor(op=4000, **a)],
            "op 2^32-1": [rpc_tensor(op=(1 << 32) - 1, **a)],
            "missing source": [rpc_tensor(op=GGML_OP_DUP, src=(999,), **a)],
            "missing view source": [rpc_tensor(op=GGML_OP_DUP, view_src=999, **a)],
            "node id 0": [rpc_tensor(**a)],
            "node outside its buffer": [rpc_tensor(op=GGML_OP_DUP, src=(2,), buffer=handle, data=base + size),
                                        rpc_tensor(id=2, **a)],
        }[case]
        c.send(GRAPH_COMPUTE, graph([0 if case == "node id 0" else 1], tensors))
        assert c.closed_by_worker()
    finally:
        c.close()
    serves_the_next_client(w)
    assert needle in w.log.read_text()


# --------------------------------------------------------------------------------------------------
# X4: a length prefix far beyond what the worker holds


def test_a_length_beyond_the_workers_memory_is_refused_at_once(worker):
    w = worker("64MiB")  # the cap: the largest device's announced memory plus 256 MiB
    before = rss(w)
    for size in (4 << 30, 1 << 62):
        c = Client(w.port)
        try:
            c.sock.sendall(bytes([SET_TENSOR]) + struct.pack("<Q", size))
            assert c.closed_by_worker()
        finally:
            c.close()
    assert rss(w) - before < 64 * MiB
    serves_the_next_client(w)
    assert "Failed to allocate input buffer of size 4294967296" in w.log.read_text()


def test_a_claimed_length_costs_memory_only_as_its_data_arrives(worker):
    """Under the cap (a worker announcing 8 GiB), a 4 GiB claim with no data behind it: the worker reads in chunks
    and grows by one chunk (64 MiB), not by the 4 GiB it was promised; the connection stays usable until closed."""
    w = worker("8GiB")
    before = rss(w)
    c = Client(w.port)
    try:
        c.sock.sendall(bytes([SET_TENSOR]) + struct.pack("<Q", 4 << 30) + bytes(MiB))
        time.sleep(1.0)
        grew = rss(w) - before
        assert w.proc.poll() is None
        assert grew < 200 * MiB, f"the worker grew by {grew / MiB:.0f} MiB for a 4 GiB claim with 1 MiB of data"
    finally:
        c.close()
    serves_the_next_client(w)


# --------------------------------------------------------------------------------------------------
# X5: a connection that never says HELLO holds the worker no longer than --hello-timeout (10 s by default), a
# client idle after it no longer than --client-timeout


@pytest.mark.parametrize("after_hello", [False, True])
def test_an_idle_connection_holds_the_worker_only_until_its_timeout(worker, after_hello):
    w = worker("64MiB", "--client-timeout" if after_hello else "--hello-timeout", "2")
    assert w.announcement["client_timeout_s" if after_hello else "hello_timeout_s"] == 2
    idle = Client(w.port) if after_hello else None
    raw = None if after_hello else socket.create_connection(("127.0.0.1", w.port), timeout=5)
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        serves_the_next_client(w)  # waits in the backlog until the idle one is dropped
        waited = time.monotonic() - t0
        assert waited < 6, f"a second client waited {waited:.1f}s behind an idle connection"
        if idle:
            assert idle.closed_by_worker(1)
        else:
            assert raw is not None
            raw.settimeout(1)
            assert raw.recv(1) == b""
            assert "stayed silent before HELLO, dropped" in w.log.read_text()
    finally:
        if idle:
            idle.close()
        if raw:
            raw.close()


def test_a_client_that_said_hello_may_idle_by_default(worker):
    """The client timeout is off unless asked for: a long-lived client (a serve session over --rpc) idles between
    requests. Only the HELLO has a deadline by default."""
    w = worker("64MiB")
    assert w.announcement["client_timeout_s"] is None
    assert w.announcement["hello_timeout_s"] == 10
    assert "no authentication" in w.log.read_text()  # on loopback too
    idle = Client(w.port)
    try:
        time.sleep(0.2)
        with pytest.raises(FlashflexError, match="did not answer the handshake"):
            rpc.probe(w.endpoint, timeout=1.5)  # not dropped: the worker is busy with the idle client
        assert not idle.closed_by_worker(0.5)
    finally:
        idle.close()
    serves_the_next_client(w)


# --------------------------------------------------------------------------------------------------
# M11: a worker lost while the client loads the model (llama-cpp-python points fd 2 at /dev/null then)


class _HandshakeOnlyWorker:
    """Answers the check and ggml's registration (HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY, the buffer type's
    alignment and maximum size), then closes a connection at its first other command (an allocation): the client's
    model load is where that happens."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    @staticmethod
    def _client(conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            while True:
                head = conn.recv(9, socket.MSG_WAITALL)
                if len(head) < 9:
                    return
                cmd, size = head[0], struct.unpack("<Q", head[1:])[0]
                if size:
                    conn.recv(size, socket.MSG_WAITALL)
                reply = {HELLO: bytes(rpc.RPC_PROTOCOL) + bytes(25), DEVICE_COUNT: struct.pack("<I", 1),
                         GET_DEVICE_MEMORY: struct.pack("<QQ", 1 << 30, 1 << 30), GET_ALIGNMENT: struct.pack("<Q", 32),
                         GET_MAX_SIZE: struct.pack("<Q", 1 << 30)}.get(cmd)
                if reply is None:
                    return
                conn.sendall(struct.pack("<Q", len(reply)) + reply)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_worker_lost_during_the_load_still_gets_its_one_line(patched_llama, tmp_path):
    if "rpc" not in patched_llama.info()["features"]:
        pytest.skip("the installed build has no RPC backend; run flashflex build")
    model = synth.write_synth_model(synth.preset("tiny-dense", quant="q8_0", n_embd=512, n_ff=1536),
                                    tmp_path / "m.gguf")
    fake = _HandshakeOnlyWorker()
    try:
        env = dict(os.environ)
        env.pop("FLASHFLEX_DEBUG", None)
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", "run", "-m", str(model), "--rpc", f"127.0.0.1:{fake.port}",
             "--rpc-layers", "2", "--ctx", "256", "-n", "2", "-t", "1", "--prompt", "hi"],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    finally:
        fake.close()
    assert result.returncode == 1, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and "stopped answering during the run" in lines[-1] and f"127.0.0.1:{fake.port}" in lines[-1], \
        result.stderr
