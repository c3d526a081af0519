"""llama.cpp's own programs, built from the same patched tree and shipped in the llama_cpp package beside the
libraries they link (flashflex build): run under a flashflex plan by handing them the plan's spec file through a GGUF
key override, the same route the Python API takes (orchestrator.run.loader).

`command_for(prepared, tool, spec_path, user_args)` is the one translation of a prepared run into a program's
arguments; `flashflex exec` and the llama-server engine of `flashflex serve` use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.errors import FlashflexError

# The programs a patched build ships, and what each takes: llama.cpp's common arguments (model, context, batch,
# threads, key overrides, load mode, offload). llama-bench has its own parser without key overrides, so it cannot be
# handed a spec: it is not shipped as a plan runner.
SHIPPED = ("llama-server", "llama-cli", "llama-completion", "llama-perplexity")

# Arguments the plan sets: given again by the user they would run something other than what was planned (a larger
# context than the KV cache the budget holds, mmap under a streaming plan). Each maps to what to do instead.
_FLASHFLEX_OPTION = {"--model": ("-m", "--model"), "--ctx": ("-c", "--ctx-size"), "--batch": ("-b", "--batch-size"),
                     "--ubatch": ("-ub", "--ubatch-size"), "--gpu-layers": ("-ngl", "--gpu-layers", "--n-gpu-layers"),
                     "--rpc": ("--rpc",), "--parallel": ("-np", "--parallel")}
_PLAN_SETS = {"the load mode": ("-lm", "--load-mode", "--mmap", "--no-mmap"),
              "the layer split": ("-ts", "--tensor-split"), "the fit": ("-fit", "--fit"),
              "the prompt cache size": ("-cram", "--cache-ram"),
              "the context checkpoints": ("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"),
              "the KV cache's size": ("--swa-full",)}
# Host state llama.cpp's server and its chat program keep beside the model, outside any plan, turned off:
# - the prompt cache (-cram): up to 8 GiB of RAM by default (and, in llama-server, the idle slots it would fill);
# - context checkpoints (-ctxcp): for a model whose memory cannot be rolled back (recurrent layers; sliding-window
#   attention with the window-sized cache), up to 32 copies per slot of that state (Gemma 3 270M: 7.5 MiB each, up
#   to 960 MiB for 4 slots beside a 280 MiB budget), and to make them the server splits every prompt at user turns
#   and ubatch + 4 and 4 tokens before its end, each split one more pass over the streamed weights. With the full-size
#   cache (plan_args) a sliding-window model needs none; a recurrent model's turn that rolls back is read again.
HOST_STATE_OFF = {"llama-server": ["-cram", "0", "--no-cache-idle-slots", "-ctxcp", "0"],
                  "llama-cli": ["-cram", "0", "-ctxcp", "0"]}
PLANNED_ARGS: dict[str, str] = {
    **{flag: f"give flashflex's {option}" for option, flags in _FLASHFLEX_OPTION.items() for flag in flags},
    **{flag: f"the plan sets {what}" for what, flags in _PLAN_SETS.items() for flag in flags},
}


def tools_dir() -> Path:
    """Where the installed llama_cpp package keeps its libraries and the shipped programs."""
    from orchestrator import native

    native.llama_cpp_module()
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def locate(tool: str) -> Path:
    """The shipped program `tool`, or one line saying why there is none and what to do."""
    if tool not in SHIPPED:
        raise FlashflexError(f"{tool} is not a program flashflex runs under a plan",
                             f"use one of: {', '.join(SHIPPED)}")
    path = tools_dir() / tool
    if not os.access(path, os.X_OK):
        raise FlashflexError(f"{tool} is not in this build ({path} is missing)",
                             "rebuild with flashflex build --force (a patched build ships llama.cpp's programs)")
    return path


def check_user_args(tool: str, args: list[str]) -> None:
    """Refuse arguments the plan sets (one line naming the flashflex option that sets them instead)."""
    from orchestrator import native

    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in PLANNED_ARGS:
            raise FlashflexError(f"{arg} is set by flashflex's plan for {tool}", f"drop it: {PLANNED_ARGS[flag]}")
        if native.SPEC_KEY in arg:
            raise FlashflexError(f"{arg}: flashflex writes and names the spec itself",
                                 "drop it (flashflex exec plans the model and writes its spec)")


def plan_args(prepared, spec_path: str | None, *, parallel: int | None = None) -> list[str]:
    """llama.cpp common arguments that reproduce a prepared run: model, context, batches, threads, seed, the
    sliding-window cache's size, load mode, the spec file (when the plan streams or banks), key overrides, and the
    device split. `parallel`: the server's
    slots, sharing one KV cache of the planned context (llama_server plans it as slots x the per-request context)."""
    settings, spec = prepared.settings, prepared.spec
    args = ["-m", str(settings.model), "-c", str(settings.ctx), "-b", str(settings.batch), "-ub", str(settings.ubatch),
            "--seed", str(settings.seed), "-fit", "off"]
    from orchestrator.modelfile.reader import arch_of

    if arch_of(settings.model).n_swa:
        # the KV cache the plan measured (llama.cpp's C API, which llama-cpp-python and the measurement use, keeps
        # sliding-window layers' cache at full size; its programs at the window by default), so llama-server can roll
        # a slot back anywhere: a conversation's next turn reuses its cached prompt without checkpoints
        args.append("--swa-full")
    if settings.threads:
        args += ["-t", str(settings.threads), "-tb", str(settings.threads)]
    overrides = [f"{k}=int:{v}" for k, v in spec.kv_overrides.items()]
    if spec_path is not None:
        from orchestrator import native

        overrides.append(f"{native.SPEC_KEY}=str:{spec_path}")
    for o in overrides:
        args += ["--override-kv", o]
    if spec.use_mmap is False or spec_path is not None:
        args += ["-lm", "none"]
    elif spec.use_mmap is True:
        args += ["-lm", "mmap"]
    placement = spec.placement
    if placement is not None:
        from orchestrator import rpc as rpc_mod

        remote = list(dict.fromkeys(d.endpoint for d in placement.devices if d.endpoint != rpc_mod.LOCAL))
        if remote:
            args += ["--rpc", ",".join(remote)]
        args += ["-ngl", str(placement.n_gpu_layers), "-ts", ",".join(f"{x:g}" for x in placement.tensor_split)]
        for pattern in placement.cpu_tensors:
            args += ["-ot", f"{pattern}=CPU"]
    else:
        args += ["-ngl", "0"]
    if parallel is not None:
        args += ["-np", str(parallel), "-kvu"]
    return args


def command_for(prepared, tool: str, spec_path: str | None, user_args: list[str], *,
                parallel: int | None = None) -> list[str]:
    """The program's argv under the plan, the host state it would keep outside the plan turned off (it finds its
    libraries through its RPATH, $ORIGIN). Mesa's shader cache is set in this process's environment, which the
    program inherits."""
    check_user_args(tool, user_args)
    path = locate(tool)
    from orchestrator import native

    native.keep_shader_cache()
    return [str(path), *plan_args(prepared, spec_path, parallel=parallel), *HOST_STATE_OFF.get(tool, []),
            *user_args]
