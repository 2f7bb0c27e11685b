"""One typed settings object, read from environment variables and `.env`."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # Where the embedded PostgreSQL, artifacts and caches live.
    data_dir: Path = Field(default=Path("var"), validation_alias="RLHF_DATA_DIR")
    # Unset: `serve` starts an embedded PostgreSQL under data_dir/pgdata.
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    artifacts_dir: Path | None = Field(default=None, validation_alias="RLHF_ARTIFACTS_DIR")

    host: str = Field(default="127.0.0.1", validation_alias="RLHF_HOST")
    port: int = Field(default=8000, validation_alias="RLHF_PORT")
    # Signs the session cookie. Unset: a random key is generated once and kept
    # in data_dir/secret_key so sessions survive restarts.
    secret_key: SecretStr | None = Field(default=None, validation_alias="RLHF_SECRET_KEY")
    # Password of the first admin; unset: one is generated and printed once.
    admin_password: SecretStr | None = Field(default=None, validation_alias="RLHF_ADMIN_PASSWORD")
    admin_username: str = Field(default="admin", validation_alias="RLHF_ADMIN_USERNAME")
    # Send the session cookie only over HTTPS (turn on behind TLS).
    secure_cookies: bool = Field(default=False, validation_alias="RLHF_SECURE_COOKIES")
    # A session ends this long after sign-in (absolute lifetime) ...
    session_max_age_s: int = Field(default=14 * 24 * 3600, gt=0, validation_alias="RLHF_SESSION_MAX_AGE_S")
    # ... or after this long without a request (idle timeout), whichever comes first.
    session_idle_s: int = Field(default=12 * 3600, gt=0, validation_alias="RLHF_SESSION_IDLE_S")
    # Proxies (comma-separated IPs or networks, or *) whose X-Forwarded-For/-Proto
    # uvicorn believes; the client address of other requests is the peer's.
    forwarded_allow_ips: str = Field(default="127.0.0.1", validation_alias="RLHF_FORWARDED_ALLOW_IPS")

    # Failed sign-ins allowed in the window per (account, address) and per address.
    # Never per account alone: guessing from one address must not lock the owner out.
    login_max_failures: int = Field(default=5, gt=0, validation_alias="RLHF_LOGIN_MAX_FAILURES")
    login_max_address_failures: int = Field(default=20, gt=0, validation_alias="RLHF_LOGIN_MAX_ADDRESS_FAILURES")
    login_window_s: int = Field(default=15 * 60, gt=0, validation_alias="RLHF_LOGIN_WINDOW_S")

    # Largest request body in bytes (JSON and forms), and for the import routes that take
    # files; larger ones get a 413 before any of them is parsed.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, validation_alias="RLHF_MAX_BODY_BYTES")
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, validation_alias="RLHF_MAX_UPLOAD_BYTES")
    # Database connections one process keeps open (more wait for a free one; up to as
    # many again are opened for bursts). Unset: `serve --workers N` shares 20 among its
    # N web processes; other processes keep 5.
    db_pool_size: int | None = Field(default=None, gt=0, validation_alias="RLHF_DB_POOL_SIZE")

    # How long a labeler holds a task before it returns to the pool.
    lease_s: int = Field(default=30 * 60, validation_alias="RLHF_LEASE_S")

    # Worker: queues to listen on, device (auto = cuda > mps > cpu).
    worker_queues: str = Field(default="default,gpu", validation_alias="RLHF_WORKER_QUEUES")
    device: str = Field(default="auto", validation_alias="RLHF_DEVICE")
    # Memory of each of the workers' GPUs (GiB): training runs that cannot fit are refused before they are
    # queued (app/services/run_memory.py). Unset: CPU workers with this machine's memory.
    worker_gpu_memory_gib: float | None = Field(default=None, gt=0, validation_alias="RLHF_WORKER_GPU_MEMORY_GIB")
    # Worker timing. Tests shrink these to seconds; the defaults suit production.
    # Seconds between polls for new jobs (LISTEN/NOTIFY usually wakes workers sooner).
    worker_poll_interval_s: float = Field(default=5.0, validation_alias="RLHF_WORKER_POLL_INTERVAL_S")
    # Seconds between a worker's heartbeats.
    worker_heartbeat_s: float = Field(default=10.0, validation_alias="RLHF_WORKER_HEARTBEAT_S")
    # A worker silent this long is dead: its running jobs are retried or failed.
    worker_stalled_after_s: float = Field(default=60.0, validation_alias="RLHF_WORKER_STALLED_AFTER_S")
    # Seconds between stalled-job checks by each worker (also once at its start).
    worker_recovery_interval_s: float = Field(default=60.0, validation_alias="RLHF_WORKER_RECOVERY_INTERVAL_S")
    # On shutdown, seconds a running job gets to finish before it is stopped and requeued.
    worker_shutdown_timeout_s: float = Field(default=10.0, validation_alias="RLHF_WORKER_SHUTDOWN_TIMEOUT_S")
    # Runs of one job (first run + retries after a dead worker) before it is failed.
    job_max_attempts: int = Field(default=3, validation_alias="RLHF_JOB_MAX_ATTEMPTS")

    log_level: str = Field(default="INFO", validation_alias="RLHF_LOG_LEVEL")

    @property
    def artifacts_path(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def pgdata_path(self) -> Path:
        return self.data_dir / "pgdata"

    def environment(self) -> dict[str, str]:
        """The settings as the environment variables that set them, for a process this one
        starts (a job's training processes); secrets and unset values are left out."""
        out: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, SecretStr) and isinstance(field.validation_alias, str):
                out[field.validation_alias] = str(value)
        return out

    def describe(self) -> dict[str, str]:
        """Settings safe to print: secrets are never shown."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                out[name] = "(set)" if value else "(unset)"
            elif name == "database_url":
                out[name] = _redact_url(value) if value else "(embedded)"
            else:
                out[name] = str(value)
        return out


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
