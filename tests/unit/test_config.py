"""Configuration: durations, strict keys named in errors, provisioner options, env, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from service.cli import main
from service.config import (
    ENV_OVERRIDES,
    Config,
    ConfigError,
    SchedulerConfig,
    config_from_dict,
    load_config,
    parse_duration,
)
from service.passes.provisioning import check_pool_options

TOKEN = "a-file-admin-token-0123456789"


def _pool(**overrides: Any) -> dict[str, Any]:
    pool = {"name": "hosted-ubuntu", "os": "ubuntu", "provisioner": "local"}
    pool.update(overrides)
    return pool


def _raw(*pools: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"admin_token": TOKEN, "pools": list(pools or [_pool()]), **top}


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "workerlease.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("60m", 3600),
        ("72h", 259200),
        ("3d", 259200),
        (45, 45),
        ("120", 120),
        (0, 0),
    ],
)
def test_durations_accept_seconds_and_unit_strings(value: Any, seconds: int) -> None:
    assert parse_duration(value) == seconds
    config = config_from_dict(_raw(_pool(pending_timeout=value)))
    assert config.pools[0].pending_timeout == seconds


@pytest.mark.parametrize(
    "value", ["10x", "m", "1.5h", "-5", -5, "", "60 minutes", True, 1.5, None, [60]]
)
def test_bad_durations_are_refused_naming_the_key(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)
    with pytest.raises(ConfigError, match=r"pools\.0\.lease_idle_timeout"):
        config_from_dict(_raw(_pool(lease_idle_timeout=value)))


def test_defaults_mirror_the_hosted_service() -> None:
    pool = config_from_dict(_raw()).pools[0]
    assert (pool.lease_idle_timeout, pool.lease_max_lifetime) == (3600, 72 * 3600)
    assert (pool.provision_timeout, pool.pending_timeout) == (600, 1800)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (_raw(_pool(foo=1)), "pools.0.foo: unknown key"),
        (_raw(_pool(), _pool(name="second", bar=1)), "pools.1.bar: unknown key"),
        (_raw(colour="blue"), "colour: unknown key"),
        (_raw(scheduler={"interval": "5s", "speed": 2}), "scheduler.speed: unknown key"),
    ],
)
def test_unknown_keys_are_refused_with_their_dotted_name(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert key in str(caught.value)


def test_min_ready_above_max_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pools\.0.*min_ready must not exceed max_workers"):
        config_from_dict(_raw(_pool(min_ready=5, max_workers=2)))


@pytest.mark.parametrize(
    ("pool", "key"),
    [
        (_pool(os="solaris"), "pools.0.os"),
        (_pool(name="Bad_Name"), "pools.0.name"),
        (_pool(max_workers=-1), "pools.0.max_workers"),
    ],
)
def test_bad_pool_values_are_refused_naming_the_key(pool: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(_raw(pool))


def _checked(raw: dict[str, Any]) -> Config:
    """The config as a process start sees it: parsed, then each pool's options checked."""
    config = config_from_dict(raw)
    check_pool_options(config)
    return config


def test_unknown_provisioner_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        _checked(_raw(_pool(), _pool(name="other", provisioner="nosuch")))
    message = str(caught.value)
    assert message.startswith("pools.1.provisioner:")
    assert "nosuch" in message


def test_bad_provisioner_options_are_refused_naming_the_option_key() -> None:
    with pytest.raises(ConfigError) as caught:
        _checked(_raw(_pool(options={"agent_host": "127.0.0.1", "colour": "red"})))
    assert "pools.0.options.colour: unknown key" in str(caught.value)
    with pytest.raises(ConfigError, match=r"pools\.0\.options\.agent_host"):
        _checked(_raw(_pool(options={"agent_host": ["not", "a", "string"]})))


def test_good_provisioner_options_are_accepted() -> None:
    config = _checked(_raw(_pool(options={"agent_host": "127.0.0.1"})))
    assert config.pools[0].options == {"agent_host": "127.0.0.1"}


def test_admin_token_from_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _raw())
    assert load_config(path, environ={}).admin_token == TOKEN
    from_env = load_config(path, environ={"WORKERLEASE_ADMIN_TOKEN": "env-token-0123456789abc"})
    assert from_env.admin_token == "env-token-0123456789abc"


def test_every_key_can_come_from_the_environment_and_wins_over_the_file(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, _raw(deployment_id="from-file", scheduler={"interval": 5}))
    environ = {
        "WORKERLEASE_DEPLOYMENT_ID": "from-env",
        "WORKERLEASE_SCHEDULER__INTERVAL": "90s",
        "WORKERLEASE_SCHEDULER__ENABLED": "false",
        "WORKERLEASE_LOG_FORMAT": "json",
        "WORKERLEASE_MAX_WAITS_PER_TENANT": "3",
        "WORKERLEASE_POOLS": '[{"name": "env-pool", "os": "linux", "max_workers": 3}]',
        "WORKERLEASE_CONFIG_UNRELATED": "ignored",  # not a key: left alone
    }
    config = load_config(path, environ=environ)
    assert config.deployment_id == "from-env"
    assert (config.scheduler.interval, config.scheduler.enabled) == (90, False)
    assert config.scheduler.reconcile_interval == 60  # the rest of the file's section stays
    assert (config.log_format, config.max_waits_per_tenant) == ("json", 3)
    assert [(p.name, p.max_workers) for p in config.pools] == [("env-pool", 3)]
    # Without a file at all.
    alone = load_config(None, environ={"WORKERLEASE_SCHEDULER__INTERVAL": "7"})
    assert alone.scheduler.interval == 7


