"""The Backups view: an Airflow plugin served by Airflow's own API server.

- The catalog read behind it: one query per kind of fact whatever the number of clusters (200
  here), split recoverable ranges around a WAL gap, and no write to a catalog that does not
  exist yet.
- The real thing: `airflow standalone` with this package's plugin, a catalog holding real
  backups (a full and an incremental taken by the engine, WAL captured, a restore point, a real
  verification and a real restore test); anonymous requests are refused; Debian's chromium,
  driven by playwright, logs in, opens the view through its nav entry, checks what it shows,
  follows a backup's link to its DAG run, and follows Admin > Providers' documentation link to
  the README page. The screenshot goes to the test's temporary directory, or to the README's
  docs/backups-view.png when PGINCR_UPDATE_SCREENSHOT=1 (so a test run leaves the checkout clean).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

from airflow_pg_incremental.core.catalog import Catalog
from airflow_pg_incremental.plugins.catalog_view import QUERIES, read_catalog, recoverable_ranges
from airflow_pg_incremental.plugins.page import ClusterEntry, Page, render_page

from ..conftest import PASSWORD, REPO_ROOT

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# what this machine needs: no sandbox as root, no GPU, no network of its own (no QUIC, no
# component/background updates or sync), a fresh profile (the user-data dir given at launch)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# None: the screenshot goes into the test's own work directory (removed with the session's)
SCREENSHOT = REPO_ROOT / "docs" / "backups-view.png" if os.environ.get("PGINCR_UPDATE_SCREENSHOT") == "1" else None
SEG = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------
# the catalog read: 200 clusters


def _fill_fleet(pg, schema: str, n: int) -> None:
    """`n` clusters c000.. in the catalog: a full and two incrementals each (one every 20 hours),
    one archived segment per hour for 60 hours, verifications, restore tests, an alert; cluster
    c007 misses segment 30 (between its first incremental and its second)."""
    Catalog(pg.conninfo("pgincr_catalog"), schema).schema_version()  # creates the schema
    s = schema
    pg.psql(f"""
        INSERT INTO {s}.backups (cluster, backup_id, kind, parent_id, chain_root_id, status, start_lsn, stop_lsn,
                                 timeline, started_at, finished_at, duration_s, raw_bytes, stored_bytes, dag_id,
                                 run_id)
        SELECT format('c%s', lpad(i::text, 3, '0')), format('B%s', j), CASE j WHEN 0 THEN 'full' ELSE 'incremental' END,
               CASE j WHEN 0 THEN NULL ELSE format('B%s', j - 1) END, 'B0', 'complete',
               '0/0'::pg_lsn + ((j * 20 + 1) * {SEG} + 40)::numeric, '0/0'::pg_lsn + ((j * 20 + 1) * {SEG} + 4000)::numeric,
               1, now() - make_interval(hours => 59 - j * 20), now() - make_interval(hours => 59 - j * 20, mins => -5),
               300, 1e9, 1e8, 'pgincr_x_weekly_full', format('scheduled__%s', j)
        FROM generate_series(0, {n - 1}) i, generate_series(0, 2) j;
        INSERT INTO {s}.wal_segments (cluster, timeline, segment, start_lsn, end_lsn, raw_bytes, stored_bytes,
                                      archived_at)
        SELECT format('c%s', lpad(i::text, 3, '0')), 1, '00000001' || lpad(to_hex(k / 256), 8, '0')
                                                        || lpad(to_hex(k % 256), 8, '0'),
               '0/0'::pg_lsn + (k * {SEG})::numeric, '0/0'::pg_lsn + ((k + 1) * {SEG})::numeric, {SEG}, 1e6,
               now() - make_interval(hours => 60 - k)
        FROM generate_series(0, {n - 1}) i, generate_series(0, 59) k WHERE NOT (i = 7 AND k = 30);
        INSERT INTO {s}.verifications (cluster, backup_id, ok, started_at, duration_s)
        SELECT cluster, backup_id, true, finished_at + interval '1 minute', 12 FROM {s}.backups;
        INSERT INTO {s}.restore_tests (cluster, ok, target_kind, backup_id, started_at, restore_seconds)
        SELECT format('c%s', lpad(i::text, 3, '0')), i % 10 <> 3, 'latest', 'B2',
               now() - make_interval(hours => h * 12), 40 + i
        FROM generate_series(0, {n - 1}) i, generate_series(0, 4) h;
        INSERT INTO {s}.alerts (cluster, kind, message) VALUES ('c003', 'restore_test_failed', 'checks failed');
    """, "pgincr_catalog")


def _count_statements(monkeypatch) -> list:
    import psycopg

    calls = []
    real = psycopg.Cursor.execute

    def counting(self, query, params=None, **kw):
        calls.append(query)
        return real(self, query, params, **kw)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    return calls


def test_catalog_read_is_one_query_per_kind_for_200_clusters(pg, monkeypatch):
    schema = "ui_fleet_" + uuid.uuid4().hex[:6]
    names = [f"c{i:03d}" for i in range(200)]
    _fill_fleet(pg, schema, len(names))
    conn = pg.conninfo("pgincr_catalog")
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=14)

    statements = _count_statements(monkeypatch)
    read_catalog(conn, schema, names[:1], since=since)
    one = len(statements)
    statements.clear()
    t0 = time.monotonic()
    out = read_catalog(conn, schema, names, since=since)
    took = time.monotonic() - t0
    many = len(statements)
    assert out.error is None, out.error
    assert many == one and out.queries == len(QUERIES), (one, many)
    assert all(len(out.clusters[n].backups) == 3 and out.clusters[n].wal["segments"] >= 59 for n in names)

    # the overview of 200 clusters and the timeline of one
    t1 = time.monotonic()
    entries = [ClusterEntry(n, 90, 192, f"cat / {schema}", facts=out.clusters[n]) for n in names]
    html = render_page(Page(entries=entries, now=out.now, since=since, days=14, airflow_root="", mount="/pgincr",
                            nonce="n", detail=["c007"]))
    rendered = time.monotonic() - t1
    print(f"200 clusters: catalog read {took * 1000:.0f} ms ({many} statements), page {rendered * 1000:.0f} ms, "
          f"{len(html) // 1024} KiB")
    assert took < 5 and rendered < 2, (took, rendered)
    assert html.count('class="cluster-row') == 200 and html.count('<section class="cluster"') == 1

    # c007: a WAL gap splits what can be recovered; the others recover from their full onwards
    gapped = out.clusters["c007"]
    assert len(gapped.wal_gaps) == 1 and gapped.window["gaps"] == 1
    ranges = recoverable_ranges(gapped, out.now)
    b0, b1, b2 = gapped.backups
    assert [r[0] for r in ranges] == [b0["finished_at"], b2["finished_at"]], ranges
    assert ranges[0][1] == gapped.wal_gaps[0]["before_at"]
    assert len(recoverable_ranges(out.clusters["c001"], out.now)) == 1
    section = html[html.index('<section class="cluster" id="cluster-c007"'):]
    assert section.count('class="window-band"') == 2 and section.count('class="wal-gap"') == 1
    assert 'class="rt-mark ok"' in section and "RTO 47.0 s" in section


def test_catalog_read_writes_nothing(pg):
    """A catalog no backup task has created yet is reported, not created by the view."""
    schema = "ui_none_" + uuid.uuid4().hex[:6]
    out = read_catalog(pg.conninfo("pgincr_catalog"), schema, ["a"], since=dt.datetime.now(dt.timezone.utc))
    assert "does not exist yet" in out.error
    assert pg.psql(f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'", "pgincr_catalog").strip() == "0"


def test_catalog_errors_name_the_problem_never_the_password(pg):
    bad = dataclasses.replace(pg.conninfo("pgincr_catalog"), password="wrong-" + uuid.uuid4().hex)
    out = read_catalog(bad, "pgincr", ["a"], since=dt.datetime.now(dt.timezone.utc))
    assert "authentication failed" in out.error and "password" in out.error
    assert bad.password not in out.error


def test_restore_points_are_read_from_the_repositories(s3, workdir, monkeypatch):
    """Restore points are indexed in the repository, not in the catalog: the view reads them
    there, local and S3 (through the cluster's Amazon connection); a missing repository is
    reported for its cluster."""
    from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
    from airflow_pg_incremental.core.wal import record_restore_point
    from airflow_pg_incremental.dag_factory import parse_config
    from airflow_pg_incremental.plugins import app
    from airflow_pg_incremental.plugins.catalog_view import ClusterFacts
    from tests.conftest import created

    tag = uuid.uuid4().hex[:6]
    local_dir, prefix = workdir / "repos" / f"rp-{tag}", f"rp-{tag}"
    record_restore_point(created(LocalRepository(local_dir)), f"l{tag}", "before-x", "0/3000028", 1,
                         "2026-11-25T10:00:00+00:00")
    s3repo = created(S3Repository(s3.client(), s3.bucket, prefix))
    for name, at in (("before-z", "2026-11-25T12:00:00+00:00"), ("before-y", "2026-11-25T11:00:00+00:00")):
        record_restore_point(s3repo, f"s{tag}", name, "0/5000028", 1, at)
    monkeypatch.setenv("AIRFLOW_CONN_UI_RP_S3", s3.airflow_conn_uri())
    clusters = parse_config({"clusters": [
        {"name": f"l{tag}", "postgres_conn_id": "x", "repository": str(local_dir)},
        {"name": f"s{tag}", "postgres_conn_id": "x", "repository": f"s3://{s3.bucket}/{prefix}",
         "aws_conn_id": "ui_rp_s3"},
        {"name": f"m{tag}", "postgres_conn_id": "x", "repository": str(workdir / "repos" / f"none-{tag}")}]})
    entries = {c.name: ClusterEntry(c.name, 90, 192, "", facts=ClusterFacts(c.name)) for c in clusters}
    app._add_restore_points(clusters, entries)
    facts = {n: e.facts for n, e in entries.items()}
    assert [p["name"] for p in facts[f"l{tag}"].restore_points] == ["before-x"]
    assert [p["name"] for p in facts[f"s{tag}"].restore_points] == ["before-y", "before-z"]
    assert facts[f"s{tag}"].restore_points[0]["created_at"] == dt.datetime(2026, 11, 25, 11, tzinfo=dt.timezone.utc)
    assert facts[f"m{tag}"].restore_points == [] and "RepositoryNotFound" in facts[f"m{tag}"].restore_points_error


# ------------------------------------------------------------------------------------------
# the real UI


def _browser_or_skip():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium (bash .ci/setup does it as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]' (bash .ci/setup)")


def plugin_metadata_overlay(dest: Path) -> Path | None:
    """Airflow finds the plugin (entry point `airflow.plugins`) and the provider's documentation
    link (Project-URL) in the installed distribution's metadata. When the installed metadata is
    not this checkout's (a shared virtualenv installed from another checkout), write this
    checkout's into a directory to put first on the API server's path; None when it matches."""
    from importlib import metadata

    proj = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    want_eps = {(g, n, v) for g, eps in proj["entry-points"].items() for n, v in eps.items()}
    want_urls = {f"{k}, {v}" for k, v in proj["urls"].items()}
    try:
        dist = metadata.distribution(proj["name"])
        if want_eps <= {(e.group, e.name, e.value) for e in dist.entry_points} and \
                want_urls <= set(dist.metadata.get_all("Project-URL") or []):
            return None
    except metadata.PackageNotFoundError:
        pass
    info = dest / f"{proj['name'].replace('-', '_')}-{proj['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {proj['name']}\nVersion: {proj['version']}\n"
                                   + "".join(f"Project-URL: {u}\n" for u in sorted(want_urls)))
    (info / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{n} = {v}\n" for n, v in eps.items()) + "\n"
        for g, eps in proj["entry-points"].items()))
    return dest


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _http(url: str, *, headers: dict | None = None, data: dict | None = None) -> tuple[int, dict, str]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={**({"Content-Type": "application/json"} if body else {}),
                                                          **(headers or {})})
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode(errors="replace")


def _start_standalone(base: Path, cfg: dict, port: int, pythonpath: list[str]):
    home = base / "airflow"
    (home / "dags").mkdir(parents=True)
    # the package's DAG file: the on-demand restore DAG's form is tested in the browser too
    (home / "dags" / "pgincr_dags.py").write_text((REPO_ROOT / "dags" / "pgincr_dags.py").read_text())
    (base / "clusters.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}?timeout=60",
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join([*pythonpath, str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
        "PGINCR_CONFIG": str(base / "clusters.json"),
    })
    log = open(base / "standalone.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _free_port() -> int:
    from airflow_pg_incremental.core.server import free_port

    return free_port()


def _stop(proc, log) -> None:
    """SIGINT to standalone's process group (SIGTERM would orphan its children). Its scheduler
    sometimes never finishes stopping (an idle LocalExecutor worker blocked reading its pipe, seen
    with and without this plugin): after 15 s the group is killed."""
    t0 = time.monotonic()
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass
    log.close()
    print(f"airflow standalone stopped in {time.monotonic() - t0:.1f} s")


def _wait_healthy(proc, base: Path, url: str, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2).read()
            return
        except OSError:
            pass
        assert proc.poll() is None, (base / "standalone.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"airflow standalone did not come up in {timeout:.0f} s"
        time.sleep(1)


def _take_backups(pg, repo, catalog, cluster: str, runs: dict) -> dict:
    """A full, a restore point, an incremental, WAL captured after each, a verification and a
    restore test: all real, all recorded in `catalog`."""
    from airflow_pg_incremental.core.backup import take_backup
    from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
    from airflow_pg_incremental.core.incremental import take_planned_backup
    from airflow_pg_incremental.core.restoretest import run_restore_test
    from airflow_pg_incremental.core.verify import verify_backup

    conn = pg.conninfo()

    def capture(**switch):
        capture_wal_pull(conn, repo, cluster, upto_lsn=switch_wal(conn, **switch)["lsn"], catalog=catalog)

    capture_wal_pull(conn, repo, cluster, catalog=catalog)  # the slot, before the first backup
    full = take_backup(conn, repo, cluster, kind="full", catalog=catalog, airflow=runs["full"])
    pg.psql("CREATE TABLE IF NOT EXISTS ui_markers (id serial PRIMARY KEY, at timestamptz DEFAULT now()); "
            "INSERT INTO ui_markers DEFAULT VALUES")
    capture(restore_point=f"before-{cluster}-change", repo=repo, cluster=cluster)
    incr = take_planned_backup(conn, repo, cluster, kind="incremental", catalog=catalog, airflow=runs["incr"])
    assert incr["kind"] == "incremental", incr
    pg.psql("INSERT INTO ui_markers DEFAULT VALUES")
    capture()
    verified = verify_backup(repo, cluster, incr["backup_id"], catalog=catalog, only_unverified=False)
    assert incr["backup_id"] in verified["verified"], verified
    test = run_restore_test(repo, cluster, catalog=catalog, airflow=runs["test"],
                            checks=["SELECT count(*) FROM ui_markers"])
    assert test["ok"], test
    return {"full": full["backup_id"], "incr": incr["backup_id"], "rto": test["restore_seconds"]}


def _trigger_the_restore_form(ui, url: str, cluster: str, bearer: dict) -> None:
    """The on-demand restore's trigger form as a person meets it: every field titled, the default
    case (a dry run of latest, nothing typed) can be triggered, and the run succeeds."""
    from playwright.sync_api import expect

    ui.goto(f"{url}/dags/pgincr_restore")
    ui.get_by_role("button", name="Trigger").first.click()
    dialog = ui.get_by_role("dialog")
    for title in ("Cluster", "Recover to", "Target value", "Destination directory", "At the target", "Dry run"):
        expect(dialog.locator("label", has_text=title).first).to_be_visible()
    expect(dialog).to_contain_text("2026-11-21T10:15:00+01:00")  # the time format, under the value field
    submit = dialog.get_by_role("button", name="Trigger")
    expect(submit).to_be_enabled()
    submit.click()
    deadline = time.monotonic() + 240
    while True:
        try:  # polling: one slow answer of a loaded standalone API server is not a failure
            status, _, body = _http(f"{url}/api/v2/dags/pgincr_restore/dagRuns", headers=bearer)
        except OSError as e:
            status, body = None, f"{type(e).__name__}: {e}"
        runs = json.loads(body).get("dag_runs", []) if status == 200 else []
        if runs and runs[-1]["state"] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, f"the triggered restore did not finish: {status} {body[:500]}"
        time.sleep(2)
    assert runs[-1]["state"] == "success", runs[-1]
    assert runs[-1]["conf"]["target_type"] == "latest" and runs[-1]["conf"]["dry_run"] is True, runs[-1]["conf"]


@pytest.mark.slow
def test_backups_view_in_the_airflow_ui(pg, workdir):
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    from airflow_pg_incremental.core.repository import LocalRepository
    from tests.conftest import created

    t_start = time.monotonic()
    base = workdir / f"ui-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    os.chmod(base, 0o755)
    cluster, schema = f"ui{uuid.uuid4().hex[:4]}", "ui_" + uuid.uuid4().hex[:6]
    dag = {k: f"pgincr_{cluster}_{k}" for k in ("weekly_full", "daily_incremental", "restore_test")}
    runs = {"full": {"dag_id": dag["weekly_full"], "run_id": "manual__2026-11-20T02:00:00+00:00",
                     "task_id": "full_backup"},
            "incr": {"dag_id": dag["daily_incremental"], "run_id": "scheduled__2026-11-21T02:00:00+00:00",
                     "task_id": "incremental_backup"},
            "test": {"dag_id": dag["restore_test"], "run_id": "scheduled__2026-11-21T06:30:00+00:00"}}
    cfg = {"clusters": [{"name": cluster, "postgres_conn_id": "ui_pg", "repository": str(base / "repo"),
                         "catalog_conn_id": "ui_catalog", "catalog_schema": schema}]}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    overlay = plugin_metadata_overlay(base / "metadata")
    proc, log = _start_standalone(base, cfg, port, [str(overlay)] if overlay else [])
    slot = f"pgincr_{cluster}"
    try:
        # the backups are taken while Airflow starts
        repo = created(LocalRepository(base / "repo"))
        ids = _take_backups(pg, repo, Catalog(pg.conninfo("pgincr_catalog"), schema), cluster, runs)
        _wait_healthy(proc, base, url)
        t_up = time.monotonic()
        password = json.loads((base / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        status, _, body = _http(f"{url}/auth/token", data={"username": "admin", "password": password})
        assert status == 201, body
        bearer = {"Authorization": f"Bearer {json.loads(body)['access_token']}"}
        # the catalog connection in Airflow's metadata DB (Admin > Connections), as a user would add it
        ci = pg.conninfo()
        status, _, body = _http(f"{url}/api/v2/connections", headers=bearer, data={
            "connection_id": "ui_catalog", "conn_type": "postgres", "host": ci.host, "port": ci.port,
            "login": ci.user, "password": ci.password, "schema": "pgincr_catalog"})
        assert status == 201, body

        # nothing without a session: JSON callers get 401, a browser is sent to the login page
        for path in ("/pgincr/", "/pgincr/docs", "/pgincr/docs/backups-view.png", "/pgincr/icon.svg"):
            status, _, body = _http(url + path, headers={"Accept": "application/json"})
            assert status == 401, (path, status, body[:300])
        status, headers, _ = _http(f"{url}/pgincr/", headers={"Accept": "text/html"})
        assert status == 303 and headers["location"].startswith("/auth/login?next="), (status, headers)
        assert _http(f"{url}/pgincr/openapi.json", headers=bearer)[0] == 404
        status, _, page = _http(f"{url}/pgincr/", headers=bearer)
        assert status == 200 and ids["full"] in page and ids["incr"] in page, page[:2000]
        assert PASSWORD not in page and ci.password not in page
        status, headers, image = _http(f"{url}/pgincr/docs/backups-view.png", headers=bearer)
        assert status == 200 and headers["content-type"] == "image/png", (status, headers)  # README images

        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(base / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1440, "height": 1000})
            try:
                ui = browser.new_page()
                ui.goto(f"{url}/")
                ui.wait_for_url("**/auth/login**")
                ui.fill("input[name=username]", "admin")
                ui.fill("input[name=password]", password)
                ui.click("button[type=submit]")
                ui.get_by_role("link", name="Backups").click()  # the nav entry
                ui.wait_for_url("**/plugin/backups**")
                view = ui.frame_locator("iframe[title=Backups]")
                for bid in (ids["full"], ids["incr"]):
                    expect(view.locator(f"tr.backup-row[data-backup='{bid}']")).to_be_visible()
                    expect(view.locator(f"svg.timeline a.dagrun[data-backup='{bid}']")).to_have_count(1)
                expect(view.locator("svg.timeline .window-band")).to_have_count(1)
                expect(view.locator("svg.timeline .wal-gap")).to_have_count(0)
                expect(view.locator("svg.timeline .rt-mark.ok")).to_have_count(1)
                expect(view.locator("svg.timeline .rt-label.ok")).to_have_text(f"RTO {ids['rto']:.1f} s")
                expect(view.locator("svg.timeline .rp-mark")).to_have_count(1)
                expect(view.locator("svg.timeline .backup.incr.verified-ok")).to_have_count(1)
                expect(view.locator("dl.facts")).to_contain_text("passed")  # last verification, restore test
                expect(view.locator("td.rto").first).to_have_text(f"{ids['rto']:.1f} s")
                link = view.locator(f"tr.backup-row[data-backup='{ids['full']}'] a.dagrun")
                run_path = f"/dags/{dag['weekly_full']}/runs/{quote(runs['full']['run_id'], safe='')}"
                assert link.get_attribute("href") == run_path
                shot = SCREENSHOT or base / "backups-view.png"
                shot.parent.mkdir(exist_ok=True)
                ui.screenshot(path=str(shot))
                # the README opens inside the UI too (the iframe may not open a new window), and back
                view.locator("header a.docs").click()
                expect(view.locator("main h1").first).to_have_text("airflow-pg-incremental")
                view.get_by_role("link", name="Backups view", exact=True).click()
                expect(view.locator(f"tr.backup-row[data-backup='{ids['full']}']")).to_be_visible()

                # the backup's link leaves the iframe: the Airflow UI shows the DAG run
                link.click()
                ui.wait_for_url(f"**/dags/{dag['weekly_full']}/runs/**")
                assert urlparse(ui.url).path in (run_path, f"/dags/{dag['weekly_full']}/runs/{runs['full']['run_id']}")
                expect(ui.locator("iframe[title=Backups]")).to_have_count(0)

                _trigger_the_restore_form(ui, url, cluster, bearer)

                # Admin > Providers: the package's documentation link opens the README page
                ui.goto(f"{url}/providers")
                doc_link = ui.get_by_role("link", name="airflow-pg-incremental")
                assert doc_link.get_attribute("href") == "pgincr/docs"
                with browser.expect_page() as opened:
                    doc_link.click()
                docs = opened.value
                docs.wait_for_load_state()
                assert urlparse(docs.url).path == "/pgincr/docs", docs.url
                expect(docs.locator("main h1").first).to_have_text("airflow-pg-incremental")
                expect(docs.locator("nav")).to_contain_text("Using it in Airflow")
            finally:
                browser.close()
        t_end = time.monotonic()
        print(f"UI test: {t_end - t_start:.0f} s in all, Airflow up after {t_up - t_start:.0f} s, "
              f"browser part {t_end - t_up:.0f} s")
    finally:
        _stop(proc, log)
        pg.psql(f"SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'")
