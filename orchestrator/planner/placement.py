"""Layers on other machines: which of a model's layers go to which RPC worker device, and what stays on this host.

llama.cpp places layers by two model parameters (layer split mode): `n_gpu_layers` = the number of the model's
LAST layers (the output layer counting as one more) given to the devices in its list, and `tensor_split` = the share
of those layers each device takes, in list order. The input embedding always stays on the CPU. So a placement is:
layers [0, local_layers) here, then one contiguous block per worker device, the last device also holding the output
layer (output norm and output matrix; for a model without an output matrix, llama.cpp puts a copy of the token
embedding there).

How many layers and where (place_layers, pure):

- Each device's capacity = the memory its worker announces (free; this host's GPUs: the device budget) minus a
  compute reserve (measured on this host's GPUs, else the same conservative estimate as the local plan's compute
  buffers). A layer costs its weights plus its KV cache (as llama.cpp sized each layer when a GPU here was
  measured: sliding-window layers hold fewer cells; else f16 for the whole context); the output layer costs its
  weights.
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
from typing import Any, Literal

from orchestrator.errors import FlashflexError
from orchestrator.modelfile.table import ModelTable, Role, TensorInfo
from orchestrator.planner.buffers import compute_bytes, kv_layer_bytes
from orchestrator.planner.schema import RPCDevicePlan, RPCPlan
from orchestrator.rpc import LOCAL
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
    """A device as the planner sees it: an RPC worker's, or one of this host's GPUs (endpoint LOCAL)
    (orchestrator.rpc.Worker gives these)."""

    endpoint: str
    device: int
    free: int
    total: int
    name: str = ""
    capacity: int | None = None  # what the plan may use (this host's GPUs: the device budget); None = free
    compute: int | None = None  # its compute buffer, measured; None = the planner's estimate
    kv_layers: tuple[int, ...] | None = None  # each layer's KV cache, measured; None = the planner's formula

    @property
    def label(self) -> str:
        """How messages name it: this host's GPU by its backend name, a worker's device by endpoint and index."""
        if self.endpoint == LOCAL:
            return f"this host's {self.name or f'GPU #{self.device}'}"
        return f"{self.endpoint}#{self.device}"

    @property
    def usable(self) -> int:
        return self.capacity if self.capacity is not None else self.free


def devices_of(workers: list[Any]) -> list[DeviceMemory]:
    """Every device of every worker (orchestrator.rpc.Worker), in llama.cpp's device order (this host's GPUs, then
    --rpc order)."""
    return [DeviceMemory(w.endpoint, d.index, d.free, d.total, d.name, d.capacity, d.compute, d.kv_layers)
            for w in workers for d in w.devices]


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


def _stays_here(t: TensorInfo, experts_here: bool, routers_here: bool, experts_from: int | None = None) -> bool:
    """A layer's tensor that stays on this host whichever device holds its layer: its routed experts (unless the
    layer is at or past `experts_from`, whose experts went to the GPU with it), its router for lookahead."""
    expert_here = experts_here and is_expert_here(t) and (experts_from is None or (t.layer or 0) < experts_from)
    return expert_here or (routers_here and is_router_here(t))


def experts_here_pattern(experts_from: int | None) -> str:
    """The tensor override keeping routed experts in the CPU buffer type: every layer's, or only those of layers
    below `experts_from` (the others went to the GPU with their layer)."""
    if experts_from is None:
        return EXPERTS_HERE
    return rf"^blk\.({'|'.join(str(i) for i in range(experts_from))})" + EXPERTS_HERE


def _layer_costs(table: ModelTable, ctx: int, experts_here: bool, routers_here: bool = False,
                 experts_from: int | None = None,
                 kv_measured: tuple[int, ...] | None = None) -> tuple[list[int], list[int]]:
    """Each layer's weights that go with it to a device, and its KV cache: as llama.cpp sized it (`kv_measured`, one
    entry per layer), else f16 for the whole context."""
    a = table.arch
    weights = [0] * a.n_layer
    for t in table.tensors:
        if (t.layer is not None and 0 <= t.layer < a.n_layer
                and not _stays_here(t, experts_here, routers_here, experts_from)):
            weights[t.layer] += t.n_bytes
    if kv_measured is not None and len(kv_measured) == a.n_layer:
        return weights, list(kv_measured)
    return weights, [kv_layer_bytes(table, ctx)] * a.n_layer


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
                 experts_here: bool = False, routers_here: bool = False,
                 flag: str = "--rpc-layers", experts_to_gpus: bool = False) -> tuple[RPCPlan, list[str]]:
    """The placement of `table`'s layers on `devices` (see the module docstring) and warnings. Pure.

    `experts_here`: the routed experts of every layer stay on this host (in slot banks); the devices get the rest
    of their layers (attention, norms, router, shared experts). `routers_here`: the routers stay here as well
    (router-lookahead prefetch reads them here). Each device's compute reserve is its measured compute buffer, else
    `compute`, else the planner's estimate. `flag` is the option that asked for `layers`, for messages."""

    name = table.files[0].name if table.files else table.arch.arch
    n_layer = table.arch.n_layer
    if not devices:
        raise FlashflexError("no RPC worker device to place layers on", "give --rpc HOST:PORT")
    if n_layer < 1:
        raise FlashflexError(f"{name} has no repeating layers to place on other devices", "drop --rpc and -ngl")
    estimate = compute if compute is not None else compute_bytes(table, ctx, ubatch)
    reserves = [d.compute if d.compute is not None else estimate for d in devices]
    kv_measured = next((d.kv_layers for d in devices if d.kv_layers is not None), None)
    weights, kv = _layer_costs(table, ctx, experts_here, routers_here, kv_measured=kv_measured)
    kv_source: Literal["measured", "estimated"] = (
        "measured" if kv_measured is not None and len(kv_measured) == n_layer else "estimated")
    output = output_layer_bytes(table)
    fit = _Fit(weights, kv, output, [max(0, d.usable - r) for d, r in zip(devices, reserves)])
    where = ", ".join(f"{d.label} {format_size(d.usable)}"
                      + (" budget" if d.capacity is not None else "") for d in devices)
    local = any(d.endpoint == LOCAL for d in devices)
    whose = "the devices' memory" if local else "the RPC workers' announced memory"
    more = ("give a larger --gpu-budget (or free memory on the GPU)" if local else "") + (
        ", " if local and len({d.endpoint for d in devices}) > 1 else "") + (
        "start the workers with more --mem" if any(d.endpoint != LOCAL for d in devices) else "")
    need = (f"a layer needs {format_size(weights[-1] + kv[-1], round_up=True)} with its KV cache, each device "
            f"{format_size(max(reserves), round_up=True)} for compute, the last the output layer "
            f"{format_size(output, round_up=True)}")
    if layers is not None:
        if layers > n_layer:
            raise FlashflexError(f"{flag} {layers} exceeds the {n_layer} layers of {name}",
                                 f"give at most {n_layer}")
        counts = fit.assign(layers)
        if counts is None:
            most = next((r for r in range(layers - 1, 0, -1) if fit.assign(r) is not None), 0)
            raise FlashflexError(
                f"{whose} ({where}) holds {most} of {name}'s layers, not {flag} {layers} ({need})",
                f"give {flag} {most} or fewer, lower --ctx, or {more}" if most else f"lower --ctx, or {more}")
    else:
        counts = None
        for r in range(n_layer, 0, -1):
            counts = fit.assign(r)
            if counts is not None:
                break
        if counts is None:
            raise FlashflexError(f"{whose} ({where}) holds no layer of {name}: {need}",
                                 f"{more} (or on bigger machines), or lower --ctx" if not local
                                 else f"{more}, or lower --ctx")
    used = fit.used(counts)
    assert used is not None
    remote = sum(counts)
    experts_from = (_experts_to_the_gpu(table, devices, counts, used, fit.caps, experts_here)
                    if experts_to_gpus else None)
    if experts_from is not None:  # the moved experts count with their layer's weights from here on
        weights, _kv = _layer_costs(table, ctx, experts_here, routers_here, experts_from)
    warnings = [f"{d.label} gets no layer: its memory holds none beside the others" if d.endpoint == LOCAL else
                f"RPC worker {d.endpoint} (device {d.device}) gets no layer: its memory holds none beside the others"
                for d, c in zip(devices, counts) if c == 0]
    plans = []
    first = n_layer - remote
    kept = [(d, c, r) for d, c, r in zip(devices, counts, reserves) if c > 0]
    for i, (d, c, r) in enumerate(kept):
        last = i == len(kept) - 1
        w = sum(weights[first:first + c]) + (output if last else 0)
        k = sum(kv[first:first + c])
        plans.append(RPCDevicePlan(endpoint=d.endpoint, device=d.device, name=d.name, free_bytes=d.free,
                                   total_bytes=d.total, budget_bytes=d.capacity, first_layer=first, n_layers=c,
                                   output=last, weight_bytes=w, kv_cache_bytes=k, compute_bytes=r,
                                   compute_source="measured" if d.compute is not None else "estimated",
                                   kv_source=kv_source,
                                   used_bytes=w + k + r))
        first += c
    split = [float(p.n_layers + (1 if p.output else 0)) for p in plans]
    here = local_table(table, n_layer - remote, experts_here, routers_here, experts_from)
    # what llama.cpp sends to the devices while loading, each tensor read whole into a host buffer first
    sent = [t.n_bytes for t in table.tensors
            if (t.layer is not None and t.layer >= n_layer - remote
                and not _stays_here(t, experts_here, routers_here, experts_from)) or is_output_tensor(t)]
    if not any(t.name == "output.weight" for t in table.tensors):
        sent += [t.n_bytes for t in table.tensors if t.role is Role.TOKEN_EMBD]  # the output layer's copy
    plan = RPCPlan(devices=plans, local_layers=n_layer - remote, remote_layers=remote, n_gpu_layers=remote + 1,
                   tensor_split=split, requested_layers=layers,
                   remote_weight_bytes=sum(p.weight_bytes for p in plans),
                   local_model_bytes=sum(t.n_bytes for t in here.tensors),
                   experts_here=experts_here, routers_here=routers_here, experts_on_gpu_from=experts_from,
                   load_staging_bytes=max(sent, default=0),
                   cpu_tensors=[experts_here_pattern(experts_from)] * experts_here + [ROUTERS_HERE] * routers_here)
    return plan, warnings


