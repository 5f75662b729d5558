"""The harness of the hostile-input suite: run `cgd` as a user would, in a sandbox folder, and check every promise
a refusal makes (non-zero exit, one `cgd <command>: error: ...` line, no traceback, nothing written outside the
run and the cache, no partial outputs, bounded memory)."""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cgd.pipeline import OUTPUTS

PEAK_RSS_LIMIT = 2 << 30  # what a refusal may cost at most
ADDRESS_SPACE_LIMIT = 6 << 30  # a safety net: an unbounded allocation fails instead of taking the machine down


@dataclass
class Sandbox:
    """`root/work` is the current folder (and $CGD_DATA), `root/home` the home folder, `cache` $CGD_CACHE;
    anything the command writes must land in the cache or in a run folder the test names."""

    root: Path
    cache: Path | None = None  # a cache shared by several sandboxes (a warm guide), else root/cache

    def __post_init__(self):
        self.cache = Path(self.cache or self.root / "cache")
        for d in (self.work, self.root / "home", self.cache):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def work(self) -> Path:
        return self.root / "work"

    def files(self) -> set[Path]:
        """Files and links under `root`, links never followed (Path.rglob follows them: out of the sandbox, into
        loops, or into paths past PATH_MAX that a hostile archive builds); `os.fwalk` walks by folder descriptor."""
        out = set()
        for top, dirs, names, fd in os.fwalk(self.root):
            out.update(Path(top, n) for n in names)
            out.update(Path(top, n) for n in dirs if stat.S_ISLNK(os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode))
        return out


@dataclass
class Result:
    code: int
    out: str
    err: str
    peak_rss: int  # bytes
    written: set[Path]  # files that appeared during the run

    @property
    def last_line(self) -> str:
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_cli(box: Sandbox, *argv: str, env: dict | None = None, timeout: float = 300) -> Result:
    """`python -m cgd.cli ARGV` in `box`; its peak resident memory comes from the kernel (wait4's rusage)."""
    import signal
    import tempfile
    import time

    before = box.files()
    full_env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    full_env.update(HOME=str(box.root / "home"), CGD_CACHE=str(box.cache), CGD_DATA=str(box.work),
                    OMP_NUM_THREADS="1", **(env or {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cgd.cli", *argv], cwd=box.work, env=full_env,
                                stdout=out, stderr=err, preexec_fn=_limit_memory, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"cgd {' '.join(argv)} ran over {timeout} s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Result(proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024, box.files() - before)


def assert_refused(res: Result, command: str, *needles: str, box: Sandbox, run_dir: Path | None = None) -> None:
    """Every promise of a refusal (see the module docstring)."""
    assert res.code not in (0, None), f"exit {res.code}; stderr:\n{res.err}"
    assert "Traceback" not in res.err, res.err
    assert res.last_line.startswith(f"cgd {command}: error: "), res.err
    for n in needles:
        assert n.lower() in res.err.lower(), f"{n!r} not in {res.err!r}"
    allowed = [box.cache] + ([run_dir] if run_dir is not None else [])
    stray = [p for p in res.written if not any(p.is_relative_to(a) for a in allowed)]
    assert not stray, f"written outside the run and cache: {stray}"
    if run_dir is not None:
        left = [f for f in OUTPUTS if (run_dir / f).exists()]
        assert not left, f"partial outputs left in {run_dir}: {left}"
    assert res.peak_rss <= PEAK_RSS_LIMIT, f"peak RSS {res.peak_rss / 2**30:.2f} GiB"
