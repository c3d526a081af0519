"""`flashflex doctor`: is this environment ready to run flashflex's execution paths?"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

import psutil

from orchestrator import cpufeatures, native, patches, vendor
from orchestrator.errors import FlashflexError
from orchestrator.paths import cache_root, repo_root

# ggml's registry names of each build backend's devices (devices()[i]["backend"]), lower case.
_DEVICE_BACKENDS = {"vulkan": ("vulkan",), "cuda": ("cuda",), "metal": ("metal", "mtl")}


@dataclass
class Report:
    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def backend_mismatch(built: str | None, wanted: str | None) -> str | None:
    """One line when the installed library was built for another backend than the one asked for."""
    if not wanted or built == wanted:
        return None
    what = f"built for the {built} backend" if built else "does not record its backend (built before backends)"
    return f"the installed library is {what}, not {wanted} — run: flashflex build --backend {wanted}"


def device_warning(built: str | None, devices: list[dict[str, Any]]) -> str | None:
    """A GPU build that sees none of its own devices runs everything on the CPU, silently and with exit 0."""
    names = _DEVICE_BACKENDS.get(built or "")
    if not names or any(str(d.get("backend", "")).lower().startswith(names) for d in devices):
        return None
    hint = ""
    if built == "vulkan":
        from orchestrator.build import vulkan_drivers

        if not vulkan_drivers():
            hint = " (no Vulkan driver installed: apt-get install mesa-vulkan-drivers, or your GPU's driver)"
        else:
            hint = (" (ggml skips a CPU-type Vulkan device such as lavapipe/llvmpipe unless "
                    "GGML_VK_VISIBLE_DEVICES=0 is set)")
    return f"the library is built for {built} but ggml sees no {built} device: layers will run on the CPU{hint}"


def diagnose(backend: str | None = None) -> Report:
    """`backend`: the backend the caller expects the installed library to be built for (None: any)."""
    rep = Report()
    f = rep.facts
    root = repo_root()
    try:
        pin = vendor.load_pin(root)
        f["pin"] = pin.commit
        f["llama_cpp_python_pin"] = pin.lcp_version
        f["series_hash"] = patches.series_hash(root)
        f["vendor_synced"] = vendor.status(root)["synced"]
    except FlashflexError as exc:
        rep.problems.append(exc.one_line())
    record = cpufeatures.installed_build_record()
    host = cpufeatures.for_host()
    f["host_instruction_set"] = host.summary()
    f["build_backend"] = record.get("backend") if record else None
    mismatch = backend_mismatch(f["build_backend"], backend) if record or backend else None
    if mismatch:
        rep.problems.append(mismatch)
    if record and "instruction_set" in record:
        built = cpufeatures.InstructionSet.from_json(record["instruction_set"])
        f["build_instruction_set"] = built.summary()
        f["build_amx"] = built.amx
    else:
        f["build_instruction_set"] = None
    try:
        lowlevel = native.llama_cpp_module()
        import llama_cpp

        f["llama_cpp_version"] = getattr(llama_cpp, "__version__", "?")
        f["llama_cpp_path"] = str(getattr(lowlevel._lib, "_name", "?"))
        f["cpu_features"] = native.system_info()
        info = native.info()
        f["patched"] = True
        f["library_series_hash"] = info.get("series_hash")
        f["features"] = info.get("features", [])
        f["backends"] = info.get("backends", [])
        if f.get("series_hash") and info.get("series_hash") != f["series_hash"]:
            rep.problems.append("the installed library was built from another patch series "
                                f"({str(info.get('series_hash'))[:12]} ≠ {f['series_hash'][:12]}) "
                                "— run: flashflex build")
        elif f["build_instruction_set"] is None:
            rep.problems.append("the installed library does not record the instruction set it was built for "
                                "(built before flashflex keyed builds by CPU) — run: flashflex build --force")
        stale = bool(f.get("series_hash")) and info.get("series_hash") != f["series_hash"]
        f["devices"] = None  # a library from another series may lack the devices API (its problem is reported)
        if not stale and "devices" in f["features"]:
            f["devices"] = native.devices()
            warning = device_warning(f["build_backend"], f["devices"])
            if warning:
                rep.warnings.append(warning)
        if "AMX_INT8 = 1" in f["cpu_features"] and not f.get("build_amx"):
            rep.problems.append("the installed library compiles ggml's AMX path, which segfaults at this pin "
                                "(upstream llama.cpp issue 20824) — run: flashflex build --force")
    except native.WrongCPU as exc:
        f["patched"] = None
        rep.problems.append(exc.one_line())
    except native.NotPatched as exc:
        f.setdefault("patched", False)
        rep.problems.append(exc.one_line())
    mem = psutil.virtual_memory()
    f["ram_total"] = mem.total
    f["ram_available"] = mem.available
    cache = cache_root()
    probe = cache if cache.exists() else cache.parent if cache.parent.exists() else root
    f["cache_dir"] = str(cache)
    f["disk_free"] = shutil.disk_usage(probe).free
    f["cpu_count"] = psutil.cpu_count(logical=True)
    return rep
