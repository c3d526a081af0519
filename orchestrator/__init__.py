"""flashflex: run LLMs that do not fit in RAM through a patched llama.cpp.

The import package is `orchestrator`; the command is `flashflex` (see orchestrator.cli.main).
"""

__version__ = "0.1.0"

# The Python API (orchestrator.api), imported on first use so `import orchestrator` stays light.
__all__ = ["open_llama", "llama", "prepare"]


def __getattr__(name: str):
    if name in __all__:
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
