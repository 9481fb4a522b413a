"""The prediction record end to end: what one request may do to the pool, and what it leaves.

Each scenario runs a real pool (real coglet runner processes, real signals) and, where the
finding was seen over HTTP, a real aiohttp server and client.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pool_helpers import MODELS, make_config, running_pool, wait_until
from test_api_e2e import serving

from pool import manager as manager_module
from pool.errors import InvalidInput, PoolFull
from pool.manager import PoolManager
from pool.prediction import SECRET_MASK, EndReason, Phase, Prediction, PredictionRequest

RECORD = str(MODELS / "record")


def raw(text: str) -> dict[str, Any]:
    return {"data": text.encode(), "headers": {"Content-Type": "application/json"}}


async def submit(manager: PoolManager, pid: str | None = None, **inputs: Any) -> Prediction:
    return await manager.submit(PredictionRequest(id=pid, input=inputs))


# --- finding 1: a request that cannot be encoded never takes a slot ----------------------------
async def test_lone_surrogates_are_422_and_leave_every_slot_free(tmp_path: Path) -> None:
    async with serving(tmp_path, RECORD, runners__count=2) as api:
        # Steps: on a 2-runner pool, two inputs and one context holding a lone surrogate.
        for body, loc in [
            ('{"input": {"tag": "\\ud800"}}', ["body", "input", "tag"]),
            ('{"input": {"tag": "ok \\udfff"}}', ["body", "input", "tag"]),
            ('{"input": {}, "context": {"who": "\\ud800"}}', ["body", "context", "who"]),
        ]:
            status, answer = await api.call("POST", "/predictions", **raw(body))
            assert status == 422, answer
            assert answer["detail"][0]["loc"] == loc
            assert "surrogate" in answer["detail"][0]["msg"]
        # Result: no slot was taken, and a normal prediction still runs at once.
        _, health = await api.call("GET", "/health-check")
        assert health["concurrency"]["current"] == 0
        assert [r["busy"] for r in health["runners"]] == [0, 0]
        status, ok = await api.call("POST", "/predictions", json={"input": {"tag": "fine"}})
        assert status == 200 and ok["status"] == "succeeded" and ok["output"]["tag"] == "fine"


async def test_queue_path_gets_the_named_error_for_an_unencodable_input(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path, "record")) as manager:
        # Queue consumers build the request themselves and call submit(): the manager refuses.
        with pytest.raises(InvalidInput) as e:
            await submit(manager, "q-surrogate", tag="\ud800")
        assert e.value.detail[0]["loc"] == ["body", "input", "tag"]
        assert manager.get("q-surrogate") is None
        with pytest.raises(InvalidInput) as e:
            await manager.submit(PredictionRequest(id="q-ctx", input={}, context={"k": "\udc80"}))
        assert e.value.detail[0]["loc"] == ["body", "context", "k"]
        assert manager.free_slots() == 1
        ok = await submit(manager, tag="after")
        await ok.wait(30)
    assert ok.status == "succeeded"


async def test_a_large_input_is_checked_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_check = manager_module.check_wire_safe

    def check(request: PredictionRequest) -> None:
        threads.append(threading.get_ident())
        real_check(request)

    monkeypatch.setattr(manager_module, "check_wire_safe", check)
    async with running_pool(make_config(tmp_path, "record")) as manager:
        big = "é" * (2 * 1024 * 1024)
        with pytest.raises(InvalidInput) as e:
            await submit(manager, tag=big + "\ud800")
        ok = await submit(manager, tag=big)
        await ok.wait(30)
        small = await submit(manager, tag="small")
        await small.wait(30)
    assert e.value.detail[0]["loc"] == ["body", "input", "tag"]
    assert ok.status == "succeeded" and small.status == "succeeded"
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread and threads[1] != loop_thread  # the two large ones
    assert threads[2] == loop_thread  # a small one costs no thread hop


async def test_a_cancel_while_the_request_is_encoded_never_reaches_a_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    release = threading.Event()
    real_encode = Prediction.encode_request

    def slow_encode(self: Prediction, runner_input: Any) -> bytes:
        entered.set()
        release.wait(30)
        return real_encode(self, runner_input)

    monkeypatch.setattr(Prediction, "encode_request", slow_encode)
    async with running_pool(make_config(tmp_path, "record")) as manager:
        # Steps: a large input is encoded in a thread; the client cancels meanwhile.
        task = asyncio.ensure_future(submit(manager, "enc-1", tag="e" * (2 * 1024 * 1024)))
        await asyncio.to_thread(entered.wait, 30)
        assert manager.free_slots() == 0  # it holds its place while it prepares
        assert await manager.cancel("enc-1")
        release.set()
        p = await asyncio.wait_for(task, 30)
        # Result: canceled, its place given back, and the runner never saw it.
        assert p.status == "canceled" and p.ended_in is Phase.PREPARING
        assert manager.free_slots() == 1 and manager._router.waiting_bytes == 0
        after = await submit(manager, tag="next")
        await after.wait(30)
    assert p.started_at is None and p.runner_index is None
    assert after.status == "succeeded"


# --- finding 16: non-finite numbers in, non-finite numbers out ---------------------------------
async def test_non_finite_input_is_422_over_http_and_queues(tmp_path: Path) -> None:
    async with serving(tmp_path, RECORD) as api:
        status, answer = await api.call(
            "POST", "/predictions", **raw('{"input": {"weight": 1e309}}')
        )
        assert status == 422, answer
        assert answer["detail"][0]["loc"] == ["body", "input", "weight"]
        assert "finite" in answer["detail"][0]["msg"]
        for bad in (float("nan"), float("inf"), [1.0, float("-inf")]):
            with pytest.raises(InvalidInput) as e:
                await submit(api.manager, weight=bad)
            assert e.value.detail[0]["loc"][:3] == ["body", "input", "weight"]
        assert api.manager.health()["concurrency"]["current"] == 0


async def test_a_nan_output_fails_the_prediction_with_valid_json(tmp_path: Path) -> None:
    async with serving(tmp_path, RECORD) as api:
        async with api.session.post(
            api.url("/predictions"), json={"input": {"nan_out": True}}
        ) as resp:
            text = await resp.text()
        body = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the body"))
        assert resp.status == 200
        assert body["status"] == "failed" and body["output"] is None
        assert "non-finite" in body["error"] and "NaN" in body["error"]
        status, ok = await api.call("POST", "/predictions", json={"input": {"tag": "next"}})
        assert status == 200 and ok["status"] == "succeeded"


# --- finding 14: secrets masked everywhere outside the runner ----------------------------------
class Hooks:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def hook(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response()


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Hooks, str]]:
    found = Hooks()
    app = web.Application()
    app.router.add_post("/hook", found.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield found, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    await runner.cleanup()


async def test_secret_inputs_are_masked_outside_the_runner(
    tmp_path: Path, hooks: tuple[Hooks, str]
) -> None:
    import hashlib

    received, url = hooks
    secret = "sk-live-do-not-leak"
    async with serving(tmp_path, RECORD) as api:
        body = {"id": "sec-1", "input": {"token": secret, "tag": "t"}, "webhook": url}
        status, answer = await api.call("PUT", "/predictions/sec-1", json=body)
        assert status == 200, answer
        _, again = await api.call("GET", "/predictions/sec-1")
        await wait_until(
            lambda: any(h["status"] == "succeeded" for h in received.received), what="terminal hook"
        )
        record = api.manager.get("sec-1")
        assert record is not None
        queue_result = record.to_dict()  # what the queue consumers publish
    # The runner saw the real value ...
    assert answer["output"]["token_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    # ... and nothing outside it shows it.
    for shown in [answer, again, queue_result, *received.received]:
        assert shown["input"]["token"] == SECRET_MASK
        assert shown["input"]["tag"] == "t"
        assert secret not in json.dumps(shown)


# --- finding 13: admission counts predictions still downloading their inputs ------------------
class SlowFiles:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked = asyncio.Event()

    async def file(self, request: web.Request) -> web.Response:
        self.asked.set()
        await self.release.wait()
        return web.Response(body=b"slow body")


@pytest.fixture
async def slow_files() -> AsyncIterator[tuple[SlowFiles, str]]:
    files = SlowFiles()
    app = web.Application()
    app.router.add_get("/slow.txt", files.file)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield files, f"http://127.0.0.1:{runner.addresses[0][1]}/slow.txt"
    files.release.set()
    await runner.cleanup()


async def test_a_prediction_downloading_its_inputs_holds_its_place(
    tmp_path: Path, slow_files: tuple[SlowFiles, str]
) -> None:
    files, url = slow_files
    config = make_config(tmp_path, "file_in", http__queue_limit=0)
    async with running_pool(config) as manager:
        # Steps: A is admitted and downloads its input (held); B arrives meanwhile.
        task_a = asyncio.ensure_future(submit(manager, "a", doc=url))
        await asyncio.wait_for(files.asked.wait(), 30)
        assert manager.free_slots() == 0
        assert manager.health()["concurrency"]["current"] == 0  # A holds no runner yet
        with pytest.raises(PoolFull):
            await submit(manager, "b", doc="data:text/plain;base64,Yg==")
        # Result: A, whose input was fetched, is never refused after the fetch.
        files.release.set()
        a = await asyncio.wait_for(task_a, 30)
        await a.wait(30)
    assert a.status == "succeeded", a.error
    assert a.output == "slow body"


# --- finding 12: one deadline over every phase, and a timeout is not a runner death -----------
async def test_a_timed_out_prediction_is_not_rerun_by_a_later_put(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__predict_timeout_s=1.0, runners__cancel_grace_s=0.2)
    async with running_pool(config) as manager:
        # Steps: a model that ignores cancels runs past its deadline; the pool kills its runner.
        first = await submit(manager, "stubborn-1", sleep_s=60, stubborn=True)
        await first.wait(30)
        pid_before = manager.runners[0]["pid"]
        await wait_until(
            lambda: manager.runners[0]["pid"] not in (None, pid_before), what="runner restarted"
        )
        again = await submit(manager, "stubborn-1", sleep_s=60, stubborn=True)
    # Result: the timeout stands; the same id is not run a second time.
    assert first.status == "failed" and "timed out" in (first.error or "")
    assert first.end_reason is EndReason.TIMED_OUT and not first.runner_died
    assert again.id == first.id and again.status == "failed"
    assert again.end_reason is EndReason.TIMED_OUT


async def test_the_deadline_covers_the_input_download(
    tmp_path: Path, slow_files: tuple[SlowFiles, str]
) -> None:
    _, url = slow_files
    config = make_config(tmp_path, "file_in", runners__predict_timeout_s=0.5)
    async with running_pool(config) as manager:
        p = await asyncio.wait_for(submit(manager, "dl-1", doc=url), 30)
        await p.wait(30)
        assert manager.free_slots() == 1
    assert p.status == "failed" and p.error == "Prediction timed out"
    assert p.end_reason is EndReason.TIMED_OUT and p.ended_in is Phase.PREPARING
    assert p.started_at is None


async def test_the_deadline_covers_the_queue_wait(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__predict_timeout_s=1.0, runners__cancel_grace_s=3)
    async with running_pool(config) as manager:
        # The first ignores its cancel and holds the only slot; the second waits behind it.
        first = await submit(manager, sleep_s=60, stubborn=True)
        second = await submit(manager, n=2)
        await asyncio.gather(first.wait(30), second.wait(30))
        assert manager.health()["concurrency"]["current"] == 1  # the first still runs
    assert first.end_reason is EndReason.TIMED_OUT and first.ended_in is Phase.RUNNING
    assert second.status == "failed" and second.error == "Prediction timed out"
    assert second.end_reason is EndReason.TIMED_OUT and second.ended_in is Phase.QUEUED
    assert second.started_at is None and second.runner_index is None


class SlowUploads:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.requests: list[web.Request] = []

    async def upload(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        await self.release.wait()
        return web.Response(status=201)


async def test_the_deadline_covers_the_output_upload(tmp_path: Path) -> None:
    uploads = SlowUploads()
    app = web.Application()
    app.router.add_put("/up/{name}", uploads.upload)
    server = web.AppRunner(app)
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{server.addresses[0][1]}/up"
    config = make_config(
        tmp_path, "file_out", runners__predict_timeout_s=2.0, files__upload_url=url
    )
    try:
        async with running_pool(config) as manager:
            # Steps: the model returns a file at once; its upload hangs past the deadline.
            p = await submit(manager, text="to upload")
            await p.wait(30)
            assert manager.health()["concurrency"]["current"] == 0  # no slot held meanwhile
            # Result: the upload is abandoned: its connection closes.
            await wait_until(
                lambda: (
                    uploads.requests
                    and all(
                        r.transport is None or r.transport.is_closing() for r in uploads.requests
                    )
                ),
                what="the upload connection closed",
            )
    finally:
        uploads.release.set()
        await server.cleanup()
    assert p.status == "failed" and p.error == "Prediction timed out"
    assert p.end_reason is EndReason.TIMED_OUT and p.ended_in is Phase.ENCODING
    assert p.output is None


# --- finding 16: a shutdown says why it canceled ----------------------------------------------
async def test_predictions_canceled_by_shutdown_say_why(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running_pool(config, grace_s=0.0) as manager:
        running = await submit(manager, sleep_s=60)
        queued = await submit(manager, sleep_s=60)
        await wait_until(lambda: running.status == "processing", what="running")
    for p in (running, queued):
        assert p.status == "canceled"
        assert p.end_reason is EndReason.SHUTDOWN
        assert p.error is not None and "the pool shut down" in p.error
        assert p.to_dict()["error"] == p.error


async def test_a_client_cancel_has_its_own_reason(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        running = await submit(manager, sleep_s=60)
        await wait_until(lambda: running.status == "processing", what="running")
        await manager.cancel(running.id)
        await running.wait(30)
    assert running.status == "canceled" and running.end_reason is EndReason.CANCELED
    assert running.error is None


# --- finding 5: bounded memory ----------------------------------------------------------------
async def test_logs_are_capped_with_head_tail_and_a_marker(tmp_path: Path) -> None:
    config = make_config(tmp_path, "record", predictions__logs_max_bytes=4000)
    async with running_pool(config) as manager:
        p = await submit(manager, log_bytes=100_000)
        await p.wait(30)
    assert p.status == "succeeded", p.error
    logs = p.logs
    assert len(logs.encode()) <= 4000 + 200  # the cap plus the marker line
    assert logs.startswith("00000000")  # the head is kept ...
    assert logs.rstrip("\n").splitlines()[-1].startswith("00000999")  # ... and the tail
    assert "bytes of logs dropped" in logs
    head, rest = logs.split("\n[... ", 1)
    dropped = int(rest.split(" bytes")[0])
    tail = rest.split(" ...]\n", 1)[1]
    assert dropped == 100_000 - len(head) - len(tail)


async def test_finished_records_are_slim_and_bounded_in_bytes(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        "record",
        predictions__recent_value_max_bytes=1000,
        predictions__recent_max_bytes=30_000,
    )
    async with running_pool(config) as manager:
        big = await submit(manager, "big", out_bytes=5000, tag="x" * 2000)
        await big.wait(30)
        kept = manager.get("big")
        # Records of ~1.6 kB each: the store keeps what fits in 30 kB, newest first.
        small = [await submit(manager, f"s{i}", tag="y" * 500) for i in range(30)]
        await asyncio.gather(*(p.wait(30) for p in small))
        gone = manager.get("s0")
        newest = manager.get("s29")
        stored = manager._router.recent_bytes
    # The caller's own record is whole; the one kept for GET/PUT is slim and says so.
    assert big.output["blob"] == "o" * 5000
    assert kept is not None and kept.status == "succeeded"
    shown = kept.to_dict()
    assert shown["output"] is None and shown["input"]["tag"] is None
    assert shown["omitted"]["output"] > 5000 and shown["omitted"]["input.tag"] >= 2000
    assert gone is None and newest is not None and newest.input["tag"] == "y" * 500
    assert stored <= 30_000


async def test_inputs_waiting_for_a_slot_are_bounded_in_bytes(tmp_path: Path) -> None:
    config = make_config(tmp_path, "record", predictions__waiting_max_bytes=3000)
    async with running_pool(config) as manager:
        running = await submit(manager, sleep_s=60, tag="r" * 2000)  # has a slot: not waiting
        first = await submit(manager, tag="a" * 2000)
        assert manager._router.waiting_bytes > 2000
        with pytest.raises(PoolFull, match=r"predictions\.waiting_max_bytes=3000"):
            await submit(manager, tag="b" * 2000)
        small = await submit(manager, tag="c")  # what fits still waits
        await manager.cancel(running.id)
        await asyncio.gather(*(p.wait(30) for p in (running, first, small)))
        waiting = manager._router.waiting_bytes
    assert first.status == "succeeded" and small.status == "succeeded"
    assert waiting == 0


# --- finding 6: removing a prediction's input files never runs on the event loop ---------------
async def test_input_dirs_are_removed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real_rmtree = manager_module.shutil.rmtree

    def rmtree(path: Any, *args: Any, **kw: Any) -> None:
        if "inputs" in str(path):  # the runners' own working dirs are not the subject here
            threads.append(threading.get_ident())
        real_rmtree(path, *args, **kw)

    monkeypatch.setattr(manager_module.shutil, "rmtree", rmtree)
    async with running_pool(make_config(tmp_path, "file_in")) as manager:
        p = await submit(manager, doc="data:text/plain;base64,Ym9keQ==")
        await p.wait(30)
        await wait_until(lambda: threads, what="input dir removed")
    assert p.output == "body"
    assert threads and loop_thread not in threads


# --- the recent store's memory estimate ------------------------------------------------------
async def test_a_kept_copy_takes_no_more_memory_than_the_store_counts_for_it() -> None:
    # Steps: 500 finished predictions with a small input, output and logs; keep their slim
    # copies (as the router's recent store does). Result: the memory the copies take, measured,
    # is at most what slim() reports for them, so predictions.recent_max_bytes bounds real
    # memory (it once counted 512 bytes for a copy that took ~4.7 KB).
    import gc
    import tracemalloc

    live = []
    for n in range(500):
        p = Prediction(PredictionRequest.from_body({"input": {"text": f"t{n}"}}))
        p.mark_started(0)
        p.apply_delta({"status": "succeeded", "output": f"out {n}", "logs_append": "a line\n"})
        live.append(p)
    gc.collect()
    tracemalloc.start()
    try:
        kept = [p.slim(1 << 20) for p in live]
        gc.collect()
        taken, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    counted = sum(size for _, size in kept)
    assert taken <= counted, f"copies take {taken / 500:.0f} B each, counted {counted / 500:.0f}"
    copy = kept[0][0]
    await copy.wait(1)  # a kept copy is done: waiting on it returns at once
    assert copy.logs == "a line\n" and copy.output == "out 0" and copy.status == "succeeded"
