"""Layers on other machines through ggml's RPC backend, on loopback: the worker (`flashflex rpc-server`), the check
of each worker before loading, the placement, exactness against stock with the same workers and layer split, and
bad input (malformed addresses, nothing listening, a silent or foreign server, a worker killed mid-run).

Every worker is started by its test on a free port of 127.0.0.1 and killed after it; every command has a timeout.
Runs that use a worker happen in subprocesses (the `flashflex` command, or a short script): ggml's RPC client keeps
its connection for the life of the process, and a worker serves one client at a time.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator import rpc, synth
from orchestrator.config import load_run_config
from orchestrator.errors import FlashflexError
from orchestrator.modelfile.reader import read_model_table
from orchestrator.planner.placement import DeviceMemory, local_table, place_layers
from tests.helpers import plan_config

from conftest import REPO, flashflex, one_error

CTX = 256
MiB = 1 << 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny dense models of tests/test_stream.py: a repacked quant (Q4_0) and a plain one (Q8_0), 4 layers."""
    out = tmp_path_factory.mktemp("rpc-dense")
    return {q: synth.write_synth_model(synth.preset("tiny-dense", quant=q, n_embd=512, n_ff=1536), out / f"{q}.gguf")
            for q in ("q4_0", "q8_0")}


# --------------------------------------------------------------------------------------------------
# Addresses and configuration (no library needed)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("localhost", "not HOST:PORT"),
    (":50052", "not HOST:PORT"),
    ("host:", "port must be a number"),
    ("host:port", "port must be a number"),
    ("host:0", "port must be a number"),
    ("host:70000", "port must be a number"),
    ("[::1]:50052", "IPv6"),
    ("::1:50052", "IPv6"),
    ("bad host:50052", "not a host name"),
    ("host/x:50052", "not a host name"),
])
def test_malformed_addresses_are_refused(text, needle):
    with pytest.raises(FlashflexError, match=needle):
        rpc.parse_endpoint(text)


def test_address_lists():
    assert rpc.parse_endpoints("127.0.0.1:50052, gpu-box.lan:7000") == ["127.0.0.1:50052", "gpu-box.lan:7000"]
    assert rpc.parse_endpoints(["a:1", "b:02"]) == ["a:1", "b:2"]
    with pytest.raises(FlashflexError, match="listed twice"):
        rpc.parse_endpoints("a:1,a:01")
    with pytest.raises(FlashflexError, match="at most 16"):
        rpc.parse_endpoints([f"h{i}:1" for i in range(17)])


def test_rpc_config_section():
    cfg = load_run_config(None, {"rpc.servers": "127.0.0.1:50052,127.0.0.1:50053", "rpc.layers": 2})
    assert cfg.rpc.servers == ["127.0.0.1:50052", "127.0.0.1:50053"] and cfg.rpc.layers == 2
    assert load_run_config(None).rpc.servers == []
    with pytest.raises(FlashflexError, match=r"rpc.servers.*not HOST:PORT"):
        load_run_config(None, {"rpc.servers": "nocolon"})
    with pytest.raises(FlashflexError, match=r"rpc.layers.*lists none"):
        load_run_config(None, {"rpc.layers": 2})


@pytest.mark.parametrize("value", ["nocolon", "1.2.3.4:99999", "a:1,a:1", "", "[::1]:5"])
def test_malformed_rpc_flag_is_one_line(dense_models, value):
    result = flashflex("run", "-m", str(dense_models["q8_0"]), "--rpc", value, "-n", "1", timeout=60)
    one_error(result, "rpc")


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_bench_takes_rpc_workers_and_refuses_a_malformed_one(kind):
    result = flashflex("bench", kind, "--rpc", "nocolon", "--model", str(REPO / "README.md"), timeout=60)
    one_error(result, "RPC worker 'nocolon' is not HOST:PORT")


# --------------------------------------------------------------------------------------------------
# Placement (pure)


