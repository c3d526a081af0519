"""flashflex: run LLMs that do not fit in RAM through a patched llama.cpp.

The import package is `orchestrator`; the command is `flashflex` (see orchestrator.cli.main).
"""

__version__ = "0.1.0"