def _experts_to_the_gpu(table: ModelTable, devices: list[DeviceMemory], counts: list[int], used: list[int],
                        caps: list[int], experts_here: bool) -> int | None:
    """-ngl auto, once every placed layer's dense part is on the GPUs: the routed experts of whole layers follow
    them while the room left holds them, the model's last layer first (on the last device) and no further than a
    layer that does not fit, so the layers whose experts stay in host banks are always the first ones, layer 0 at
    least (the bank mode asked for keeps something to bank). Only this host's GPUs take experts (a worker's would
    cross the network on every miss). The first layer whose experts moved, or None."""
    if not experts_here:
        return None
    n_layer = table.arch.n_layer
    experts = [0] * n_layer
    for t in table.tensors:
        if t.layer is not None and 0 <= t.layer < n_layer and is_expert_here(t):
            experts[t.layer] += t.n_bytes
    room = [c - u for c, u in zip(caps, used)]
    layer, first = n_layer - 1, None
    for d in range(len(devices) - 1, -1, -1):
        if counts[d] == 0:
            continue
        if devices[d].endpoint != LOCAL:
            break
        low = max(1, layer - counts[d] + 1)
        while layer >= low and experts[layer] and experts[layer] <= room[d]:
            room[d] -= experts[layer]
            first = layer
            layer -= 1
        if layer >= low:  # a layer of this device kept its experts here: the layers below keep theirs too
            break
    return first


def local_table(table: ModelTable, local_layers: int, experts_here: bool = False,
                routers_here: bool = False, experts_from: int | None = None) -> ModelTable:
    """The part of `table` that stays on this host: layers [0, local_layers), the tensors outside the layers except
    the output layer's and, with `experts_here`, the routed experts of every layer below `experts_from` (all when
    None); as a model of local_layers layers (so the local plan's KV cache counts only them)."""
    keep = [t for t in table.tensors
            if (t.layer is None and not is_output_tensor(t)) or (t.layer is not None and t.layer < local_layers)
            or (t.layer is not None and _stays_here(t, experts_here, routers_here, experts_from))]
    arch = dataclasses.replace(table.arch, n_layer=local_layers,
                               n_leading_dense=min(table.arch.n_leading_dense, local_layers))
    return ModelTable(files=table.files, arch=arch, tensors=keep, metadata=table.metadata)
