"""The connection point's exchange watchdog: one timer, each exchange failed on its own deadline."""

import asyncio

from connector.forwarder import _Watchdog


class _FakeConn:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last_activity = loop.time()
        self.broken_at: float | None = None

    def _break(self, error: BaseException) -> None:
        assert isinstance(error, asyncio.TimeoutError)
        self.broken_at = self.loop.time()


def test_each_exchange_times_out_on_its_own_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        dog = _Watchdog(0.2)
        start = loop.time()
        quiet = _FakeConn(loop)
        dog.watch(quiet)
        await asyncio.sleep(0.1)
        later, busy, done = _FakeConn(loop), _FakeConn(loop), _FakeConn(loop)
        for conn in (later, busy, done):
            dog.watch(conn)
        dog.unwatch(done)
        for _ in range(8):  # the role keeps sending: pushed back each time
            await asyncio.sleep(0.05)
            busy.last_activity = loop.time()
        assert quiet.broken_at is not None and 0.2 <= quiet.broken_at - start < 0.28
        assert later.broken_at is not None and 0.3 <= later.broken_at - start < 0.38
        assert busy.broken_at is None and done.broken_at is None
        await asyncio.sleep(0.3)
        assert busy.broken_at is not None and busy.broken_at - busy.last_activity >= 0.2
        dog.close()

    asyncio.run(main())
