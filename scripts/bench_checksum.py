"""What checking every expert read against its checksum (`moe.verify`) costs, on the MoE benchmark model.

Runs `flashflex run --json` in slot-bank mode with verify on and off, alternating, and reports per pair the decode
tok/s of both and the runtime's own timer for checksumming (`verify_seconds`: CPU time of the threads that
checksum, summed) as a share of decode time, and the checksum's speed; medians over the pairs. Without --model, the
MoE benchmark model (synthetic A3B shape) and its sidecar, generated once into the cache like `flashflex bench moe`
does.

    python scripts/bench_checksum.py --slots 32 --pairs 3 --out bench-results/checksum
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "the model reads its weights from the disk when they are needed and keeps the rest in memory"


def run(model: Path, sidecar: Path, slots: int, n: int, verify: bool) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
        cfg.write(json.dumps({"moe": {"verify": verify}}))
    cmd = [sys.executable, "-m", "orchestrator", "run", cfg.name, "-m", str(model), "--moe-sidecar", str(sidecar),
           "--moe-mode", "slot-bank", "--moe-slot-bank", str(slots), "--ctx", "512", "--ubatch", "32",
           "-p", PROMPT, "-n", str(n), "--draft", "none", "--json"]  # drafting's timing-led lengths vary the text
    proc = subprocess.run(cmd, capture_output=True, text=True)
    Path(cfg.name).unlink()
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    out = json.loads(proc.stdout)
    moe = out["stats"]["moe"]["decode"]
    return {"verify": verify, "decode_tok_per_s": out["decode_tok_per_s"], "decode_seconds": out["decode_s"],
            "verify_seconds": moe.get("verify_seconds", 0.0), "bytes_read": moe["bytes_read"],
            "misses": moe["misses"], "tokens": out["tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a MoE GGUF with a sidecar (default: the synthetic "
                    "A3B-shape benchmark model, generated once)")
    ap.add_argument("--sidecar", type=Path, default=None)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results/checksum"))
    args = ap.parse_args()
    if args.model is None:
        from orchestrator.bench.speculative import resolve_model

        args.model = resolve_model("synth:moe-a3b-12l-q4_0", lambda m: print(m, file=sys.stderr))
    from orchestrator import sidecar as sidecars

    sidecar = args.sidecar or sidecars.default_path(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(args.pairs):
        for verify in (True, False):
            rows.append(run(args.model, sidecar, args.slots, args.n, verify))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), file=sys.stderr)
    on = [r for r in rows if r["verify"]]
    off = [r for r in rows if not r["verify"]]
    share = [r["verify_seconds"] / r["decode_seconds"] for r in on]
    summary = {
        "model": str(args.model), "slots": args.slots, "pairs": args.pairs,
        "decode_tok_per_s_verify_on": statistics.median(r["decode_tok_per_s"] for r in on),
        "decode_tok_per_s_verify_off": statistics.median(r["decode_tok_per_s"] for r in off),
        "verify_seconds_share_of_decode": statistics.median(share),
        "verify_seconds_share_max": max(share),
        "checksum_gb_per_s": statistics.median(r["bytes_read"] / r["verify_seconds"] / 1e9 for r in on
                                               if r["verify_seconds"] > 0) if any(r["verify_seconds"] for r in on)
        else None,
        "miss_bytes_per_token": statistics.median(r["bytes_read"] / len(r["tokens"]) for r in on),
        "same_tokens": all(r["tokens"] == rows[0]["tokens"] for r in rows),
    }
    (args.out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(markdown(summary))
    print(json.dumps(summary, indent=2))
    return 0


def markdown(s: dict) -> str:
    """The summary as the benchmarks page shows it (medians of the pairs, interleaved on/off)."""
    on, off = s["decode_tok_per_s_verify_on"], s["decode_tok_per_s_verify_off"]
    rate = f"{s['checksum_gb_per_s']:.1f} GB/s" if s["checksum_gb_per_s"] else "-"
    return ("| slots | pairs | decode tok/s, checked | unchecked | checked / unchecked | checking's share of decode "
            "(median, max) | checksum rate | MiB missed / token | same tokens |\n"
            "|---:|---:|---:|---:|---:|---|---:|---:|---|\n"
            f"| {s['slots']} | {s['pairs']} | {on:.2f} | {off:.2f} | {on / off:.3f} | "
            f"{s['verify_seconds_share_of_decode']:.1%}, {s['verify_seconds_share_max']:.1%} | {rate} | "
            f"{s['miss_bytes_per_token'] / 2**20:.1f} | {'yes' if s['same_tokens'] else 'no'} |\n")


if __name__ == "__main__":
    sys.exit(main())
