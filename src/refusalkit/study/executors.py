"""Where a sweep's points run (issue 15, part 6): in turn in this process (``local``), or in parallel
as Ray tasks (``ray``) — a Ray instance started on this machine, or an existing cluster
(``--address auto``), one task per point with the CPUs and GPUs it needs.

Every point is an ordinary variant of the run directory and its stages skip what exists, so a
point is idempotent: Ray re-runs a task whose worker died (``max_retries``), and the new attempt
resumes from the stages the dead one finished. On a cluster the run directory must be on storage
every node sees (NFS, Lustre, a mounted bucket); the driver checks that the workers see it.

Ray is optional and imported only here, when ``--executor ray`` is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.core.errors import UserError

EXECUTORS = ("local", "ray")

# A point's outcome: (point name, its record) or (point name, None) with the reason it failed.
Outcome = tuple[str, dict[str, Any] | None, str | None]


def _point_outcome(fn: Callable[..., dict[str, Any]], args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Run one point; a :class:`UserError` (a point that cannot be made) is an outcome, not a crash."""
    try:
        return fn(*args, **kwargs), None
    except UserError as e:
        return None, str(e)


class LocalExecutor:
    """The points in turn, in this process."""

    kind = "local"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def base(self, fn: Callable[[], Any]) -> None:
        fn()

    def points(
        self, fn: Callable[..., dict[str, Any]], jobs: list[tuple[str, tuple, dict[str, Any]]]
    ) -> Iterator[Outcome]:
        for name, args, kwargs in jobs:
            record, error = _point_outcome(fn, args, kwargs)
            yield name, record, error

    def close(self) -> None:
        pass


@dataclass
class RayExecutor:
    """One Ray task per point. ``address`` None starts a Ray instance on this machine with ``workers``
    worker slots (each point takes ``cpus_per_point`` CPUs of them); ``"auto"`` or ``ray://…``
    joins an existing cluster. ``gpus_per_point`` None gives a point one GPU when the cluster has
    GPUs, none otherwise; a point larger than one GPU (a 70B model with ``device_map``) asks for
    several. A point whose worker dies is re-run up to ``max_retries`` times."""

    address: str | None = None
    workers: int = 2
    cpus_per_point: float = 1.0
    gpus_per_point: float | None = None
    max_retries: int = 2
    kind: str = "ray"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: give at least 1")
        if self.cpus_per_point <= 0:
            raise UserError(f"--cpus-per-point {self.cpus_per_point}: give a positive number")
        if self.gpus_per_point is not None and self.gpus_per_point < 0:
            raise UserError(f"--gpus-per-point {self.gpus_per_point}: give 0 or more")
        if self.max_retries < 0:
            raise UserError(f"--max-retries {self.max_retries}: give 0 or more")
        try:
            import ray
        except ImportError:
            raise UserError(
                "--executor ray needs Ray: pip install 'refusalkit[cluster]' (or pip install ray), "
                "or use --executor local"
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                kwargs["num_cpus"] = max(1, int(self.workers * self.cpus_per_point + 0.999))
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise UserError(f"cannot start or join {where} ({str(e).splitlines()[0]}); check --address") from None
            self._started = True
        if self.gpus_per_point is None:
            self.gpus_per_point = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        if self.gpus_per_point > ray.cluster_resources().get("GPU", 0):
            self.close()
            raise UserError(
                f"--gpus-per-point {self.gpus_per_point:g}: the Ray cluster has "
                f"{ray.cluster_resources().get('GPU', 0):g} GPU(s); give fewer"
            )
        self._options = {"num_cpus": self.cpus_per_point, "num_gpus": self.gpus_per_point}

    def describe(self) -> dict[str, Any]:
        res = self._ray.cluster_resources()
        return {
            "kind": self.kind,
            "address": self.address or "local",
            "cluster_cpus": res.get("CPU", 0),
            "cluster_gpus": res.get("GPU", 0),
            "cpus_per_point": self.cpus_per_point,
            "gpus_per_point": self.gpus_per_point,
            "max_retries": self.max_retries,
        }

    def _remote(self, fn: Callable[..., Any], retries: int) -> Any:
        return self._ray.remote(max_retries=retries, retry_exceptions=False, **self._options)(fn)

    def check_shared(self, root: Path) -> None:
        """One task confirms that a worker sees the run directory (shared storage on a cluster)."""
        task = self._remote(_sees, 0)
        if not self._ray.get(task.remote(str(root))):
            self.close()
            raise UserError(
                f"the Ray workers cannot see {root}: put the run directory on storage every node mounts "
                "at the same path"
            )

    def base(self, fn: Callable[[], Any]) -> None:
        """The base model's stages (direction, noise floor, evaluation) as one task, before any point."""
        self._ray.get(self._remote(_call, self.max_retries).remote(fn))

    def points(
        self, fn: Callable[..., dict[str, Any]], jobs: list[tuple[str, tuple, dict[str, Any]]]
    ) -> Iterator[Outcome]:
        """Every point as a task; yields each as it finishes (any order). A point whose worker died
        more than ``max_retries`` times, or that raised an unexpected error, is a failed outcome."""
        ray = self._ray
        task = self._remote(_point_outcome, self.max_retries)
        pending = {task.remote(fn, args, kwargs): name for name, args, kwargs in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                name = pending.pop(ref)
                try:
                    record, error = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None) or e
                    record, error = None, f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError) as e:
                    record, error = None, f"its worker died {self.max_retries + 1} times ({type(e).__name__})"
                yield name, record, error
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def _call(fn: Callable[[], Any]) -> None:
    fn()


def _sees(root: str) -> bool:
    """In a worker: the driver's run directory is there (its config file, written by the driver)."""
    from refusalkit.core.layout import RunLayout

    return RunLayout(Path(root)).config.is_file()


def make_executor(
    kind: str,
    *,
    address: str | None = None,
    workers: int = 2,
    cpus_per_point: float = 1.0,
    gpus_per_point: float | None = None,
    max_retries: int = 2,
) -> LocalExecutor | RayExecutor:
    if kind == "local":
        if address is not None:
            raise UserError("--address is for --executor ray")
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, workers, cpus_per_point, gpus_per_point, max_retries)
    raise UserError(f"unknown executor {kind!r}; use {' or '.join(EXECUTORS)}")
