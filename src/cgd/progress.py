"""Progress bars on long work (tqdm on a terminal; quiet when CGD_QUIET=1 or output is not a tty)."""

from __future__ import annotations

import os
import sys


def progress(iterable, desc: str | None = None, total: int | None = None):
    from tqdm.auto import tqdm

    quiet = os.environ.get("CGD_QUIET") == "1" or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False, dynamic_ncols=True)
