"""airflow-pg-incremental: incremental-forever PostgreSQL backups with PITR, orchestrated by Airflow.

The engine (`airflow_pg_incremental.core`) imports no Airflow; the hooks/operators/sensors are thin
adapters over it.
"""

__version__ = "0.1.0"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-pg-incremental",
        "name": "PostgreSQL incremental backups",
        "description": "Incremental-forever PostgreSQL backups with point-in-time recovery, proven by restore "
                       "tests, scheduled and audited in Airflow.",
        "versions": [__version__],
        "integrations": [{
            "integration-name": "PostgreSQL incremental backups",
            "external-doc-url": "https://www.postgresql.org/docs/current/continuous-archiving.html",
            "tags": ["software"],
        }],
        "operators": [{"integration-name": "PostgreSQL incremental backups",
                       "python-modules": ["airflow_pg_incremental.operators.backup",
                                          "airflow_pg_incremental.operators.wal",
                                          "airflow_pg_incremental.operators.verify",
                                          "airflow_pg_incremental.operators.retention",
                                          "airflow_pg_incremental.operators.restore"]}],
        "sensors": [{"integration-name": "PostgreSQL incremental backups",
                     "python-modules": ["airflow_pg_incremental.sensors.wal"]}],
        "triggers": [{"integration-name": "PostgreSQL incremental backups",
                      "python-modules": ["airflow_pg_incremental.triggers.wal"]}],
        "hooks": [{"integration-name": "PostgreSQL incremental backups",
                   "python-modules": ["airflow_pg_incremental.hooks.repository"]}],
    }
