"""Progress on long work: a tqdm bar on a terminal; elsewhere (a log file under `nohup`, CI) one plain line to
stderr at most every `LOG_EVERY_S` seconds, so a background run shows where it is. `CGD_QUIET=1` silences both."""

from __future__ import annotations

import os
import sys
import time

LOG_EVERY_S = 60.0
_last_line = [None]  # when any loop last wrote a line: a run of loops shorter than a minute each (a victim's
# epochs) still shows one line a minute


def _log_lines(iterable, desc: str | None, total: int | None):
    """Yield from `iterable`, writing 'desc: done/total (p %), elapsed' when LOG_EVERY_S seconds have passed since
    the last line of any loop, and at the end when the loop has logged at all and its last line did not say it."""
    start = time.monotonic()
    if _last_line[0] is None:
        _last_line[0] = start
    done = logged_at = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - _last_line[0] >= LOG_EVERY_S:
            _last_line[0], logged_at = now, done
            _write(desc, done, total, now - start)
    if 0 < logged_at < done:
        _last_line[0] = time.monotonic()
        _write(desc, done, total, _last_line[0] - start)


def _write(desc: str | None, done: int, total: int | None, elapsed: float) -> None:
    of = f"/{total} ({100 * done / total:.0f} %)" if total else ""
    print(f"{desc or 'progress'}: {done}{of}, {elapsed:.0f} s", file=sys.stderr, flush=True)


def progress(iterable, desc: str | None = None, total: int | None = None):
    if os.environ.get("CGD_QUIET") == "1":
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not sys.stderr.isatty():
        return _log_lines(iterable, desc, total)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