def test_every_config_key_has_its_environment_variable() -> None:
    keys = set(ENV_OVERRIDES.values())
    assert {(name,) for name in Config.model_fields} <= keys
    assert {("scheduler", name) for name in SchedulerConfig.model_fields} <= keys
    assert ENV_OVERRIDES["WORKERLEASE_SCHEDULER__DEMAND_INTERVAL"] == (
        "scheduler",
        "demand_interval",
    )


@pytest.mark.parametrize(
    ("variable", "value", "in_file"),
    [
        ("WORKERLEASE_SCHEDULER__INTERVAL", "0", {"scheduler": {"interval": 0}}),
        ("WORKERLEASE_DEPLOYMENT_ID", "Bad Id", {"deployment_id": "Bad Id"}),
        ("WORKERLEASE_LOG_FORMAT", "xml", {"log_format": "xml"}),
        ("WORKERLEASE_DATABASE_POOL_SIZE", "lots", {"database_pool_size": "lots"}),
    ],
)
def test_a_bad_value_from_the_environment_is_refused_as_the_file_is(
    tmp_path: Path, variable: str, value: str, in_file: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as from_file:
        load_config(_write(tmp_path, _raw(**in_file)), environ={})
    with pytest.raises(ConfigError) as from_env:
        load_config(_write(tmp_path, _raw()), environ={variable: value})
    assert str(from_env.value) == str(from_file.value)
    assert ENV_OVERRIDES[variable][-1] in str(from_env.value)


def test_a_list_from_the_environment_must_be_json() -> None:
    with pytest.raises(ConfigError, match="WORKERLEASE_POOLS: pools is not valid JSON"):
        load_config(None, environ={"WORKERLEASE_POOLS": "[{name: p"})


def test_missing_or_short_admin_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="admin_token"):
        config_from_dict({"pools": []}).require_admin_token()
    with pytest.raises(ConfigError, match="admin_token"):
        config_from_dict({"admin_token": "short"}).require_admin_token()


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check-config", str(_write(tmp_path, _raw()))])
    assert result.exit_code == 0, result.output
    assert "hosted-ubuntu" in result.output


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (_raw(_pool(foo=1)), "pools.0.foo: unknown key"),
        (_raw(_pool(min_ready=3, max_workers=1)), "pools.0"),
        (_raw(_pool(provisioner="nosuch")), "pools.0.provisioner"),
        (_raw(_pool(options={"colour": "red"})), "pools.0.options.colour"),
        (_raw(_pool(lease_max_lifetime="3 weeks")), "pools.0.lease_max_lifetime"),
        ({"pools": [_pool()]}, "admin_token"),
    ],
)
def test_check_config_exits_non_zero_naming_the_key(
    tmp_path: Path, raw: dict[str, Any], key: str
) -> None:
    result = CliRunner().invoke(main, ["check-config", str(_write(tmp_path, raw))])
    assert result.exit_code != 0
    assert key in result.output


def test_check_config_refuses_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    missing = CliRunner().invoke(main, ["check-config", str(tmp_path / "absent.yaml")])
    assert missing.exit_code != 0 and "cannot read config" in missing.output
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    result = CliRunner().invoke(main, ["check-config", str(listing)])
    assert result.exit_code != 0 and "top level must be a mapping" in result.output


def test_warm_policy_defaults_change_nothing() -> None:
    pool = config_from_dict(_raw()).pools[0]
    assert (pool.warm_policy, pool.schedules, pool.scale_down_delay) == ("fixed", [], 600)


def test_schedules_and_adaptive_policy_are_accepted() -> None:
    schedule = {
        "cron": "0 8 * * 1-5",
        "duration": "10h",
        "min_ready": 6,
        "timezone": "Europe/Paris",
    }
    pool = config_from_dict(
        _raw(_pool(warm_policy="adaptive", warm_hit_target=0.9, schedules=[schedule]))
    ).pools[0]
    assert pool.schedules[0].duration == 36000
    assert pool.warm_hit_target == 0.9


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        (_pool(warm_policy="magic"), r"pools\.0\.warm_policy"),
        (_pool(warm_hit_target=1.0), r"pools\.0\.warm_hit_target"),
        (
            _pool(schedules=[{"cron": "0 8 * *", "duration": "1h", "min_ready": 1}]),
            r"pools\.0\.schedules\.0.*invalid cron",
        ),
        (
            _pool(
                schedules=[
                    {
                        "cron": "0 8 * * *",
                        "duration": "1h",
                        "min_ready": 1,
                        "timezone": "Mars/Olympus",
                    }
                ]
            ),
            r"pools\.0\.schedules\.0.*timezone",
        ),
        (
            _pool(schedules=[{"cron": "0 8 * * *", "duration": "1h", "min_ready": 99}]),
            r"pools\.0.*schedule's min_ready must not exceed max_workers",
        ),
        (_pool(schedules=[{"cron": "0 8 * * *", "min_ready": 1}]), r"schedules\.0\.duration"),
    ],
)
def test_bad_warm_settings_are_refused_naming_the_key(pool: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_raw(pool))