def _split_devices(plan) -> list[int]:
    """Which device llama.cpp gives each layer and the output layer for a plan's n_gpu_layers / tensor_split (its
    load_tensors arithmetic, in float32), -1 for the CPU."""
    n_layer = plan.local_layers + plan.remote_layers
    splits = np.cumsum(np.array(plan.tensor_split, dtype=np.float32), dtype=np.float32)
    splits = (splits / splits[-1]).astype(np.float32)
    start = max(n_layer + 1 - plan.n_gpu_layers, 0)
    act = min(plan.n_gpu_layers, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(-1)
        else:
            out.append(int(np.searchsorted(splits, np.float32(il - start) / np.float32(act), side="right")))
    return out


def _fake(n: int, mem: int) -> list[DeviceMemory]:
    return [DeviceMemory(f"10.0.0.{i + 1}:50052", 0, mem, mem) for i in range(n)]


@pytest.mark.parametrize("n_workers,mem,layers", [(1, 64 * MiB, None), (1, 10 * MiB, None), (2, 9 * MiB, None),
                                                  (2, 64 * MiB, None), (3, 64 * MiB, 3), (2, 64 * MiB, 1)])
def test_llama_cpp_places_each_layer_where_the_plan_says(dense_models, n_workers, mem, layers):
    table = read_model_table(dense_models["q4_0"])
    plan, _ = place_layers(table, _fake(n_workers, mem), ctx=CTX, ubatch=32, layers=layers)
    expected = [-1] * plan.local_layers
    for i, d in enumerate(plan.devices):
        assert d.first_layer == len(expected)
        expected += [i] * d.n_layers
        assert d.used_bytes <= d.free_bytes
    expected.append(len(plan.devices) - 1)  # the output layer goes with the last device
    assert _split_devices(plan) == expected
    assert plan.devices[-1].output and not any(d.output for d in plan.devices[:-1])
    if layers is not None:
        assert plan.remote_layers == layers


def test_placement_fills_the_workers_and_keeps_the_rest_here(dense_models):
    table = read_model_table(dense_models["q4_0"])
    everything, _ = place_layers(table, _fake(1, 1 << 30), ctx=CTX, ubatch=32)
    assert everything.local_layers == 0 and everything.remote_layers == 4
    two, _ = place_layers(table, _fake(1, 10 * MiB), ctx=CTX, ubatch=32)
    assert two.remote_layers == 2 and two.local_layers == 2
    balanced, _ = place_layers(table, _fake(2, 1 << 30), ctx=CTX, ubatch=32)
    assert [d.n_layers for d in balanced.devices] == [2, 2]
    local = local_table(table, two.local_layers)
    assert {t.layer for t in local.tensors} == {None, 0, 1}
    assert not any(t.name.startswith("output") for t in local.tensors)
    assert local.arch.n_layer == 2


def test_placement_refusals_say_how_many_fit(dense_models):
    table = read_model_table(dense_models["q4_0"])
    with pytest.raises(FlashflexError, match="holds no layer"):
        place_layers(table, _fake(1, 4 * MiB), ctx=CTX, ubatch=32)
    with pytest.raises(FlashflexError, match="holds 2 of .* not --rpc-layers 3"):
        place_layers(table, _fake(1, 10 * MiB), ctx=CTX, ubatch=32, layers=3)
    with pytest.raises(FlashflexError, match="exceeds the 4 layers"):
        place_layers(table, _fake(1, 1 << 30), ctx=CTX, ubatch=32, layers=5)


def test_experts_stay_here_in_a_bank_mode(moe_models):
    table = read_model_table(moe_models["qwen3moe"][0])
    cfg = load_run_config(None, {"context.ctx": CTX, "context.ubatch": 32, "budget.size": "64MiB",
                                 "moe.mode": "slot-bank", "moe.slot_bank": 8, "rpc.servers": "10.0.0.1:50052"})
    worker = rpc.Worker("10.0.0.1:50052", rpc.RPC_PROTOCOL, [rpc.WorkerDevice(0, 1 << 30, 1 << 30)])
    plan = plan_config(table, cfg, workers=[worker])
    assert plan.rpc.experts_here and plan.rpc.remote_layers == table.arch.n_layer and plan.rpc.local_layers == 0
    experts = {t.name for t in table.tensors if "_exps." in t.name}
    assert experts and {t.name for t in plan.tensors if t.placement == "bank"} == experts  # every layer's, here
    assert plan.rpc.remote_weight_bytes + plan.rpc.local_model_bytes >= table.total_bytes
    assert not any(t.layer is not None and "_exps." not in t.name for t in plan.tensors)
    stock = plan_config(table, load_run_config(None, {"context.ctx": CTX, "rpc.servers": "10.0.0.1:50052"}),
                         workers=[worker])
    assert not stock.rpc.experts_here and not stock.rpc.cpu_tensors  # stock: experts go with their layers
    assert stock.rpc.remote_weight_bytes > plan.rpc.remote_weight_bytes


def test_the_budget_plans_only_what_stays_here(dense_models):
    table = read_model_table(dense_models["q4_0"])
    cfg = load_run_config(None, {"context.ctx": CTX, "context.ubatch": 32, "budget.size": "9MiB",
                                 "prefetch.window": 1, "rpc.servers": "10.0.0.1:50052", "rpc.layers": 1})
    worker = rpc.Worker("10.0.0.1:50052", rpc.RPC_PROTOCOL, [rpc.WorkerDevice(0, 10 * MiB, 10 * MiB)])
    plan = plan_config(table, cfg, workers=[worker])
    assert plan.rpc is not None and plan.rpc.local_layers == 3 and plan.n_layer == 4
    assert {lp.layer for lp in plan.layers} == {0, 1, 2}
    streamed = {t.layer for t in plan.tensors if t.placement == "streamed"}
    assert streamed and streamed <= {0, 1, 2}  # only local layers stream
    assert not any(t.layer == 3 for t in plan.tensors)
    assert plan.used_bytes <= plan.budget_bytes


# --------------------------------------------------------------------------------------------------
# The check before loading, against servers that misbehave (no library needed)


class _FakeServer:
    """A TCP server on 127.0.0.1 that does `behaviour` with each connection: "silent" (accept, never answer),
    "close" (accept and close), or a protocol version tuple it answers HELLO with."""

    def __init__(self, behaviour):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.behaviour = behaviour
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        if self.behaviour == "close":
            conn.close()
        elif isinstance(self.behaviour, tuple):
            conn.recv(1 + 8 + 24)
            conn.sendall(struct.pack("<Q", 28) + bytes(self.behaviour) + bytes(25))
        elif self.behaviour == "http":  # an HTTP server on the port given to --rpc
            conn.recv(1 + 8 + 24)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("behaviour,needle", [
    ("silent", "did not answer the handshake within 0.5s"),
    ("close", "closed the connection during the handshake"),
    ((6, 0, 0), "speaks ggml RPC protocol 6.0.0"),
    ((7, 9, 0), "speaks ggml RPC protocol 7.9.0"),
    ("http", "is not an RPC worker: it answered the handshake with 'HTTP/1.1'"),
])
def test_a_server_that_is_not_a_compatible_worker_is_named(behaviour, needle):
    server = _FakeServer(behaviour)
    try:
        t0 = time.monotonic()
        with pytest.raises(FlashflexError, match=needle) as info:
            rpc.probe(f"127.0.0.1:{server.port}", timeout=0.5)
        assert f"127.0.0.1:{server.port}" in str(info.value)
        assert time.monotonic() - t0 < 5
    finally:
        server.close()


def test_nothing_listening_is_named():
    port = free_port()
    with pytest.raises(FlashflexError, match=f"RPC worker 127.0.0.1:{port} refused the connection"):
        rpc.probe(f"127.0.0.1:{port}", timeout=1)


def test_plan_with_a_port_nobody_listens_on_is_one_line(dense_models):
    port = free_port()
    result = flashflex("plan", str(dense_models["q8_0"]), "--rpc", f"127.0.0.1:{port}", timeout=60)
    one_error(result, f"127.0.0.1:{port}", "refused")


# --------------------------------------------------------------------------------------------------
# Workers (native)


class Worker:
    """`flashflex rpc-server` on a free port of 127.0.0.1, its announcement read from stdout."""

    def __init__(self, log: Path, mem: str = "64MiB", threads: int = 1, *extra: str):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ)
        env.pop("FLASHFLEX_DEBUG", None)
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "rpc-server", "--port", str(self.port), "--mem", mem,
                 "-t", str(threads), "--json", *extra],
                stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env)
        self.announcement = json.loads(self._read_stdout(60) or "null")

    def _read_stdout(self, timeout: float) -> str:
        """Everything on stdout until the worker moves its stdout to stderr (EOF), within `timeout`."""
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return data.decode()
                data += chunk
        self.stop()
        raise AssertionError(f"the worker did not announce itself within {timeout}s: {self.log.read_text()}")

    def accepted(self) -> int:
        return self.log.read_text().count("Accepted client connection")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture
