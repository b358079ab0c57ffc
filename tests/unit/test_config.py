"""Settings from flags and HUB_* variables: precedence and validation."""

from __future__ import annotations

import argparse

import pytest

from hub.config import OPTIONS, Settings, add_arguments, load_settings
from hub.errors import ConfigError

SECRET = "x" * 40


def settings(flags: dict[str, object] | None = None, **env: str) -> Settings:
    return load_settings(flags, {"HUB_JWT_SECRET": SECRET, **env})


def test_defaults() -> None:
    loaded = settings()
    assert loaded.host == "127.0.0.1"
    assert loaded.port == 4000
    assert loaded.orgs_claim_path == ("app_metadata", "orgs")
    assert loaded.max_channels == 100
    assert loaded.idle_timeout == 60.0
    assert loaded.jwt_secret == SECRET
    assert not loaded.dev_mode
    assert loaded.node_id  # a random one


def test_env_values_are_typed() -> None:
    loaded = settings(
        HUB_PORT="8080",
        HUB_IDLE_TIMEOUT="2.5",
        HUB_MAX_CHANNELS="7",
        HUB_JWT_AUDIENCE="authenticated",
        HUB_NODE_ID="node-a",
        HUB_ORGS_CLAIM="app_metadata.hub.orgs",
    )
    assert loaded.port == 8080
    assert loaded.idle_timeout == 2.5
    assert loaded.max_channels == 7
    assert loaded.jwt_audience == "authenticated"
    assert loaded.node_id == "node-a"
    assert loaded.orgs_claim_path == ("app_metadata", "hub", "orgs")


def test_flag_beats_env_beats_default() -> None:
    env = {"HUB_PORT": "8080", "HUB_HOST": "0.0.0.0", "HUB_JWT_SECRET": SECRET}
    loaded = load_settings({"port": "9000", "host": None}, env)
    assert loaded.port == 9000
    assert loaded.host == "0.0.0.0"
    assert load_settings({}, env).port == 8080
    assert load_settings({}, {"HUB_JWT_SECRET": SECRET}).port == 4000


def test_empty_values_mean_default() -> None:
    assert settings(HUB_PORT="").port == 4000
    assert load_settings({"port": ""}, {"HUB_JWT_SECRET": SECRET}).port == 4000


