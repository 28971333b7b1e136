"""Errors raised by the engine. Every message says what went wrong and how to fix it."""


class PgIncrError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(PgIncrError, ValueError):
    """Bad argument or configuration."""


class InvalidName(ConfigError):
    """A cluster name or backup id that could escape the repository prefix or is malformed."""


class BinaryNotFound(PgIncrError):
    """PostgreSQL programs of the needed major version are not installed."""


class RepositoryError(PgIncrError):
    """The repository cannot be read or written (missing bucket, permissions, full disk ...)."""


class RepositoryNotFound(RepositoryError):
    """No pgincr repository at that location (no identity marker): never read as an empty one."""


class ClusterNotFound(PgIncrError, LookupError):
    """The repository holds no cluster of that name."""


class ObjectNotFound(RepositoryError, KeyError):
    """An object does not exist in the repository."""

    def __str__(self):  # KeyError quotes its argument otherwise
        return str(self.args[0]) if self.args else "object not found"


class ObjectExists(RepositoryError):
    """An object exists already with different content (never overwritten)."""


class ChecksumMismatch(RepositoryError):
    """An object read back does not match the checksum recorded when it was written."""


class BackupNotFound(PgIncrError, LookupError):
    """No complete backup with that id."""


class ServerError(PgIncrError):
    """The PostgreSQL server could not be reached or refused the operation."""


class BackupFailed(PgIncrError):
    """pg_basebackup (or the streaming around it) failed; nothing was published."""


class RestoreError(PgIncrError):
    """A restore could not be carried out; the message names the cause."""


class WalCaptureError(PgIncrError):
    """WAL could not be captured completely; the replication slot was not advanced."""


class SlotRetentionExceeded(WalCaptureError):
    """The replication slot held more WAL on the server than the bound allows: captures are too far
    apart (or failing) for the cluster's WAL rate. Raised after a capture that itself succeeded."""


class TargetBeyondArchive(RestoreError):
    """A recovery target lies beyond the last point the archived WAL lets recovery reach (refused
    before anything is touched; a restore test falls back to 'latest' on it)."""
