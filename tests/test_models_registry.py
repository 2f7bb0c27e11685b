"""The model registry: registering checkpoints, the default model, the CLI."""

import pytest
from typer.testing import CliRunner

from app.config import Settings
from app.db.enums import ModelKind
from app.db.session import new_session
from app.services import models
from app.services.errors import Conflict, Invalid
from tests.conftest import default_model_dir


def test_register_checkpoint_directory_stores_hash_config_and_relative_path(session, tiny_model_dir):
    settings = Settings(artifacts_dir=tiny_model_dir.parent)
    model = models.register_checkpoint(session, settings=settings, path_or_hub_id=str(tiny_model_dir),
                                       name="tiny", kind="sft")
    assert model.path == tiny_model_dir.name  # relative to the artifacts dir
    assert model.source == "local" and len(model.sha256) == 64
    assert model.config["architectures"] == ["LlamaForCausalLM"]
    import trainer.models

    assert model.sha256 == trainer.models.checkpoint_sha256(tiny_model_dir)
    child = models.register_checkpoint(session, settings=settings, path_or_hub_id=str(tiny_model_dir),
                                       name="tiny-policy", kind="policy", parent_id=model.id)
    assert child.parent.id == model.id


def test_register_rejects_what_is_not_a_checkpoint(session, tmp_path):
    settings = Settings(artifacts_dir=tmp_path)
    with pytest.raises(Invalid, match="no config.json"):
        models.register_checkpoint(session, settings=settings, path_or_hub_id=str(tmp_path))
    with pytest.raises(Invalid, match="no such directory"):
        models.register_checkpoint(session, settings=settings, path_or_hub_id=str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(Invalid, match="not a causal language model"):
        models.register_checkpoint(session, settings=settings, path_or_hub_id=str(tmp_path))
    with pytest.raises(Invalid, match="kind"):
        models.register_model(session, name="x", kind="teacher", path="p", source="s")


def test_hub_ids_register_as_they_are_and_names_are_unique(session, tmp_path):
    model = models.register_checkpoint(session, settings=Settings(artifacts_dir=tmp_path),
                                       path_or_hub_id="HuggingFaceTB/SmolLM2-360M-Instruct")
    assert (model.path, model.source, model.name) == ("HuggingFaceTB/SmolLM2-360M-Instruct", "hub",
                                                      "HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(Conflict, match="already registered"):
        models.register_model(session, name=model.name, kind="sft", path="x", source="s")


def test_one_default_per_kind(session):
    a = models.register_model(session, name="a", kind="sft", path="a", source="s", make_default=True)
    b = models.register_model(session, name="b", kind="sft", path="b", source="s")
    rm = models.register_model(session, name="rm", kind="reward", path="rm", source="s", make_default=True)
    models.set_default(session, model_id=b.id)
    session.refresh(a)
    assert not a.is_default and b.is_default and rm.is_default
    assert models.default_model(session, ModelKind.sft).id == b.id
    assert [m.name for m in models.models_of(session)][:2] in (["b", "rm"], ["rm", "b"])


def test_ensure_default_model_registers_the_provisioned_checkpoint_once(session, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / models.DEFAULT_MODEL_DIR).symlink_to(default_model_dir().resolve())
    settings = Settings(artifacts_dir=tmp_path)
    model = models.ensure_default_model(session, settings)
    assert model.name == "SmolLM2-135M-Instruct" and model.kind == ModelKind.sft and model.is_default
    assert model.path == models.DEFAULT_MODEL_DIR and model.source == "provisioned"
    assert models.ensure_default_model(session, settings).id == model.id
    assert len(models.models_of(session)) == 1


def test_ensure_default_model_without_a_provisioned_checkpoint_registers_nothing(session, tmp_path):
    assert models.ensure_default_model(session, Settings(artifacts_dir=tmp_path)) is None
    assert models.models_of(session) == []


def test_cli_models_add_and_list(committed, tiny_model_dir, tmp_path):
    from app.cli import cli

    runner = CliRunner()
    added = runner.invoke(cli, ["models", "add", str(tiny_model_dir), "--name", "tiny-cli", "--kind", "sft"])
    assert added.exit_code == 0, added.output
    assert "registered sft model 'tiny-cli'" in added.output
    listed = runner.invoke(cli, ["models", "list"])
    assert "tiny-cli" in listed.output and str(tiny_model_dir) in listed.output
    bad = runner.invoke(cli, ["models", "add", str(tmp_path)])
    assert bad.exit_code == 1 and "no config.json" in bad.output
    with new_session() as session:
        assert [m.name for m in models.models_of(session)] == ["tiny-cli"]
