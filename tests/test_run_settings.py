"""The settings of training runs come from the trainer's config dataclasses
(trainer/configs.py): the forms' fields, the API's listing and the checks of a
submitted value are derived from each field's metadata."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.services import training
from app.services.run_settings import clean_config, form_values, settings_of
from trainer.configs import PPOConfig, RewardConfig, SFTConfig, setting


@dataclasses.dataclass
class Toy:
    steps: int = setting(3, label="Steps", help="a few", ge=1, le=5)
    rate: float = setting(0.5, ge=0.0, le=1.0)
    penalty: float | None = setting(1.0, ge=0.0, le=2.0)
    schedule: str = setting("a", choices=("a", "b"))
    fast: bool = setting(False, label="Fast")
    hidden: int = 7  # not a setting: keeps its default


def test_a_configs_settings_are_its_fields_made_with_setting():
    steps, rate, penalty, schedule, fast = settings_of(Toy)
    assert (steps.name, steps.kind, steps.default, steps.low, steps.high) == ("steps", int, 3, 1, 5)
    assert (steps.title, steps.help, rate.title) == ("Steps", "a few", "Rate")
    assert (penalty.kind, penalty.optional, rate.optional) == (float, True, False)
    assert (schedule.choices, fast.kind, fast.title) == (("a", "b"), bool, "Fast")
    assert form_values(settings_of(Toy)) == {"steps": "3", "rate": "0.5", "penalty": "1.0", "schedule": "a",
                                             "fast": False}


def test_values_are_checked_against_the_metadata_with_clear_messages():
    errors: dict[str, str] = {}
    config = clean_config({"steps": " 2.0 ", "rate": "1", "penalty": "", "schedule": " b ", "fast": "on",
                           "hidden": 99}, Toy, errors)
    assert errors == {}
    assert config == {"steps": 2, "rate": 1.0, "penalty": None, "schedule": "b", "fast": True, "hidden": 7}
    assert isinstance(config["rate"], float)

    errors = {}
    clean_config({"steps": "6", "rate": "fast", "penalty": "nan", "schedule": "c", "fast": "no"}, Toy, errors)
    assert errors == {"steps": "must be 1..5", "rate": "must be a number", "penalty": "must be a finite number",
                      "schedule": "one of a, b"}
    errors = {}
    clean_config({"steps": 2.5, "rate": True}, Toy, errors)
    assert errors == {"steps": "must be a whole number", "rate": "must be a number"}


def test_blank_values_and_missing_flags():
    errors: dict[str, str] = {}
    assert clean_config({"steps": "", "schedule": " "}, Toy, errors) == dataclasses.asdict(Toy())
    assert clean_config({}, Toy, errors, flags_from_form=True)["fast"] is False
    assert errors == {}


def test_the_services_use_the_trainer_configs():
    assert training.SFT_SETTINGS == settings_of(SFTConfig)
    assert training.REWARD_SETTINGS == settings_of(RewardConfig)
    assert training.PPO_SETTINGS == settings_of(PPOConfig)
    ranges = {s.name: (s.low, s.high) for s in training.PPO_SETTINGS}
    assert ranges["steps"] == (1, 100_000) and ranges["learning_rate"] == (1e-10, 1.0)


def test_a_cleaned_config_is_a_whole_trainer_config():
    # A job's stored config holds every field, as before: the worker builds the dataclass from it.
    for config_class in (SFTConfig, RewardConfig, PPOConfig):
        errors: dict[str, str] = {}
        config = clean_config({"seed": "5"}, config_class, errors)
        assert errors == {} and config_class(**config) == config_class(seed=5)


def test_rules_between_ppo_settings_are_the_configs_own():
    # The trainer refuses them naming the field; the forms and the API show the same message beside it.
    with pytest.raises(ValueError, match=r"mini_batch_size=4 \(must divide the batch size \(6\)\)"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError, match=r"value_warmup_steps=3 \(must be below the number of steps \(3\)"):
        PPOConfig(steps=3, value_warmup_steps=3)
    errors: dict[str, str] = {}
    clean_config({"steps": "3", "value_warmup_steps": "3"}, PPOConfig, errors)
    assert errors == {}  # a single value is in range; the rule between them is the config's
    assert set(PPOConfig.joint_problems({"steps": 3, "value_warmup_steps": 3, "batch_size": 6,
                                         "mini_batch_size": 4})) == {"value_warmup_steps", "mini_batch_size"}
    assert PPOConfig.joint_problems({"batch_size": 6, "mini_batch_size": None}) == {}  # its own check speaks


def assert_runs_in_a_fresh_interpreter(code: str) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_web_app_imports_no_torch():
    assert_runs_in_a_fresh_interpreter(
        "import sys; from app.main import create_app; from app.config import Settings; "
        "create_app(Settings(secret_key='k')); import app.services.run_settings, app.routes.api_training; "
        "assert 'torch' not in sys.modules, 'torch imported'")


def test_the_trainers_import_neither_the_database_nor_the_web_app():
    """The training code runs where only torch and transformers are (a GPU machine, `accelerate launch`)."""
    modules = ["trainer.sft", "trainer.reward", "trainer.ppo", "trainer.dpo", "trainer.sampling", "trainer.best_of_n",
               "trainer.models", "trainer.distributed", "trainer.memory", "trainer.cli_train"]
    assert_runs_in_a_fresh_interpreter(
        f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'fastapi', 'app'}); "
        "assert not bad, bad")


def test_every_trainer_has_the_distributed_strategy_setting():
    for config_class in (SFTConfig, RewardConfig, PPOConfig):
        (strategy,) = [s for s in settings_of(config_class) if s.name == "strategy"]
        assert (strategy.default, strategy.choices) == ("ddp", ("single", "ddp", "fsdp", "zero2", "zero3"))
        errors: dict[str, str] = {}
        assert clean_config({"strategy": " fsdp "}, config_class, errors)["strategy"] == "fsdp" and errors == {}
        clean_config({"strategy": "zero4"}, config_class, errors)
        assert errors == {"strategy": "one of single, ddp, fsdp, zero2, zero3"}
        with pytest.raises(ValueError, match=r"strategy='megatron'"):
            config_class(strategy="megatron")
