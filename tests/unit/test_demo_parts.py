"""The demo's work-directory rules and the reasons its report gives for a failed check."""

from __future__ import annotations

import os
import stat

import pytest

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.demo import prepare_workdir, release_workdir, table_differences, verification_problems


def test_a_non_empty_workdir_is_refused_untouched(tmp_path):
    w = tmp_path / "w"
    w.mkdir(mode=0o700)
    (w / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty.*'mine.txt'.*nothing was touched"):
        prepare_workdir(str(w))
    assert (w / "mine.txt").read_text() == "keep me" and stat.S_IMODE(w.stat().st_mode) == 0o700
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_workdir(str(f))


def test_an_empty_workdir_is_given_back_empty_with_its_mode(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    os.chmod(w, 0o710)
    wd = prepare_workdir(str(w))
    assert (wd.created, wd.mode) == (False, 0o710)
    os.chmod(w, 0o755)  # what the demo does
    (w / "source").mkdir()
    (w / "source" / "f").write_text("x")
    (w / "airflow.log").write_text("x")
    release_workdir(wd, keep=False)
    assert list(w.iterdir()) == [] and stat.S_IMODE(w.stat().st_mode) == 0o710


def test_a_workdir_the_demo_made_is_removed_unless_kept(tmp_path):
    wd = prepare_workdir(str(tmp_path / "new" / "w"))
    assert wd.created and wd.path.is_dir()
    (wd.path / "f").write_text("x")
    release_workdir(wd, keep=True)
    assert (wd.path / "f").exists()
    release_workdir(wd, keep=False)
    assert not wd.path.exists()


def test_report_reasons_name_the_table_and_the_backup():
    a = {"public.t": {"rows": 3, "md5": "aaaa"}, "public.u": {"rows": 1, "md5": "bbbb"},
         "public.v": {"rows": 1, "md5": "cccc"}}
    b = {"public.t": {"rows": 2, "md5": "dddd"}, "public.u": {"rows": 1, "md5": "eeee"},
         "public.w": {"rows": 1, "md5": "ffff"}}
    why = table_differences(a, b)
    assert "public.t has 2 rows, expected 3" in why
    assert "public.u: 1 rows as expected but different content" in why
    assert "public.v missing from the restored copy" in why and "public.w is only in the restored copy" in why
    assert table_differences(a, dict(a)) == ""
    problems = verification_problems({"B1": {"ok": True}, "B2": {"ok": False, "error": "wal: segment X missing"},
                                      "B3": None})
    assert problems == "backup B2: wal: segment X missing; backup B3 was never verified"
