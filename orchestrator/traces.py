"""MoE routing traces: the file format, recording and replay checks, and bank modeling (`flashflex trace analyze`).

A trace is JSON Lines (docs/traces.md has the full schema):

- line 1, the header (TraceHeader): `format` "flashflex-moe-trace", `version`, the model it was recorded on (the
  sidecar's model identity: architecture, expert counts, fingerprint), the banked layers, and the settings that
  shape routing (`k` experts per token, `ubatch`) or hit rates (`slots`, `prefetch`, `mode`);
- every later line, one routed layer call (TraceRecord), written by the native runtime in the order the run
  resolves them: `seq` (0, 1, ...), `ubatch` (the runtime's ubatch counter), `layer`, `tokens` in the ubatch,
  `k`, then `ids`, `slots` and `hit`, each `tokens * k` long and token-major (pair i = token i // k, rank i % k).
  `hit` is 1 when the pair's expert was resident when the call resolved it (misses are read before compute).

A recording run writes to `TRACE.partial` and renames it over TRACE once the model is closed (fsynced), so an
interrupted run leaves no half-written trace under the name asked for.

Replay (the oracle modes) hands the records to the runtime as a schedule it checks call by call; a run whose
routing differs (another prompt, model or setting) stops with one line instead of replaying something else.

Bank modeling replays the recorded expert ids through simulated banks: LRU (the runtime's own policy, with its
slot and tie-breaking rules, so the simulated hit rate at the recorded bank size equals the recorded one), LFU and
Belady's optimal offline policy (evict the expert whose next use is farthest).
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Iterable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.errors import FlashflexError
from orchestrator.fsutil import fsync_dir
from orchestrator.sizes import format_size

FORMAT: Final = "flashflex-moe-trace"
VERSION = 2  # 2: the last line is an end record {"end": true, "records": N} (a cut trace is refused)
POLICIES = ("lru", "lfu", "belady")

RECORD_FIX = "record it again: flashflex run --moe-mode slot-bank --moe-trace FILE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TraceModel(_Strict):
    """The model a trace was recorded on (the sidecar manifest's identity)."""

    architecture: str
    n_expert: int
    n_expert_used: int
    n_layer: int
    fingerprint: str


class TraceHeader(_Strict):
    format: Literal["flashflex-moe-trace"]
    version: int
    model: TraceModel
    layers: list[int]  # the banked (routed) layers, in order
    k: int  # experts per token in this run (the model's, or a lossy --moe-topk)
    ubatch: int
    slots: int
    prefetch: str
    mode: str


class TraceRecord(_Strict):
    seq: int
    ubatch: int
    layer: int
    tokens: int
    k: int
    ids: list[int]
    slots: list[int]
    hit: list[int]


@dataclass
class Trace:
    path: Path
    header: TraceHeader
    records: list[TraceRecord]

    @property
    def tokens(self) -> int:
        """Tokens the run processed (counted at the first banked layer)."""
        first = self.header.layers[0] if self.header.layers else None
        return sum(r.tokens for r in self.records if r.layer == first)

    @property
    def decode_tokens(self) -> int:
        return len(decode_ubatches(self.records))

    def recorded_hits(self) -> tuple[int, int]:
        """(hits, misses) over distinct experts per call, as the runtime counts them."""
        hits = misses = 0
        for r in self.records:
            seen: dict[int, int] = {}
            for e, h in zip(r.ids, r.hit):
                seen.setdefault(e, h)
            hits += sum(seen.values())
            misses += len(seen) - sum(seen.values())
        return hits, misses

    def max_distinct_per_layer(self) -> int:
        """The most distinct experts any layer uses over the whole trace (what oracle-all-hit must hold)."""
        used: dict[int, set[int]] = {}
        for r in self.records:
            used.setdefault(r.layer, set()).update(r.ids)
        return max((len(s) for s in used.values()), default=0)


def _problem(path: Path, what: str) -> FlashflexError:
    return FlashflexError(f"{path}: {what}", RECORD_FIX)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def _require_trace_file(path: Path) -> None:
    if not path.exists():
        raise FlashflexError(f"routing trace {path} does not exist", RECORD_FIX)
    if path.is_dir():
        raise FlashflexError(f"routing trace {path} is a directory", "name the trace file (a .jsonl)")
    if not path.is_file():
        raise FlashflexError(f"routing trace {path} is not a regular file (a FIFO, device or socket)",
                             "name the trace file (a .jsonl)")


def read_header(path: Path) -> TraceHeader:
    """Just the header line (cheap, for checks before a run)."""
    path = Path(path)
    _require_trace_file(path)
    with open(path, "rb") as f:
        first = f.readline()
    return _parse_header(path, first)


def _parse_header(path: Path, line: bytes) -> TraceHeader:
    if not line.strip():
        raise _problem(path, "is empty, not a flashflex routing trace")
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _problem(path, "line 1 is not JSON: not a flashflex routing trace") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise _problem(path, f"line 1 is not a {FORMAT} header: not a flashflex routing trace")
    if raw.get("version") != VERSION:
        raise _problem(path, f"trace format version {raw.get('version')!r}; this flashflex reads version {VERSION}")
    try:
        return TraceHeader.model_validate(raw)
    except ValidationError as exc:
        raise _problem(path, f"bad header: {_first_error(exc)}") from None


def read_trace(path: Path) -> Trace:
    """Read and check a whole trace; any defect is one FlashflexError naming the line."""
    path = Path(path)
    _require_trace_file(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    header = _parse_header(path, lines[0])
    if data and not data.endswith(b"\n"):
        raise _problem(path, f"line {len(lines)} is incomplete: the trace is truncated")
    banked = set(header.layers)
    records: list[TraceRecord] = []
    end: dict | None = None
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if end is not None:
            raise _problem(path, f"line {n} follows the end record (lines appended to a finished trace)")
        if line.startswith(b'{"end"'):
            try:
                end = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise _problem(path, f"line {n} is not JSON (a truncated or edited trace)") from None
            if end.get("records") != len(records):
                raise _problem(path, f"the end record counts {end.get('records')} records, the file holds "
                                     f"{len(records)} (lines missing or added)")
            continue
        try:
            rec = TraceRecord.model_validate(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _problem(path, f"line {n} is not JSON (a truncated or edited trace)") from None
        except ValidationError as exc:
            raise _problem(path, f"line {n}: {_first_error(exc)}") from None
        pairs = rec.tokens * rec.k
        if rec.tokens < 1 or rec.k < 1 or not (len(rec.ids) == len(rec.slots) == len(rec.hit) == pairs):
            raise _problem(path, f"line {n}: ids, slots and hit must each hold tokens x k = {pairs} values")
        if rec.seq != len(records):
            raise _problem(path, f"line {n}: seq {rec.seq}, expected {len(records)} (lines missing or reordered)")
        if rec.layer not in banked:
            raise _problem(path, f"line {n}: layer {rec.layer} is not one of the header's banked layers")
        if rec.k != header.k:
            raise _problem(path, f"line {n}: k {rec.k} differs from the header's {header.k}")
        if any(e < 0 or e >= header.model.n_expert for e in rec.ids):
            raise _problem(path, f"line {n}: an expert id outside 0..{header.model.n_expert - 1}")
        if any(h not in (0, 1) for h in rec.hit):
            raise _problem(path, f"line {n}: hit values must be 0 or 1")
        for t in range(rec.tokens):
            picks = rec.ids[t * rec.k:(t + 1) * rec.k]
            if len(set(picks)) != len(picks):
                raise _problem(path, f"line {n}: token {t} lists expert {_repeated(picks)} twice (a router picks "
                                     "distinct experts: an edited trace)")
        records.append(rec)
    if end is None:
        raise _problem(path, "has no end record: the trace was cut short (or written by an interrupted run)")
    if not records:
        raise _problem(path, "holds a header but no routed layer calls (the run routed nothing?)")
    return Trace(path=path, header=header, records=records)


# ---------------------------------------------------------------------------------------------------------------
# Recording


def header_for(manifest: Any, *, k: int, ubatch: int, slots: int, prefetch: str, mode: str) -> TraceHeader:
    """The header of a trace recorded with this sidecar (orchestrator.sidecar.SidecarManifest) and settings."""
    m = manifest.model
    layers = sorted({t.layer for t in manifest.tensors if t.n_expert > 1})
    return TraceHeader(format=FORMAT, version=VERSION,
                       model=TraceModel(architecture=m.architecture, n_expert=m.n_expert,
                                        n_expert_used=m.n_expert_used, n_layer=m.n_layer, fingerprint=m.fingerprint),
                       layers=layers, k=k, ubatch=ubatch, slots=slots, prefetch=prefetch, mode=mode)


def _repeated(values: list[int]) -> int:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return -1


def partials_of(path: Path) -> list[Path]:
    """The temp files of recordings into `path` now on disk (`.NAME.PID.RANDOM.partial`, one per recording)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*.partial"))


def check_trace_destination(path: Path, force: bool) -> None:
    """Before a recording run: a file path whose parent exists, not a directory, device or FIFO, and not an
    existing trace unless `force`."""
    from orchestrator.fsutil import check_output_path

    if Path(path).is_dir():
        raise FlashflexError(f"--moe-trace {path} is a directory", "name a file, e.g. run.trace.jsonl")
    check_output_path(Path(path), force=force, flag="--force (or moe.trace_force: true)")


def begin_recording(path: Path, header: TraceHeader) -> Path:
    """A temp file of this recording's own beside TRACE (`.TRACE.PID.RANDOM.partial`, created exclusively, so two
    runs recording into one TRACE never share a file) with the header written; the runtime appends the records to
    it. Temp files of dead recorders are swept first. Returns its path."""
    import tempfile

    from orchestrator.fsutil import sweep_stale_partials

    path = Path(path)
    if path.is_dir():
        raise FlashflexError(f"--moe-trace {path} is a directory", "name a file, e.g. run.trace.jsonl")
    if not path.parent.is_dir():
        raise FlashflexError(f"cannot write the trace: {path.parent} does not exist", "create it or pick another path")
    sweep_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(header.model_dump_json() + "\n")
    return Path(tmp)


def finish_recording(path: Path, partial: Path, ok: bool) -> None:
    """Publish a recording's temp file as TRACE (its end record, fsync, rename) after a successful run; delete it
    after a failed one. Two recordings into one TRACE each publish a whole trace; the last one stays."""
    tmp = Path(partial)
    if not tmp.exists():
        return
    if not ok:
        tmp.unlink()
        return
    with open(tmp, "rb") as f:
        n_records = max(0, sum(1 for line in f if line.strip()) - 1)  # every line after the header
    with open(tmp, "a") as f:
        f.write(json.dumps({"end": True, "records": n_records}) + "\n")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


# ---------------------------------------------------------------------------------------------------------------
# Replay


def check_replay(trace: Trace, manifest: Any, *, k: int, ubatch: int) -> None:
    """Refuse (one line) a trace recorded on another model or with settings that change the routing."""
    h, m = trace.header, manifest.model
    fix = "replay a trace recorded on this model with the same settings (flashflex run --moe-trace FILE)"
    if h.model.fingerprint != m.fingerprint or h.model.architecture != m.architecture or \
            h.model.n_expert != m.n_expert:
        raise FlashflexError(f"routing trace {trace.path} was recorded on another model "
                             f"({h.model.architecture}, {h.model.n_expert} experts, fingerprint "
                             f"{h.model.fingerprint[:12]}; this one: {m.architecture}, {m.n_expert} experts, "
                             f"{m.fingerprint[:12]})", fix)
    layers = sorted({t.layer for t in manifest.tensors if t.n_expert > 1})
    if h.layers != layers:
        raise FlashflexError(f"routing trace {trace.path} banks layers {h.layers}, this sidecar {layers}", fix)
    if h.k != k:
        raise FlashflexError(f"routing trace {trace.path} was recorded with {h.k} experts per token, this run uses {k}",
                             "use the same --moe-topk")
    if h.ubatch != ubatch:
        raise FlashflexError(f"routing trace {trace.path} was recorded with ubatch {h.ubatch}, this run uses {ubatch}",
                             f"use --ubatch {h.ubatch}")


def schedule(records: Iterable[TraceRecord]) -> list[int]:
    """The runtime's replay schedule: layer, n, n expert ids, ... in record order."""
    out: list[int] = []
    for r in records:
        out += [r.layer, len(r.ids), *r.ids]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Bank modeling


@dataclass
class SimResult:
    policy: str
    k: int
    slots: int
    hits: int = 0
    misses: int = 0
    tokens: int = 0
    decode_hits: int = 0
    decode_misses: int = 0
    decode_tokens: int = 0
    bytes_per_expert: int | None = None  # all banked tensors of one layer

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def decode_hit_rate(self) -> float:
        n = self.decode_hits + self.decode_misses
        return self.decode_hits / n if n else 0.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0

    @property
    def decode_misses_per_token(self) -> float:
        return self.decode_misses / self.decode_tokens if self.decode_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(hit_rate=self.hit_rate, decode_hit_rate=self.decode_hit_rate,
                   misses_per_token=self.misses_per_token, decode_misses_per_token=self.decode_misses_per_token)
        if self.bytes_per_expert is not None:
            out["bytes_per_token"] = self.misses_per_token * self.bytes_per_expert
            out["decode_bytes_per_token"] = self.decode_misses_per_token * self.bytes_per_expert
        return out


@dataclass
class _Bank:
    """One layer's bank as the runtime keeps it: slot -> expert, LRU stamps, victims by (stamp, slot index)."""

    n: int
    slot_expert: list[int] = field(default_factory=list)
    stamp: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slot_expert = [-1] * self.n
        self.stamp = [0] * self.n
        self.where: dict[int, int] = {}


def decode_ubatches(records: list[TraceRecord]) -> set[int]:
    """The ubatches of one token, judged at the first layer (llama.cpp trims a prompt's last layer to the
    tokens whose logits are wanted, so a prompt's last-layer call may have one token too)."""
    first = min((r.layer for r in records), default=None)
    return {r.ubatch for r in records if r.layer == first and r.tokens == 1}


def _calls_by_layer(records: list[TraceRecord], k: int) -> dict[int, list[tuple[int, list[int]]]]:
    """Per layer: (ubatch, distinct experts in first-use order) of each call, keeping each token's first k ids."""
    out: dict[int, list[tuple[int, list[int]]]] = {}
    for r in records:
        distinct: dict[int, None] = {}
        for t in range(r.tokens):
            for e in r.ids[t * r.k: t * r.k + min(k, r.k)]:
                distinct.setdefault(e, None)
        out.setdefault(r.layer, []).append((r.ubatch, list(distinct)))
    return out


def simulate(records: list[TraceRecord], policy: str, slots: int, k: int | None = None,
             bytes_per_expert: int | None = None) -> SimResult:
    """Replay the trace's expert ids through one bank of `slots` per layer under `policy` (lru, lfu, belady).

    Each call reserves its resident experts, then fills misses into victims chosen by the policy among the other
    slots; a call with more distinct experts than slots runs in groups of at most `slots` (resident ones first),
    as the runtime's passes do. With k below the recorded k each token keeps its first k ids (the router's top
    ranks): an estimate of a lossy --moe-topk, whose later routing would differ."""
    if policy not in POLICIES:
        raise FlashflexError(f"unknown bank policy {policy!r}", f"use one of: {', '.join(POLICIES)}")
    k = k or (records[0].k if records else 1)
    res = SimResult(policy=policy, k=k, slots=slots, bytes_per_expert=bytes_per_expert)
    decode_set = decode_ubatches(records)
    first = min((r.layer for r in records), default=None)
    res.tokens = sum(r.tokens for r in records if r.layer == first)
    res.decode_tokens = len(decode_set)
    clock = 0
    for calls in _calls_by_layer(records, k).values():
        bank = _Bank(slots)
        freq: dict[int, int] = {}
        # Belady: the calls each expert is used in, to find its next use after any call
        uses: dict[int, list[int]] = {}
        for i, (_, experts) in enumerate(calls):
            for e in experts:
                uses.setdefault(e, []).append(i)
        for i, (ubatch, experts) in enumerate(calls):
            decode = ubatch in decode_set
            resident = [e for e in experts if e in bank.where]
            ordered = resident + [e for e in experts if e not in bank.where]
            for g in range(0, len(ordered), slots):
                group = ordered[g: g + slots]
                reserved = [False] * slots
                misses = []
                for e in group:
                    if e in bank.where:
                        reserved[bank.where[e]] = True
                    else:
                        misses.append(e)
                for e in misses:
                    victim = _victim(bank, reserved, policy, freq, uses, i)
                    reserved[victim] = True
                    old = bank.slot_expert[victim]
                    if old >= 0:
                        del bank.where[old]
                    bank.slot_expert[victim] = e
                    bank.where[e] = victim
                clock += 1
                for e in group:
                    bank.stamp[bank.where[e]] = clock
                    freq[e] = freq.get(e, 0) + 1
                hits = len(group) - len(misses)
                res.hits += hits
                res.misses += len(misses)
                if decode:
                    res.decode_hits += hits
                    res.decode_misses += len(misses)
    return res


def _next_use(uses: dict[int, list[int]], e: int, after: int) -> int:
    """The first call after `after` that uses expert e (never: a huge number)."""
    calls = uses.get(e, [])
    j = bisect.bisect_right(calls, after)
    return calls[j] if j < len(calls) else 1 << 60


def _victim(bank: _Bank, reserved: list[bool], policy: str, freq: dict[int, int], uses: dict[int, list[int]],
            call: int) -> int:
    best, best_key = -1, None
    for s in range(bank.n):
        if reserved[s]:
            continue
        e = bank.slot_expert[s]
        if policy == "lru":
            key: tuple = (bank.stamp[s],)
        elif policy == "lfu":
            key = (freq.get(e, 0) if e >= 0 else -1, bank.stamp[s])
        else:  # belady: empty slots first, then the expert used farthest in the future (never = farthest)
            key = (0 if e < 0 else 1, -_next_use(uses, e, call) if e >= 0 else 0)
        if best_key is None or key < best_key:
            best, best_key = s, key
    return best


def default_banks(k: int, n_expert: int) -> list[int]:
    """Bank sizes to model: k up to every expert, about ten steps."""
    step = max(1, (n_expert - k) // 10)
    return sorted({*range(k, n_expert, step), n_expert})


def layer_expert_bytes(manifest: Any) -> int:
    """Bytes of one expert over all routed tensors of one layer (the largest layer)."""
    per_layer: dict[int, int] = {}
    for t in manifest.tensors:
        if t.n_expert > 1:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.bytes_per_expert
    return max(per_layer.values(), default=0)


@dataclass
class Analysis:
    trace: str
    header: dict[str, Any]
    records: int
    tokens: int
    decode_tokens: int
    recorded_hit_rate: float
    lru_at_recorded_slots: float | None
    results: list[dict[str, Any]]
    recommendation: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyze(trace: Trace, *, banks: list[int] | None = None, topks: list[int] | None = None,
            manifest: Any = None, budget_bytes: int | None = None, log=None) -> Analysis:
    h = trace.header
    if manifest is not None and manifest.model.fingerprint != h.model.fingerprint:
        raise FlashflexError(f"the manifest {getattr(manifest, 'directory', '')} is of another model than "
                             f"the trace {trace.path}",
                             "pass the sidecar manifest of the model the trace was recorded on")
    topks = sorted(set(topks or [h.k]), reverse=True)
    if any(k < 1 or k > h.k for k in topks):
        raise FlashflexError(f"--topk values must be within 1..{h.k} (the trace holds {h.k} experts per token)",
                             "pick smaller values")
    banks = sorted(set(banks or default_banks(min(topks), h.model.n_expert)))
    if any(b < 1 or b > h.model.n_expert for b in banks):
        raise FlashflexError(f"--banks values must be within 1..{h.model.n_expert}", "pick other bank sizes")
    per_expert = layer_expert_bytes(manifest) if manifest is not None else None
    results = []
    for k in topks:
        for b in banks:
            if b < k:
                continue
            for policy in POLICIES:
                results.append(simulate(trace.records, policy, b, k, per_expert).to_dict())
        if log:
            log(f"k={k}: {len([b for b in banks if b >= k])} bank sizes x {len(POLICIES)} policies")
    hits, misses = trace.recorded_hits()
    lru_same = None
    if h.slots >= h.k and h.slots <= h.model.n_expert:
        lru_same = simulate(trace.records, "lru", h.slots, h.k).hit_rate
    rec = recommend(results, k=h.k, bytes_per_expert=per_expert, n_layers=len(h.layers), budget_bytes=budget_bytes,
                    n_expert=h.model.n_expert)
    return Analysis(trace=str(trace.path), header=h.model_dump(), records=len(trace.records), tokens=trace.tokens,
                    decode_tokens=trace.decode_tokens,
                    recorded_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                    lru_at_recorded_slots=lru_same, results=results, recommendation=rec)


def bank_bytes(slots: int, bytes_per_expert: int, n_layers: int, n_expert: int) -> int:
    """What a bank of `slots` costs over all layers, with the runtime's zero slot while slots < experts."""
    return (slots + (1 if slots < n_expert else 0)) * bytes_per_expert * n_layers


def recommend(results: list[dict[str, Any]], *, k: int, bytes_per_expert: int | None, n_layers: int,
              budget_bytes: int | None, n_expert: int) -> dict[str, Any] | None:
    """The bank size to run: among the sizes that fit the budget (all, without one), the LRU decode hit rate's
    best; a smaller bank within one point of it wins (the RAM it leaves goes to the page cache and KV)."""
    lru = [r for r in results if r["policy"] == "lru" and r["k"] == k]
    if not lru:
        return None
    if budget_bytes is not None:
        if bytes_per_expert is None:
            raise FlashflexError("--budget needs --manifest (the bytes of one expert)", "pass the sidecar's manifest")
        lru = [r for r in lru if bank_bytes(r["slots"], bytes_per_expert, n_layers, n_expert) <= budget_bytes]
        if not lru:
            need = bank_bytes(k, bytes_per_expert, n_layers, n_expert)
            raise FlashflexError(f"no modeled bank fits the budget: the smallest ({k} slots) needs "
                                 f"{format_size(need)}", "raise --budget")
    best = max(r["decode_hit_rate"] for r in lru)
    pick = min((r for r in lru if r["decode_hit_rate"] >= best - 0.01), key=lambda r: r["slots"])
    out = {"slots": pick["slots"], "lru_decode_hit_rate": pick["decode_hit_rate"], "best_in_budget": best,
           "rule": "smallest bank within 1 point of the best LRU decode hit rate that fits"}
    if bytes_per_expert is not None:
        out["bank_bytes"] = bank_bytes(pick["slots"], bytes_per_expert, n_layers, n_expert)
    return out


def plot(analysis: Analysis, out: Path, log) -> None:
    """Hit rate vs bank size per policy (one line per policy and top-k) as a PNG."""
    from orchestrator.plotting import pyplot as _pyplot

    plt = _pyplot(log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"lru": "-o", "lfu": "-s", "belady": "--^"}
    for k in sorted({r["k"] for r in analysis.results}, reverse=True):
        for policy in POLICIES:
            pts = sorted((r["slots"], r["decode_hit_rate"]) for r in analysis.results
                         if r["k"] == k and r["policy"] == policy)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[policy], label=f"{policy} k={k}",
                        markersize=4)
    ax.set_xlabel("slots per layer")
    ax.set_ylabel("decode hit rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{Path(analysis.trace).name}: {analysis.decode_tokens} decode tokens")
    fig.tight_layout()
    from orchestrator.fsutil import atomic_file

    with atomic_file(out) as fh:  # a failed plot leaves nothing behind
        fig.savefig(fh, dpi=110, format="png")
    plt.close(fig)
