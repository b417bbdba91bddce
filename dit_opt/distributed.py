"""Work spread over the ranks of a ``torch.distributed`` process group.

``dit_opt.profile(..., distributed=True)`` runs under ``torchrun`` (or any initialised default
process group): each rank runs its share of the calibration's generations, and what the profile
accumulates (error sums and call counts per step, the MLP channel statistics, the end-to-end
errors of its probes) is summed over the ranks before anything is derived from it, so every rank
ends with the profile one process would measure on all the generations (up to the order of
float summation). This module is the only place that talks to ``torch.distributed``:

* :func:`resolve` turns the user's ``distributed=`` into a :class:`Group`, or says how to start
  one (``torchrun``);
* :func:`spread` makes a group the active one for the code inside it (:func:`active`), so that
  the passes and the error measurements reduce over it without being handed it;
* :meth:`Group.agree` and :func:`spread` keep the ranks in step: a value that differs
  between ranks (the model, the settings, the calibration's shapes), or an exception on one
  rank, becomes the same error on every rank instead of a hang;
* :func:`is_writer` says whether this process writes artifacts (rank 0, or no group).

Collectives run on CPU tensors, so the gloo backend serves; with NCCL the tensors are moved to
the rank's device for the reduction.
"""

from __future__ import annotations

import contextlib
import contextvars
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dit_opt.errors import ConfigError, DistributedError, RankFailedError

__all__ = ["Group", "resolve", "spread", "active", "is_writer", "TORCHRUN_HINT"]

#: How to start the processes, quoted by every error that finds no process group.
TORCHRUN_HINT = ("torchrun --nproc-per-node=2 your_script.py (or torch.distributed.init_process_group(...) "
                 "in each process before the call)")


@dataclass(frozen=True)
class Group:
    """A process group and this process's place in it (the default group unless given).

    Attributes:
        rank: this process's rank in the group.
        world: the number of ranks.
        group: the ``torch.distributed`` group (``None``: the default one).
    """

    rank: int
    world: int
    group: Any = None

    @property
    def device(self) -> torch.device:
        """Where the collectives' tensors live: the rank's CUDA device under NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # Every collective starts with an exchange of status (``_sync``): a rank whose work raised
    # sends its error there instead (``fail``, from ``spread``), so the others stop at their next
    # collective with RankFailedError rather than wait in a payload collective it never joins.
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Run one collective; a rank that died (the backend's error) becomes RankFailedError."""
        try:
            yield
        except RuntimeError as e:  # gloo and NCCL report a lost rank or a timeout as RuntimeError
            raise _on_every_rank(RankFailedError(
                f"a rank of the group of {self.world} stopped answering during {what} (it died, or the group's "
                f"timeout passed), so this rank ({self.rank}) stops too; nothing was written. "
                f"The backend said: {e}")) from e

    def _sync(self, status: str | None) -> None:
        import torch.distributed as dist

        statuses: list[Any] = [None] * self.world
        with self._collective("the ranks' exchange of status"):
            dist.all_gather_object(statuses, status, group=self.group)
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None and r != self.rank]
        if failed and status is None:
            r, s = failed[0]
            raise _on_every_rank(RankFailedError(f"rank {r} of {self.world} failed, so this rank ({self.rank}) stops "
                                              f"too: {s}"))

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed with ``error`` (their next collective raises)."""
        self._sync(_describe(error))

    def all_sum(self, values: np.ndarray | Sequence[float]) -> np.ndarray:
        """Elementwise sum over the ranks, in float64 (every rank gets the result)."""
        import torch.distributed as dist

        self._sync(None)
        arr = np.ascontiguousarray(values, dtype=np.float64)
        t = torch.from_numpy(arr.copy()).to(self.device)
        with self._collective("a sum over the ranks"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy().reshape(arr.shape)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        self._sync(None)
        out: list[Any] = [None] * self.world
        with self._collective("a gather over the ranks"):
            dist.all_gather_object(out, value, group=self.group)
        return out

    def agree(self, what: str, value: Any, fix: str) -> None:
        """Check that every rank has the same ``value``; otherwise raise the same
        :class:`~dit_opt.errors.DistributedError` on every rank, naming the ranks that differ
        from rank 0.

        Args:
            what: what ``value`` is ("the model", "the profile settings", ...).
            value: a picklable value that must be equal on every rank.
            fix: what to do about a difference.
        """
        values = self.gather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            detail = "; ".join(f"rank {r}: {_short(values[r])}" for r in differ[:3])
            raise _on_every_rank(DistributedError(
                f"{what} differs between the ranks (rank 0: {_short(values[0])}; {detail}); {fix}"))


def _on_every_rank(error: Exception) -> Exception:
    """Mark ``error`` as raised on every rank alike (nothing to tell the others)."""
    error._dit_opt_collective = True  # type: ignore[attr-defined]
    return error


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ACTIVE: contextvars.ContextVar[Group | None] = contextvars.ContextVar("dit_opt_distributed", default=None)


def resolve(distributed: bool | Any) -> Group | None:
    """The group ``distributed=`` asks for: ``False`` none, ``True`` the default process group,
    or a ``torch.distributed`` ``ProcessGroup`` itself.

    Raises:
        ConfigError: ``distributed`` is neither, or asks for a group while none is initialised
            (the message gives the ``torchrun`` command).
    """
    if distributed is False or distributed is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("distributed=True needs torch.distributed, which this build of torch lacks; "
                          "use distributed=False")
    if not dist.is_initialized():
        raise ConfigError(f"distributed=True needs an initialised process group, and there is none; start the "
                          f"processes with {TORCHRUN_HINT}")
    if distributed is True:
        return Group(rank=dist.get_rank(), world=dist.get_world_size())
    if isinstance(distributed, dist.ProcessGroup):
        return Group(rank=dist.get_rank(distributed), world=dist.get_world_size(distributed), group=distributed)
    raise ConfigError(f"distributed must be True, False or a torch.distributed ProcessGroup, got {distributed!r}")


@contextlib.contextmanager
def spread(group: Group | None) -> Iterator[Group | None]:
    """Make ``group`` the active one (:func:`active`) inside the ``with`` (``None``: no change).

    The ranks leave it together: an exception on one rank is sent to the others (their next
    collective, or the exchange every rank makes on leaving, raises
    :class:`~dit_opt.errors.RankFailedError` naming it) and re-raised on its own rank.
    """
    if group is None:
        yield _ACTIVE.get()
        return
    token = _ACTIVE.set(group)
    try:
        yield group
    except Exception as e:
        if not getattr(e, "_dit_opt_collective", False):
            group.fail(e)
        raise
    else:
        group._sync(None)
    finally:
        _ACTIVE.reset(token)


def active() -> Group | None:
    """The group the current code reduces over (set by :func:`spread`), or ``None``."""
    return _ACTIVE.get()


def is_writer() -> bool:
    """Whether this process writes artifacts: it is rank 0 of the default process group, or
    there is none (every rank computes the same artifact; one writes it)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _describe(e: BaseException) -> str:
    """One line for a rank's exception: its type, message and innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"
