"""Benchmarks: stock and flashflex side by side, each run in its own process inside a memory cgroup sized to
the budget (where the platform allows), page cache dropped before each run, with the disk's direct-read
bandwidth measured in the same sweep so every figure has its I/O roofline next to it.

Results: one JSON line per run (results.jsonl), a Markdown table (results.md) and a plot (tok_s_vs_budget.png).
Nothing here asserts a speed: benchmarks report, tests check correctness.

The package, by concern: `isolation` (cgroups, page cache, direct-read bandwidth), `runs` (one run in its own
process: Point, RunSpec, run_point), `worker` (what runs inside that process), `dense` and `moe` (the sweeps, their
ratios, Markdown tables and plots). Plots go through orchestrator.plotting, which `trace analyze` shares.
"""

from orchestrator.bench.dense import DenseSweep, _add_ratios, markdown_table, plot, run_dense_sweep
from orchestrator.bench.isolation import (
                                          PROCESS_SLACK,
                                          MemoryCgroup,
                                          cgroup_version,
                                          direct_read_bandwidth,
                                          drop_page_cache,
)
from orchestrator.bench.moe import (
                                          MoESweep,
                                          PrefetchSweep,
                                          _add_moe_ratios,
                                          _add_prefetch_ratios,
                                          moe_markdown,
                                          plot_moe,
                                          plot_prefetch,
                                          prefetch_markdown,
                                          run_moe_sweep,
                                          run_prefetch_sweep,
)
from orchestrator.bench.runs import Point, RunSpec, check_isolation, machine_info, run_point

__all__ = ["DenseSweep", "MemoryCgroup", "MoESweep", "PROCESS_SLACK", "Point", "PrefetchSweep", "RunSpec",
           "_add_moe_ratios", "_add_prefetch_ratios", "_add_ratios", "cgroup_version", "check_isolation",
           "direct_read_bandwidth", "drop_page_cache", "machine_info", "markdown_table", "moe_markdown", "plot",
           "plot_moe", "plot_prefetch", "prefetch_markdown", "run_dense_sweep", "run_moe_sweep",
           "run_prefetch_sweep", "run_point"]
