"""All airflow-pg-incremental DAGs of every cluster, from one configuration file.

The file is $PGINCR_CONFIG, or pgincr_clusters.yaml beside this DAG file.
"""

import os
from pathlib import Path

from airflow_pg_incremental.dag_factory import dags_from_config_file

_config = os.environ.get("PGINCR_CONFIG") or str(Path(__file__).with_name("pgincr_clusters.yaml"))
globals().update(dags_from_config_file(_config))
