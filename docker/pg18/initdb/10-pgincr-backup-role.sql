-- Runs once, when the pg18 volume is created (docker-entrypoint-initdb.d, as the superuser, with
-- ON_ERROR_STOP). Creates the backup role the DAGs log in with and the catalog database.
-- The password comes from the container's environment (PGINCR_BACKUP_PASSWORD, set in
-- docker/compose.env), read with psql's \getenv: no secret in this file.
\set ON_ERROR_STOP on
\getenv backup_password PGINCR_BACKUP_PASSWORD
\if :{?backup_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'PGINCR_BACKUP_PASSWORD is not set: put it in docker/compose.env'; END $$;
\endif

-- LOGIN + REPLICATION: pg_basebackup, pg_receivewal, the replication slot (pg_hba.conf has the
-- matching "host replication pgincr_backup samenet scram-sha-256" line)
SET password_encryption = 'scram-sha-256';
CREATE ROLE pgincr_backup LOGIN REPLICATION PASSWORD :'backup_password';

-- WAL switch, named restore points, advancing the slot once the WAL is stored, system identifier.
-- Function grants belong to one database: these are in "postgres", the database of connection
-- pg_demo (repeat them in another database if pg_demo is pointed there).
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO pgincr_backup;
GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO pgincr_backup;
GRANT EXECUTE ON FUNCTION pg_replication_slot_advance(name, pg_lsn) TO pgincr_backup;
GRANT EXECUTE ON FUNCTION pg_control_system() TO pgincr_backup;
-- settings (data_directory, summarize_wal ...), statistics, and CHECKPOINT
GRANT pg_read_all_settings, pg_read_all_stats, pg_checkpoint TO pgincr_backup;

-- the catalog (connection pgincr_catalog): the backup role creates its schema pgincr there
CREATE DATABASE pgincr_catalog;
GRANT CREATE ON DATABASE pgincr_catalog TO pgincr_backup;
