#!/usr/bin/env bash
# One-shot job of docker-compose.yaml (service airflow-init), run before the Airflow components start:
# migrates the metadata database, sets the admin password of the simple auth manager (Airflow 3's
# default auth manager) and checks the pgincr configuration and programs, so that a mistake shows
# here, in `docker compose logs airflow-init`, rather than as a missing DAG later.
set -euo pipefail

if [[ -z "${AIRFLOW_ADMIN_PASSWORD:-}" ]]; then
    echo "airflow-init: AIRFLOW_ADMIN_PASSWORD is not set; put it in docker/compose.env" >&2
    exit 1
fi

echo "airflow-init: airflow db migrate"
airflow db migrate

# The simple auth manager reads user passwords from this JSON file ({"user": "password"}) and only
# generates one for a configured user that is missing from it.
python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
users = [u.split(":")[0] for u in os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin").split(",")]
admin = users[0].strip()
path.parent.mkdir(parents=True, exist_ok=True)
tmp = path.with_name(path.name + ".tmp")
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    f.write(json.dumps({admin: os.environ["AIRFLOW_ADMIN_PASSWORD"]}) + "\n")
os.replace(tmp, path)
print(f"airflow-init: password of Airflow user {admin!r} set from AIRFLOW_ADMIN_PASSWORD")
PY

echo "airflow-init: checking the pgincr configuration ${PGINCR_CONFIG:-<unset>}"
python - <<'PY'
import os

from airflow_pg_incremental.core.binaries import find_program
from airflow_pg_incremental.dag_factory import load_config

clusters = load_config(os.environ["PGINCR_CONFIG"])
for cl in clusters:
    print(f"airflow-init: cluster {cl.name}: {cl.postgres_conn_id} -> {cl.repository} (aws {cl.aws_conn_id}, "
          f"catalog {cl.catalog_conn_id}, wal_mode {cl.wal_mode})")
major = int(os.environ.get("PGINCR_PG_MAJOR", "18"))
for prog in ("pg_basebackup", "pg_receivewal", "pg_verifybackup", "pg_combinebackup", "pg_waldump", "postgres"):
    print(f"airflow-init: {prog}: {find_program(prog, major)}")
PY
echo "airflow-init: done"