def workers(patched_llama, tmp_path):
    if "rpc" not in patched_llama.info()["features"]:
        pytest.skip("the installed build has no RPC backend; run flashflex build")
    started: list[Worker] = []

    def start(mem: str = "64MiB", threads: int = 1, *extra: str) -> Worker:
        w = Worker(tmp_path / f"worker-{len(started)}.log", mem, threads, *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL)



@pytest.mark.native
def test_the_library_speaks_the_protocol_the_check_expects(patched_llama):
    if "rpc" not in patched_llama.info()["features"]:
        pytest.skip("the installed build has no RPC backend")
    assert tuple(patched_llama.info()["rpc_protocol"]) == rpc.RPC_PROTOCOL


@pytest.mark.native
def test_worker_announces_its_devices_and_stops_cleanly(workers):
    w = workers(mem="96MiB")
    a = w.announcement
    assert a["endpoint"] == w.endpoint and a["protocol"] == "7.0.0" and a["threads"] == 1
    assert a["devices"] and a["devices"][0]["type"] == "cpu" and a["devices"][0]["announced"] == 96 * MiB
    seen = rpc.probe(w.endpoint, timeout=5)  # what a client sees: the announced memory
    assert seen.devices[0].total == 96 * MiB and seen.devices[0].free == 96 * MiB
    t0 = time.monotonic()
    assert w.stop(signal.SIGINT) == 0
    assert time.monotonic() - t0 < 5
    assert "stopped by SIGINT" in w.log.read_text()


