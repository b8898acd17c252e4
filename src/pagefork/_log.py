"""pagefork's logger, ``logging.getLogger("pagefork")``: silent unless the
program configures logging. INFO tells what changes how pagefork works
(tracking choices and fallbacks, workers started or replaced, checkpoint
bases); DEBUG adds every batch's phases and every checkpoint's decision."""

from __future__ import annotations

import logging

__all__ = ["log"]

log = logging.getLogger("pagefork")
log.addHandler(logging.NullHandler())
