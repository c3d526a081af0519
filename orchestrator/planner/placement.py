"""Layers on other machines: which of a model's layers go to which RPC worker device, and what stays on this host.

llama.cpp places layers by two model parameters (layer split mode): `n_gpu_layers` = the number of the model's
LAST layers (the output layer counting as one more) given to the devices in its list, and `tensor_split` = the share
of those layers each device takes, in list order. The input embedding always stays on the CPU. So a placement is:
layers [0, local_layers) here, then one contiguous block per worker device, the last device also holding the output
layer (output norm and output matrix; for a model without an output matrix, llama.cpp puts a copy of the token
embedding there).

How many layers and where (place_layers, pure):

- Each device's capacity = the memory its worker announces (free) minus a compute reserve (the same conservative
  estimate as the local plan's compute buffers). A layer costs its weights plus its KV cache (f16, the whole
  context); the output layer costs its weights.
- Layers given (rpc.layers = R): the model's last R layers are split across the devices in proportion to their
  capacity; where that overfills a device, the devices are filled in turn instead, the last device first (it also
  holds the output layer). R that fits neither way is refused, with the number that would fit.
- Layers not given: the largest R that fits — as many layers as the workers' memory holds, all of them if it can.
- Devices that get no layer are left out of the device list (a warning names them).

What stays here (the input embedding, layers [0, local_layers) and any other tensor outside the layers) is planned
under the local budget exactly like a model of local_layers layers: resident, streamed or banked (local_table).

MoE models in a bank mode (resident-bank, slot-bank, the oracles) keep every layer's routed experts here, in slot
banks, while the workers get the rest of their layers (llama.cpp's --cpu-moe shape: the expert tensors are kept in
the CPU buffer type by a tensor override, EXPERTS_HERE); a worker layer then costs its attention, norms, router and
shared experts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from orchestrator.errors import FlashflexError
from orchestrator.modelfile.table import ModelTable, Role, TensorInfo
from orchestrator.planner.buffers import compute_bytes
from orchestrator.planner.schema import RPCDevicePlan, RPCPlan
from orchestrator.sizes import format_size

_OUTPUT_NAMES = re.compile(r"^output(_norm)?\.(weight|bias)$")

# Routed-expert weights that stay on this host, in slot banks, when a MoE model's layers sit on RPC workers (llama.cpp's
# --cpu-moe shape): llama.cpp is told to keep every tensor this matches in the CPU buffer type, and the planner keeps
# the same tensors here.
EXPERTS_HERE = r"\.ffn_(up|down|gate|gate_up)_exps\."
_EXPERTS_HERE = re.compile(EXPERTS_HERE)
# With router-lookahead prefetch, every layer's router stays here too: the prefetcher applies layer L+1's router to
# layer L's MoE input on this host, so it needs the router's bytes in host memory.
ROUTERS_HERE = r"\.ffn_gate_inp\.weight$"
_ROUTERS_HERE = re.compile(ROUTERS_HERE)


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """A worker device as the planner sees it (orchestrator.rpc.Worker gives these)."""

    endpoint: str
    device: int
    free: int
    total: int


def devices_of(workers: list[Any]) -> list[DeviceMemory]:
    """Every device of every worker (orchestrator.rpc.Worker), in --rpc order."""
    return [DeviceMemory(w.endpoint, d.index, d.free, d.total) for w in workers for d in w.devices]


def is_output_tensor(t: TensorInfo) -> bool:
    """Tensors llama.cpp creates on the output layer's device."""
    return t.layer is None and bool(_OUTPUT_NAMES.match(t.name))


def output_layer_bytes(table: ModelTable) -> int:
    """Bytes the output layer puts on its device: output norm and matrix, or a copy of the token embedding when the
    model ties its output to it."""
    outs = [t for t in table.tensors if is_output_tensor(t)]
    n = sum(t.n_bytes for t in outs)
    if not any(t.name == "output.weight" for t in outs):
        n += sum(t.n_bytes for t in table.tensors if t.role is Role.TOKEN_EMBD)
    return n


def is_expert_here(t: TensorInfo) -> bool:
    """A routed-expert weight that stays here when the experts stay here (EXPERTS_HERE)."""
    return t.layer is not None and bool(_EXPERTS_HERE.search(t.name))


def is_router_here(t: TensorInfo) -> bool:
    """A layer's router weight, kept here for router-lookahead prefetch (ROUTERS_HERE)."""
    return t.layer is not None and bool(_ROUTERS_HERE.search(t.name))


