from types import SimpleNamespace

import pytest

from cgd import progress as progress_mod
from cgd.progress import progress


@pytest.fixture(autouse=True)
def fresh_clock(monkeypatch):
    monkeypatch.setattr(progress_mod, "_last_line", [None])  # no line written yet in this process


def test_log_lines_when_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("CGD_QUIET", raising=False)
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)
    assert list(progress(range(4), desc="unlearn epoch 1/1")) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("unlearn epoch 1/1: 1/4 (25 %), ")
    assert lines[-1].startswith("unlearn epoch 1/1: 4/4 (100 %), ")
    assert len(lines) == 4  # one line per item here, and the last one is not repeated at the end


def test_short_loops_and_quiet_mode_print_nothing(monkeypatch, capsys):
    monkeypatch.delenv("CGD_QUIET", raising=False)
    assert list(progress(iter([7, 8]), desc="fast")) == [7, 8]  # under a minute: no line
    monkeypatch.setenv("CGD_QUIET", "1")
    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)
    assert list(progress(range(3), desc="quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_the_end_is_logged_when_the_last_line_was_earlier(monkeypatch, capsys):
    monkeypatch.delenv("CGD_QUIET", raising=False)
    clock = iter([0.0, 70.0, 71.0, 72.0, 73.0])  # start, then one reading per item, then the end
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    assert list(progress(range(3), desc="guide")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["guide: 1/3 (33 %)", "guide: 3/3 (100 %)"]


def test_a_run_of_short_loops_still_logs_once_a_minute(monkeypatch, capsys):
    monkeypatch.delenv("CGD_QUIET", raising=False)
    now = [0.0]

    def tick():
        now[0] += 10.0  # every reading 10 s later: each 3-item loop takes ~40 s, under LOG_EVERY_S
        return now[0]

    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(monotonic=tick))
    for epoch in range(1, 5):
        assert list(progress(range(3), desc=f"victim epoch {epoch}/4")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    epochs = {ln.split(":")[0] for ln in lines}
    assert len(lines) <= 4 and len(epochs) >= 2  # a line about once a minute, not only in the first epoch
