"""Every process runs its event loop on uvloop unless `WAYPOST_EVENT_LOOP=asyncio` says
otherwise; an unknown name is refused with the setting named."""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvloop
from pydantic import ValidationError

from shared import event_loop
from shared.settings import CommonSettings


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default_and_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAYPOST_EVENT_LOOP", raising=False)
    assert CommonSettings().event_loop == "uvloop"
    monkeypatch.setenv("WAYPOST_EVENT_LOOP", " AsyncIO ")
    assert CommonSettings().event_loop == "asyncio"
    assert issubclass(event_loop.run(_loop_type(), "uvloop"), uvloop.Loop)
    assert not issubclass(event_loop.run(_loop_type(), "asyncio"), uvloop.Loop)


def test_an_unknown_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAYPOST_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        CommonSettings()


def test_a_loop_on_a_thread_leaves_no_policy_behind() -> None:
    found: list[type] = []
    thread = threading.Thread(target=lambda: found.append(event_loop.run(_loop_type(), "uvloop")))
    thread.start()
    thread.join(10)
    assert len(found) == 1
    assert issubclass(found[0], uvloop.Loop)
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
