"""One Adam/AdamW step over one buffer: host-side scalars, then one backend call."""
from __future__ import annotations

import itertools
from array import array

import torch

from . import backends


# The hyperparameter record: one row per (param group, step count), float64, these fields in this
# order; csrc/adam_math.h's AdamHyper has the same (tests/test_kernels_agree.py compares).
# Kernels round each to fp32 as ATen rounds a Python scalar. Adding a float hyperparameter: a
# field here and in AdamHyper, its use in adam_math.h, the Triton kernel and the torch backend.
HYPER_FIELDS = ("grad_mult", "decay", "weight_decay", "lerp_weight", "beta2", "one_minus_beta2",
                "neg_step_size", "bc2_sqrt", "eps", "sr_key")
# A segment of a launch, as ints (csrc/adam_math.h's SegmentSpec): elements [start, start +
# length) of buffer `buffer`'s operands, stepped with hyperparameter row `row`; stochastic
# rounding keys element i of the segment on index_base + i.
SEGMENT_FIELDS = ("buffer", "start", "length", "row", "index_base")
# The fields a device step count or a tensor lr makes device values (the rest stay host constants).
GRAD_MULT = HYPER_FIELDS.index("grad_mult")  # the clip coefficient and inverse scale go here
_DEVICE_FIELDS = tuple(HYPER_FIELDS.index(f) for f in ("decay", "neg_step_size", "bc2_sqrt"))


def hyper_row(*, step, lr, beta1, beta2, eps, weight_decay=0.0, decoupled_weight_decay=False,
              maximize=False, bias_correction=True, stochastic_rounding_seed=None) -> list[float]:
    """One row computed on the host in double, as `_single_tensor_adam` computes its scalars in
    Python. Weight decay that does not apply leaves its fields neutral (decay 1, L2 0)."""
    lr, beta1, beta2, weight_decay = float(lr), float(beta1), float(beta2), float(weight_decay)
    decoupled = bool(decoupled_weight_decay)
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    key = 0 if stochastic_rounding_seed is None else sr_key(stochastic_rounding_seed, step)
    return [-1.0 if maximize else 1.0, 1 - lr * weight_decay if decoupled else 1.0,
            0.0 if decoupled else weight_decay, 1 - beta1, beta2, 1 - beta2, -(lr / bc1),
            bc2**0.5, float(eps), float(key)]


_CONSTANT_ROWS: dict[tuple, torch.Tensor] = {}


def device_row(*, step: torch.Tensor, lr, beta1, beta2, eps, weight_decay=0.0,
               decoupled_weight_decay=False, maximize=False, bias_correction=True) -> torch.Tensor:
    """The row of a step count on the device (capturable, skip_nonfinite, GradScaler), with `lr`
    a float or a device tensor: computed there in double with the host path's operations (pow,
    division, sqrt), no host sync, nothing copied from the host (a CUDA graph captures it)."""
    device = step.device
    step = step.to(torch.float64)
    const = hyper_row(step=1, lr=0.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    # The constant fields as a device tensor, made once per value (outside any capture: the
    # eager steps before one make it); a compiled step has them as constants of its graph.
    if torch.compiler.is_compiling():
        base = torch.tensor(const, dtype=torch.float64, device=device)
    else:
        key = (str(device), *const)
        base = _CONSTANT_ROWS.get(key)
        if base is None:
            if len(_CONSTANT_ROWS) > 256:  # a schedule of betas or eps: no unbounded growth
                _CONSTANT_ROWS.clear()
            base = _CONSTANT_ROWS[key] = torch.tensor(const, dtype=torch.float64, device=device)
    if torch.is_tensor(lr):
        lr = lr.to(device, torch.float64)
    one = torch.ones_like(step)
    bc1 = 1 - torch.pow(float(beta1), step) if bias_correction else one
    bc2 = 1 - torch.pow(float(beta2), step) if bias_correction else one
    decay = one * (1 - lr * float(weight_decay)) if decoupled_weight_decay else one
    d, n, b = _DEVICE_FIELDS
    return torch.cat([base[:d], decay[None], base[d + 1:n], (-(lr / bc1) * one)[None],
                      bc2.sqrt()[None], base[b + 1:]])


def step_segments_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, hyper,
                   segments, *, exp_avg_absmaxes=(), exp_avg_sq_absmaxes=(), stochastic=False,
                   found_inf=None, backend="auto") -> None:
    """One launch: every segment of `segments` (SEGMENT_FIELDS, flattened) over buffer lists
    (max_exp_avg_sqs, masters and, with 8-bit states, the absmaxes: empty, or one tensor per
    buffer), each segment with its row of `hyper` (float64 [rows, len(HYPER_FIELDS)], on the CPU
    or the buffers' device). `found_inf` (a device scalar, nonzero: skip) is read by the kernel:
    no host sync."""
    if not params:
        return
    backends.resolve(backend, params[0].device, params[0].dtype)(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        list(masters), list(exp_avg_absmaxes), list(exp_avg_sq_absmaxes), hyper,
        [int(x) for x in segments], stochastic=bool(stochastic), found_inf=found_inf)


