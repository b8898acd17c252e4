"""Process-wide kernel states that tracking and remapping must know about.

- ``mlockall(MCL_FUTURE)`` (without ``MCL_ONFAULT``): every new mapping is
  locked and populated when it is made, and populating a private writable
  mapping breaks copy-on-write of every page at once. A snapshot mapped then
  (``Snapshot.map_to``) is all private copies, which is all ``cow`` sees.
- Long-term pins: io_uring fixed buffers (``IORING_REGISTER_BUFFERS``) are
  written through the kernel's pin of the pages. Tracking reports them at
  every read (native ``exempt.c``), but mapping the memory again leaves the
  pin on the old pages: the ring writes where nobody reads.
"""

from __future__ import annotations

from . import _native
from ._errors import PageforkError
from .memory import Region

__all__ = ["new_mappings_locked", "MLOCK_COW_REASON", "refuse_pinned"]

#: Why cow cannot track memory mapped while mlockall(MCL_FUTURE) is in effect.
MLOCK_COW_REASON = (
    "mlockall(MCL_FUTURE) is in effect: the kernel locks every new mapping and populates it at "
    "once, which copies every page of a private snapshot mapping, so cow cannot tell which pages "
    "the program writes; call munlockall() or mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) "
    "(locks pages as they are touched), or track with another mode")


def new_mappings_locked() -> bool:
    """Whether memory mapped now is locked and populated at once
    (``mlockall(MCL_FUTURE)`` without ``MCL_ONFAULT``); a few microseconds."""
    return _native.new_mappings_locked()


def refuse_pinned(region: Region, action: str) -> None:
    """Raises :class:`PageforkError` if io_uring fixed buffers of this
    process pin pages of ``region``, which ``action`` would map again: the
    pin would keep the old pages, and the ring would go on writing into them
    where the region never shows it."""
    spans = _native.pinned_pages(region.address, region.n_pages)
    if not spans:
        return
    pages = ", ".join(f"{first}-{first + count - 1}" if count > 1 else str(first)
                      for first, count in spans[:8])
    raise PageforkError(
        f"io_uring fixed buffers (IORING_REGISTER_BUFFERS) pin pages {pages} of main memory; "
        f"{action} maps main memory again, after which the ring would write into the old pages "
        "and the arrays would never show it. Unregister the buffers (IORING_UNREGISTER_BUFFERS) "
        "before it and register them again after, or register buffers outside the App's memory")