def test_loopback_and_the_warning():
    from orchestrator.cli.rpc_cmd import UNSAFE_HOST_WARNING

    assert rpc.is_loopback("127.0.0.1") and rpc.is_loopback("127.3.0.1") and rpc.is_loopback("localhost")
    assert not rpc.is_loopback("0.0.0.0") and not rpc.is_loopback("192.168.1.10")
    assert "NO authentication" in UNSAFE_HOST_WARNING


def test_the_workers_lines_say_no_authentication_and_a_usable_address():
    """On loopback too the worker says it has no authentication; with --host 0.0.0.0 the client hint names no
    wildcard address (review M13)."""
    from orchestrator.cli.rpc_cmd import LOOPBACK_NOTE, client_hint

    assert "no authentication" in LOOPBACK_NOTE.format(endpoint="127.0.0.1:1")
    assert client_hint("127.0.0.1", 50052) == "clients: flashflex run --rpc 127.0.0.1:50052 ..."
    assert client_hint("192.168.1.10", 50052) == "clients: flashflex run --rpc 192.168.1.10:50052 ..."
    hint = client_hint("0.0.0.0", 50052)
    assert "0.0.0.0" not in hint and "ADDRESS:50052" in hint and "this machine's address" in hint


@pytest.mark.native
def test_worker_stops_on_sigterm_while_serving_a_client(workers, tmp_path):
    w = workers("auto", 1, "--cache-dir", str(tmp_path / "cache"))
    a = w.announcement
    assert a["announced_by"].startswith("auto") and 0 < a["devices"][0]["announced"] <= a["devices"][0]["total"]
    assert a["cache_dir"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    client = socket.create_connection(("127.0.0.1", w.port), timeout=5)  # a client that never says anything
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        assert w.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 5
    finally:
        client.close()


@pytest.mark.native
def test_worker_bad_input_is_one_line(workers):
    w = workers()
    one_error(flashflex("rpc-server", "--port", str(w.port), timeout=60), "cannot listen", str(w.port))
    one_error(flashflex("rpc-server", "--host", "localhost", timeout=60), "not an IPv4 address")
    one_error(flashflex("rpc-server", "--port", str(free_port()), "--mem", "lots", timeout=60), "--mem")


def _budget(model: Path, endpoint: str, layers: int, window: int, threads: int, ubatch: int) -> int:
    """The planner's minimum local budget for this split: the most the local part can stream."""
    table = read_model_table(model)
    cfg = load_run_config(None, {"context.ctx": CTX, "context.ubatch": ubatch, "context.batch": 64,
                                 "budget.size": "1TiB", "prefetch.window": window, "prefetch.threads": threads,
                                 "rpc.servers": endpoint, "rpc.layers": layers})
    return plan_config(table, cfg, workers=[rpc.probe(endpoint, 5)]).minimum_budget_bytes


@pytest.mark.native
@pytest.mark.parametrize("quant,ubatch,threads", [("q4_0", 32, 2), ("q4_0", 1, 0), ("q8_0", 32, 0)])
def test_layers_on_a_worker_and_local_layers_streamed_are_bitwise_exact(workers, dense_models, quant, ubatch,
                                                                          threads):
    """Stock llama.cpp with the worker and the layer split vs flashflex with the same placement, whose local layers
    stream under the minimum budget: the same logits, bit for bit."""
    w = workers(mem="64MiB")
    model = dense_models[quant]
    budget = _budget(model, w.endpoint, layers=1, window=1, threads=threads, ubatch=ubatch)
    common = ["--model", str(model), "--rpc", w.endpoint, "--rpc-layers", "1", "--budget", f"{budget}B",
              "-tp", str(threads), "--prefetch-window", "1", "--ctx", str(CTX), "--ubatch", str(ubatch), "-t", "1"]
    result = flashflex("verify-exact", *common, "--tokens", "40", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["identical"] and out["mode"] == "dense-stream" and out["max_abs_diff"] == 0.0, out

    run = flashflex("run", *common, "-n", "4", "--json", timeout=300)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    assert stats["mode"] == "dense-stream" and stats["decode"]["bytes_read"] > 0
    placed = stats["rpc"]["devices"]
    assert stats["rpc"]["local_layers"] == 3 and placed[0]["first_layer"] == 3 and placed[0]["output"]
    remote = [d for d in stats["devices"] if d["device"].startswith("RPC")]
    assert len(remote) == 1 and remote[0]["description"] == w.endpoint
    # llama.cpp put exactly the planned weights (layer 3 and the output layer) on the worker
    assert remote[0]["model"] == placed[0]["weight_bytes"]
    assert remote[0]["context"] > 0  # its layer's KV cache lives there too


@pytest.mark.native
def test_the_split_is_real_stock_here_and_stock_split_differ(workers, dense_models, tmp_path):
    """The worker's CPU backend computes Q4_0 without the repacked layout this host uses, so moving a layer there
    changes the logits' last bits: proof that the comparison above compares two placements that really split."""
    w = workers(mem="64MiB")
    script = tmp_path / "compare.py"
    script.write_text(f"""
import json
from orchestrator import api, exact
model = {str(dense_models["q4_0"])!r}
opts = dict(ctx={CTX}, ubatch=32, threads=1)
tokens = exact.teacher_tokens(24, 512)
here = api.prepare(model=model, **opts)
split = api.prepare(model=model, rpc={w.endpoint!r}, rpc_layers=2, **opts)
a = exact.logits(here.stock(), tokens)
b = exact.logits(split.stock(), tokens)
print(json.dumps(exact.compare(a, b).to_dict()))
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["identical"] and 0 < result["max_abs_diff"] < 1.0, result  # the same model, other kernels


@pytest.mark.native
def test_python_api_takes_rpc(workers, dense_models, tmp_path):
    w = workers(mem="64MiB")
    script = tmp_path / "api.py"
    script.write_text(f"""
import json
import orchestrator as ff
with ff.llama({str(dense_models["q8_0"])!r}, rpc={w.endpoint!r}, rpc_layers=2, ctx={CTX}, ubatch=32,
              threads=1) as llm:
    out = llm("hello", max_tokens=3, temperature=0)
    stats = llm.flashflex.stats()
print(json.dumps(stats["rpc"]))
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert placed["remote_layers"] == 2 and placed["devices"][0]["endpoint"] == w.endpoint


@pytest.mark.native
def test_nothing_listening_is_one_line_before_loading(patched_llama, dense_models):
    port = free_port()
    t0 = time.monotonic()
    result = flashflex("run", "-m", str(dense_models["q8_0"]), "--rpc", f"127.0.0.1:{port}", "-n", "1", timeout=60)
    one_error(result, f"RPC worker 127.0.0.1:{port}", "refused the connection")
    assert time.monotonic() - t0 < 30


@pytest.mark.native
def test_a_silent_server_is_one_line_within_the_timeout(patched_llama, dense_models):
    server = _FakeServer("silent")
    try:
        result = flashflex("verify-exact", "-m", str(dense_models["q8_0"]), "--rpc", f"127.0.0.1:{server.port}",
                           "--rpc-timeout", "1", timeout=60)
        one_error(result, f"127.0.0.1:{server.port}", "did not answer the handshake within 1s")
    finally:
        server.close()


@pytest.mark.native
def test_more_layers_than_the_workers_hold_is_one_line(workers, dense_models):
    w = workers(mem="10MiB")
    result = flashflex("run", "-m", str(dense_models["q4_0"]), "--rpc", w.endpoint, "--rpc-layers", "4", "--ctx",
                       str(CTX), "--ubatch", "32", "-n", "1", timeout=60)
    one_error(result, "holds 2 of", "--rpc-layers 4")


@pytest.mark.native
@pytest.mark.parametrize("family,mode,slots,layers,ubatch", [
    ("qwen3moe", "slot-bank", 8, None, 32),  # every layer's dense part on the worker, all experts banked here
    ("qwen3moe-q4_0", "slot-bank", 6, 2, 1),  # a repacked quant; layer 0 entirely here
    # a repacked quant, every layer on the worker, passes whose junk slot gets several pairs of a token (the
    # phantom slots of llama-flashflex-bank.cpp keep them inside mul_mat_id's row table)
    ("qwen3moe-q4_0", "slot-bank", 4, 3, 8),
    ("qwen2moe", "resident-bank", None, 1, 16),  # shared experts go with their layer
])
def test_moe_dense_parts_on_a_worker_experts_in_banks_here_are_bitwise_exact(workers, moe_models, family, mode, slots,
                                                                              layers, ubatch):
    """llama.cpp's --cpu-moe shape over RPC: each layer's attention, router (and shared experts) on the worker, its
    routed experts in this host's slot banks; exact against stock with the same workers, split and expert
    override."""
    w = workers(mem="256MiB")
    path, sidecar = moe_models[family]
    common = ["--model", str(path), "--moe-mode", mode, "--moe-sidecar", str(sidecar), "--rpc", w.endpoint,
              "--ctx", str(CTX), "--ubatch", str(ubatch), "-t", "1"]
    common += ["--moe-slot-bank", str(slots)] if slots else []
    common += ["--rpc-layers", str(layers)] if layers else []
    result = flashflex("verify-exact", *common, "--tokens", "40", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["identical"] and out["mode"].startswith(mode) and out["max_abs_diff"] == 0.0, out

    run = flashflex("run", *common, "-n", "4", "--json", timeout=300)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    placed = stats["rpc"]
    assert placed["experts_here"] and placed["cpu_tensors"]
    remote = [d for d in stats["devices"] if d["device"].startswith("RPC")]
    # the worker holds exactly the planned weights: no routed expert went there
    assert remote[0]["model"] == placed["devices"][0]["weight_bytes"]
    assert stats["moe"]["decode"] is not None
    if mode == "slot-bank":
        assert stats["moe"]["decode"]["calls"] > 0 and stats["moe"]["decode"]["slots"] == slots


@pytest.mark.native
def test_router_lookahead_with_layers_on_a_worker_keeps_the_routers_here_and_is_exact(workers, moe_models):
    """Router-lookahead applies layer L+1's router here to layer L's MoE input, so with layers on a worker the
    routers stay here with the experts (a second tensor override); exact against stock with the same placement."""
    w = workers(mem="256MiB")
    path, sidecar = moe_models["qwen3moe"]
    common = ["--model", str(path), "--moe-mode", "slot-bank", "--moe-slot-bank", "8", "--moe-sidecar", str(sidecar),
              "--moe-prefetch", "router-lookahead", "--rpc", w.endpoint, "--rpc-layers", "2", "--ctx", str(CTX),
              "--ubatch", "8", "-t", "1"]
    result = flashflex("verify-exact", *common, "--tokens", "40", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identical"], result.stdout
    run = flashflex("run", *common, "-n", "8", "--json", timeout=300)
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout)["stats"]
    placed = stats["rpc"]
    assert placed["routers_here"] and len(placed["cpu_tensors"]) == 2
    remote = [d for d in stats["devices"] if d["device"].startswith("RPC")]
    assert remote[0]["model"] == placed["devices"][0]["weight_bytes"]  # neither experts nor routers went there
    decode = stats["moe"]["decode"]
    assert decode["calls"] > 0 and decode.get("prefetch_issued", decode.get("prefetch_used", 0)) >= 0


def _worker_lost_mid_run(w, model: Path, lose, *extra: str) -> str:
    """A long run with its last layers on worker `w`; `lose(w)` once it generates. Returns the run's stderr after
    checking it ended with status 1, within 30 s, in one line naming the worker."""
    env = dict(os.environ)
    env.pop("FLASHFLEX_DEBUG", None)
    client = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-m", str(model), "--rpc", w.endpoint, "--rpc-layers", "2",
         *extra, "--ctx", "4096", "-ub", "32", "-n", "4000", "-t", "1", "--prompt", "hello"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while w.accepted() < 3 and client.poll() is None and time.monotonic() < deadline:  # 2 checks + ggml's
            time.sleep(0.1)
        assert client.poll() is None, client.communicate()
        time.sleep(1.0)  # generating now
        lose(w)
        t0 = time.monotonic()
        _, err = client.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "stopped answering during the run" in lines[-1] and w.endpoint in lines[-1], err
    return lines[-1]


@pytest.mark.native
def test_a_worker_killed_mid_run_ends_the_run_with_its_name(workers, dense_models):
    w = workers(mem="256MiB")
    last = _worker_lost_mid_run(w, dense_models["q8_0"], lambda w: w.stop(signal.SIGKILL))
    assert last.startswith(f"error: the RPC worker {w.endpoint} stopped answering during the run")


@pytest.mark.native
def test_a_frozen_worker_ends_the_run_within_the_answer_timeout(workers, dense_models):
    """A worker that stops answering without closing its connection (a frozen host: SIGSTOP here) would block
    ggml's client forever; --rpc-answer-timeout bounds each wait, and the run ends with one line naming it."""
    w = workers(mem="256MiB")
    try:
        _worker_lost_mid_run(w, dense_models["q8_0"], lambda w: w.proc.send_signal(signal.SIGSTOP),
                             "--rpc-answer-timeout", "2")
    finally:
        w.proc.send_signal(signal.SIGCONT)


def test_run_json_reports_the_bytes_over_rpc_measured(workers, dense_models):
    """The bytes each phase sent to and received from the workers, as the kernel counted them on ggml's
    connections: a decoded token moves its hidden state to the worker and the logits back, so the decode phase
    carries at least the logits of every token (n_vocab x 4 bytes) and far less than the worker's weights."""
    w = workers(mem="256MiB")
    model = dense_models["q8_0"]
    result = flashflex("run", "--model", str(model), "--rpc", w.endpoint, "--rpc-layers", "2", "--ctx", str(CTX),
                       "-ub", "32", "-t", "1", "-n", "8", "--prompt", "hello world", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    traffic = stats["rpc"]["traffic"]
    decode = traffic["decode"]
    n_vocab = next(t.shape[1] for t in read_model_table(model).tensors if t.name == "token_embd.weight")
    assert decode["tokens"] == 8
    # the logits came back from the worker (output layer): at least 7 decode passes' worth, since the first generated
    # token comes from the prompt's logits (seen: 14,392 bytes = 7 passes of 2,048 bytes and their framing)
    assert decode["bytes_received"] >= 7 * n_vocab * 4
    assert 0 < decode["bytes_sent"] < stats["rpc"]["devices"][0]["weight_bytes"]
    assert traffic["prompt"]["bytes_per_token"] > 0


def test_gpu_layers_without_a_gpu_or_a_worker_is_one_line(patched_llama, dense_models):
    """-ngl offloads to the accelerators present: a CPU-only build without --rpc has none."""
    if patched_llama.local_accelerators():
        pytest.skip("this build sees a local GPU device (a GPU build): -ngl has somewhere to go")
    result = flashflex("run", "-m", str(dense_models["q8_0"]), "-ngl", "2", "-n", "1", timeout=60)
    one_error(result, "--gpu-layers 2", "no GPU", "--rpc")


def test_gpu_layers_and_rpc_layers_together_are_one_line(dense_models):
    result = flashflex("run", "-m", str(dense_models["q8_0"]), "-ngl", "2", "--rpc", "127.0.0.1:1", "--rpc-layers",
                       "2", "-n", "1", timeout=60)
    one_error(result, "gpu.layers", "rpc.layers")


@pytest.mark.native
def test_gpu_layers_offload_to_rpc_devices_like_rpc_layers(workers, moe_models):
    """On a CPU-only build the accelerators present are the RPC workers' devices: -ngl N puts the last N layers
    there, the routed experts staying in this host's slot banks (the --cpu-moe shape), exact against stock with the
    same placement. (With a CUDA or Metal build this host's GPUs come first in the device list.)"""
    w = workers(mem="256MiB")
    path, sidecar = moe_models["qwen3moe"]
    common = ["--model", str(path), "--moe-mode", "slot-bank", "--moe-slot-bank", "8", "--moe-sidecar", str(sidecar),
              "--rpc", w.endpoint, "-ngl", "2", "--ctx", str(CTX), "--ubatch", "8", "-t", "1"]
    result = flashflex("verify-exact", *common, "--tokens", "24", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identical"], result.stdout
    run = flashflex("run", *common, "-n", "4", "--json", timeout=300)
    assert run.returncode == 0, run.stderr
    placed = json.loads(run.stdout)["stats"]["rpc"]
    assert placed["remote_layers"] == 2 and placed["experts_here"]
    assert [d["endpoint"] for d in placed["devices"]] == [w.endpoint]
    # 99 = every layer, as with llama.cpp's -ngl
    every = flashflex("plan", str(path), "--rpc", w.endpoint, "-ngl", "99", "--moe-mode", "slot-bank", "--budget",
                      "1GiB", "--ctx", str(CTX), "--json", timeout=120)
    assert every.returncode == 0, every.stderr
    assert json.loads(every.stdout)["rpc"]["local_layers"] == 0


@pytest.mark.native
def test_oracle_modes_with_layers_on_a_worker_are_exact(workers, moe_models, tmp_path):
    """A routing trace recorded with the dense parts on a worker replays there: oracle-all-hit and oracle-prefetch
    give logits bitwise identical to stock with the same placement."""
    w = workers(mem="256MiB")
    path, sidecar = moe_models["qwen3moe"]
    trace = tmp_path / "t.jsonl"
    common = ["--model", str(path), "--moe-sidecar", str(sidecar), "--rpc", w.endpoint, "--rpc-layers", "2",
              "--ctx", str(CTX), "--ubatch", "8", "-t", "1", "--moe-slot-bank", "6", "--moe-trace", str(trace),
              "--tokens", "24", "--json"]
    for mode in ("slot-bank", "oracle-all-hit", "oracle-prefetch"):  # record, then replay twice
        result = flashflex("verify-exact", *common, "--moe-mode", mode, timeout=300)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["identical"] and out["max_abs_diff"] == 0.0 and out["mode"].startswith(mode), out
    assert trace.exists()
