"""pytest plugin (entry point `pytest11`): the `tasker` fixture, a [`TaskerTestEnv`] with a real
orchestrator for the whole test session.

By default it starts `tasker serve` (found as `--tasker-bin`, `$TASKER_BIN`,
`target/debug/tasker` above the current directory, or `tasker` on the PATH) on its own database
and broker prefix, from `TASKER_TEST_DATABASE_URL` and `TASKER_TEST_AMQP_URL`; with
`--tasker-url` (or `TASKER_TEST_HTTP_URL`) it uses an orchestrator that is already running, with
`--tasker-prefix` (or `TASKER_TEST_PREFIX`, default `tasker`) and the AMQP URL of
`TASKER_TEST_AMQP_URL` (or `TASKER_AMQP_URL`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .testing import (
    ENV_AMQP,
    ENV_HTTP_URL,
    ENV_PREFIX,
    TaskerTestEnv,
    TaskerTestError,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tasker", "Tasker orchestrator for tests")
    group.addoption("--tasker-bin", default=None, help="the tasker binary to start")
    group.addoption(
        "--tasker-url", default=None, help="use a running orchestrator at this HTTP URL"
    )
    group.addoption("--tasker-prefix", default=None, help="its broker prefix (default tasker)")


@pytest.fixture(scope="session")
def tasker_session(request: pytest.FixtureRequest) -> Iterator[TaskerTestEnv]:
    """One orchestrator for the test session."""
    url = request.config.getoption("--tasker-url") or os.environ.get(ENV_HTTP_URL)
    if url:
        amqp = os.environ.get(ENV_AMQP) or os.environ.get("TASKER_AMQP_URL")
        if not amqp:
            raise TaskerTestError(f"set {ENV_AMQP} to the orchestrator's broker")
        prefix = (
            request.config.getoption("--tasker-prefix") or os.environ.get(ENV_PREFIX) or "tasker"
        )
        env = TaskerTestEnv.external(url, amqp, prefix)
        yield env
        env.stop()
        return
    env = TaskerTestEnv.start(binary=request.config.getoption("--tasker-bin"))
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture
def tasker(tasker_session: TaskerTestEnv) -> TaskerTestEnv:
    """The session's [`TaskerTestEnv`]: register templates with unique names
    (`tasker.unique("name")`), build workers with `tasker.worker(queues=[...])`, run them with
    `async with tasker.running(worker):` and tasks with `await tasker.run(ns, template, ctx)`."""
    return tasker_session
