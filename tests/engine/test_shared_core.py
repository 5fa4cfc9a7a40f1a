"""One engine core, several API processes' clients (`--api-workers N`): a real core process (the
fake runner) started by a sharing client, a second client attached to it over its attach socket.
Each gets only its own requests' outputs; each sees the other's load (`PeerLoad`) in its queue;
a detached frontend's requests are aborted in the core; the starter waits for it to leave."""
from __future__ import annotations

import asyncio
import time

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.frontends import LoadBook
from lockgate.engine.frontend.attached_transport import AttachedTransport, CoreAddress
from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.engine.messages import EngineCoreOutput, EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams


def _req(rid: str, n: int, priority: int = 0) -> EngineCoreRequest:
    return EngineCoreRequest(rid, list(range(1, n + 1)), SamplingParams(max_tokens=2), 0.0, priority=priority)


def test_load_book_counts_each_frontend_and_reports_the_others() -> None:
    book = LoadBook()
    book.added(0, _req("a", 10))
    book.added(7, _req("b", 5, priority=1))
    book.added(7, _req("c", 3, priority=1))
    p0 = book.peers(0, 1)
    assert (p0.in_flight, p0.queued, p0.departed, p0.arrived) == (2, {1: (2, 8)}, (0, 0), {1: (2, 8)})
    assert book.output(EngineCoreOutput("b", [4])) == 7  # first output: b departs
    assert book.peers(0, 1).queued == {1: (1, 3)} and book.peers(0, 1).departed == (1, 5)
    assert book.output(EngineCoreOutput("b", [5], finish_reason="length")) == 7
    assert book.peers(0, 1).in_flight == 1
    p7 = book.peers(7, 0)
    assert (p7.in_flight, p7.queued, p7.departed) == (1, {0: (1, 10)}, (0, 0))
    assert book.forget(7) == ["c"]  # the frontend left: what it left running is aborted
    assert book.peers(0, 0).in_flight == 0 and book.peers(0, 0).queued == {}
    assert book.output(EngineCoreOutput("zz", [1])) == 0  # unknown: the starter's


async def _collect(client: AsyncEngineClient, rid: str, max_tokens: int) -> list[str]:
    ids = []
    async for out in client.generate(rid, [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        assert out.request_id == rid
        ids.append(out.request_id)
    return ids


def test_two_frontends_share_one_core_and_see_each_others_load() -> None:
    async def main() -> None:
        config = EngineConfig(load_format="fake", fake_step_delay_s=0.02, max_num_seqs=2)
        primary = AsyncEngineClient(config, stall_timeout_s=None)
        primary.share(detach_wait_s=10.0)
        await primary.start()
        address = CoreAddress(pid=primary.engine_pid or 0, generation=primary.core_generation,
                              attach=primary.attach_address or "", kv_events=primary.kv_event_addresses[0],
                              kv_replay=primary.kv_event_addresses[1])
        located: list[CoreAddress | None] = []

        async def locate(dead: CoreAddress | None) -> CoreAddress:
            located.append(dead)
            return address

        other = AsyncEngineClient(config, stall_timeout_s=None, transport=AttachedTransport(locate))
        other.tokenizer, other.model_config = primary.tokenizer, primary.model_config
        try:
            await other.start()
            assert other.attached and not primary.attached and located == [None]
            assert other.engine_pid == primary.engine_pid  # one core, two frontends
            # Each gets only its own outputs (the stream asserts the ids), both complete.
            got = await asyncio.wait_for(asyncio.gather(*[_collect(c, f"{name}-{i}", 3) for i in range(4)
                                                          for name, c in (("p", primary), ("o", other))]), 10)
            assert all(len(g) >= 1 for g in got)

            # Load: with 2 batch slots and slow steps, the other's queued requests show in the
            # primary's queue view (and in-flight count) and the other way round.
            streams = [other.add_request(f"slow-o{i}", [1, 2, 3], SamplingParams(max_tokens=50)) for i in range(5)]
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (primary.peer_in_flight < 5 or primary.queue.peer_requests < 3):
                await asyncio.sleep(0.02)
            assert primary.peer_in_flight == 5 and primary.queue.peer_requests >= 3
            assert primary.queue.num_requests >= 3 and primary.peers is not None and primary.peers.frontends == 1
            mine = primary.add_request("slow-p", [1, 2, 3], SamplingParams(max_tokens=50))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and other.peer_in_flight < 1:
                await asyncio.sleep(0.02)
            assert other.peer_in_flight == 1 and other.peers is not None and other.peers.frontends == 0
            mine.abort()

            # Detaching aborts the other's requests in the core: the primary sees none left.
            for s in streams:
                s.abort()
            await other.shutdown()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (primary.peer_in_flight or primary.peers.frontends):
                await asyncio.sleep(0.02)
            assert primary.peer_in_flight == 0 and primary.peers.frontends == 0
            assert primary.queue.num_requests == 0
            assert primary.core_stats.num_running + primary.core_stats.num_waiting == 0
        finally:
            await other.shutdown()
            t0 = time.monotonic()
            await primary.shutdown()
            assert time.monotonic() - t0 < 5  # nobody attached: no wait

    asyncio.run(main())
