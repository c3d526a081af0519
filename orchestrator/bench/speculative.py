"""Speculative decoding under a budget (`flashflex bench speculative`, scripts/bench_speculative.py).

On written-down text tasks, each run goes through what `flashflex run` does (api.prepare → run.execution.run), with
and without drafting, under the same total budget (by default the smallest one the planner accepts with drafting:
drafting's RAM comes off the model's share, so the drafted run streams a little more). The runs are interleaved
(every task and mode once, then again, each task's pair in the other order the next time) so drift on a shared
machine hits both alike; the table reports medians.

Per run: decode tok/s, the drafter's acceptance rate (kept / judged drafted tokens), accepted drafted tokens per
verification, tokens verified and tokens generated per verification (decode calls of the model), and bytes read per
generated token from the runtime's stream counters (run.execution's decode phase). On a MoE model with expert banks,
also per MoE layer: the distinct experts a decode call resolves (a verification batch resolves the union of its
tokens' experts once; a single-token step resolves top-k), experts resolved per generated token, the bank's hit
rate and the bytes of expert misses per generated token. Nothing here asserts a speed.

Models are GGUF paths or `synth:PRESET` (orchestrator.synth: generated once into the cache, deterministic; a MoE
preset gets its expert sidecar extracted beside it once). A synthetic draft preset (draft-for-7b, draft-for-a3b,
tiny-draft) shares its target's vocabulary. With random weights the drafts are rarely what the target picks: those
runs measure the mechanics (bytes and experts per verification), best with fixed draft lengths (draft_adaptive
False), since adaptive lengths fall to 0 when drafts fail.

The no-drafting runs use run.execution's plain loop, which also evaluates its last token (one step more than
needed: at most 1/n of its decode time, in drafting's favour).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Log = Callable[[str], None]

_PARAGRAPH = (
    "The comittee met on tuesday to discus the new budjet for the libary. Most members agreed that the "
    "reading room needs new chairs, better lightning and a quieter heating system, but there was a long "
    "arguement about wether the childrens section should get more books or more computers. In the end "
    "they decided to spend half of the money on each, and to ask the town council for a seperate grant "
    "next year so that the old windows can finaly be replaced before winter."
)

_FUNCTION = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        if item.quantity <= 0:
            continue
        total = total + item.price * item.quantity
    total = total * (1 + tax_rate)
    return round(total, 2)
'''

_DOCUMENT = (
    "The Harbour Bridge Maintenance Report, 2023.\n\n"
    "Section 1. Structure. The bridge is a steel arch bridge with a main span of 503 metres and a total "
    "length of 1,149 metres. It carries eight road lanes, two railway tracks, a footway and a cycleway. The "
    "arch is made of 28 panels on each side, joined by about six million hand-driven rivets.\n\n"
    "Section 2. Painting. The steelwork is repainted in a continuous cycle. Since 2019 the old lead-based "
    "paint has been removed by robotic blasting machines, which reduced the number of workers exposed to dust "
    "by two thirds. One full coat needs about 30,000 litres of paint. The current cycle started in March 2021 "
    "and is planned to finish in November 2027.\n\n"
    "Section 3. Inspections. Engineers inspect the deck every six months and the arch every year. In 2023 "
    "they found 41 loose rivets, all on the western side, and replaced them during night closures. Corrosion "
    "was found on two bearings of the southern pylon; the bearings were cleaned and coated, and will be "
    "replaced in 2025.\n\n"
    "Section 4. Traffic. On an average weekday 160,000 vehicles, 480 trains and 1,900 cyclists crossed the "
    "bridge in 2023. Night closures of one lane were needed on 63 nights. The longest full closure lasted "
    "five hours, on 12 August, when a crane replaced a damaged expansion joint.\n\n"
    "Section 5. Budget. Maintenance cost 42.5 million dollars in 2023: 18.2 million for painting, 9.7 million "
    "for inspections and repairs, 6.1 million for the expansion joint and bearings, and the rest for traffic "
    "management and lighting. The budget for 2024 is 44 million dollars.\n"
)

TASKS: dict[str, tuple[str, str]] = {  # name -> (what it is, the prompt); greedy unless in TEMPERATURE
    "rewrite": ("rewrite a paragraph: fix its spelling, keep everything else",
                f"Original paragraph:\n{_PARAGRAPH}\n\nThe same paragraph with the spelling mistakes corrected and "
                f"nothing else changed:\n"),
    "edit-function": ("edit a function: rename a variable in a Python function",
                      f"Before:\n```python\n{_FUNCTION}```\n\nAfter renaming the variable `total` to `subtotal` "
                      f"(the rest unchanged):\n```python\n"),
    "document-qa": ("answer from a long quoted document",
                    f"{_DOCUMENT}\nQuestion: What did the engineers find during the 2023 inspections, and what was "
                    f"done about it? Answer with the sentences from the report.\nAnswer:"),
    "free-chat": ("free chat: an open question, nothing to copy",
                  "User: I have a free afternoon. Tell me a short story about a robot who learns to paint.\n"
                  "Assistant:"),
    "story-sampled": ("a new story, sampled (temperature 0.8): little to copy, drafts mostly fail",
                      "Chapter One\n\nNobody in the village of Hollin had ever seen the sea. Mara, the blacksmith's "
                      "youngest daughter,"),
    "extract": ("extraction: list the report's figures, each with the sentence it comes from",
                f"{_DOCUMENT}\nEvery number in the report above, one per line, each followed by the sentence it "
                f"appears in, copied exactly:\n-"),
    "letter-sampled": ("a new letter, sampled (temperature 0.9): nothing to copy",
                       "Dear Aunt Rosa,\n\nThank you for the parcel. The winter here has been strange:"),
}
TEMPERATURE = {"story-sampled": 0.8, "letter-sampled": 0.9}
"""Tasks sampled rather than greedy. Greedy Gemma 3 270M (a base model) soon repeats itself, which prompt lookup
drafts perfectly; sampling keeps its text new. Sampled runs with and without drafting need not give the same tokens
(run.execution's plain loop draws its random numbers differently from llama-cpp-python's generate)."""


@dataclass
class SpeculativeBench:
    """What one invocation measures."""

    model: Path
    draft: str = "prompt-lookup"  # --draft value (prompt-lookup[:N]); ignored with draft_model
    draft_model: Path | None = None
    draft_max: int | None = None
    draft_adaptive: bool | None = None  # None = the config's default (adaptive); False = always draft_max
    budget: str = "min"  # "min" = the smallest budget the planner accepts with drafting, else a size
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    n_predict: int = 128
    repeats: int = 3
    ctx: int = 1024
    ubatch: int = 8
    threads: int | None = 2
    prefetch_threads: int | str = "auto"  # as `run` by default
    moe_mode: str | None = None  # None = auto: expert banks when the model does not fit the budget
    moe_slot_bank: int | None = None  # None = the planner's pick for the budget (MoE models with a sidecar)


SYNTH_PREFIX = "synth:"


def resolve_model(name: str | Path, log: Log = print) -> Path:
    """A GGUF path as given, or for `synth:PRESET` the synthetic preset's model, generated once into the cache;
    a MoE preset also gets its expert sidecar extracted once at the default place beside it (a budget below the
    model's size runs its experts from slot banks, `moe.mode` auto)."""
    text = str(name)
    if not text.startswith(SYNTH_PREFIX):
        return Path(name)
    from orchestrator import sidecar, synth

    preset = text.removeprefix(SYNTH_PREFIX)
    spec = synth.preset(preset)  # an unknown preset is one line naming the known ones
    path = synth.cached_preset(preset, log)
    if spec.is_moe:
        sidecar.beside(path, log)
    return path


def _options(b: SpeculativeBench, drafting: bool, task: str | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"model": b.model, "ctx": b.ctx, "ubatch": b.ubatch, "threads": b.threads,
                            "prefetch_threads": b.prefetch_threads, "n_predict": b.n_predict,
                            "temperature": TEMPERATURE.get(task or "", 0.0)}
    if drafting:
        if b.draft_model is not None:
            opts["draft_model"] = b.draft_model
        else:
            opts["draft"] = b.draft
        opts["draft_max"] = b.draft_max
        if b.draft_adaptive is not None:
            opts["draft_adaptive"] = b.draft_adaptive
    if b.moe_mode is not None:
        opts["moe_mode"] = b.moe_mode
    if b.moe_slot_bank is not None:
        opts["moe_slot_bank"] = b.moe_slot_bank
    return opts


def calibrate(b: SpeculativeBench, budget: int | None, log: Log = print) -> None:
    """One undrafted run, not counted, where no run of the model with these threads has measured its decode step
    yet (orchestrator.computespeed): what the drafted plans price their rows by, as `run` would after a first
    run. Every run the benchmark counts then plans the same way."""
    from orchestrator import api, computespeed
    from orchestrator.run import execution

    opts = {**_options(b, drafting=False, task=b.tasks[0]), "n_predict": 32}
    if computespeed.measured(b.model, b.threads) is not None:
        return
    if budget is None:  # the undrafted minimum: drafting's reservation is what the measurement decides
        plan = api.prepare(budget_bytes=1 << 40, own_decodes=True, **opts).plan
        assert plan is not None  # a budget is given: the model is planned
        budget = plan.minimum_budget_bytes
    log("calibrating: one undrafted run (not counted) measures a decode step's compute and reads")
    execution.run(api.prepare(budget_bytes=budget, prompt=TASKS[b.tasks[0]][1], log=log, own_decodes=True, **opts))


def smallest_budget(b: SpeculativeBench) -> int:
    """The smallest total budget the planner accepts for the drafted run: the model's minimum plus drafting."""
    from orchestrator import api

    probe = api.prepare(budget_bytes=1 << 40, own_decodes=True, **_options(b, drafting=True))
    assert probe.plan is not None
    return probe.plan.minimum_budget_bytes  # drafting's reservation included


def run(b: SpeculativeBench, out_dir: Path, log: Log = print) -> dict[str, Any]:
    """Measure every task with and without drafting, `repeats` times each, interleaved; write results.json and
    results.md under out_dir; return the results."""
    from orchestrator import api
    from orchestrator.bench.runs import machine_info
    from orchestrator.fsutil import atomic_file
    from orchestrator.run import execution
    from orchestrator.sizes import format_size, parse_size

    unknown = [t for t in b.tasks if t not in TASKS]
    if unknown:
        from orchestrator.errors import FlashflexError

        raise FlashflexError(f"unknown task {', '.join(unknown)}", f"use some of {', '.join(TASKS)}")
    given = None if b.budget == "min" else parse_size(b.budget, what="--budget")
    calibrate(b, given, log)
    budget = smallest_budget(b) if given is None else given
    modes = {"no draft": False, "draft": True}
    prepared: dict[tuple[str, str], Any] = {}
    plans: dict[str, dict[str, Any]] = {}
    for mode, drafting in modes.items():
        for task in b.tasks:
            p = api.prepare(budget_bytes=budget, prompt=TASKS[task][1], log=log, own_decodes=True,
                            **_options(b, drafting, task))
            prepared[(task, mode)] = p
        plan, banks = p.plan, p.spec.banks
        assert plan is not None
        share = plan.budget_bytes - plan.reservations.draft_bytes  # the model's share, drafting's reservation apart
        plans[mode] = {"mode": p.spec.mode, "budget_bytes": share,
                       "resident_bytes": plan.resident_bytes, "model_bytes": plan.model_bytes,
                       "streamed_bytes_per_token": plan.estimates.dense_streamed_bytes_per_token,
                       "streamed_fraction": plan.estimates.dense_streamed_bytes_per_token / plan.model_bytes,
                       "draft": p.draft.summary() if p.draft is not None else None,
                       "moe": {"mode": p.spec.mode, "slots": banks.slots} if banks is not None else None}
        log(f"{mode}: {p.spec.mode}, model's share of the {format_size(budget)} budget "
            f"{format_size(share)}, streams {format_size(plans[mode]['streamed_bytes_per_token'])} "
            f"per token ({plans[mode]['streamed_fraction']:.0%} of the weights)"
            + (f", {banks.slots} expert slots per MoE layer" if banks is not None else ""))
    runs: list[dict[str, Any]] = []
    for rep in range(b.repeats):
        for task in b.tasks:
            # each pair in the other order from one repetition to the next: a run that goes second (after a
            # process has just loaded, run and freed the model) is not always the drafted one
            for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
                p = prepared[(task, mode)]
                result = execution.run(p)
                decode = result.stats.get("decode") or {}
                draft = result.stats.get("draft")
                rec = {"task": task, "mode": mode, "repeat": rep, "prompt_tokens": len(result.prompt_tokens),
                       "tokens": len(result.tokens), "token_ids": result.tokens, "text": result.text,
                       "decode_s": result.decode_s, "decode_tok_per_s": result.decode_tok_per_s,
                       "bytes_read_per_token": decode.get("bytes_read_per_token"),
                       "wait_seconds": decode.get("wait_seconds"), "peak_rss_bytes": result.peak_rss_bytes}
                if draft is not None:
                    verifications = max(1, draft["verifications"])
                    rec.update(acceptance_rate=draft["acceptance_rate"],
                               accepted_per_verification=draft["accepted_tokens"] / verifications,
                               verified_per_verification=draft["verified_tokens"] / verifications,
                               tokens_per_verification=len(result.tokens) / verifications, draft=draft)
                else:
                    # the plain loop evaluates every generated token alone: one decode call per token
                    verifications = len(result.tokens)
                    rec.update(verified_per_verification=1.0, tokens_per_verification=1.0)
                rec.update(moe_columns((result.stats.get("moe") or {}).get("decode"), len(result.tokens),
                                       verifications))
                runs.append(rec)
                log(f"  {task} · {mode} · run {rep + 1}/{b.repeats}: {rec['tokens']} tokens, "
                    f"{rec['decode_tok_per_s']:.2f} tok/s"
                    + (f", {rec['acceptance_rate'] or 0:.0%} of drafted tokens kept" if draft is not None else ""))
    summary = summarise(runs, b.tasks)
    results = {"bench": "speculative", "machine": machine_info(), "model": str(b.model),
               "model_bytes": b.model.stat().st_size, "budget_bytes": budget,
               "budget": b.budget, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(b).items()},
               "tasks": {t: {"what": TASKS[t][0], "prompt": TASKS[t][1], "temperature": TEMPERATURE.get(t, 0.0)}
                         for t in b.tasks}, "plans": plans,
               "summary": summary, "runs": runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"),
                       ("results.md", markdown(results) + "\n")):
        with atomic_file(out_dir / name, "w") as fh:
            fh.write(text)
    return results


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def moe_columns(moe: dict[str, Any] | None, tokens: int, decode_calls: int) -> dict[str, Any]:
    """A decode phase's expert-bank counters (a run's stats["moe"]["decode"]: the native counters) per MoE layer.
    The bank counts each distinct expert of a layer call once, as a hit or a miss (a call whose experts exceed the
    bank runs in passes, each expert in one), so hits + misses over layers and decode calls is the number of
    distinct experts a call resolves: top-k for a single-token step, the union of its tokens' experts for a
    verification batch. {} for a run without expert banks."""
    if not moe or not moe.get("banked_layers"):
        return {}
    layers = moe["banked_layers"]
    resolved = moe["hits"] + moe["misses"]
    return {"top_k": moe["n_expert_used"], "expert_slots": moe["slots"],
            "experts_per_verification": resolved / layers / decode_calls if decode_calls else None,
            "experts_per_token": resolved / layers / tokens if tokens else None,
            "expert_hit_rate": moe["hits"] / resolved if resolved else None,
            "expert_misses_per_token": moe["misses"] / layers / tokens if tokens else None,
            "expert_miss_bytes_per_token": moe["bytes_read"] / tokens if tokens else None}