def next_count(step: float) -> float:
    """A host step count one step later, as a float32 count tensor's `+= 1` makes it (exact below
    2**24, where float32 counts stop)."""
    return step + 1 if step < 1 << 24 else array("f", (step + 1,))[0]


class Launch:
    """The segments of one launch, gathered buffer by buffer across param groups, then stepped
    by one backend call: one row per (group, step count), on the host or the device; a group's
    grad multiplier (clip coefficient, GradScaler's inverse scale) multiplies its rows'
    grad_mult."""

    def __init__(self, backend_fn, stochastic: bool, kept: dict | None = None):
        self.backend_fn, self.stochastic, self.kept = backend_fn, stochastic, kept
        self.lists: tuple[list, ...] = ([], [], [], [], [], [], [], [])
        self.segments: list[int] = []
        self.rows: list = []  # host rows (lists of floats) or device rows (tensors)
        self.made_from: list[tuple] = []  # per row: (group, step count)
        self.multipliers: list = []  # per row: None or the group's multiplier tensor
        self._row_of: dict[tuple, int] = {}
        self._plain = True  # every row from the host, no multiplier: the table as it is

    def add(self, operands, spans, options_of: list[dict], multiplier_of: list) -> None:
        """`operands` of one buffer (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master,
        exp_avg_absmax, exp_avg_sq_absmax: None where absent) and its spans (start, end, step count, index base of the random bits, key, group): group
        g's options (hyper_row's keywords) are options_of[g], its multiplier (None or a tensor)
        multiplier_of[g]. Spans of one group with one key (None: none) share a row."""
        buffer = len(self.lists[0])
        for lst, t in zip(self.lists, operands):
            if t is not None:
                lst.append(t)
        for start, end, step, base, same, g in spans:
            key = None if same is None else (g, same)
            row = None if key is None else self._row_of.get(key)
            if row is None:
                row = len(self.rows)
                options = options_of[g]
                if torch.is_tensor(step):  # (stochastic rounding needs host step counts)
                    self._plain = False
                    self.rows.append(device_row(step=step, **{
                        k: v for k, v in options.items() if k != "stochastic_rounding_seed"}))
                else:
                    self.rows.append(hyper_row(step=step, **options))
                self.made_from.append((g, step))
                if key is not None:
                    self._row_of[key] = row
                self.multipliers.append(multiplier_of[g])
                self._plain &= multiplier_of[g] is None
            self.segments += (buffer, start, end - start, row, base)

    def recount(self, options_of: list[dict]) -> None:
        """The same launch one step later (host rows, no multiplier): each row's step count one
        more, as float32 counts add it, and its group's options as they are now."""
        self.made_from = [(g, next_count(step)) for g, step in self.made_from]
        self.rows = [hyper_row(step=step, **options_of[g]) for g, step in self.made_from]

    def table(self, device: torch.device) -> torch.Tensor:
        """The hyperparameter table: on the host when every row and multiplier is, else on
        `device`. A CPU launch's host rows are written into a table kept in `kept` (the
        optimizer's, per row count; the CPU kernels read it before they return): a tensor made
        each step cost ~38 us of host time where a step has streamed its operands through the
        caches, the write ~11 (bench/NOTES.md 28)."""
        if self._plain:
            if self.kept is None or device.type != "cpu" or torch.compiler.is_compiling():
                return torch.tensor(self.rows, dtype=torch.float64)
            made = self.kept.get(len(self.rows))
            if made is None:
                if len(self.kept) >= 8:  # (row counts come and go: bounded)
                    self.kept.clear()
                memory = array("d", bytes(8 * len(HYPER_FIELDS) * len(self.rows)))
                made = self.kept[len(self.rows)] = (memory, torch.frombuffer(
                    memory, dtype=torch.float64).view(len(self.rows), len(HYPER_FIELDS)))
            made[0][:] = array("d", itertools.chain.from_iterable(self.rows))
            return made[1]
        on_device = [torch.is_tensor(r) for r in self.rows]
        host = [r for r, d in zip(self.rows, on_device) if not d]
        if not any(on_device) and all(m is None or m.device.type == "cpu" for m in self.multipliers):
            table = torch.tensor(host, dtype=torch.float64)
        else:
            moved = iter(torch.tensor(host, dtype=torch.float64).to(device)) if host else None
            table = torch.stack([r if d else next(moved) for r, d in zip(self.rows, on_device)])
        start = 0
        for end in range(1, len(self.rows) + 1):  # runs of rows with one multiplier
            if end == len(self.rows) or self.multipliers[end] is not self.multipliers[start]:
                if self.multipliers[start] is not None:
                    table[start:end, GRAD_MULT] *= self.multipliers[start].to(table.device)
                start = end
        return table

    def run(self, found_inf=None) -> None:
        if not self.segments:
            return
        params = self.lists[0]
        self.backend_fn(*self.lists, self.table(params[0].device), self.segments,
                        stochastic=self.stochastic,
                        found_inf=None if found_inf is None else found_inf.to(params[0].device))


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, max_exp_avg_sq: torch.Tensor | None = None,
               master: torch.Tensor | None = None, *,
               exp_avg_absmax: torch.Tensor | None = None,
               exp_avg_sq_absmax: torch.Tensor | None = None,
               step: float, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
               maximize: bool = False, bias_correction: bool = True,
               stochastic_rounding_seed: int | None = None, index_base: int = 0,
               clip_coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
               backend: str = "auto") -> None:
    """Update `param`, `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`, i.e. amsgrad) in place.

    With `master` (an fp32 copy of a bf16/fp16 param) the math updates the master and the param
    is written as its rounding. With the absmaxes, exp_avg and exp_avg_sq are 8-bit states
    (uint8 codes, fused_adam/quantize.py), updated in place with their scales. Math is fp32 whatever the tensors' dtypes; each result is rounded
    once on store: to nearest even, or for a bf16 param with `stochastic_rounding_seed` set,
    stochastically with random bits keyed on (seed, step, index_base + element index), the same
    on every backend. `clip_coef`, a one-element fp32 tensor on the param's device (computed
    there, e.g. from the grads' norm), multiplies the grads first, read by the kernel: no sync.
    `step` may be a 0-dim tensor (the step count on the device): bias corrections and step size
    are then computed on the device (with `lr` a float or a device tensor), and with `found_inf`
    (nonzero: skip) nothing is written.

    `step` is the step count including this one (1 on the first step). The scalars are computed
    once in double precision, as `_single_tensor_adam` computes them in Python; kernels receive
    them rounded to fp32, as ATen's ops do. A launch of one segment (`Launch`).
    """
    if torch.is_tensor(step):  # a tensor lr stays a tensor: read on the device
        if stochastic_rounding_seed is not None:
            raise ValueError("stochastic rounding needs the step count on the host")
        step = step.to(param.device)
    launch = Launch(backends.resolve(backend, param.device, param.dtype),
                    stochastic=stochastic_rounding_seed is not None)
    launch.add((param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax,
                exp_avg_sq_absmax),
               [(0, param.numel(), step, index_base, None, 0)],
               [dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                    bias_correction=bias_correction,
                    stochastic_rounding_seed=stochastic_rounding_seed)], [clip_coef])
    launch.run(found_inf)


def lowbias32(x: int) -> int:
    """The 32-bit hash of csrc/adam_math.h, on Python ints."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def sr_key(seed: int, step: float) -> int:
    """The per-launch key of stochastic rounding: a hash of (seed, step)."""
    return lowbias32((int(seed) & 0xFFFFFFFF) ^ lowbias32(int(step) & 0xFFFFFFFF))