def test_limits_come_from_settings() -> None:
    limits = settings(
        HUB_MAX_CHANNELS="3",
        HUB_JOINS_PER_SECOND="1.5",
        HUB_JOIN_BURST="4",
        HUB_MAX_PAYLOAD_BYTES="1000",
        HUB_IDLE_TIMEOUT="9",
    ).limits
    assert (limits.max_channels, limits.joins_per_second, limits.join_burst) == (3, 1.5, 4)
    assert (limits.max_payload_bytes, limits.idle_timeout) == (1000, 9.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HUB_PORT", "http"),
        ("HUB_PORT", "80.5"),
        ("HUB_PORT", "0"),
        ("HUB_PORT", "-1"),
        ("HUB_PORT", "70000"),
        ("HUB_MAX_CHANNELS", "0"),
        ("HUB_MAX_CHANNELS", "ten"),
        ("HUB_IDLE_TIMEOUT", "-5"),
        ("HUB_IDLE_TIMEOUT", "nan"),
        ("HUB_JOINS_PER_SECOND", "0"),
        ("HUB_JOIN_BURST", "1.5"),
        ("HUB_MAX_FRAME_BYTES", "1MB"),
        ("HUB_JWKS_MIN_REFRESH", "0"),
        ("HUB_JWT_SECRET", "too-short"),
        ("HUB_JWKS_URL", "ftp://example.com/jwks.json"),
        ("HUB_JWKS_URL", "example.com/jwks.json"),
        ("HUB_ORGS_CLAIM", "user_metadata.orgs"),
        ("HUB_ORGS_CLAIM", "orgs"),
        ("HUB_ORGS_CLAIM", "app_metadata"),
        ("HUB_LOG_LEVEL", "verbose"),
        ("HUB_MAX_PAYLOAD_BYTES", str(2 * 1024 * 1024)),
        ("HUB_MAX_OUTBOX_BYTES", "1024"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**{variable: value})
    assert variable in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"HUB_REDIS_CLUSTER": "1"},
        {"HUB_REDIS_CLUSTER": "1", "HUB_REDIS_URL": "unix:///run/redis.sock"},
    ],
)
def test_redis_cluster_needs_a_redis_url_of_a_node(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**env)
    assert "HUB_REDIS_CLUSTER" in str(info.value)


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "HUB_REDIS_URL"),
        ({"HUB_REDIS_URL": "redis://127.0.0.1:6379/0"}, "HUB_DATABASE_URL"),
        ({"HUB_DATABASE_URL": "postgresql://db/hub"}, "HUB_REDIS_URL"),
    ],
)
def test_several_workers_need_redis_and_a_database(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(HUB_WORKERS="2", **env)
    assert "HUB_WORKERS" in str(info.value) and missing in str(info.value)
    assert settings(HUB_WORKERS="1").workers == 1


def test_several_workers_with_redis_and_a_database() -> None:
    loaded = settings(
        HUB_WORKERS="3",
        HUB_REDIS_URL="redis://127.0.0.1:6379/0",
        HUB_DATABASE_URL="postgresql://db/hub",
    )
    assert loaded.workers == 3


def test_redis_cluster_with_a_node_url() -> None:
    loaded = settings(HUB_REDIS_CLUSTER="1", HUB_REDIS_URL="redis://10.0.0.5:7000/0")
    assert loaded.redis_cluster and loaded.redis_url == "redis://10.0.0.5:7000/0"


@pytest.mark.parametrize(
    "path", ["user_metadata.orgs", "orgs", "app_metadata", "app_metadata..orgs", "sub"]
)
def test_claim_path_outside_app_metadata_is_refused(path: str) -> None:
    with pytest.raises(ConfigError):
        settings(HUB_ORGS_CLAIM=path)


def test_invalid_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"port": "http"}, {"HUB_JWT_SECRET": SECRET})
    assert "--port" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings({"max_channels": "0"}, {"HUB_JWT_SECRET": SECRET})
    assert "--max-channels" in str(info.value)


def test_secret_of_32_bytes_is_enough() -> None:
    assert settings(HUB_JWT_SECRET="s" * 32).jwt_secret == "s" * 32
    # Counted in bytes, not characters.
    assert settings(HUB_JWT_SECRET="\u00e9" * 16).jwt_secret == "\u00e9" * 16
    with pytest.raises(ConfigError):
        settings(HUB_JWT_SECRET="s" * 31)


def test_dev_mode_without_secret_or_jwks() -> None:
    loaded = load_settings({}, {})
    assert loaded.dev_mode
    assert loaded.jwt_secret is not None
    assert len(loaded.jwt_secret.encode()) >= 32
    assert load_settings(None, None).dev_mode
    # Each start gets its own secret.
    assert load_settings({}, {}).jwt_secret != loaded.jwt_secret


def test_jwks_alone_is_not_dev_mode() -> None:
    loaded = load_settings(
        {}, {"HUB_JWKS_URL": "https://ref.supabase.co/auth/v1/.well-known/jwks.json"}
    )
    assert not loaded.dev_mode
    assert loaded.jwt_secret is None
    assert loaded.jwks_url is not None


def test_secret_is_not_dev_mode() -> None:
    loaded = settings()
    assert not loaded.dev_mode
    assert loaded.jwt_secret == SECRET


def test_every_option_has_a_setting_a_variable_and_a_flag() -> None:
    fields = set(Settings.__dataclass_fields__)
    for opt in OPTIONS:
        assert opt.name in fields
        assert opt.env == "HUB_" + opt.name.upper()
        assert opt.flag == "--" + opt.name.replace("_", "-")


def test_argparse_flags_feed_load_settings() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "5001", "--max-channels", "3"])
    loaded = load_settings(vars(args), {"HUB_JWT_SECRET": SECRET, "HUB_PORT": "6000"})
    assert loaded.port == 5001
    assert loaded.max_channels == 3
    help_text = parser.format_help()
    assert "HUB_PORT" in help_text
    assert "HUB_JWT_SECRET" in help_text
