"""The accumulator base class: fixed-size states with a declared reduction.

In the spirit of torchmetrics' ``Metric``, but without its list states: a subclass declares
each state once with ``add_state(name, tensor, reduce="sum")`` (int64 counts, float64 sums),
and the base class gives it ``reset()``, ``merge(other)``, ``state_dict()`` /
``load_state_dict()`` (plain tensors, loadable with ``torch.load(..., weights_only=True)``),
``to(device)`` and ``all_reduce(group)``. The states never grow, and states of batches, processes
and resumed runs combine in any grouping: int64 counts (and max / min) exactly, float64 sums up to
rounding (float addition is not associative: ~1e-16 relative, far below the 10 significant digits of
results.csv).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from shiftbench.chunks import CHUNK_PIXELS, row_chunks  # noqa: F401  (re-exported for the metrics)
from shiftbench.errors import ShiftbenchError, is_int, is_unit_range

#: reduce name -> (how two states combine, the matching torch.distributed op name)
REDUCTIONS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "sum": (torch.add, "SUM"),
    "max": (torch.maximum, "MAX"),
    "min": (torch.minimum, "MIN"),
}


class Accumulator:
    """Base class: subclasses call ``add_state`` in ``__init__`` and implement ``update`` / ``compute``.

    ``config`` (a dict of the constructor's settings) must be equal for two accumulators to merge.
    States live on one device; ``update`` moves them to its inputs' device (``_follow``).
    """

    def __init__(self, **config: Any) -> None:
        if "ignore_index" in config and not is_int(config["ignore_index"]):
            raise ShiftbenchError(f"ignore_index must be an integer (the label of ignored pixels, e.g. 255); "
                                  f"got {config['ignore_index']!r}")
        self.config = {k: int(v) if k == "ignore_index" else v for k, v in config.items()}
        self._reduce: dict[str, str] = {}
        self._default: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- states
    def add_state(self, name: str, default: Tensor, reduce: str = "sum") -> None:
        """Declare a state: its initial value (shape and dtype are fixed from here on) and its reduction."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not one of {', '.join(REDUCTIONS)}")
        if name in self._reduce or hasattr(type(self), name):
            raise ValueError(f"state {name!r} is already defined")
        self._reduce[name] = reduce
        self._default[name] = default.detach().clone()
        setattr(self, name, default.detach().clone())

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(self._reduce)

    @property
    def device(self) -> torch.device:
        return getattr(self, next(iter(self._reduce))).device

    def reset(self) -> Accumulator:
        """Back to the declared initial values (on the current device)."""
        for name, default in self._default.items():
            setattr(self, name, default.to(self.device, copy=True))
        return self

    def to(self, device: torch.device | str) -> Accumulator:
        for name in self._reduce:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _follow(self, x: Tensor) -> None:
        """Move the states to ``x``'s device if they are elsewhere (one transfer of a few KB)."""
        if x.device != self.device:
            self.to(x.device)

    # ----------------------------------------------------------------- combine
    def merge(self, other: Accumulator) -> Accumulator:
        """Add ``other``'s states into this one's (``a.merge(b)`` == one accumulator updated with both)."""
        if type(other) is not type(self) or other.config != self.config:
            raise ShiftbenchError(f"cannot merge {type(other).__name__}({_fmt(getattr(other, 'config', {}))}) into "
                                  f"{type(self).__name__}({_fmt(self.config)}); both must have the same settings")
        for name, reduce in self._reduce.items():
            combine = REDUCTIONS[reduce][0]
            setattr(self, name, combine(getattr(self, name), getattr(other, name).to(self.device)))
        return self

    def all_reduce(self, group: Any = None) -> Accumulator:
        """Reduce the states over a torch.distributed process group, in place (one collective per dtype).

        A no-op when torch.distributed is not available or its default process group is not initialised
        (a single process, not under torchrun), as torchmetrics syncs only when distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self

        buckets: dict[tuple[str, torch.dtype], list[str]] = {}
        for name, reduce in self._reduce.items():
            buckets.setdefault((reduce, getattr(self, name).dtype), []).append(name)
        for (reduce, _), names in buckets.items():
            flat = torch.cat([getattr(self, n).reshape(-1) for n in names])
            dist.all_reduce(flat, op=getattr(dist.ReduceOp, REDUCTIONS[reduce][1]), group=group)
            for name, part in zip(names, flat.split([getattr(self, n).numel() for n in names])):
                setattr(self, name, part.view_as(getattr(self, name)).clone())
        return self

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Tensor]:
        """The states as plain CPU tensors (``torch.save`` them; load with ``weights_only=True``)."""
        return {name: getattr(self, name).detach().to("cpu", copy=True) for name in self._reduce}

    def load_state_dict(self, state: dict[str, Tensor]) -> Accumulator:
        """Replace the states; names, shapes and dtypes must be the declared ones."""
        if not isinstance(state, dict) or set(state) != set(self._reduce):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ShiftbenchError(f"{type(self).__name__}: state has keys {got}; expected {sorted(self._reduce)}")
        for name, value in state.items():
            mine = getattr(self, name)
            if not isinstance(value, Tensor) or value.shape != mine.shape or value.dtype != mine.dtype:
                got = f"{value.dtype} {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ShiftbenchError(f"{type(self).__name__}: state {name!r} is {got}; expected {mine.dtype} "
                                      f"{list(mine.shape)} (saved with other settings?)")
        for name, value in state.items():
            setattr(self, name, value.to(self.device, copy=True))
        return self

    # ----------------------------------------------------------------- interface
    def update(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_fmt(self.config)})"


def check_count(name: str, value: Any, minimum: int = 1, what: str = "") -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (numpy's too, bools refused); ``what`` explains it."""
    if not is_int(value) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ShiftbenchError(f"{name} must be {allowed}{f' ({what})' if what else ''}; got {value!r}")
    return int(value)


