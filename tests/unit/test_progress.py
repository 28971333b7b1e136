import logging
import types

import pytest

from airflow_pg_incremental.core import progress as progress_mod
from airflow_pg_incremental.core.progress import Progress, human_bytes

MiB = 1024 * 1024


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (MiB - 1, "1024.0 KiB"),
    (5 * MiB, "5.0 MiB"), (3 * 1024 ** 3, "3.0 GiB"), (2.5 * 1024 ** 4, "2.5 TiB"), (1024 ** 5, "1024.0 TiB"),
    (-2048, "-2.0 KiB"), (10.7, "10 B"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod, "time", types.SimpleNamespace(monotonic=c))
    return c


def test_line_with_total_has_percent_and_eta(clock):
    p = Progress("full backup X", total=1000 * MiB)
    clock.t += 10
    p.done = 250 * MiB
    line = p.line()
    assert line == "full backup X: 250.0 MiB of ~1000.0 MiB (25%), 25.0 MiB/s, ETA 30 s"


def test_line_without_total(clock):
    p = Progress("restore", total=None)
    clock.t += 2
    p.add(4 * MiB)
    line = p.line()
    assert line == "restore: 4.0 MiB, 2.0 MiB/s"
    assert "%" not in line and "ETA" not in line


def test_line_done_beyond_estimate(clock):
    p = Progress("x", total=100)
    clock.t += 1
    p.done = 250
    line = p.line()
    assert "(100%)" in line and "ETA" not in line


def test_line_extra_and_zero_elapsed(clock):
    p = Progress("x", total=10)
    p.extra = "stored 1 B"
    line = p.line()  # no time passed: must not divide by zero
    assert line.endswith("; stored 1 B") and "(0%)" in line and "ETA" not in line


def test_add_logs_only_after_interval(clock, caplog):
    log = logging.getLogger("test.progress")
    p = Progress("copy", total=100, logger=log, interval=10)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.t += 5
        p.add(10)
        assert caplog.records == []
        clock.t += 6
        p.add(10)
        assert len(caplog.records) == 1 and "copy: 20 B of ~100 B (20%)" in caplog.records[0].getMessage()
        clock.t += 1
        p.add(10)
        assert len(caplog.records) == 1
        clock.t += 3
        took = p.finish()
    assert took == pytest.approx(15)
    assert p.done == 30
    assert "done in 15.0 s" in caplog.records[-1].getMessage()
