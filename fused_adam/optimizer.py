"""FusedAdam / FusedAdamW: the torch.optim.Optimizer API over flat buffers.

This layer validates arguments (torch's exceptions and messages), owns param_groups, state and
state_dict (torch's layout), and turns a step into one backend call per kind of buffer (device,
dtypes, operands), across param groups: each group's hyperparameters are rows of its table. It
never touches a kernel.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import operator
import os

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import backends, quantize
from .flat import (STEP, Layout, Packing, Watch, addresses, buffer_key, check_state_dtype,
                   clip_coefficient, nonfinite, observed)
from .functional import Launch


def _hooked(planned):
    """Makes `step` (a replay of the last step's plan, else `planned`, the step planned in full)
    the optimizer's step: inside torch.optim's step wrapper (Optimizer.profile_hook_step: the
    step hooks and the "Optimizer.step#FusedAdamW.step" range) while a step hook is registered
    or a range would reach anyone (flat.observed), else alone: the wrapper's record_function
    costs ~30 us of host time where the step before streamed its operands through the caches
    (bench/NOTES.md 28). Compiled: torch's wrapper around `planned` (a compiled step never
    replays). A subclass that overrides step has torch's wrapper around its own: its
    super().step() is this one alone (the hooks run once)."""
    def hook(step):
        hooked, compiled = Optimizer.profile_hook_step(step), Optimizer.profile_hook_step(planned)

        @functools.wraps(step)
        def wrapper(*args, **kwargs):
            self = args[0]
            ours = type(self).step is wrapper
            if torch.compiler.is_compiling():
                return (compiled if ours else planned)(*args, **kwargs)
            if ours and (_global_optimizer_pre_hooks or _global_optimizer_post_hooks
                         or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                         or observed()):
                return hooked(*args, **kwargs)
            return step(*args, **kwargs)

        wrapper.hooked = True  # (Optimizer.__init__ wraps a step that is not)
        return wrapper
    return hook


class FusedAdam(Optimizer):
    """Drop-in `torch.optim.Adam` whose step is one fused pass per flat buffer.

    Same arguments as `torch.optim.Adam`; `foreach` and `fused` are accepted for drop-in use and
    change nothing (the step is always fused). Extra keyword arguments:
      bias_correction: False drops Adam's bias correction (as apex and DeepSpeed allow).
      master_weights: for bfloat16/float16 params keep an fp32 master copy in the optimizer
        state; the step updates it and writes the param as its rounding.
      state_dtype: dtype of exp_avg and exp_avg_sq (max_exp_avg_sq follows exp_avg_sq), or a
        dict {"exp_avg": dtype, "exp_avg_sq": dtype}; default: the param dtype, as torch, or
        float32 with master_weights. "int8": both moments 8-bit, blockwise (2 B/param instead
        of 8 in fp32; `state[p]` holds uint8 codes and `exp_avg_absmax` / `exp_avg_sq_absmax`
        scales, see fused_adam/quantize.py, which also turns such a state_dict into torch's);
        params under 4096 elements keep fp32 states. Not with amsgrad.
      stochastic_rounding: round bfloat16 params (without master weights) stochastically, with
        random bits keyed on (seed, step, element index): reproducible on every backend.
      seed: the stochastic-rounding seed.
      max_grad_norm: clip the group's grads to this global 2-norm inside the step, as
        `torch.nn.utils.clip_grad_norm_(group params, max_grad_norm)` before AdamW would; the
        coefficient is computed and applied on the device (one norm pass, no host sync).
      skip_nonfinite: a step in which any grad of the groups with this option is inf or NaN
        changes no param or state of those groups and does not count for them (`skipped_steps`
        counts it), decided on the device; other groups step as torch's would. Step counts then
        live on the device, and a GradScaler's unscale and skip happen inside the update kernel
        (its found_inf skips every group, as the scaler skips torch's step).
      capturable: step counts, bias corrections and lr (a tensor lr is read on the device) stay
        on the device, so the step has no host sync and captures in a CUDA graph.
      backend: "auto" (default), "triton", "cuda", "cpu" or "torch"; see `fused_adam.backends`.
    """

    _packing: Packing | None = None
    _skipped_steps: torch.Tensor | None = None  # (skipped_steps)
    _packing_state = None  # the `self.state` the packing adopted
    _amp = False

    @property
    def _watch(self) -> Watch:
        """Set by user code's changes to a param's state dict (flat.WatchedDict)."""
        if "_watch_flag" not in self.__dict__:
            self.__dict__["_watch_flag"] = Watch()
        return self.__dict__["_watch_flag"]

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler's protocol, advertised where skip_nonfinite asks for in-kernel
        skipping: the scaler then sets `grad_scale` (None once unscaled) and `found_inf` for each
        step() call instead of unscaling and checking found_inf on the host; the unscale and the
        skip happen in the update kernel, and once a scaler has been seen (`_amp`) step counts
        move to the device, so a skipped step is not counted without a host sync. Not advertised
        by default, as torch's default AdamW: Lightning refuses gradient clipping for optimizers
        that advertise it (bf16-mixed included), and accelerate's `step_was_skipped` relies on
        the scaler not calling step() on an overflow."""
        return any(g.get("skip_nonfinite") for g in self.param_groups)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 bias_correction=True, master_weights=False, state_dtype=None,
                 stochastic_rounding=False, seed=0, max_grad_norm=None, skip_nonfinite=False,
                 backend="auto"):
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        # The signature above is the one list of options and their defaults, in the order of
        # torch.optim.Adam's defaults dict (a group's keys, as a state_dict shows them).
        given = locals()
        defaults = {key: given[key] for key in DEFAULTS}
        defaults.update(capturable=bool(capturable), differentiable=False,
                        master_weights=bool(master_weights),
                        stochastic_rounding=bool(stochastic_rounding), seed=int(seed),
                        skip_nonfinite=bool(skip_nonfinite))
        _check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self._sync_layout()
        skipping = [p for g in self.param_groups if g["skip_nonfinite"] for p in g["params"]]
        if skipping:  # (made here, not in a first step that torch.compile traces)
            self._skipped_steps = torch.zeros((), device=skipping[0].device)

    @staticmethod
    def _check_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
        backends.resolve(name, device, dtype)  # raises, with the reason, when `name` can't run

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # groups pickled by torch.optim lack our keys
            for key, value in OPTIONS.items():
                group.setdefault(key, self.defaults.get(key, value))
            for key, value in TORCH_OPTIONS.items():
                group.setdefault(key, value)

    def state_dict(self):
        """torch's, with each param's state a plain dict (ours are WatchedDicts), so that a
        checkpoint loads with `torch.load(weights_only=True)` anywhere."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict):
        """torch's load, with three differences. State tensors keep the precision they were saved
        with: torch casts every state to the param's dtype, which would round an fp32 master copy
        or fp32 states of a bf16 param to bf16 (and make 8-bit codes floats); the flat buffers
        cast to their own dtypes instead. Our own options (max_grad_norm, master_weights, ...) missing from the
        checkpoint (one written by torch.optim) keep this optimizer's values: a resumed run keeps
        its clipping. And the checkpoint's states are checked against the params first (shapes,
        exp_avg and exp_avg_sq present with a step): a bad one raises with nothing changed."""
        seen = {}
        # Appended last, this pre-hook sees the dict as the user's pre-hooks left it.
        handle = self.register_load_state_dict_pre_hook(
            lambda _, d: seen.setdefault("dict", _checked(self.param_groups, d)))
        kept = [{k: g[k] for k in OPTIONS} for g in self.param_groups]
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        saved_groups = seen["dict"]["param_groups"]
        for group, saved, ours in zip(self.param_groups, saved_groups, kept):
            for key in OPTIONS:
                if key not in saved:
                    group[key] = ours[key]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        saved = seen["dict"]["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in saved.get(saved_id, {}).items():
                if key != "step" and torch.is_tensor(value):  # (8-bit codes too: uint8)
                    self.state[p][key] = value
        self.__dict__.pop("_replay", None)  # (a kept plan holds the buffers it steps)
        self._sync_layout()  # copy into our buffers now: nothing aliases the loaded tensors

    def add_param_group(self, param_group):
        """torch's, then this optimizer's checks and the group's buffers; a group that fails any
        of them is not added (torch's own checks raise before it is)."""
        super().add_param_group(param_group)
        if self._packing is None:  # torch's __init__ adding the first groups: __init__ checks
            return
        try:
            _check_group(self.param_groups[-1])
            self.__dict__.pop("_replay", None)  # (a kept plan holds the buffers it steps)
            self._sync_layout()
        except Exception:
            self.param_groups.pop()
            raise

    def _layouts(self) -> list[Layout]:
        return [Layout.of(group, self._amp) for group in self.param_groups]

    def _sync_layout(self) -> None:
        """(Re)build the flat buffers of groups that are new or stale; after load_state_dict (a
        new `self.state`) all of them, adopting the loaded values."""
        if self._packing is None or self._packing_state is not self.state:
            self._packing, self._packing_state = Packing(), self.state
        self._packing.sync(self.param_groups, self._layouts(), self.state, self._watch)

    def _layout_is_current(self) -> bool:
        return (self._packing is not None and self._packing_state is self.state
                and self._packing.is_current(self.param_groups, self._layouts()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none or not self._layout_is_current():
            return super().zero_grad(set_to_none)
        for buf in self._packing.buffers:
            buf.zero_grad()

    @torch.no_grad()
    def _planned_step(self, closure=None):
        """The step planned in full: what torch.compile traces, and an eager step that cannot
        replay the last one's plan (Replay)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.__dict__["_replay"] = None
        if getattr(self, "found_inf", None) is not None and not self._amp:
            self._amp = True  # a GradScaler: re-pack once with step counts on the device
        self._sync_layout()
        # Every check runs before the first update: a step that raises changes nothing.
        for group in self.param_groups:
            _check_step_values(group)
        # A state dict replaced or deleted (`del opt.state[p]`, `opt.state.clear()`): the dicts
        # in order are no longer the ones the last step left (identity, ~25 ns a param).
        values = self.__dict__.get("_state_values", ())
        if not compiling and (len(self.state) != len(values) or not all(
                map(operator.is_, self.state.values(), values))):
            self._watch.dirty = True
        # Each buffer's backends (its groups' choice) resolved once per (backend, kind) a step:
        # raises, with the reason, where one can't run, before anything has changed.
        groups = self.param_groups
        names = [group["backend"] for group in groups]
        uniform = all(name == names[0] for name in names)
        resolved = {}
        todo = []  # (buffer, prepare)
        for buf in self._packing.buffers:
            prepare = buf.plan(self.state)
            if prepare is not None:
                for name in (names[0],) if uniform else {names[g] for g in buf.group_range}:
                    if (name, buf.kind) not in resolved:
                        resolved[name, buf.kind] = backends.resolve(name, buf.device, buf.dtype)
                todo.append((buf, prepare))
        states = len(self.state)
        prepared = [(buf, prepare()) for buf, prepare in todo]
        if len(self.state) != states and not compiling:
            self._order_states(states)
        if not compiling:  # every buffer has compared and adopted
            self._watch.dirty = False
            self.__dict__["_state_values"] = list(self.state.values())
        # GradScaler sets grad_scale (None once unscaled) and found_inf for this call when
        # _step_supports_amp_scaling; skip_nonfinite looks at every grad of the step itself.
        # A scaler's found_inf skips every group (its grads are all scaled); our own check, of
        # the grads of the groups with skip_nonfinite, skips just those (the others step as
        # torch's would, non-finite values and all).
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        scaler = found_inf is not None
        if not scaler and any(g["skip_nonfinite"] for g in groups):
            found_inf = nonfinite([(buf, active) for buf, active in prepared if buf.skips])
        if found_inf is not None:
            found_inf = found_inf.float()
            counted = self._skipped_steps
            if counted is None or counted.device != found_inf.device:
                counted = self._skipped_steps = torch.zeros((), device=found_inf.device)
            # In place: a compiled step mutates its input (an attribute set there is lost).
            counted.add_(found_inf)
        skips = [found_inf if scaler or buf.skips else None for buf, _ in prepared]
        bulk = [buf for (buf, active), skip in zip(prepared, skips)
                if buf.counts_in_bulk(active, skip)]
        if bulk:
            torch._foreach_add_([buf.steps for buf in bulk], 1)
        # Each group's hyperparameters and grad multiplier (clip coefficient, GradScaler's
        # inverse scale): the rows of the launches, per group and step count.
        inverse = None if grad_scale is None else grad_scale.double().reciprocal().float()
        options_of, multiplier_of = [], []
        for g, group in enumerate(groups):
            multiplier = None
            if group["max_grad_norm"] is not None:
                mine = [(buf, active) for buf, active in prepared if g in buf.group_range]
                multiplier = clip_coefficient(mine, group["max_grad_norm"], grad_scale, g)
            if inverse is not None:
                multiplier = inverse if multiplier is None else multiplier * inverse.to(multiplier.device)
            options_of.append(_options(group))
            multiplier_of.append(multiplier)
        rounding = [bool(group["stochastic_rounding"]) for group in groups]
        uniform = uniform and all(r == rounding[0] for r in rounding)
        # One launch per (backend, device, operand dtypes, operands present, rounding), across
        # groups: lr, betas, eps and weight decay are rows of its table, not launches.
        launches: dict[tuple, Launch] = {}
        kept = None if compiling else self.__dict__.setdefault("_host_tables", {})
        copied = []  # buffers with params copied in, to copy out after the launches
        for (buf, active), skip in zip(prepared, skips):
            work = buf.begin(active, None if skip is None else skip.to(buf.device),
                             counted=buf.counts_in_bulk(active, skip))
            key_of = lambda g: (names[g], buf.kind,  # noqa: E731
                                rounding[g] and buf.may_round_stochastically, skip is not None)
            whole = uniform or len(buf.group_range) == 1  # one launch takes all its spans
            if buf.ordered:  # stepped now, in order: a param whose memory overlaps this
                key = key_of(buf.groups[0])  # one steps next and must see this update
                launch = Launch(resolved[key[:2]], key[2], kept)
                for operands, spans in work:
                    launch.add(operands, spans, options_of, multiplier_of)
                launch.run(skip)
                buf.end()
                continue
            if work and whole:  # (one key for the buffer's operands, its in-place params' too)
                key = key_of(buf.groups[0])
                parted = {key: work}
            else:
                parted = {}
                for operands, spans in work:
                    parts = {}
                    for span in spans:
                        parts.setdefault(key_of(span[-1]), []).append(span)
                    for key, part in parts.items():
                        parted.setdefault(key, []).append((operands, part))
            for key, items in parted.items():
                launch = launches.get(key)
                if launch is None:
                    launch = launches[key] = Launch(resolved[key[:2]], key[2], kept)
                for operands, spans in items:
                    launch.add(operands, spans, options_of, multiplier_of)
            if buf.copied:
                copied.append(buf)
        for key, launch in launches.items():
            launch.run(found_inf if key[3] else None)
        for buf in copied:  # their update back where the params live
            buf.end()
        if (not compiling and found_inf is None and grad_scale is None
                and len(prepared) == len(self._packing.buffers)
                and all(buf.replayable for buf, _ in prepared)
                and all(m is None for m in multiplier_of)):
            self.__dict__["_replay"] = Replay(self, launches.values())
        return loss

    @_hooked(_planned_step)
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        replay = self.__dict__.get("_replay")
        if replay is None or not replay.holds(self):
            self._planned_step()
            return loss
        # (the grad mode switched in C: torch.no_grad() costs ~20 us more of host time where the
        # step before streamed its operands through the caches, bench/NOTES.md 28)
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            replay.run(self)
        finally:
            torch._C._set_grad_enabled(enabled)
        return loss

    def _order_states(self, kept: int) -> None:
        """The states this step made (after the first `kept`) in the order torch.optim makes
        them, its params' order, after the states made before, as torch's appear when each param
        first steps (buffers make them buffer by buffer: large and overlapping params have
        buffers of their own, after the packed ones). `state_dict()` numbers them so."""
        order = {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}
        made = list(self.state)[kept:]
        ordered = sorted(made, key=lambda p: order.get(id(p), len(order)))
        if not all(map(operator.is_, ordered, made)):
            for p in ordered:
                self.state[p] = self.state.pop(p)

    @property
    def skipped_steps(self) -> torch.Tensor:
        """How many steps were skipped for a non-finite grad (skip_nonfinite, GradScaler): a
        tensor on the device where it was decided, so reading it is the only sync."""
        return torch.zeros(()) if self._skipped_steps is None else self._skipped_steps


class FusedAdamW(FusedAdam):
    """Drop-in `torch.optim.AdamW`: FusedAdam with decoupled weight decay, default 1e-2 (the
    other options and their defaults are FusedAdam's)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, **options):
        if "decoupled_weight_decay" in options:  # as torch.optim.AdamW: always decoupled
            raise TypeError("FusedAdamW.__init__() got an unexpected keyword argument "
                            "'decoupled_weight_decay'")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         decoupled_weight_decay=True, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW: always decoupled
            group["decoupled_weight_decay"] = True


# Our options beyond torch.optim.Adam's, with their defaults: the one place they are listed for
# groups that lack them (an unpickled torch optimizer, a torch checkpoint).
def _options(group: dict) -> dict:
    """A group's hyperparameters as `hyper_row` takes them (the rows of its launches)."""
    beta1, beta2 = group["betas"]
    return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"], bias_correction=group["bias_correction"],
                stochastic_rounding_seed=group["seed"] if group["stochastic_rounding"] else None)


def _policy(groups: list[dict]) -> list[tuple]:
    """What each group's options decide about its launches besides its rows and its Layout."""
    return [(g["backend"], g["stochastic_rounding"], g["max_grad_norm"]) for g in groups]


class Replay:
    """The last step's launches, kept while nothing they were planned from changes: a step like
    the last one then only counts, writes its rows and launches. Where the step before streamed
    its operands through the caches, planning a step costs ~190 us of host time, a replay ~100
    (ZeroRedundancyOptimizer's bucket views on the 2-core VM, where torch fused's step takes
    ~110; bench/NOTES.md 28). Kept after a step in which every buffer stepped every param with
    one host step count and adopted, created and copied nothing (FlatBuffer `replayable`), with
    no clipping, skipping or scaler; `holds` checks, before anything changes, everything else a
    plan depends on: the same buffers and state dicts and no state dict written (the Watch), each
    group's Layout and launch options, FUSED_ADAM_BACKEND, the step counts, and one census of
    every group's params (the objects, their data, their grads: objects, addresses, and whether
    each is read as it is) and of the state tensors' addresses. Anything else takes the full
    step, which keeps its plan again when it can. Grads user code holds are not kept between
    steps (zero_grad() frees them, as under torch): their slots are filled from the params for
    the launch and emptied after it."""

    def __init__(self, opt: FusedAdam, launches):
        self.buffers, self.state = opt._packing.buffers, opt.state
        self.values = opt.__dict__["_state_values"]
        self.layouts = opt._layouts()
        self.policy = _policy(opt.param_groups)
        self.override = os.environ.get(backends.OVERRIDE)
        self.views = [v for buf in self.buffers for key in buf.state for v in buf.views[key]]
        params = [p for group in opt.param_groups for p in group["params"]]
        self.census = addresses(params + self.views, STEP)
        # (the version of each buffer's counts: any write to a count changes it)
        self.versions = [(buf, buf.steps._version) for buf in self.buffers]
        held = {id(p.grad): p for p in params if p.grad is not None}
        self.launches = []
        for launch in launches:
            grads = launch.lists[1]
            slots = [(k, held[id(g)]) for k, g in enumerate(grads) if id(g) in held]
            for k, _ in slots:
                grads[k] = None
            self.launches.append((launch, slots))

    def holds(self, opt: FusedAdam) -> bool:
        groups = opt.param_groups
        if (self.census is None or opt._packing.buffers is not self.buffers
                or opt.state is not self.state or opt._watch.dirty
                or getattr(opt, "found_inf", None) is not None
                or getattr(opt, "grad_scale", None) is not None
                or len(opt.state) != len(self.values)
                or not all(map(operator.is_, opt.state.values(), self.values))
                or _policy(groups) != self.policy
                or os.environ.get(backends.OVERRIDE) != self.override
                or not all(map(operator.is_, opt._layouts(), self.layouts))):
            return False
        params = [p for group in groups for p in group["params"]]
        if addresses(params + self.views, STEP) != self.census:
            return False
        return all(buf.steps._version == version for buf, version in self.versions)

    def run(self, opt: FusedAdam) -> None:
        for group in opt.param_groups:
            _check_step_values(group)
        torch._foreach_add_([buf.steps for buf, _ in self.versions], 1)
        self.versions = [(buf, buf.steps._version) for buf, _ in self.versions]
        options_of = [_options(group) for group in opt.param_groups]
        for launch, slots in self.launches:
            launch.recount(options_of)
            grads = launch.lists[1]
            for k, p in slots:
                grads[k] = p.grad
            try:
                launch.run()
            finally:
                for k, _ in slots:
                    grads[k] = None


def _signature_defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


# Every option of a group with its default: FusedAdam's signature, the one place they are listed.
DEFAULTS = _signature_defaults(FusedAdam.__init__)
_TORCH_ADAM = set(inspect.signature(torch.optim.Adam.__init__).parameters)
# Ours (not torch.optim.Adam's): kept from our defaults when a torch checkpoint is loaded.
OPTIONS = {k: v for k, v in DEFAULTS.items() if k not in _TORCH_ADAM}
# torch.optim.Adam's keys that older torch versions' checkpoints may lack, with torch's defaults.
TORCH_OPTIONS = {k: v for k, v in DEFAULTS.items()
                 if k in _TORCH_ADAM and k not in ("lr", "betas", "eps", "weight_decay")}
# FusedAdamW's signature, for help() and IDEs: FusedAdam's with its two differences.
FusedAdamW.__init__.__signature__ = inspect.signature(FusedAdam.__init__).replace(parameters=[
    p.replace(default=1e-2) if p.name == "weight_decay" else p
    for p in inspect.signature(FusedAdam.__init__).parameters.values()
    if p.name != "decoupled_weight_decay"])
STATE_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")


def _check_group(group: dict) -> None:
    """Every check of a group's options (the constructor's defaults, or a group added later):
    torch's, with its messages, then ours; for a group with params, whether its backend can step
    each of their (device, dtype)."""
    try:
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                               group.get("foreach"), group.get("fused"))
    except TypeError as exc:
        raise TypeError(f"invalid optimizer option in a param group: {exc}") from None
    if group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if group["stochastic_rounding"] and (group["skip_nonfinite"] or group["capturable"]):
        raise ValueError("stochastic_rounding keys its random bits on the step count, which "
                         "skip_nonfinite and capturable keep on the device: use one of them")
    max_norm = group["max_grad_norm"]
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"Invalid max_grad_norm value: {max_norm}")
    check_state_dtype(group["state_dtype"], group["amsgrad"])
    if group["stochastic_rounding"] and group["master_weights"]:
        raise ValueError("stochastic_rounding applies to bfloat16 params without master weights")
    backends.check_name(group["backend"])
    for device, dtype, _ in {buffer_key(p) for p in group.get("params", ())}:
        FusedAdam._check_backend(group["backend"], device, dtype)


def _check_step_values(group: dict) -> None:
    """The types a step computes with, checked for every group before any group steps: a value a
    scheduler or the user set wrongly (`lr=None`) raises with nothing changed."""
    betas = group["betas"]
    if not (type(betas) in (tuple, list) and len(betas) == 2):
        raise TypeError(f"betas must be a pair of floats or tensors, got {betas!r}")
    values = (group["lr"], group["eps"], group["weight_decay"], *betas)
    if all(type(v) is float for v in values):  # the usual case, ~0.3 us (the ABC check: ~5 us)
        return
    for name, value in zip(("lr", "eps", "weight_decay", "betas[0]", "betas[1]"), values):
        if not isinstance(value, (numbers.Real, torch.Tensor)) or isinstance(value, bool):
            raise TypeError(f"param group option {name} must be a float or a tensor, got {value!r}")


def _checked(groups: list[dict], state_dict: dict) -> dict:
    """`state_dict`, after checking its states against the params they will load into: every
    state tensor shaped like its param, and exp_avg and exp_avg_sq present wherever a state is.
    Group sizes are torch's own check, which follows."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        return state_dict
    for group, saved in zip(groups, saved_groups):  # the options the load leaves each group
        options = {**group, **saved}
        check_state_dtype(options.get("state_dtype"), options.get("amsgrad"))
    saved_ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in groups for p in g["params"]]
    for n, (saved_id, p) in enumerate(zip(saved_ids, params)):
        state = state_dict["state"].get(saved_id)
        if not state:
            continue
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in state]
        if missing:
            raise ValueError(f"loaded state_dict has a state for parameter {n} without "
                             f"{', '.join(map(repr, missing))}")
        for key in quantize.KEYS:  # 8-bit codes: their scales, one per block
            if torch.is_tensor(state[key]) and state[key].dtype == quantize.CODE_DTYPE:
                scale = state.get(quantize.absmax_key(key))
                blocks = quantize.blocks(p.numel())
                if not (torch.is_tensor(scale) and scale.is_floating_point()
                        and scale.numel() == blocks):
                    raise ValueError(f"loaded state_dict's 8-bit {key!r} of parameter {n} needs "
                                     f"{quantize.absmax_key(key)!r}: {blocks} float scales")
        for key in STATE_SHAPED:  # (8-bit states: the codes are; their scales per block)
            value = state.get(key)
            if value is not None and (not torch.is_tensor(value) or value.shape != p.shape):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"loaded state_dict's {key!r} of parameter {n} has shape {shape}, "
                                 f"but the parameter has shape {tuple(p.shape)}")
    return state_dict


def _check_hyperparameters(lr, betas, eps, weight_decay, foreach, fused) -> None:
    """torch.optim.Adam's argument checks, with its exception types and messages."""
    if isinstance(lr, torch.Tensor):
        if foreach:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (all(isinstance(b, float) for b in betas)
            or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                 "capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
