"""Benchmark bookkeeping: ratios against the same-budget stock run and the same-run roofline; the table."""

from __future__ import annotations

from orchestrator import bench


def _rec(mode, budget, tp, decode, streamed=None, bw=None):
    return {"mode": mode, "budget_bytes": budget, "prefetch_threads": tp, "status": "ok", "decode_tok_per_s": decode,
            "prompt_tok_per_s": decode * 4, "streamed_bytes_per_token": streamed, "read_bandwidth_bytes_per_s": bw,
            "model": "/m/dense.gguf", "model_bytes": 4 << 30, "machine": {"cores": 2, "ram_bytes": 24 << 30},
            "label": mode}


def test_ratios_use_the_same_budget_stock_run_and_the_measured_bandwidth():
    g = 1 << 30
    records = [_rec("stock-mmap", 2 * g, None, 0.2), _rec("flashflex", 2 * g, 2, 0.5, streamed=g, bw=g),
               _rec("stock-mmap", 3 * g, None, 0.4), _rec("flashflex", 3 * g, 2, 0.6, streamed=g // 2, bw=g)]
    bench._add_ratios(records)
    assert records[1]["decode_ratio_to_stock"] == 0.5 / 0.2
    assert records[3]["decode_ratio_to_stock"] == 0.6 / 0.4
    assert records[1]["roofline_tok_per_s"] == 1.0  # 1 GiB per token at 1 GiB/s
    assert records[1]["per_token_s_over_roofline"] == 2.0  # 2 s per token against a 1 s roofline
    assert "decode_ratio_to_stock" not in records[0]


def test_failed_runs_stay_in_the_table_with_their_status():
    records = [_rec("stock-mmap", 1 << 30, None, 0.1)]
    records.append({**_rec("flashflex", 1 << 30, 4, 0.0), "status": "killed (out of memory in the cgroup)"})
    bench._add_ratios(records)
    table = bench.markdown_table(records, {1: 1.2e9, 4: 1.1e9})
    assert "killed (out of memory in the cgroup)" in table
    assert "QD1 1.20 GB/s" in table and "QD4 1.10 GB/s" in table
    assert table.count("\n| ") == 1 + len(records)  # header + one row per run


def test_cgroup_detection_degrades_gracefully(monkeypatch):
    from orchestrator.bench import isolation

    monkeypatch.setattr(isolation.os, "geteuid", lambda: 1000)
    assert bench.cgroup_version() is None


def _moe(mode, decode, slots=None, miss_bytes=None, hit=None, budget=2 << 30):
    return {**_rec(mode, budget, None, decode, bw=1e9), "slot_bank": slots, "miss_bytes_per_token": miss_bytes,
            "hit_rate": hit, "io_threads": 4, "model": "/m/moe.gguf"}


def test_moe_ratios_use_stock_mmap_and_the_resident_plus_miss_roofline():
    records = [_moe("stock-resident", 10.0, budget=None), _moe("resident", 9.8, budget=None),
               _moe("stock-mmap", 0.5), _moe("slot-bank", 2.0, slots=16, miss_bytes=4e8, hit=0.4)]
    bench._add_moe_ratios(records)
    assert records[3]["decode_ratio_to_stock"] == 2.0 / 0.5
    assert records[1]["decode_ratio_to_stock"] == 9.8 / 10.0  # resident compares with stock resident
    # roofline: 0.1 s resident compute + 0.4 GB of misses at 1 GB/s = 0.5 s per token
    assert abs(records[3]["roofline_tok_per_s"] - 2.0) < 1e-9
    assert abs(records[3]["per_token_s_over_roofline"] - 1.0) < 1e-9
    assert "decode_ratio_to_stock" not in records[0] and "decode_ratio_to_stock" not in records[2]
    table = bench.moe_markdown(records)
    assert "40.0%" in table and "4.00" in table and table.count("\n| ") == 1 + len(records)


def test_bench_dense_takes_tp_auto_and_records_what_the_plan_chose(tmp_path, patched_llama):
    """`bench dense --tp auto` runs like `run -tp auto` (it used to stop with a ValueError); the record and the table
    say which thread count the plan chose."""
    import json

    from orchestrator import synth

    from conftest import flashflex

    # Large enough that a budget below its size still holds this process (~120 MiB) and a streaming ring.
    model = synth.write_synth_model(synth.preset("tiny-dense", n_layer=16, n_embd=1024, n_ff=4096),
                                    tmp_path / "dense.gguf")
    out = tmp_path / "out"
    budget = f"{model.stat().st_size * 7 // 8}B"
    r = flashflex("bench", "dense", "-m", str(model), "--budgets", budget, "--tp", "auto", "--gen-tokens", "2",
                  "--prompt-tokens", "2", "--no-cgroup", "--no-drop-caches", "--repeats", "1", "--out-dir", str(out),
                  "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)
    flex = [x for x in records if x["mode"] == "flashflex"]
    assert len(flex) == 1 and flex[0]["status"] == "ok", flex
    assert flex[0]["prefetch_threads_auto"] is True and isinstance(flex[0]["prefetch_threads"], int)
    assert flex[0]["read_bandwidth_bytes_per_s"] > 0
    # every run counts what it read from storage over decode (stock's mmap page-cache misses included)
    assert all(x["disk_read_bytes_per_token"] >= 0 for x in records if x["status"] == "ok")
    assert f"auto ({flex[0]['prefetch_threads']})" in (out / "results.md").read_text()


def test_bench_dense_refuses_a_bad_tp_in_one_line(tmp_path):
    from conftest import flashflex, one_error

    one_error(flashflex("bench", "dense", "--tp", "1,two", "--out-dir", str(tmp_path)), "--tp: 'two'", "auto")


def test_the_moe_roofline_divides_by_the_probe_or_what_the_run_itself_reached():
    """A probe slower than a run's own misses (issue 27: 0.87 GB/s against 1.55) would put time/roofline below 1:
    that run's roofline divides by its own miss bandwidth. Another run keeps its probe: on a host-cached disk a
    small bank re-reading popular experts is no roofline for a large bank reading rarer ones. The share of the probe
    the misses were read at is reported beside it."""
    slow, fast = _moe("slot-bank", 2.0, slots=16, miss_bytes=4e8, hit=0.4), _moe("slot-bank", 2.5, slots=32,
                                                                                  miss_bytes=2e8, hit=0.6)
    slow["miss_bandwidth_bytes_per_s"], fast["miss_bandwidth_bytes_per_s"] = 0.8e9, 2e9  # the probes said 1 GB/s
    records = [_moe("stock-resident", 10.0, budget=None), _moe("stock-mmap", 0.5), slow, fast]
    bench._add_moe_ratios(records)
    assert fast["roofline_bandwidth_bytes_per_s"] == 2e9 and fast["roofline_bandwidth_source"] == "the run"
    assert slow["roofline_bandwidth_bytes_per_s"] == 1e9 and slow["roofline_bandwidth_source"] == "probe"
    # 0.1 s resident compute + 0.4 GB at 1 GB/s = 0.5 s per token, as the run took; 0.1 + 0.2 GB at 2 GB/s = 0.2 s
    assert abs(slow["per_token_s_over_roofline"] - 1.0) < 1e-9
    assert abs(fast["per_token_s_over_roofline"] - 0.4 / 0.2) < 1e-9
    assert slow["miss_bandwidth_share_of_probe"] == 0.8 and fast["miss_bandwidth_share_of_probe"] == 2.0
    table = bench.moe_markdown(records)
    assert "| 0.80 GB/s | 1.00 GB/s | 80% |" in table and "| 2.00 GB/s | 1.00 GB/s | 200% |" in table


def test_the_moe_roofline_reads_the_dense_weights_a_plan_streams_too():
    """A bank the budget holds only by streaming dense weights (an explicit one) reads them beside its misses: the
    roofline counts both (16 slots of the top-4 shape at 1.5 GiB streamed 42 MB a token and looked 1.36x without)."""
    streaming = {**_moe("slot-bank", 2.0, slots=16, miss_bytes=3e8, hit=0.4), "bytes_read_per_token": 1e8}
    records = [_moe("stock-resident", 10.0, budget=None), streaming]
    bench._add_moe_ratios(records)
    # 0.1 s resident compute + (0.3 + 0.1) GB at 1 GB/s = 0.5 s, as the run took
    assert abs(streaming["per_token_s_over_roofline"] - 1.0) < 1e-9
    assert "| 286.1 | 95.4 |" in bench.moe_markdown(records)


def test_the_expert_probe_reads_whole_experts_of_banked_tensors(tmp_path, monkeypatch):
    """The probe reads as misses do: every banked tensor's slice of one expert of a layer, page-rounded, at the
    run's queue depth; different seeds read different experts."""
    from types import SimpleNamespace

    from orchestrator.bench import moe

    seen = []
    monkeypatch.setattr(moe, "parallel_direct_reads", lambda reads, qd: seen.append((reads, qd)) or 1.0)
    tensors = [SimpleNamespace(layer=layer, file=f"layer-{layer:03d}.bin", n_expert=8, offset=4096 * (1 + 100 * i),
                               expert_stride=8192) for layer in (0, 1) for i in range(3)]
    tensors.append(SimpleNamespace(layer=0, file="layer-000.bin", n_expert=1, offset=1 << 20, expert_stride=4096))
    manifest = SimpleNamespace(tensors=tensors)
    assert moe.expert_read_bandwidth(tmp_path, manifest, 4, seed=1, total_bytes=10 * 8192) == 1.0
    assert moe.expert_read_bandwidth(tmp_path, manifest, 4, seed=2, total_bytes=10 * 8192) == 1.0
    (reads, qd), (other, _) = seen
    assert qd == 4 and len(reads) == 12 and all(n == 8192 for _, _, n in reads)  # 4 experts x 3 tensors
    for i in range(0, 12, 3):  # one expert of one layer: its three tensors together, at the same expert index
        group = reads[i:i + 3]
        assert len({p.name for p, _, _ in group}) == 1
        assert len({(off - t.offset) // 8192 for (_, off, _), t in zip(group, [t for t in tensors if t.n_expert > 1
                    and t.file == group[0][0].name])}) == 1
    assert reads != other


def test_the_dense_roofline_never_divides_by_less_than_the_runs_reached():
    g = 1 << 30
    # the worker's records: bytes read per generated token (decode only); 1 GiB a token at 1.5 tok/s is 1.5 GiB/s,
    # faster than the probe
    quick = {**_rec("flashflex", 2 * g, 2, 1.5, streamed=g, bw=g), "bytes_read_per_token": g}
    other = {**_rec("flashflex", 3 * g, 2, 1.0, streamed=g, bw=g), "bytes_read_per_token": g}
    bench._add_ratios([_rec("stock-mmap", 2 * g, None, 0.5), quick, other])
    assert quick["roofline_bandwidth_source"] == "fastest run" and quick["roofline_bandwidth_bytes_per_s"] == 1.5 * g
    assert abs(quick["per_token_s_over_roofline"] - 1.0) < 1e-9  # at the roofline, not below it
    assert abs(other["per_token_s_over_roofline"] - 1.5) < 1e-9
    assert "the roofline divides by 1.61 GB/s" in bench.markdown_table([quick, other], {1: 1e9})


def test_points_are_measured_interleaved_and_the_median_run_reported():
    """Every point once, then again (drift hits every point alike); per point the run with the median speed, its
    repeats listed; a point whose runs all failed keeps its failure."""
    from orchestrator.bench.runs import Point, interleaved

    points = [Point("stock-mmap", 1 << 30), Point("flashflex", 1 << 30, 2), Point("flashflex", 1 << 30, 4)]
    speeds = iter([1.0, 5.0, None, 3.0, 4.0, None, 2.0, 6.0, None])
    order: list[Point] = []

    def measure(point: Point) -> dict:
        order.append(point)
        v = next(speeds)
        return {"status": "ok", "decode_tok_per_s": v, "tp": point.prefetch_threads} if v is not None else \
            {"status": "killed", "decode_tok_per_s": None, "tp": point.prefetch_threads}

    out = interleaved(points, 3, measure, lambda _: None)
    assert order == points * 3
    assert [r["decode_tok_per_s"] for r in out[:2]] == [2.0, 5.0]
    assert out[0]["repeats"] == [1.0, 3.0, 2.0] and out[1]["repeats"] == [5.0, 4.0, 6.0]
    assert out[2]["status"] == "killed" and out[2]["tp"] == 4



def test_disk_read_bytes_counts_what_came_from_storage_not_the_page_cache(tmp_path):
    """The worker's per-run "read from disk" is /proc/self/io read_bytes: a file read after its pages are dropped
    counts in full; read again from the page cache, nothing."""
    import os

    import pytest

    from orchestrator.llamacpp import disk_read_bytes

    if disk_read_bytes() is None:
        pytest.skip("this kernel does not report task I/O (/proc/self/io)")
    path = tmp_path / "blob"
    size = 8 << 20
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped, so the next read goes to storage
        before = disk_read_bytes()
        while os.read(fd, 1 << 20):
            pass
        cold = disk_read_bytes() - before
        os.lseek(fd, 0, os.SEEK_SET)
        before = disk_read_bytes()
        while os.read(fd, 1 << 20):
            pass
        warm = disk_read_bytes() - before
    finally:
        os.close(fd)
    if cold == 0:
        pytest.skip("storage reads are not accounted to tasks here (tmpfs, or a filesystem without block I/O)")
    assert cold >= size and warm == 0