def _stays_here(t: TensorInfo, experts_here: bool, routers_here: bool) -> bool:
    """A layer's tensor that stays on this host whichever device holds its layer."""
    return (experts_here and is_expert_here(t)) or (routers_here and is_router_here(t))


def _layer_costs(table: ModelTable, ctx: int, experts_here: bool,
                 routers_here: bool = False) -> tuple[list[int], list[int]]:
    a = table.arch
    weights = [0] * a.n_layer
    for t in table.tensors:
        if t.layer is not None and 0 <= t.layer < a.n_layer and not _stays_here(t, experts_here, routers_here):
            weights[t.layer] += t.n_bytes
    kv = ctx * a.n_head_kv * (a.head_dim_k + a.head_dim_v) * 2
    return weights, [kv] * a.n_layer


def _proportional(r: int, caps: list[int]) -> list[int]:
    """r split in proportion to caps, largest remainders first (cumulative rounding keeps the sum exact)."""
    total = sum(caps)
    if total <= 0:
        return [0] * len(caps)
    out, before, acc = [], 0, 0
    for c in caps:
        acc += c
        upto = (r * acc + total // 2) // total
        out.append(upto - before)
        before = upto
    return out


class _Fit:
    def __init__(self, weights: list[int], kv: list[int], output: int, caps: list[int]):
        self.weights, self.kv, self.output, self.caps = weights, kv, output, caps
        self.n = len(weights)

    def used(self, counts: list[int]) -> list[int] | None:
        """Bytes per device for `counts` layers each (the model's last sum(counts) layers, in device order; the output
        layer on the last device that gets layers), or None when one overflows."""
        first = self.n - sum(counts)
        last = max((d for d, c in enumerate(counts) if c > 0), default=None)
        out = []
        for d, c in enumerate(counts):
            used = sum(self.weights[i] + self.kv[i] for i in range(first, first + c))
            used += self.output if d == last else 0
            if used > self.caps[d]:
                return None
            out.append(used)
            first += c
        return out

    def fill_from_last(self, r: int) -> list[int] | None:
        """The devices filled in turn with the model's last r layers, the last device first: it also holds the output
        layer (or, when it cannot hold that and a layer, the next one that can)."""
        counts = [0] * len(self.caps)
        layer, left, output_pending = self.n - 1, r, True
        for d in range(len(self.caps) - 1, -1, -1):
            room = self.caps[d] - (self.output if output_pending else 0)
            while left > 0 and layer >= 0 and self.weights[layer] + self.kv[layer] <= room:
                room -= self.weights[layer] + self.kv[layer]
                counts[d] += 1
                layer -= 1
                left -= 1
            output_pending = output_pending and counts[d] == 0
        return counts if left == 0 and self.used(counts) is not None else None

    def assign(self, r: int) -> list[int] | None:
        counts = _proportional(r, self.caps)
        if sum(counts) == r and self.used(counts) is not None:
            return counts
        return self.fill_from_last(r)


def place_layers(table: ModelTable, devices: list[DeviceMemory], *, ctx: int, ubatch: int,
                 layers: int | None = None, compute: int | None = None,
                 experts_here: bool = False, routers_here: bool = False) -> tuple[RPCPlan, list[str]]:
    """The placement of `table`'s layers on `devices` (see the module docstring) and warnings. Pure.

    `experts_here`: the routed experts of every layer stay on this host (in slot banks); the workers get the rest
    of their layers (attention, norms, router, shared experts). `routers_here`: the routers stay here as well
    (router-lookahead prefetch reads them here)."""

    name = table.files[0].name if table.files else table.arch.arch
    n_layer = table.arch.n_layer
    if not devices:
        raise FlashflexError("no RPC worker device to place layers on", "give --rpc HOST:PORT")
    if n_layer < 1:
        raise FlashflexError(f"{name} has no repeating layers to place on RPC workers", "drop --rpc")
    reserve = compute if compute is not None else compute_bytes(table, ctx, ubatch)
    weights, kv = _layer_costs(table, ctx, experts_here, routers_here)
    output = output_layer_bytes(table)
    fit = _Fit(weights, kv, output, [max(0, d.free - reserve) for d in devices])
    where = ", ".join(f"{d.endpoint}#{d.device} {format_size(d.free)}" for d in devices)
    if layers is not None:
        if layers > n_layer:
            raise FlashflexError(f"--rpc-layers {layers} exceeds the {n_layer} layers of {name}",
                                 f"give at most {n_layer}")
        counts = fit.assign(layers)
        if counts is None:
            most = next((r for r in range(layers - 1, 0, -1) if fit.assign(r) is not None), 0)
            raise FlashflexError(
                f"the RPC workers' announced memory ({where}) holds {most} of {name}'s layers, not --rpc-layers "
                f"{layers} (a layer needs {format_size(weights[-1] + kv[-1], round_up=True)} with its KV cache, each "
                f"device {format_size(reserve, round_up=True)} for compute, the last the output layer "
                f"{format_size(output, round_up=True)})",
                f"give --rpc-layers {most} or fewer, lower --ctx, or start the workers with more --mem"
                if most else "lower --ctx, or start the workers with more --mem")
    else:
        counts = None
        for r in range(n_layer, 0, -1):
            counts = fit.assign(r)
            if counts is not None:
                break
        if counts is None:
            raise FlashflexError(
                f"the RPC workers' announced memory ({where}) holds no layer of {name}: a layer needs "
                f"{format_size(weights[-1] + kv[-1], round_up=True)} with its KV cache, plus "
                f"{format_size(reserve, round_up=True)} for compute and the output layer "
                f"{format_size(output, round_up=True)} on the last device",
                "start the workers with more --mem (or on bigger machines), or lower --ctx")
    used = fit.used(counts)
    assert used is not None
    remote = sum(counts)
    warnings = [f"RPC worker {d.endpoint} (device {d.device}) gets no layer: its memory holds none beside the others"
                for d, c in zip(devices, counts) if c == 0]
    plans = []
    first = n_layer - remote
    kept = [(d, c, u) for d, c, u in zip(devices, counts, used) if c > 0]
    for i, (d, c, u) in enumerate(kept):
        last = i == len(kept) - 1
        w = sum(weights[first:first + c]) + (output if last else 0)
        k = sum(kv[first:first + c])
        plans.append(RPCDevicePlan(endpoint=d.endpoint, device=d.device, free_bytes=d.free, total_bytes=d.total,
                                   first_layer=first, n_layers=c, output=last, weight_bytes=w, kv_cache_bytes=k,
                                   compute_bytes=reserve, used_bytes=w + k + reserve))
        first += c
    split = [float(p.n_layers + (1 if p.output else 0)) for p in plans]
    local_bytes = sum(t.n_bytes for t in local_table(table, n_layer - remote, experts_here, routers_here).tensors)
    # what llama.cpp sends to the devices while loading, each tensor read whole into a host buffer first
    sent = [t.n_bytes for t in table.tensors
            if (t.layer is not None and t.layer >= n_layer - remote and not _stays_here(t, experts_here, routers_here))
            or is_output_tensor(t)]
    if not any(t.name == "output.weight" for t in table.tensors):
        sent += [t.n_bytes for t in table.tensors if t.role is Role.TOKEN_EMBD]  # the output layer's copy
    plan = RPCPlan(devices=plans, local_layers=n_layer - remote, remote_layers=remote, n_gpu_layers=remote + 1,
                   tensor_split=split, requested_layers=layers,
                   remote_weight_bytes=sum(p.weight_bytes for p in plans), local_model_bytes=local_bytes,
                   experts_here=experts_here, routers_here=routers_here, load_staging_bytes=max(sent, default=0),
                   cpu_tensors=[EXPERTS_HERE] * experts_here + [ROUTERS_HERE] * routers_here)
    return plan, warnings


def local_table(table: ModelTable, local_layers: int, experts_here: bool = False,
                routers_here: bool = False) -> ModelTable:
    """The part of `table` that stays on this host: layers [0, local_layers), the tensors outside the layers except
    the output layer's and, with `experts_here`, every layer's routed experts; as a model of local_layers layers (so
    the local plan's KV cache counts only them)."""
    keep = [t for t in table.tensors
            if (t.layer is None and not is_output_tensor(t)) or (t.layer is not None and t.layer < local_layers)
            or (t.layer is not None and _stays_here(t, experts_here, routers_here))]
    arch = dataclasses.replace(table.arch, n_layer=local_layers,
                               n_leading_dense=min(table.arch.n_leading_dense, local_layers))
    return ModelTable(files=table.files, arch=arch, tensors=keep, metadata=table.metadata)
