"""Where the threads of a batch run: in this process, in worker processes,
or on a Dask cluster. Each backend implements executor.Backend."""

from __future__ import annotations

from typing import Any

__all__ = ["make_backend", "BACKENDS"]

BACKENDS = ("threads", "processes", "dask")


def make_backend(name: str, workers: int | None, client: Any = None) -> Any:
    """The backend called ``name``."""
    if name == "threads":
        from .threads import ThreadsBackend

        return ThreadsBackend(workers)
    if name == "processes":
        from .processes import ProcessesBackend

        return ProcessesBackend(workers)
    if name == "dask":
        from .dask import DaskBackend

        return DaskBackend(client, workers)
    raise ValueError(f"unknown backend {name!r}; valid: " + ", ".join(map(repr, BACKENDS)))