MOE_COLUMNS = ("experts_per_verification", "experts_per_token", "expert_hit_rate", "expert_misses_per_token",
               "expert_miss_bytes_per_token")


def summarise(runs: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """Medians per task and mode, with the drafted run's decode tok/s over the undrafted one's."""
    rows = []
    for task in tasks:
        base: list[dict[str, Any]] = []
        for mode in ("no draft", "draft"):
            rs = [r for r in runs if r["task"] == task and r["mode"] == mode]
            if not rs:
                continue
            row = {"task": task, "mode": mode, "runs": len(rs), "prompt_tokens": rs[0]["prompt_tokens"],
                   "tokens": _median([r["tokens"] for r in rs]),
                   "decode_tok_per_s": _median([r["decode_tok_per_s"] for r in rs]),
                   "acceptance_rate": _median([r.get("acceptance_rate") for r in rs]),
                   "accepted_per_verification": _median([r.get("accepted_per_verification") for r in rs]),
                   "verified_per_verification": _median([r.get("verified_per_verification") for r in rs]),
                   "tokens_per_verification": _median([r.get("tokens_per_verification") for r in rs]),
                   "bytes_read_per_token": _median([r["bytes_read_per_token"] for r in rs])}
            if any("experts_per_verification" in r for r in rs):
                row.update({k: _median([r.get(k) for r in rs]) for k in MOE_COLUMNS})
                row["top_k"], row["expert_slots"] = rs[0].get("top_k"), rs[0].get("expert_slots")
            if mode == "no draft":
                base = rs
            else:
                base_tps = _median([r["decode_tok_per_s"] for r in base]) if base else None
                row["speedup"] = row["decode_tok_per_s"] / base_tps if base_tps else None
                row["same_tokens"] = bool(base) and all(r["token_ids"] == base[0]["token_ids"] for r in rs + base)
            rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    def mib(v: float | None) -> str:
        return num(v / 2**20 if v is not None else None, ".1f")

    lines = ["| task | mode | prompt tok | gen tok | decode tok/s | × no draft | drafted tokens kept | "
             "accepted / verification | verified / verification | tokens / verification | MiB read / token | "
             "same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["summary"]:
        drafted = r["mode"] == "draft"
        lines.append(
            f"| {r['task']} | {r['mode']} | {r['prompt_tokens']} | {num(r['tokens'], '.0f')} | "
            f"{num(r['decode_tok_per_s'], '.2f')} | {num(r.get('speedup'), '.2f') + '×' if drafted else ''} | "
            f"{num(r['acceptance_rate'], '.0%') if drafted else ''} | "
            f"{num(r['accepted_per_verification'], '.2f') if drafted else ''} | "
            f"{num(r.get('verified_per_verification'), '.2f')} | "
            f"{num(r['tokens_per_verification'], '.2f')} | {mib(r['bytes_read_per_token'])} | "
            f"{('yes' if r.get('same_tokens') else 'no') if drafted else ''} |")
    moe = [r for r in results["summary"] if "experts_per_verification" in r]
    if moe:
        lines += ["", "Expert banks (decode; per MoE layer; an expert counted once per decode call that uses it):", "",
                  "| task | mode | top-k | slots | experts / verification | experts / gen token | hit rate | "
                  "misses / gen token | expert miss MiB / gen token |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in moe:
            lines.append(
                f"| {r['task']} | {r['mode']} | {num(r.get('top_k'), 'd')} | {num(r.get('expert_slots'), 'd')} | "
                f"{num(r['experts_per_verification'], '.2f')} | {num(r['experts_per_token'], '.2f')} | "
                f"{num(r['expert_hit_rate'], '.1%')} | {num(r['expert_misses_per_token'], '.2f')} | "
                f"{mib(r['expert_miss_bytes_per_token'])} |")
    return "\n".join(lines)


def default_model(log: Log = print) -> Path:
    """The default model (Gemma 3 270M) realigned to 4096 bytes, made once in the cache: its streamed tensors
    are then read with O_DIRECT from disk, as under a budget that leaves no room for the page cache to keep them
    (the published file is 32-aligned, so its reads would be buffered and served from the page cache)."""
    from orchestrator.modelfile.locate import default_model_path

    return realigned_copy(default_model_path(log=log), log)


def realigned_copy(src: Path, log: Log = print) -> Path:
    """`src` realigned to 4096 bytes, made once in the cache (see default_model)."""
    from orchestrator.modelfile.realign import realign
    from orchestrator.paths import cache_root

    dst = cache_root() / "models" / (src.name.removesuffix(".gguf") + ".align4096.gguf")
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        log(f"realigning {src.name} to 4096 bytes (once) at {dst}")
        realign(src, dst, alignment=4096)
    return dst