def check_unit_range(value: Any) -> tuple[float, float]:
    """``value`` as floats (lo, hi) if it is a pair of numbers 0 <= lo < hi <= 1 (a threshold range)."""
    if not is_unit_range(value):
        raise ShiftbenchError(f"threshold_range must be two numbers lo < hi in [0, 1] (e.g. (0.01, 0.99)); "
                              f"got {value!r}")
    return float(value[0]), float(value[1])


def _fmt(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


# --------------------------------------------------------------------------- helpers shared by the metrics


def _check_tensor(name: str, x: Any, what: str) -> None:
    if not isinstance(x, Tensor):
        raise ShiftbenchError(f"{name} must be {what} (torch.Tensor; convert numpy arrays with torch.from_numpy); "
                              f"got {type(x).__name__}")


def check_labels(name: str, x: Tensor, shape: torch.Size | None = None) -> None:
    """``x`` must be an integer [B,H,W] tensor (of ``shape`` when given)."""
    _check_tensor(name, x, "an integer tensor [B,H,W]")
    if x.dim() != 3 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ShiftbenchError(f"{name} must be an integer tensor [B,H,W]; got {x.dtype} {list(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ShiftbenchError(f"{name} has shape {list(x.shape)}; expected {list(shape)} like target")


def check_map(name: str, x: Tensor, shape: torch.Size) -> None:
    """``x`` must be a float [B,H,W] tensor of ``shape``."""
    _check_tensor(name, x, f"a float tensor {list(shape)}")
    if not x.is_floating_point() or x.shape != shape:
        raise ShiftbenchError(f"{name} must be a float tensor {list(shape)} like target; got {x.dtype} {list(x.shape)}")


class RangeCheck:
    """Checks inputs chunk by chunk and refuses out-of-range values with one line.

    The fast path looks at every pixel (one ``aminmax``, one host sync); only when that range is
    not allowed is the input kept, to be re-checked where ``where`` is true (e.g. NaN on ignored
    pixels is fine) by :meth:`raise_if_bad`, called before the states change (so a refused
    update leaves the accumulator as it was).
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[list[tuple[Tensor, Tensor | None]], float, float, str]] = {}

    def add(self, name: str, x: Tensor, low: float, high: float, what: str, where: Tensor | None = None) -> bool:
        """Record ``x`` (only where ``where`` is true, if given); allowed: ``what`` = values in [low, high].

        Returns whether every value of ``x``, where-masked or not, is in range (one host sync): then the
        caller may mask ``x`` by arithmetic (``x * valid``); otherwise it must sanitise the masked-out
        values first (they may be NaN), and :meth:`raise_if_bad` looks at the unmasked ones.
        """
        if not x.numel():
            return True
        if _allowed(torch.stack(torch.aminmax(x)).double()[None], low, high):
            return True
        self._seen.setdefault(name, ([], low, high, what))[0].append((x, where))
        return False

    def masked(self, name: str, x: Tensor, low: float, high: float, what: str, invalid: Tensor,
               fill: float = 0.0) -> Tensor | None:
        """``x`` ready to be masked by arithmetic (``x * valid``): ``x`` itself when every value is in range,
        else ``x`` with ``fill`` on the ``invalid`` (ignored) pixels; None when a valid pixel is NaN or Inf
        (skip it: :meth:`raise_if_bad` refuses the update). Records ``x`` like :meth:`add`."""
        if self.add(name, x, low, high, what, ~invalid):
            return x
        x = x.masked_fill(invalid, fill)
        return x if bool(x.isfinite().all()) else None

    def raise_if_bad(self) -> None:
        """Raise for the first recorded input with a value out of range where it counts."""
        for name, (parts, low, high, what) in self._seen.items():
            values = torch.cat([(x if where is None else x[where]).reshape(-1).double() for x, where in parts])
            if values.numel() and not _allowed(torch.stack(torch.aminmax(values))[None], low, high):
                self._seen.clear()
                finite = values[~values.isnan()]
                seen = "NaN" if not finite.numel() else f"values in [{finite.min().item():g}, {finite.max().item():g}]"
                seen += " and NaN" if finite.numel() < values.numel() and finite.numel() else ""
                raise ShiftbenchError(f"{name} holds {seen}; expected {what}")
        self._seen.clear()


def _allowed(lo_hi: Tensor, low: float, high: float) -> bool:
    """lo_hi [n,2] rows of (min, max): all within [low, high] (NaN is not)."""
    lo, hi = lo_hi[:, 0].min().item(), lo_hi[:, 1].max().item()
    return lo >= low and hi <= high


def check_range(name: str, x: Tensor, valid: Tensor | None, low: float, high: float, what: str) -> None:
    """Refuse values of ``x`` outside [low, high] (or NaN) where ``valid``; one host sync."""
    check = RangeCheck()
    check.add(name, x, low, high, what, valid)
    check.raise_if_bad()
