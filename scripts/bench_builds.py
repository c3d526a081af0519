"""Compare llama-cpp-python builds on the same workloads: prompt and decode tok/s, medians of interleaved runs.

Each build is a directory holding an installed `llama_cpp` package (`pip install --no-deps --target DIR
WHEEL`), put first on PYTHONPATH; an empty path means the build installed in this environment. Every run is
`flashflex run --json` in its own process, greedy, a fixed prompt: the model resident unless `--run-args` adds
a budget or a MoE mode. Runs alternate between builds (A B A B ...) so drift on this shared virtual machine hits
both alike.

    python scripts/bench_builds.py --build explicit= --build native=/tmp/native-lcp \\
        --model default --model dense-7b-q4_0 --repeats 3 --out bench-results/builds
    python scripts/bench_builds.py --build before=/tmp/lcp-before --build after= \\
        --model dense-7b-q4_0 --run-args "--budget 2GiB" --repeats 3 --out bench-results/split-dense

Writes runs.jsonl and summary.md to --out and prints the table (ratios against the first build).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined "
          "movable metal type, oil-based ink and a wooden screw press into a system that could reproduce")


def model_path(name: str) -> str | None:
    """'default' → the default model; a synthetic preset name → generated once into the cache; else a path."""
    if name == "default":
        return None
    if Path(name).exists():
        return name
    from orchestrator import synth

    return str(synth.cached_preset(name, log=lambda msg: print(msg, file=sys.stderr)))


def one_run(build_dir: str, model: str | None, n: int, threads: int | None, extra: list[str]) -> dict:
    env = dict(os.environ)
    env["FLASHFLEX_ANY_SERIES"] = "1"  # the builds compared come from other patch series than this checkout's
    if build_dir:
        env["PYTHONPATH"] = build_dir + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "orchestrator", "run", "--prompt", PROMPT, "-n", str(n), "--ctx", "512", "--json"]
    if model:
        cmd += ["-m", model]
    if threads:
        cmd += ["-t", str(threads)]
    cmd += extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"ok": False, "rc": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    out = json.loads(proc.stdout)
    return {"ok": True, "decode_tok_per_s": out["decode_tok_per_s"], "prompt_tok_per_s": out["prompt_tok_per_s"],
            "tokens": out["tokens"], "mode": out["stats"]["mode"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="append", required=True, help="LABEL=DIR (DIR empty: the installed build)")
    ap.add_argument("--model", action="append", default=None, help="default, a synth preset, or a GGUF path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-n", type=int, default=32, help="tokens to generate per run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run-args", default="", help="more `flashflex run` flags, e.g. \"--budget 2GiB\"")
    ap.add_argument("--out", type=Path, default=Path("bench-results/builds"))
    args = ap.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.build]
    models = args.model or ["default"]
    extra = shlex.split(args.run_args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out / "runs.jsonl", "w") as log:
        for name in models:
            path = model_path(name)
            for rep in range(args.repeats):
                for label, build_dir in builds:
                    run = one_run(build_dir, path, args.n, args.threads, extra)
                    r = {"model": name, "build": label, "repeat": rep, **run}
                    print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), file=sys.stderr)
                    log.write(json.dumps(r) + "\n")
                    rows.append(r)
    lines = ["| model | build | decode tok/s (median) | prompt tok/s (median) | runs | decode × first | "
             "prompt × first | same tokens as first |", "|---|---|---|---|---|---|---|---|"]
    for name in models:
        base = None
        for label, _ in builds:
            ok = [r for r in rows if r["model"] == name and r["build"] == label and r["ok"]]
            failed = [r for r in rows if r["model"] == name and r["build"] == label and not r["ok"]]
            if not ok:
                lines.append(f"| {name} | {label} | failed: {failed[0]['error'][0] if failed else '?'} "
                             f"(rc {failed[0]['rc'] if failed else '?'}) | - | 0/{len(failed)} | - | - | - |")
                continue
            dec = statistics.median(r["decode_tok_per_s"] for r in ok)
            pro = statistics.median(r["prompt_tok_per_s"] for r in ok)
            if base is None:
                base = (dec, pro, ok[0]["tokens"])
            same = all(r["tokens"] == base[2] for r in ok)
            lines.append(f"| {name} | {label} | {dec:.2f} | {pro:.1f} | {len(ok)}/{len(ok) + len(failed)} | "
                         f"{dec / base[0]:.3f} | {pro / base[1]:.3f} | {'yes' if same else 'no'} |")
    table = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
