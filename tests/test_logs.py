"""The JSON log lines: what they contain, when they leave the process, and that none is lost."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap

import pytest

from mirrorgate.webhook.infra import logs
from mirrorgate.webhook.infra.logs import JsonLineHandler, log_fields


class CountingStream(io.BytesIO):
    """A binary stream that remembers what had been flushed, like a pipe's reader would see."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.visible = b""

    def flush(self) -> None:
        self.flushes += 1
        self.visible = self.getvalue()


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def installed(monkeypatch):
    """setup_logging's handler on a CountingStream, as serve installs it on stderr."""
    stream = CountingStream()
    handler = JsonLineHandler(stream, flush_delay=0.05)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(logs, "_installed", handler)
    return stream


def test_info_lines_of_a_busy_loop_leave_together_within_the_flush_delay(installed):
    log = logs.get_logger("admission")

    async def burst() -> None:
        for i in range(500):
            log_fields(log, logging.INFO, "admission reviewed", {"uid": f"u-{i}"})
        assert installed.visible == b"", "nothing leaves before the delay"
        await asyncio.sleep(0.15)

    asyncio.run(burst())
    assert installed.flushes == 1
    assert [line["uid"] for line in lines(installed.visible)] == [f"u-{i}" for i in range(500)]


def test_warnings_and_lines_outside_a_loop_leave_at_once(installed):
    log = logs.get_logger("admission")

    async def warn() -> None:
        log_fields(log, logging.INFO, "first", {})
        log.warning("mirror unreachable", extra={"fields": {"mirror": "reg:5000"}})
        # The warning took the buffered info line with it, in order.
        assert [line["msg"] for line in lines(installed.visible)] == [
            "first",
            "mirror unreachable",
        ]

    asyncio.run(warn())
    log_fields(log, logging.INFO, "after the loop", {})
    assert lines(installed.visible)[-1]["msg"] == "after the loop"


def test_a_line_from_another_thread_leaves_at_once_while_the_loop_waits(installed):
    log = logs.get_logger("pullsecrets")

    async def both() -> None:
        log_fields(log, logging.INFO, "from the loop", {})
        # A worker thread has no loop: its line must not wait for the loop's timer.
        await asyncio.to_thread(log_fields, log, logging.INFO, "from a thread", {})
        assert [line["msg"] for line in lines(installed.visible)] == [
            "from the loop",
            "from a thread",
        ]
        log_fields(log, logging.INFO, "from the loop again", {})
        await asyncio.sleep(0.15)

    asyncio.run(both())
    assert lines(installed.visible)[-1]["msg"] == "from the loop again"


def test_a_loop_that_stopped_before_its_flush_strands_no_line(installed):
    log = logs.get_logger("admission")

    async def one(msg: str) -> None:
        log_fields(log, logging.INFO, msg, {})

    asyncio.run(one("in a loop that then closes"))  # its flush timer never fires
    asyncio.run(one("in the next loop"))
    assert installed.visible == b""

    async def wait() -> None:
        log_fields(log, logging.INFO, "third", {})
        await asyncio.sleep(0.15)

    asyncio.run(wait())
    assert [line["msg"] for line in lines(installed.visible)] == [
        "in a loop that then closes",
        "in the next loop",
        "third",
    ]


def test_the_direct_line_equals_the_one_a_log_record_gives(installed):
    log = logs.get_logger("admission")
    fields = {"uid": "u-1", "namespace": "shop", "rewritten": [{"container": "app"}], "ms": 0.5}
    log_fields(log, logging.INFO, "admission reviewed", fields)
    log.info("admission reviewed", extra={"fields": fields})
    log_fields(log, logging.DEBUG, "below the level", fields)
    installed.flush()
    direct, record = lines(installed.visible)
    assert direct.pop("ts")[:16] == record.pop("ts")[:16]
    assert (
        direct
        == record
        == {
            "level": "info",
            "logger": "mirrorgate.admission",
            "msg": "admission reviewed",
            **fields,
        }
    )


def test_another_handler_gets_the_lines_too(installed, caplog):
    # pytest's capture adds a handler beside ours: the record path serves both.
    log = logs.get_logger("admission")
    with caplog.at_level(logging.INFO):
        log_fields(log, logging.INFO, "admission reviewed", {"uid": "u-9"})
    assert [r.fields["uid"] for r in caplog.records] == ["u-9"]
    installed.flush()
    assert lines(installed.visible)[0]["uid"] == "u-9"


def test_lines_logged_just_before_exit_reach_stderr():
    code = textwrap.dedent(
        """
        import asyncio, logging
        from mirrorgate.webhook.infra.logs import get_logger, log_fields, setup_logging

        setup_logging("info")
        log = get_logger("admission")

        async def main():
            for i in range(3):
                log_fields(log, logging.INFO, "admission reviewed", {"uid": f"u-{i}"})

        asyncio.run(main())
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [line["uid"] for line in lines(r.stderr)] == ["u-0", "u-1", "u-2"]
