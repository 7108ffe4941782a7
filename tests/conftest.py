"""Fixtures: the real daemon with the real default model, on free ports, own clients file."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    authenticated,
    start_daemon,
    stop_daemon,
)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("daemon")
    running = start_daemon(tmp)
    yield running
    code = stop_daemon(running.process)
    assert code == 0, running.log()


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(daemon.endpoint)
    yield client
    client.close()


@pytest.fixture
def authed(daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(daemon.endpoint, daemon.client_id, daemon.api_key) as client:
        yield client
