"""The restore form's tablespaces field: `in place`, or NAME_OR_OID=/dir pairs; anything else is refused."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.operators.restore import PgRestoreOperator


def _op(text):
    return PgRestoreOperator(task_id="restore_x", clusters={"x": {"repository": "/r"}}, cluster="x", tablespaces=text)


@pytest.mark.parametrize("text,mapping,in_place", [
    ("", None, False),
    (None, None, False),
    ("in place", None, True),
    ("In_Place", None, True),
    ("ts_data=/srv/a, 16390 = /srv/b", {"ts_data": "/srv/a", "16390": "/srv/b"}, False),
])
def test_parsed(text, mapping, in_place):
    op = _op(text)
    op._parse_tablespaces()
    assert op.tablespace_map == mapping and op.tablespaces_in_place is in_place


@pytest.mark.parametrize("text", ["ts_data", "=/srv/a", "ts_data=", "a=/x,,b"])
def test_refused(text):
    op = _op(text)
    if text == "a=/x,,b":
        with pytest.raises(Exception, match="'b' is not NAME_OR_OID"):
            op._parse_tablespaces()
        return
    with pytest.raises(Exception, match="NAME_OR_OID=/new/directory"):
        op._parse_tablespaces()


def test_the_form_has_the_field():
    from airflow_pg_incremental.dag_factory import restore_form

    p = restore_form(["x"])["tablespaces"]
    assert p.value is None and "in place" in p.schema.get("description_md", "") + str(p.__dict__)
