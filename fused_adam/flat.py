"""Flat buffers: one contiguous buffer per (device, dtype, Layout) for params, grads and each
optimizer state, shared by every param group with that Layout (lr, betas, eps and weight decay
are rows of the launch, not buffers), so a step is one backend call per kind of buffer instead of
one per tensor or group.

Params are re-pointed (`p.data = view`) into the buffer, keeping their strides (a channels_last
weight stays channels_last), so the model and `model.state_dict()` keep working. Grads that are
views of the grad buffer (the case after the first step and `zero_grad(set_to_none=False)`) are
used in place; any other grad (backward after `zero_grad()`, an assigned `p.grad`) is copied in
and `p.grad` re-pointed to its view. `optimizer.state[p]` holds views too, in torch's layout, and
`step` is a 0-dim view of one float32 CPU tensor per buffer, so counting steps is one op.
States may have their own dtypes (`state_dtype`), and with `master_weights` a bf16/fp16 buffer
keeps an fp32 master copy (`state[p]["master_param"]`) that the step updates.
Complex params live in a real buffer as (re, im) pairs, which is what torch's Adam computes on.
To the rest of the program each param, grad and state stays a tensor of its own: the views are
DLPack aliases, each with a storage of its own bytes (over the buffer's memory, which the alias
keeps alive), so safetensors and accelerate (one name per storage), pickle and torch.save (the
whole storage) see per-param tensors, not one buffer. User code may replace any of them: a param's
storage (`p.data = t`, `model.to()`), a grad's (`p.grad.data = t`, `p.grad.set_(t)`: Horovod), a
state tensor or dict (`opt.state[p]["exp_avg"] = t`, `exp_avg.data = t`, `del opt.state[p]`);
each step checks for that first and adopts the new values, as torch.optim would use them.
Params with `requires_grad=False` and no grad get no buffer space and no state (LoRA freezes most
of a model); one that later gets a grad re-packs its group's buffers.
Params whose storage another engine owns are not re-pointed but copied in and out: each step
copies the param (its local shard) and its grad into the buffer before the update and back after
it. Those are DTensor shards (FSDP2, whose all-gather reads the shard's own storage; their states
are DTensors with the param's mesh and placements over views of the buffer, as torch.optim's would
be), params that view a larger storage not ours (ZeroRedundancyOptimizer's
`parameters_as_bucket_view` re-points params into its buckets after building its optimizer, then
broadcasts the buckets), and params whose storage another tensor also uses: FSDP1 keeps its
local shard and resets `flat_param.data` to it after every forward and backward; tied params and
the tensor handed to `nn.Embedding.from_pretrained` must stay tied. Moving any of them would drop
the update or untie them. So are params in shared memory (`model.share_memory()`, Hogwild: the
workers step the shared storage). Such params are classified again whenever a group re-packs (a
storage replaced by `model.to()` is the param's own again). Params that share one storage are
stepped one after another, each copied in just before its update, as torch's loop does.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import operator
import sys
import weakref
from array import array
from dataclasses import dataclass

import torch

from . import _ext, quantize

# Each segment starts at a multiple of 16 elements: views stay >= 32-byte aligned, so a kernel
# working per segment keeps its 128-bit vector loads, and every buffer's length is a multiple of
# 16, so whole-buffer launches need no scalar tail.
ALIGN = 16
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
MASTER_KEY = "master_param"  # the fp32 master copy of a bf16/fp16 param, in optimizer.state[p]
# The states a launch takes after param and grad, in the backends' order (8-bit states: the
# moments are codes, with their scales last).
OPERAND_STATES = (*STATE_KEYS, MASTER_KEY, *map(quantize.absmax_key, quantize.KEYS))
LOW_PRECISION = (torch.bfloat16, torch.float16)
SPARSE_ERROR = "Adam does not support sparse gradients, please consider SparseAdam instead"
_GRAD = operator.attrgetter("grad")
# Params of 4M elements (16 MB in fp32) and more are stepped in their own storage, not copied into
# a buffer: no second copy at construction (a 1 GiB param cost 1 GiB more), and autograd's grad
# is read in place (with zero_grad() setting grads to None, a step held 5 GiB for a 1 GiB model
# where torch holds 4). A launch each costs ~10 us of host time against milliseconds of work.
SOLO_NUMEL = 1 << 22
# Packed params are split into buffers of at most 16M elements (64 MiB in fp32): construction
# holds at most one such chunk twice (the params and their copy), and a group that changes
# re-packs only the chunks that hold its params, not every group's (a tiny group unfrozen next
# to a 64M-element one: 327 ms and +512 MiB with one buffer). One launch still steps them all.
CHUNK_NUMEL = 1 << 24
# Packed params of 64K elements and more have no grad buffer: autograd's grad is read where it
# is, each param a segment of the launch. Copying it into a buffer moved 8 more B/param (36, not
# 28) when `zero_grad()` (set_to_none, torch's default) made grads anew each step (GPT-2 shapes
# on CPU: 0.49x torch fused), and the buffer held 4 B/param more than torch. Below that a copy
# costs less than a segment of its own (~2 us of host time) and the buffer stays.
GRAD_IN_PLACE_NUMEL = 1 << 16


# What `addresses` reads of each tensor (csrc/census.cpp).
OBJECTS, DATA, GRADS, GRADS_AS_THEY_ARE, STEP = 0, 1, 2, 3, 4


def addresses(tensors, kind: int = DATA) -> bytes | None:
    """Per tensor, as native uint64 values: its id (OBJECTS), its data address (DATA), its grad's
    `_cdata` and data address, 0 and 0 for None (GRADS), or whether it has a grad a kernel reads
    as it is, contiguous in the tensor's shape and dtype (GRADS_AS_THEY_ARE: 1, or 0 for None;
    None where one is not, or Python must look at it): what each step compares with the last
    step's to find tensors user code re-pointed. The extension's loop when it is loaded (after a
    step has streamed its operands through the cache, it overlaps the misses a Python loop takes
    one by one: 0.05-0.10 vs 0.17-0.33 ms per 1000 tensors, bench/NOTES.md 21), else Python's;
    the grads' kinds only from the extension (None without it: the caller looks at the grads one
    by one)."""
    module = _ext.module()
    found = None if module is None else module.addresses(tensors, kind)
    if found is not None or kind >= GRADS:
        return found
    return array("Q", map(id if kind == OBJECTS else torch.Tensor.data_ptr, tensors)).tobytes()


def observed() -> bool:
    """Whether a profiler range opened now reaches anyone (a profiler, legacy or Kineto, an
    execution-trace observer: any RecordFunction callback); True without the extension, which
    alone can tell."""
    module = _ext.module()
    return module is None or module.observed()


def _values(found: bytes) -> memoryview:
    """`addresses`' values as ints (indexable, iterable)."""
    return memoryview(found).cast("Q")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise): what the kernels step."""
    return t._local_tensor if _is_dtensor(t) else t


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # (asked per tensor and step: these first, ~0.1 us)


def _is_dtensor(t) -> bool:
    if type(t) in _PLAIN:
        return False
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
    return module is not None and isinstance(t, module.DTensor)


# The storages of the params' aliases into our buffers.
_OWN_STORAGES: weakref.WeakSet = weakref.WeakSet()


def _is_external(p: torch.Tensor) -> bool:
    """Whether `p` must stay in its own storage (see the module docstring): copied in and out."""
    # (share_memory_ moves even one of our aliases; CUDA tensors always say is_shared())
    if _is_dtensor(p) or (p.device.type == "cpu" and p.is_shared()):
        return True
    storage = p.untyped_storage()
    if storage.nbytes() > p.numel() * p.element_size():  # a view into a larger storage (a
        return True  # ZeRO bucket, FSDP1's flat param, a row of one of our own aliases)
    return (storage not in _OWN_STORAGES
            and torch._C._storage_Use_Count(storage._cdata) > _sole_use_count())


@functools.cache
def _sole_use_count() -> int:
    """The storage use count of a tensor nobody else refers to, counted as _is_external counts
    (the Python storage object it asks through holds a reference of its own)."""
    t = torch.empty(1)
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _storage_address(p: torch.Tensor) -> int:
    """Where p's storage (a DTensor's local one) starts: equal for params that share it."""
    return _local(p).untyped_storage().data_ptr()


def overlapping(params: list[torch.Tensor]) -> set[int]:
    """ids of the params whose memory (a DTensor's local one) overlaps another's (a param
    listed twice is one param)."""
    spans = []
    for p in {id(p): p for p in params}.values():
        t = _local(p)
        if t.numel():
            extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
            start = t.data_ptr()
            spans.append((start, start + extent * t.element_size(), id(p)))
    spans.sort()
    found, reach, last = set(), None, None  # the furthest end so far, and whose it is
    for start, end, key in spans:
        if reach is not None and start < reach:
            found.update((key, last))
        if reach is None or end > reach:
            reach, last = end, key
    return found


def _alias(view: torch.Tensor) -> torch.Tensor:
    """`view` as a tensor with a storage of its own bytes (DLPack; it keeps the buffer alive)."""
    return torch.from_dlpack(view)


def _check_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Raises, before anything changes, where torch's step would on grad `g` (local tensors): a
    sparse grad, or one whose shape does not broadcast to the param's (torch's in-place ops)."""
    if g.layout != torch.strided:
        raise RuntimeError(SPARSE_ERROR)
    if g.shape != p.shape:
        shape = torch.broadcast_shapes(p.shape, g.shape)  # (torch's error when they do not)
        if shape != p.shape:
            raise RuntimeError(f"output with shape {list(p.shape)} doesn't match the broadcast "
                               f"shape {list(shape)}")


def _readable(g: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a kernel reads grad `g` of param `p` as it is: p's shape, contiguous, `dtype`."""
    return g.shape == p.shape and g.dtype == dtype and g.is_contiguous()


def _dense_grad(g: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`g` as a kernel reads a grad: itself when `_readable`, else a copy in p's shape
    (broadcast, as torch's ops do), contiguous, `dtype`."""
    if _readable(g, p, dtype):
        return g
    return g.expand(p.shape).to(dtype).contiguous()  # (.to(memory_format=) keeps stride 0)


def _check_writable(p: torch.Tensor) -> None:
    """torch.optim's in-place update of an expanded param raises this; so do we, before any
    step (instead of silently stepping a materialized copy its base never sees)."""
    if torch._debug_has_internal_overlap(p) == 1:
        raise RuntimeError("unsupported operation: more than one element of the written-to "
                           "tensor refers to a single memory location. Please clone() the tensor "
                           "before performing the operation.")


def buffer_key(p: torch.Tensor) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, real dtype, real grad dtype): the buffer a param belongs to. The grad dtype is
    `p.grad_dtype` where torch has it and it is set (a bf16 param can get fp32 grads), else the
    param's."""
    real = lambda dtype: dtype.to_real() if dtype.is_complex else dtype  # noqa: E731
    return p.device, real(p.dtype), real(getattr(p, "grad_dtype", None) or p.dtype)


def _elements(p: torch.Tensor) -> int:
    """How many real elements p (a DTensor's local shard) takes in a buffer."""
    return _local(p).numel() * (2 if p.is_complex() else 1)


def _padded(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of `flat` at `offset` shaped like `like`, with the dense strides torch gives
    `empty_like(like)` (like's own layout when it is dense, else contiguous)."""
    stride = torch.empty_like(like, device="meta").stride()
    if like.is_complex():
        real = flat.as_strided((*like.shape, 2), (*(2 * s for s in stride), 1), offset)
        return torch.view_as_complex(real)
    return flat.as_strided(like.shape, stride, offset)


def _convert_moments(s: dict, quantized: bool, like: torch.Tensor) -> None:
    """State dict `s` (a load's, or what user code put there) in the form of our buffers: float
    moments of a torch checkpoint quantized for 8-bit states (blocks in the memory order of our
    codes, which take the strides of `like`, the param), and 8-bit ones (codes with their
    scales) decoded for float states."""
    for key in quantize.KEYS:
        value, scale = s.get(key), s.get(quantize.absmax_key(key))
        if not torch.is_tensor(value):
            continue
        if quantized and value.is_floating_point():
            s[key], s[quantize.absmax_key(key)] = quantize.quantize(_local(value), key, like)
        elif quantized and scale is None:
            raise KeyError(f"the 8-bit optimizer state lacks {quantize.absmax_key(key)!r}")
        elif not quantized and scale is not None:
            s[key] = quantize.dequantize(value, scale, key)
            del s[quantize.absmax_key(key)]


class Watch:
    """Set when user code changed a param's state dict (a key set or deleted, cleared): the next
    step then compares every param's state with what the buffers hold, ~0.5 us a param that it
    would otherwise cost every step. A dict replaced or deleted in `optimizer.state` is seen by
    identity (~0.1 us a param)."""

    def __init__(self):
        self.dirty = True


def _touching(method):
    @functools.wraps(method)
    def touch(self, *args, **kwargs):
        self._watch.dirty = True
        return method(self, *args, **kwargs)
    return touch


class WatchedDict(dict):
    """`optimizer.state[p]`: a dict whose mutations set its Watch. state_dict() hands out plain
    copies (a checkpoint must load with `weights_only=True`)."""

    def __init__(self, watch: Watch, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._watch = watch

    def __reduce__(self):
        return type(self), (self._watch, dict(self))

    for _name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update",
                  "__ior__"):
        locals()[_name] = _touching(getattr(dict, _name))  # the class namespace
    del _name


STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_state_dtype(state_dtype, amsgrad: bool) -> None:
    """Raises ValueError where a group's `state_dtype` (with its amsgrad) cannot be stored: at
    construction, add_param_group, a load, and whenever a step meets new options."""
    chosen = state_dtype if isinstance(state_dtype, dict) else {"exp_avg": state_dtype,
                                                                "exp_avg_sq": state_dtype}
    unknown = set(chosen) - {"exp_avg", "exp_avg_sq"}
    if unknown:
        raise ValueError(f"state_dtype keys must be 'exp_avg' and/or 'exp_avg_sq', got {sorted(unknown)}")
    for dtype in chosen.values():
        if dtype is not None and dtype not in STATE_DTYPES and dtype != quantize.INT8:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, 'int8' or None, got {dtype}")
    if quantize.INT8 in chosen.values():
        if set(chosen.values()) != {quantize.INT8} or len(chosen) != 2:
            raise ValueError("state_dtype 'int8' applies to exp_avg and exp_avg_sq together")
        if amsgrad:
            raise ValueError("state_dtype 'int8' does not support amsgrad")


_LAYOUTS: dict[tuple, "Layout"] = {}  # by the group options they come from (a few kinds)


@dataclass(frozen=True)
class Layout:
    """What a group's options decide about its buffers; a change re-packs them."""

    amsgrad: bool = False
    master_weights: bool = False
    device_steps: bool = False  # skip_nonfinite or capturable: step counts on the device
    skips: bool = False  # skip_nonfinite: skipped where a grad of such a group is not finite
    exp_avg_dtype: torch.dtype | None = None  # None: fp32 with master weights, else the param's
    exp_avg_sq_dtype: torch.dtype | None = None  # max_exp_avg_sq follows it

    @classmethod
    def of(cls, group: dict, device_steps: bool = False) -> "Layout":
        """The layout a group's options ask for; `device_steps` forces step counts onto the
        device (the optimizer has seen a GradScaler)."""
        dtypes = group.get("state_dtype")
        key = (group["amsgrad"], group.get("master_weights", False), device_steps,
               group.get("skip_nonfinite"), group.get("capturable"),
               tuple(dtypes.items()) if isinstance(dtypes, dict) else dtypes)
        try:
            made = _LAYOUTS.get(key)  # (asked every step for every group: ~2 us to build)
        except TypeError:  # an unhashable option value: built, not kept
            made, key = None, None
        if made is None:  # (options user code set on a group since: checked before any change)
            check_state_dtype(dtypes, group["amsgrad"])
            if not isinstance(dtypes, dict):
                dtypes = {"exp_avg": dtypes, "exp_avg_sq": dtypes}
            device_steps = device_steps or group.get("skip_nonfinite") or group.get("capturable")
            made = cls(bool(group["amsgrad"]), bool(group.get("master_weights", False)),
                       bool(device_steps), bool(group.get("skip_nonfinite")),
                       dtypes.get("exp_avg"), dtypes.get("exp_avg_sq"))
            if key is not None:
                _LAYOUTS[key] = made
        return made

    @property
    def quantized(self) -> bool:
        """8-bit states (fused_adam/quantize.py): both moments, or neither."""
        return self.exp_avg_dtype == quantize.INT8

    def for_param(self, p: torch.Tensor) -> "Layout":
        """The layout of p's buffer: with 8-bit states, fp32 states instead (float64 ones for a
        float64 param) for a param under quantize.MIN_NUMEL elements, a complex or float64 one,
        a DTensor shard (its states are DTensors like it; scales per block of a shard have no
        such layout) or one whose grads have another dtype."""
        _, dtype, grad_dtype = buffer_key(p)
        if not self.quantized or (p.numel() >= quantize.MIN_NUMEL and not p.is_complex()
                                  and dtype in LOW_PRECISION + (torch.float32,)
                                  and not _is_dtensor(p) and dtype == grad_dtype):
            return self
        return _unquantized(self, torch.float64 if dtype == torch.float64 else torch.float32)

    def state_dtype(self, key: str, param_dtype: torch.dtype) -> torch.dtype:
        chosen = self.exp_avg_dtype if key == "exp_avg" else self.exp_avg_sq_dtype
        if chosen is not None:
            return chosen
        return torch.float32 if self.has_master(param_dtype) else param_dtype

    def has_master(self, param_dtype: torch.dtype) -> bool:
        return self.master_weights and param_dtype in LOW_PRECISION


@functools.cache
def _unquantized(layout: Layout, dtype: torch.dtype) -> Layout:
    return dataclasses.replace(layout, exp_avg_dtype=dtype, exp_avg_sq_dtype=dtype)


class FlatBuffer:
    """Params that share a device, dtype and Layout, packed with their grads and state; they may
    come from several param groups (`groups`: each param's group index, a group's params
    consecutive), each group's spans stepped with its own hyperparameter row."""

    def __init__(self, params: list[torch.Tensor], layout: Layout, watch: Watch, groups=None,
                 solo=False, ordered=False, grad_buffer=True):
        self.params, self.watch = params, watch
        self.groups = [0] * len(params) if groups is None else list(groups)
        # [first, last) param index of each group: consecutive, as the packing adds them
        self.group_range: dict[int, list[int]] = {}
        for i, g in enumerate(self.groups):
            self.group_range.setdefault(g, [i, i])[1] = i + 1
        # ordered: a param whose memory overlaps another's, stepped alone and in order
        self.ordered = ordered
        self.device, self.dtype, self.grad_dtype = buffer_key(params[0])
        # solo: one large param stepped in its own storage (GroupBuffers' SOLO_NUMEL), its grad
        # read where autograd put it: no copy of either, as torch.optim holds them.
        self.solo = solo
        # (8-bit states: each param starts on a block of their scales)
        self.quantized = layout.quantized
        align = quantize.QBLOCK if self.quantized else ALIGN
        bounds = [0]
        for p in params:
            bounds.append(bounds[-1] + (_elements(p) if solo else _padded(_elements(p), align)))
        self.bounds = bounds  # segment i is [bounds[i], bounds[i + 1]), padding included
        self.total = bounds[-1]
        # the spans of a step of every param with one step count: one per group
        self.group_runs = [(bounds[a], bounds[b], a) for a, b in self.group_range.values()]
        make = lambda dtype: torch.zeros(self.total, dtype=dtype, device=self.device)  # noqa: E731
        self.state_dtypes = {k: layout.state_dtype(k, self.dtype)
                             for k in STATE_KEYS[: 3 if layout.amsgrad else 2]}
        if self.quantized:  # codes, and a scale per block (absmax keys) of float32
            self.state_dtypes = {k: quantize.CODE_DTYPE for k in quantize.KEYS}
            self.state_dtypes |= {quantize.absmax_key(k): torch.float32 for k in quantize.KEYS}
        if layout.has_master(self.dtype):
            self.state_dtypes[MASTER_KEY] = torch.float32
        if any(p.is_complex() for p in params) and any(
                d != self.dtype for d in self.state_dtypes.values()):
            raise ValueError("fused_adam: complex params keep their states in their own dtype; "
                             "state_dtype does not apply to them")
        # The state buffers: allocated when a first param gets a state, as torch's states are at
        # a param's first step, not at construction (before the first backward, whose
        # activations would otherwise share the memory with two params' worth of moments).
        self.state: dict[str, torch.Tensor] = {}
        if solo:
            # (an alias, not a view: aot_autograd rejects an input that views another input)
            self.param, self.grad = _alias(params[0].detach().view(-1)), None  # grad: on demand
        else:
            # (grad_buffer False: large params, their grads read where autograd puts them)
            self.param = make(self.dtype)
            self.grad = make(self.grad_dtype) if grad_buffer else None
        self.grad_now = self.grad  # the grad operand of the step being prepared
        # Whether this step's plan follows from what the optimizer's Replay checks: every param
        # stepped with one host step count, nothing adopted, created or copied.
        self.replayable = False
        # Stochastic rounding (when the group asks) applies to bf16 params without a master.
        self.may_round_stochastically = (self.dtype == torch.bfloat16
                                         and MASTER_KEY not in self.state_dtypes)
        # Buffers of one kind share a launch (the optimizer's key; a string: a compiled step
        # traces the dict keyed on it, and dynamo guards on its keys).
        self.kind = f"{self.device}/{self.dtype}/{'/'.join(self.state_dtypes)}"
        # torch's `step`: fp32, on the CPU; on the param's device when the step must be skipped
        # without a host sync (skip_nonfinite, GradScaler), as torch's fused/capturable keep it.
        self.device_steps = layout.device_steps
        self.skips = layout.skips
        self.steps = torch.zeros(len(params), dtype=torch.float32,
                                 device=self.device if self.device_steps else "cpu")
        self.history, self.calls = [0] * len(params), 0
        self.step_views = list(self.steps.unbind())  # state[p]["step"]: one object per param
        # Per param and per buffer: what the param, its grad and its state tensors are (see the
        # module docstring), and where their data must be.
        # Indices of params copied in and out around each update, never re-pointed.
        # (an ordered param stays where it is too: another param overlaps its memory)
        self.external = [] if solo else [i for i, p in enumerate(params)
                                         if ordered or _is_external(p)]
        self.external_set = set(self.external)
        # Of those, the ones stepped where they are (an FSDP2 shard, a view into a ZeRO bucket):
        # their own storage is the param operand, their grad too where the kernels can read it,
        # their states live in our buffers: 28 B/param, where copying in and out moved 52.
        # A complex param is copied (its buffer segment is the real view the kernels step).
        self.in_place = {i for i in self.external
                         if not params[i].is_complex() and _local(params[i]).is_contiguous()}
        self.copied = [i for i in self.external if i not in self.in_place]
        self.copied_in = False
        self.grad_operands: dict[int, torch.Tensor] = {}  # in-place params' grads, as they are
        flats = (("param", self.param), ("grad", self.grad))
        self.views = {name: [self.param.view(params[0].shape)] if solo and name == "param" else
                      [self._make_view(flat, i) for i in range(len(params))]
                      for name, flat in flats if flat is not None}
        self.ptrs = {name: addresses(views) for name, views in self.views.items()}
        self.dtensors = any(map(_is_dtensor, params))
        # Every grad our view where it was, as `addresses(params, GRADS)` reads it then (None
        # where params are DTensors: their grads are not our views).
        self.grad_key = None if "grad" not in self.views or self.dtensors else (
            array("Q", itertools.chain.from_iterable(zip(
                map(operator.attrgetter("_cdata"), self.views["grad"]),
                _values(self.ptrs["grad"])))).tobytes())
        # Whose grad a step reads where it is (when it is contiguous and of the grad dtype): an
        # in-place param's, and every param's without a grad buffer (else a contiguous copy).
        self.reads_grad = set(range(len(params))) if self.grad is None else self.in_place
        # Grads of the buffer's dtype are checked in one C loop where the extension is loaded
        # (`addresses`: ~2 us a param less than _check_grad and _readable).
        self.grads_in_c = (not solo and self.grad_dtype == self.dtype and not self.dtensors
                           and not any(p.is_complex() for p in params))
        self.grads_as_they_are = False  # this step's grads checked so (`_classify_grads`)
        if not solo:
            for alias in self.views["param"]:
                _OWN_STORAGES.add(alias.untyped_storage())
            with torch.no_grad():
                for i, (p, view) in enumerate(zip(params, self.views["param"])):
                    view.copy_(_local(p))
                    if i not in self.external_set:
                        p.data = view
        self.initialized = [False] * len(params)
        self.all_initialized = not params
        self.state_dicts: list[dict | None] = [None] * len(params)  # the dicts we filled
        self.unwatched: set[int] = set()  # params whose state dict is a plain dict: checked always
        self.dtensor_states: dict[tuple[str, int], torch.Tensor] = {}

    def _make_view(self, flat: torch.Tensor, i: int, key: str | None = None) -> torch.Tensor:
        """Param i's segment of `flat` (of state `key`): shaped like the param, or for a scale
        key of 8-bit states (quantize.absmax_key) its blocks' scales, flat."""
        if key in quantize.ABSMAX_KEYS:
            start = self.bounds[i] // quantize.QBLOCK
            view = flat[start:start + quantize.blocks(_elements(self.params[i]))]
        else:
            view = _view(flat, self.bounds[i], _local(self.params[i]))
        # (a compiled first step allocates the states: dynamo traces views, not DLPack)
        return view if torch.compiler.is_compiling() else _alias(view)

    def _alias_compiled_views(self, key: str) -> None:
        """States a compiled step allocated are plain views of their buffer: at the first eager
        step each still in place becomes an alias (the same object, a storage of its own); one
        user code re-pointed since is stale (its address is not its segment's)."""
        flat = self.state[key]
        per = quantize.QBLOCK if key in quantize.ABSMAX_KEYS else 1
        self.ptrs[key] = array("Q", [flat.data_ptr() + start // per * flat.element_size()
                                     for start in self.bounds[:-1]]).tobytes()
        for i, (view, ptr) in enumerate(zip(self.views[key], _values(self.ptrs[key]))):
            if view.data_ptr() == ptr:  # (an alias of a fresh view, which holds the buffer: one
                # of `view` itself pointed `view` at itself, and the buffer could be freed)
                view.data = self._make_view(flat, i, key)

    def _allocate_states(self) -> None:
        """The state buffers and their per-param views: moments zero, the master copy the params'
        current values."""
        if self.state:
            return
        for key, dtype in self.state_dtypes.items():
            size = quantize.blocks(self.total) if key in quantize.ABSMAX_KEYS else self.total
            flat = torch.zeros(size, dtype=dtype, device=self.device)
            if key == MASTER_KEY:
                flat.copy_(self.param)
            self.state[key] = flat
            self.views[key] = [self._make_view(flat, i, key) for i in range(len(self.params))]
            self.ptrs[key] = (None if torch.compiler.is_compiling() else
                              addresses(self.views[key]))
        # Per param, its views in OPERAND_STATES order (None where absent): an in-place param's
        # operands a step (~1 us less a param than looking them up).
        absent = [None] * len(self.params)
        self.state_operands = list(zip(*(self.views[key] if key in self.state
                                         else absent for key in OPERAND_STATES)))

    def adopt_state(self, state) -> None:
        """Make `state[p]` (whatever tensors it holds now) views of this buffer, values kept; the
        dicts (a load's, torch's plain ones) become WatchedDicts."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                s = state.get(p)
                if s is not None and type(s) is not WatchedDict:
                    state[p] = WatchedDict(self.watch, s)
                self._adopt(i, state)
        self.all_initialized = all(self.initialized)

    def _adopt(self, i: int, state) -> float:
        """Param i's state as `state[p]` holds it now (after a load, or user code replaced or
        deleted it): its values copied into this buffer, the dict's tensors made our views again;
        an empty or missing state starts afresh, as torch's does. Returns its step count."""
        p = self.params[i]
        s = state.get(p)
        self.initialized[i] = bool(s)
        step = float(s["step"]) if s else 0.0  # loading may read values
        self.steps[i] = step
        self.history[i] = hash(step)
        if s:
            self._allocate_states()
        if s:
            _convert_moments(s, self.quantized, _local(p))
        for key in self.state:
            view, ptrs = self.views[key][i], self.ptrs[key]
            # `view.data = t`: t's values
            if ptrs is not None and view.data_ptr() != _values(ptrs)[i]:
                fresh = self._make_view(self.state[key], i, key)
                fresh.copy_(view)
                view.data = fresh
            if s and key in s:
                value = _local(s[key])
                if value is not view:
                    view.copy_(value)
            elif key == MASTER_KEY:
                view.copy_(self.views["param"][i])
            else:
                view.zero_()
            if s:
                s[key] = self._state_view(key, i)
        if s:
            s["step"] = self.step_views[i]
        self.state_dicts[i] = s if s else None
        if s and type(s) is not WatchedDict:  # assigned by user code: its object stays the state
            self.unwatched.add(i)
        else:
            self.unwatched.discard(i)
        return step

    def _init_state(self, i: int, state) -> None:
        # Segments of params never stepped are all zeros (adopt_state, or fresh from __init__),
        # but for the master copy, which adopt_state filled from the param.
        p = self.params[i]
        s = state.get(p)
        if s is None or (type(s) is not WatchedDict and not torch.compiler.is_compiling()):
            # (dynamo traces plain dicts only: a compiled step's states stay plain, unchecked)
            s = state[p] = {} if torch.compiler.is_compiling() else WatchedDict(self.watch, s or {})
        s["step"] = self.step_views[i]
        for key in self.state:
            s[key] = self._state_view(key, i)
        self.initialized[i] = True
        self.state_dicts[i] = s
        if type(s) is not WatchedDict:  # made by a compiled step: compared every eager step
            self.unwatched.add(i)

    def _state_view(self, key: str, i: int) -> torch.Tensor:
        """state[p][key]: the buffer's view, as a DTensor laid out like p when p is one (made
        once: the step checks the state holds these very objects)."""
        view, p = self.views[key][i], self.params[i]
        if not _is_dtensor(p):
            return view
        made = self.dtensor_states.get((key, i))
        if made is None or made._local_tensor is not view:
            made = self.dtensor_states[key, i] = type(p).from_local(
                view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        return made

    def _stale_states(self, state) -> list[int]:
        """Params whose state user code replaced, deleted or re-pointed since the last step (or
        that have a state we did not make): they are adopted before the update. Raises, before
        anything changes, where torch's step would (a state missing exp_avg)."""
        if torch.compiler.is_compiling():  # a compiled step trusts the state it was traced with
            return []
        # `exp_avg.data = t` re-points our tensor: its address tells, at ~40 ns a tensor.
        stale = set()
        for key in self.state:
            if self.ptrs[key] is None:
                self._alias_compiled_views(key)
            now = addresses(self.views[key])
            if now != self.ptrs[key]:
                before = _values(self.ptrs[key])
                stale.update(i for i, (a, b) in enumerate(zip(_values(now), before)) if a != b)
        if not (self.watch.dirty or self.unwatched):
            return sorted(stale)
        # (the optimizer sets the watch too when a dict was replaced or deleted in its state)
        dicts = dict(zip(stale, map(state.get, (self.params[i] for i in stale))))
        for i in range(len(self.params)) if self.watch.dirty else self.unwatched:
            s = dicts[i] = state.get(self.params[i])
            if s is not self.state_dicts[i] or (s is not None and (
                    s.get("step") is not self.step_views[i] or any(
                        s.get(key) is not self._state_view(key, i) for key in self.state))):
                stale.add(i)
        for i in stale:
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(dicts[i] or ())
            if dicts[i] and missing:  # torch's step: KeyError
                raise KeyError(f"the optimizer state of a parameter lacks {sorted(missing)}")
            shape = self.params[i].shape
            for key in STATE_KEYS:  # torch's in-place update: no broadcast into a state
                value = (dicts[i] or {}).get(key)
                if torch.is_tensor(value) and value.shape != shape:
                    raise RuntimeError(f"output with shape {list(value.shape)} doesn't match "
                                       f"the broadcast shape {list(shape)}")
        return sorted(stale)

    def _classify_grads(self):
        """(active indices or None for all, grads to copy in as (index, grad)); raises on a sparse
        grad before anything is modified."""
        # By identity, and (eager) by address: p.grad keeps the object we assigned (autograd
        # accumulates into it), but `p.grad.data = t` or `p.grad.set_(t)` (Horovod) re-points
        # that object. torch.compile traces `is`, not data_ptr, attrgetter or map over `is_`.
        if self.solo:  # autograd's grad is the operand where it can be; else a dense copy
            g = self.params[0].grad
            if g is None:
                return [], []
            _check_grad(self.params[0], g)
            return None, [(0, g)]
        compiling = torch.compiler.is_compiling()
        if not compiling and self.grad_key is not None and addresses(
                self.params, GRADS) == self.grad_key:
            return None, []  # every grad is our view, where it was: the fast path
        grads = [p.grad for p in self.params] if compiling else list(map(_GRAD, self.params))
        # every grad None or one a kernel reads as it is (so none raises): _check_grad skipped
        self.grads_as_they_are = self.grads_in_c and not compiling and addresses(
            self.params, GRADS_AS_THEY_ARE) is not None
        if self.grad is None:  # no grad buffer: every grad is read where it is
            active = [i for i, g in enumerate(grads) if g is not None]
            for i in () if self.grads_as_they_are else active:
                _check_grad(self.params[i], grads[i])
            return (None if len(active) == len(grads) else active), [(i, grads[i]) for i in active]
        views = self.views["grad"]
        if self.dtensors:
            grads = [None if g is None else _local(g) for g in grads]
        if compiling:
            if all(g is v for g, v in zip(grads, views)):
                return None, []
        elif all(map(operator.is_, grads, views)) and addresses(grads) == self.ptrs["grad"]:
            return None, []  # (the fast path without the extension)
        # (none are ours after zero_grad()'s default set_to_none: ~10 us less for 148 grads)
        moved = () if compiling or not any(map(operator.is_, grads, views)) else {
            i for i, (g, v, ptr) in enumerate(zip(grads, views, _values(self.ptrs["grad"])))
            if g is v and g.data_ptr() != ptr}
        active, foreign = [], []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if g is not views[i] and not self.grads_as_they_are:
                _check_grad(_local(self.params[i]), g)
            active.append(i)
            if g is not views[i] or i in moved:
                foreign.append((i, g))
        return (None if len(active) == len(grads) else active), foreign

    def plan(self, state):
        """Check this buffer's grads and states; return None when no param has a grad, else a
        callable that prepares the step (states adopted, grads copied in, state created) and
        returns the active segments for `launch` (None: all). Nothing is modified until it runs,
        so a step that raises here leaves every param and state as it was."""
        self.replayable = False
        active, foreign = self._classify_grads()
        stale = self._stale_states(state)
        if active == []:
            return functools.partial(self._adopt_stale, state, stale) if stale else None
        return functools.partial(self._prepare, state, active, foreign, stale)

    def _adopt_stale(self, state, stale) -> list[int]:
        self.calls += 1
        with torch.no_grad():
            for i in stale:
                # Its step count is the adopted one now: a run key shared only by params adopted
                # now with that count (full steps never re-key, so hash(step) could equal the
                # others' construction-time key; one key per param would make a row per param
                # after `opt.state.clear()` for good).
                self.history[i] = hash(("adopted", self.calls, self._adopt(i, state)))
        self.all_initialized = all(self.initialized)
        return []  # no segment steps (when called from plan: no param has a grad)

    def _reads_as_it_is(self, i: int, g: torch.Tensor) -> bool:
        """Whether a kernel reads grad g of param i where it is, as a segment of its own."""
        p = _local(self.params[i])
        return p.is_contiguous() and _readable(g, p, self.grad_dtype)

    def _grads_kept(self, foreign) -> tuple[set[int], set[int]]:
        """(kept, inside) of this step's foreign grads. Kept: grads that stay the objects user
        code gave the params, never re-pointed to our views nor written by the copy-in, read
        where they are (copied in for this step only where a kernel can't read them): a grad
        another param of this buffer also holds (`p.grad = q.grad`: autograd then accumulates
        both params' grads into it, as under torch), one in our grad buffer at another param's
        segment (grads swapped), and the grad of a param whose segment such a grad is. Inside:
        the grads in our grad buffer. (A compiled step traces no addresses: none.)"""
        if self.grad is None or self.solo or not foreign or torch.compiler.is_compiling():
            return set(), set()
        start, size = self.grad.data_ptr(), self.grad.element_size()
        end = start + self.grad.numel() * size
        grads = [g for _, g in foreign]
        # (a tensor subclass's grad may refuse data_ptr: such grads are not ours to overlap)
        at = _values(addresses(grads)) if all(type(g) in _PLAIN for g in grads) else [
            g.data_ptr() if type(g) in _PLAIN else -1 for g in grads]
        inside = {foreign[k][0] for k, a in enumerate(at) if start <= a < end}
        if not inside and len(set(map(id, grads))) == len(grads):
            return set(), inside  # (the usual case: autograd's new grads, ~0.1 us a grad)
        holder, kept, read = {}, set(), set()
        for (i, g), a in zip(foreign, at):
            first = holder.setdefault(id(g), i)
            if first != i:
                kept.update((first, i))
            if i in inside:
                segment = bisect.bisect_right(self.bounds, (a - start) // size) - 1
                if segment != i:
                    kept.add(i)
                    read.add(segment)
        kept.update(i for i, _ in foreign if i in read)
        return kept, inside

    def _prepare(self, state, active, foreign, stale):
        self.replayable = (active is None and not stale and self.all_initialized
                           and not (self.copied or self.ordered or self.device_steps
                                    or self.unwatched))
        if stale:
            self._adopt_stale(state, stale)
        if self.solo:  # (a copy for this step only when autograd's grad can't be read; the
            # kernels read any contiguous operand flat)
            self.grad_now = _dense_grad(self.params[0].grad, self.params[0], self.grad_dtype)
            self.replayable &= self.grad_now is self.params[0].grad
        kept, inside = self._grads_kept(foreign)
        # Kept grads are read where they are when every one of them can be (else all are copied
        # in, sources cloned first: the step is right, but a swapped grad object may then show
        # the values copied into its segment)
        read = kept if kept and all(self._reads_as_it_is(i, g) for i, g in foreign
                                    if i in kept) else ()
        if not self.solo:  # read where it is when the kernels can (not our grad object
            # re-pointed: that one is copied into a fresh alias of its segment, which it then
            # points to again)
            views, operands = self.views.get("grad"), {}
            for i, g in foreign:
                if i in read or (i in self.reads_grad and (
                        views is None or i in self.in_place or g is not views[i])):
                    p = _local(self.params[i])
                    if self.grads_as_they_are or i in read:
                        operands[i] = g
                    elif views is None:  # no buffer to copy it into: a dense copy if need be
                        operands[i] = _dense_grad(g, p, self.grad_dtype)
                        self.replayable &= operands[i] is g
                    elif _readable(g, p, self.grad_dtype):
                        operands[i] = g
            self.grad_operands = operands
            if operands:
                foreign = [(i, g) for i, g in foreign if i not in operands]
        if foreign and not self.solo:
            self.replayable = False
            views = self.views["grad"]
            # Our grad object re-pointed elsewhere (`p.grad.data = t`): copied into a new alias
            # of its segment, which the object then points to again. A grad in our buffer is
            # read before any segment is written (`p.grad = p.grad.t()` overlaps its own).
            # Compiled, a grad the kernel reads from the buffer goes in through a view of the
            # buffer: functionalization (aot_eager) relates no DLPack alias to its buffer and
            # applied such a copy after the kernel, which read the last step's grads. A compiled
            # step reads no addresses, so every source is cloned there (a grad swapped with
            # another param's, or `p.grad = p.grad.t()`, would be overwritten as it is read;
            # inductor fuses the clone into the copy).
            compiling = torch.compiler.is_compiling()
            targets = [self._make_view(self.grad, i)
                       if g is views[i] or (compiling and i not in self.in_place) else views[i]
                       for i, g in foreign]
            torch._foreach_copy_(targets, [g.clone() if compiling or i in inside else g
                                           for i, g in foreign])
            for (i, g), target in zip(foreign, targets):
                if i in self.external_set or i in kept:
                    continue
                if g is views[i]:
                    g.data = target
                else:
                    self.params[i].grad = views[i]
        if not self.all_initialized:
            self._allocate_states()
            for i in range(len(self.params)) if active is None else active:
                if not self.initialized[i]:
                    self._init_state(i, state)
            self.all_initialized = all(self.initialized)
        return active
    def counts_in_bulk(self, active, found_inf) -> bool:
        """Whether this step's count is `self.steps += 1` (every param, host counts, no skip):
        the optimizer then adds 1 to all such buffers in one foreach op (1000 single-param
        groups: ~2.5 ms of host time a step in 1000 separate adds)."""
        return active is None and found_inf is None and not self.device_steps

    def begin(self, active, found_inf=None, counted=False) -> list[tuple[tuple, list]]:
        """Count the step (unless `counted` in bulk) and return what to update: (operands,
        spans) pairs. A span is (start, end, step count, index base of its random bits for
        stochastic rounding, key, group): the count a float, or a 0-dim device tensor with device
        step counts; spans of one group with equal keys share a hyperparameter row (equal host
        counts, or device counts known equal: one row per group, not one per shard or run).
        First the buffer's own operands (`operands`), then each in-place param's. With
        `found_inf` (a device scalar, nonzero to skip) the step counts only where it is zero, on
        the device. Copied params are copied in here: `end` copies them back after the update."""
        if active == []:  # only states were adopted
            return []
        if self.copied:  # copied in just before the update (a param sharing their storage
            # may have stepped since, as may a checkpoint load have written the shard)
            torch._foreach_copy_(self._copied_segments(),
                                 [_local(self.params[i]) for i in self.copied])
            self.copied_in = True
        if not counted:
            self._count_step(active, found_inf)
        steps = self.steps if self.device_steps else self.steps.tolist()
        if self.replayable:
            self.replayable = steps.count(steps[0]) == len(steps)
        if self.device_steps:
            keys = [(self, h) for h in self.history]
        else:
            keys = steps
        groups = self.groups
        # segments of their own: in-place params, and params whose grad is read where it is
        alone = self.in_place.union(self.grad_operands) if self.grad_operands else self.in_place
        stepping = range(len(self.params)) if active is None else active
        rest = [i for i in stepping if i not in alone] if alone else active
        work = [] if rest == [] else [(self.operands(), [
            (start, end, steps[first], start, keys[first], groups[first])
            for start, end, first in self._runs(rest, keys)])]
        for i in stepping if alone else ():
            if i in alone:
                operands = self._in_place_operands(i)  # (random bits keyed on its place in
                # our layout, as a packed param's: not on 0 for every in-place param)
                work.append((operands, [(0, operands[0].numel(), steps[i], self.bounds[i],
                                         keys[i], groups[i])]))
        # The step holds this step's grads from here on: a grad autograd made, which the next
        # zero_grad() lets go, must not outlive the step here (1 more grad's worth of memory).
        self.grad_operands = {}
        if self.solo:
            self.grad_now = self.grad
        return work

    def operands(self) -> tuple:
        """The launch's operands: param, grad, then OPERAND_STATES (None where absent)."""
        return (self.param, self.grad_now, *map(self.state.get, OPERAND_STATES))

    def _in_place_operands(self, i: int) -> tuple:
        """Param i (its own storage, or its segment of ours) and its grad where it is (or its
        copy in our grad buffer), our states' views: contiguous tensors of one size, in their
        shapes (a kernel reads them flat)."""
        grad = self.grad_operands.get(i)
        return (_local(self.params[i]), self.views["grad"][i] if grad is None else grad,
                *self.state_operands[i])

    def end(self) -> None:
        """Copied params back where they live, after an update `begin` copied them in for (a
        step that only adopted states copies nothing: the buffer holds no newer values)."""
        if self.copied_in:
            self.copied_in = False
            torch._foreach_copy_([_local(self.params[i]) for i in self.copied],
                                 self._copied_segments())

    def _copied_segments(self) -> list[torch.Tensor]:
        """Copied params' segments of our param buffer: compiled, views of the buffer the kernel
        updates (as for grads in `_prepare`: a DLPack alias is unrelated to it in the graph)."""
        if torch.compiler.is_compiling():
            return [self._make_view(self.param, i) for i in self.copied]
        return [self.views["param"][i] for i in self.copied]

    def _count_step(self, active, found_inf) -> None:
        # In place on the whole tensor when every param steps: `steps[:] += 1` (slice, add, copy
        # back) costs ~15 us of host time a step, the add alone ~3 us.
        counts = self.steps if active is None else self.steps[active]
        counts += 1 if found_inf is None else 1 - found_inf.to(self.steps.device)  # no host sync
        if active is not None:
            self.steps[active] = counts
        # Params with grads in the same step() calls have equal step counts whatever was
        # skipped: the key device-step runs are grouped by (their values are not read). A step
        # of every param keeps that partition, so it changes nothing here, which also keeps a
        # torch.compile'd step free of guards on these counters (no recompile per step).
        if self.device_steps and active is not None:
            self.calls += 1
            for i in active:
                self.history[i] = hash((self.history[i], self.calls))

    def step_grads(self, active, group=None) -> list[torch.Tensor]:
        """The grads this step reads (of `group`'s params only, when given): contiguous spans of
        our grad buffer, and each in-place param's grad where it is (what the clip norm and the
        non-finite check must see)."""
        first, last = (0, len(self.params)) if group is None else self.group_range[group]
        if (active is None and not self.in_place and not self.grad_operands
                and (first, last) == (0, len(self.params))):
            return [self.grad_now]
        stepping = (range(first, last) if active is None  # (active: ascending indices)
                    else active[bisect.bisect_left(active, first):bisect.bisect_left(active, last)])
        grads, start, end = [], None, None
        for i in stepping:
            grad = self.grad_operands.get(i)
            if grad is not None or i in self.in_place:
                grads.append(self.views["grad"][i] if grad is None else grad)
                continue
            if start is not None and end == self.bounds[i]:
                end = self.bounds[i + 1]
                continue
            if start is not None:
                grads.append(self.grad_now[start:end])
            start, end = self.bounds[i], self.bounds[i + 1]
        if start is not None:
            grads.append(self.grad_now[start:end])
        return grads

    def _runs(self, active, keys):
        """Maximal spans of consecutive active segments of one group with one step count (the
        same key), as (start, end, first segment): one span per group, unless some grads are
        None or params joined at different times."""
        if active is None and len(set(keys)) <= 1:
            return self.group_runs
        runs, groups = [], self.groups
        for i in range(len(self.params)) if active is None else active:
            start, end = self.bounds[i], self.bounds[i + 1]
            if runs and runs[-1][1] == start and keys[runs[-1][2]] == keys[i] and (
                    groups[runs[-1][2]] == groups[i]):
                runs[-1][1] = end
            else:
                runs.append([start, end, i])
        return runs

    def release(self, indices, state, grads_only=False) -> None:
        """Params `indices` (no longer in any group: a popped group's, one removed from its
        list) keep their values, grads and states in storages of their own: torch.optim keeps a
        removed param's state, and our views would keep this whole buffer, every group's part
        of it, alive. `grads_only`: just their grads (params re-packed elsewhere, whose new
        buffer may read grads where they are)."""
        flats = [f for f in (None if self.solo else self.param, self.grad, self.steps,
                             *self.state.values()) if f is not None]
        spans = [(f.data_ptr(), f.data_ptr() + f.numel() * f.element_size()) for f in flats]
        with torch.no_grad():
            for i in indices:
                p = self.params[i]
                for t in (p.grad,) if grads_only else (p, p.grad, *(state.get(p) or {}).values()):
                    t = _local(t) if torch.is_tensor(t) else None
                    if t is not None and any(lo <= t.data_ptr() < hi for lo, hi in spans):
                        t.data = t.clone()

    def zero_grad(self) -> None:
        """`zero_grad(set_to_none=False)`: one fill for every grad that is our view; others as
        torch does them."""
        views = self.views.get("grad") or [None] * len(self.params)
        ptrs = _values(self.ptrs["grad"]) if "grad" in self.ptrs else views
        for p, view, ptr in zip(self.params, views, ptrs):
            g = None if p.grad is None else _local(p.grad)
            # (our grad object re-pointed by `p.grad.data = t` is t: zeroed, as torch's)
            if g is not None and (g is not view or g.data_ptr() != ptr):
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()
        if self.grad is not None and not self.solo:
            self.grad.zero_()


class GroupRecord:
    """What one param group's part of the buffers was built from, and the check that it still
    holds: the group's params, options (its Layout) and storages."""

    def __init__(self, params: list[torch.Tensor], layout: Layout, overlapping: set[int]):
        # A param listed twice (torch warns, then updates it twice a step) is stepped once.
        unique = list({id(p): p for p in params}.values())
        # Frozen params (no grad now, none to come) get no buffer space: torch gives them no
        # state. One that gets a grad later re-packs the group (is_current).
        self.frozen = [p for p in unique if not (p.requires_grad or p.grad is not None)]
        self.packed = [p for p in unique if p.requires_grad or p.grad is not None]
        # Params whose memory overlaps another's (`overlapping`: ids, over every group) step
        # one after another where they are, each in a buffer of its own, in order: each sees
        # the update of the one before. Params that only share a storage (views into a ZeRO
        # bucket) step where they are, side by side.
        self.ordered_ids = {id(p) for p in self.packed} & overlapping
        self.layout = layout
        self.params = list(params)
        self.ids: bytes | None = None  # (at the first eager check: dynamo traces no addresses)
        self.dtensors = any(map(_is_dtensor, self.packed))
        self.ptrs = b""  # where the packed params are, once packed (`settle`)

    def _storages(self) -> list[torch.Tensor]:
        return list(map(_local, self.packed)) if self.dtensors else self.packed

    def settle(self) -> None:
        self.ptrs = addresses(self._storages())

    def is_current(self, params: list[torch.Tensor], layout: Layout) -> bool:
        """False when the group's params or options changed, a frozen param got a grad, or a
        param's storage was replaced (`model.half()`, `model.to(...)`, `p.data = ...`): the
        buffers would then update a stale copy."""
        # torch.compile traces `is`, not addresses: a compiled step trusts the storage
        # (replacing it under a compiled step is not supported; the eager step re-packs).
        if not ((layout is self.layout or layout == self.layout)  # (Layouts are shared: `is`)
                and not any(p.requires_grad or p.grad is not None for p in self.frozen)):
            return False
        if torch.compiler.is_compiling():
            return len(params) == len(self.params) and all(
                p is q for p, q in zip(params, self.params))
        if self.ids is None:
            self.ids = addresses(self.params, OBJECTS)
        return addresses(params, OBJECTS) == self.ids and addresses(self._storages()) == self.ptrs


class Packing:
    """The flat buffers of every param group. Params of one device, dtype and Layout share a
    buffer whatever their group (1000 single-param groups: one buffer, one launch, a row per
    group); params of SOLO_NUMEL elements and more, and params whose memory overlaps another's,
    have buffers of their own. A change to a group (its params, its Layout, a storage replaced,
    a frozen param's first grad) rebuilds only the buffers that hold its params."""

    def __init__(self):
        self.records: list[GroupRecord] = []
        self.buffers: list[FlatBuffer] = []

    def stale(self, groups: list[dict], layouts: list[Layout]) -> set[int]:
        """Indices of the groups (old or new) whose buffers no longer hold them."""
        records = self.records
        return {i for i in range(max(len(groups), len(records)))
                if i >= len(groups) or i >= len(records)
                or not records[i].is_current(groups[i]["params"], layouts[i])}

    def sync(self, groups: list[dict], layouts: list[Layout], state, watch: Watch) -> None:
        """Rebuild the buffers of stale groups (and of groups that share a buffer with one),
        adopting every state `state` holds for their params."""
        stale = self.stale(groups, layouts)
        if not stale:
            return
        # Params whose memory overlaps, across groups (one launch steps every group), frozen
        # ones included (a trainable row of a frozen param stays its row): found when a group
        # is (re)built, which also rebuilds a group whose params it now overlaps.
        overlap = overlapping([p for group in groups for p in group["params"]])
        records = [None if i in stale else r for i, r in enumerate(self.records[:len(groups)])]
        records += [None] * (len(groups) - len(records))
        for i, record in enumerate(records):
            if record is not None and record.ordered_ids != overlap & {id(p) for p in record.packed}:
                stale.add(i)
                records[i] = None
        for i, record in enumerate(records):
            if record is None:
                records[i] = GroupRecord(groups[i]["params"], layouts[i], overlap)
        rebuilt = [b for b in self.buffers if not stale.isdisjoint(b.group_range)]
        kept = [b for b in self.buffers if stale.isdisjoint(b.group_range)]
        # Kept groups' params that shared a rebuilt buffer are packed again with them.
        moved = {(g, id(p)) for b in rebuilt for p, g in zip(b.params, b.groups) if g not in stale}
        entries = [(p, g) for g, record in enumerate(records) for p in record.packed
                   if g in stale or (g, id(p)) in moved]
        held = {id(p) for group in groups for p in group["params"]}
        for buf in rebuilt:  # (their params that left the optimizer; frozen ones stay put)
            buf.release([i for i, p in enumerate(buf.params) if id(p) not in held], state)
            buf.release([i for i, p in enumerate(buf.params) if id(p) in held], state, True)
        # Released first: a buffer's aliases count as other users of the params' storage.
        self.buffers, self.records = kept, []
        del rebuilt
        made = _pack(entries, records, watch)
        for buf in made:
            buf.adopt_state(state)
        for g in stale | {g for g, _ in moved}:  # where their params are now
            if g < len(groups):
                records[g].settle()
        position = {id(p): (g, k) for g, record in enumerate(records)
                    for k, p in enumerate(record.packed)}
        # In param order: ordered buffers are stepped in it (each sees the one before).
        self.buffers = sorted(kept + made, key=lambda b: position[id(b.params[0])])
        self.records = records

    def is_current(self, groups: list[dict], layouts: list[Layout]) -> bool:
        return not self.stale(groups, layouts)


def _pack(entries: list[tuple[torch.Tensor, int]], records: list[GroupRecord],
          watch: Watch) -> list[FlatBuffer]:
    """Buffers for (param, group index) entries, in group order: one per (device, dtype, Layout),
    one per large param stepped in its own storage, one per param that overlaps another."""
    by_key: dict[tuple, list[list[tuple[torch.Tensor, int]]]] = {}  # chunks per key
    filled: dict[tuple, int] = {}  # elements in each key's last chunk
    solo, serial = [], []
    for p, g in entries:
        _check_writable(p)
        layout = records[g].layout.for_param(p)
        if id(p) in records[g].ordered_ids:
            serial.append((p, g))
        elif (p.numel() >= SOLO_NUMEL and p.is_contiguous() and not p.is_complex()
                and not _is_external(p)):
            solo.append((p, g))
        else:  # (large: no grad buffer, GRAD_IN_PLACE_NUMEL)
            large = (_elements(p) >= GRAD_IN_PLACE_NUMEL and p.is_contiguous()
                     and not p.is_complex() and not _is_external(p))
            key = (*buffer_key(p), large, layout)
            chunks = by_key.setdefault(key, [[]])
            size = _padded(_elements(p))
            if filled.get(key, 0) + size > CHUNK_NUMEL:
                chunks.append([])
                filled[key] = 0
            chunks[-1].append((p, g))
            filled[key] = filled.get(key, 0) + size
    return [FlatBuffer([p for p, _ in chunk], key[-1], watch, [g for _, g in chunk],
                       grad_buffer=not key[-2])
            for key, chunks in by_key.items() for chunk in chunks if chunk] + [
        FlatBuffer([p], records[g].layout.for_param(p), watch, [g], solo=True) for p, g in solo] + [
        FlatBuffer([p], records[g].layout.for_param(p), watch, [g], ordered=True)
        for p, g in serial]


def clip_coefficient(prepared, max_norm: float, grad_scale=None,
                     group: int | None = None) -> torch.Tensor | None:
    """`torch.nn.utils.clip_grad_norm_`'s coefficient for the grads of `prepared` ((buffer,
    active) pairs; of param group `group` only, when given), as a device tensor: min(1, max_norm
    / (total norm + 1e-6)), no host sync. With `grad_scale` the grads are scaled: the norm is of
    the unscaled ones."""
    # (fp32 sums for bf16/fp16 grads; float64 ones keep their own precision, as torch's)
    norms = [torch.linalg.vector_norm(g, dtype=None if g.dtype == torch.float64 else torch.float32)
             for buf, active in prepared for g in buf.step_grads(active, group)]
    if not norms:
        return None
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if grad_scale is not None:
        total = total / grad_scale.to(device)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def nonfinite(prepared) -> torch.Tensor | None:
    """1.0 on the device when any grad of `prepared` is inf or NaN, else 0.0: no host sync."""
    flags = [~torch.isfinite(g).all() for buf, active in prepared for g in buf.step_grads(active)]
    if not flags:
        return None
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).any().float()
