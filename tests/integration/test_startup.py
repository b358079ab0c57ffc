"""A configuration mistake stops `hub serve` at start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.hubs import ROOT
from tests.support.pg import create_database, drop_database, new_database_name, run_sync

SECRET = "s" * 40


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub", "serve", "--port", "1"],
        env={**os.environ, "HUB_JWT_SECRET": SECRET, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = new_database_name()
    dsn = run_sync(lambda: create_database(name))
    yield dsn
    run_sync(lambda: drop_database(name))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HUB_REDIS_URL": "redis://127.0.0.1:1/0"}, "HUB_REDIS_URL: cannot reach Redis"),
        ({"HUB_REDIS_URL": "http://x"}, "HUB_REDIS_URL: must be a redis://"),
        ({"HUB_JWT_SECRET": "short"}, "HUB_JWT_SECRET: must be at least 32 bytes"),
        ({"HUB_JWT_SECRET": ""}, "HUB_JWT_SECRET: is set but empty"),
        ({"HUB_ORGS_CLAIM": "user_metadata.orgs"}, "HUB_ORGS_CLAIM:"),
        ({"HUB_ORG_QUOTAS": "{not json"}, "HUB_ORG_QUOTAS: not valid JSON"),
        ({"HUB_JWKS_URL": "http://127.0.0.1:1/jwks.json"}, "cannot load JWKS"),
        ({"HUB_WORKERS": "2"}, "HUB_WORKERS: more than one worker needs HUB_REDIS_URL"),
    ],
)
def test_a_bad_setting_stops_the_hub(env: dict[str, str], message: str) -> None:
    result = serve(env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unmigrated_database_stops_the_hub(empty_database: str) -> None:
    result = serve({"HUB_DATABASE_URL": empty_database})
    assert result.returncode == 2, result.stderr
    assert "run `hub migrate`" in result.stderr
    assert "Traceback" not in result.stderr
