"""Large outputs end to end (issue 7, finding 5): a file output is kept on disk by its record
and encoded a slice at a time by each reader; a long string stays in its decoded slices.

Real socket, real PoolManager, real coglet runner processes. Files of a few MiB (over the
1 MiB slice size) keep the suite fast; bench/large_payloads.py measures 100 MiB.
"""

from __future__ import annotations

import base64
import gc
import importlib.util
import json
import os
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pool_helpers import path_exists
from test_api_e2e import MODELS, Api, Receiver, serving, wait_until

from pool.files import INLINE_FILE_MAX_BYTES
from pool.manager import PoolManager

_spec = importlib.util.spec_from_file_location("bigfile_model", MODELS / "bigfile" / "predict.py")
assert _spec is not None and _spec.loader is not None
_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_model)
content: Callable[[int, int], bytes] = _model.content
_spec = importlib.util.spec_from_file_location("large_model", MODELS / "large" / "predict.py")
assert _spec is not None and _spec.loader is not None
_large = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_large)
_large_text: Callable[[int, str], str] = _large.text

SIZE_KB = 4096  # 4 MiB: four 1 MiB slices and more


def model_input(tmp_path: Path, name: str, **values: Any) -> dict[str, Any]:
    """The bigfile model's input, its file written under ``tmp_path`` (not left in /tmp)."""
    return {"path": str(tmp_path / f"{name}.bin"), **values}


def decoded(uri: Any) -> bytes:
    prefix = "data:application/octet-stream;base64,"
    assert isinstance(uri, str) and uri.startswith(prefix), str(uri)[:80]
    return base64.b64decode(uri.partition(",")[2], validate=True)


def file_size(path: str) -> int:
    return os.stat(path).st_size


def kept_files(manager: PoolManager) -> list[str]:
    """The output files the pool keeps for its records (``<files dir>/outputs/*/*``)."""
    root = manager._outputs_dir
    found = []
    for entry in os.listdir(root):
        found.extend(os.path.join(root, entry, name) for name in os.listdir(Path(root, entry)))
    return found


async def read_streamed(api: Api, method: str, path: str, **kw: Any) -> tuple[int, bytes, str]:
    async with api.session.request(method, api.url(path), **kw) as resp:
        chunks = [chunk async for chunk in resp.content.iter_chunked(1 << 20)]
        return resp.status, b"".join(chunks), resp.headers.get("Transfer-Encoding", "")


async def test_a_large_file_output_reaches_every_reader_whole_then_goes(
    tmp_path: Path, receiver: Receiver
) -> None:
    model_file = tmp_path / "model-out.bin"
    expected = content(SIZE_KB, 1)
    async with serving(tmp_path, model="bigfile", predictions__recent_max=1) as api:
        # Steps: a sync prediction returns a 4 MiB file the model wrote at its own path, with a
        # webhook; then GET; then another prediction pushes it out of the recent store.
        body = {
            "id": "f1",
            "input": {"size_kb": SIZE_KB, "seed": 1, "path": str(model_file)},
            "webhook": receiver.url("/hook/f1"),
            "webhook_events_filter": ["completed"],
        }
        status, raw, encoding = await read_streamed(api, "POST", "/predictions", json=body)
        assert status == 200, raw[:300]
        sync = json.loads(raw)
        assert sync["status"] == "succeeded", sync["error"]
        assert encoding == "chunked"  # streamed out a slice at a time
        (kept,) = kept_files(api.manager)
        status, raw, _ = await read_streamed(api, "GET", "/predictions/f1")
        assert status == 200
        got = json.loads(raw)
        await wait_until(lambda: receiver.terminal("f1"), "the completed webhook")
        (hook,) = receiver.terminal("f1")
        # Result: the sync response, GET and the webhook carry the same bytes; the model's own
        # file was copied (it is still there, untouched: the model may write it again).
        assert decoded(sync["output"]) == expected
        assert decoded(got["output"]) == expected and "omitted" not in got
        assert decoded(hook["output"]) == expected
        assert model_file.read_bytes() == expected
        assert file_size(kept) == len(expected)

        status, small = await api.call(
            "POST", "/predictions", json={"input": model_input(tmp_path, "small", size_kb=1)}
        )
        assert status == 200 and decoded(small["output"]) == content(1, 0)  # inline: no file
        # Result: f1 left the recent store (recent_max 1), and its file with it.
        await wait_until(lambda: not kept_files(api.manager), "f1's file removed")
        status, _ = await api.call("GET", "/predictions/f1")
        assert status == 404


async def test_a_file_object_output_is_moved_out_of_the_runners_temp_root(tmp_path: Path) -> None:
    async with serving(tmp_path, model="bigfile") as api:
        manager = api.manager
        files_dir = manager._files_dir
        # Steps: the model returns a 2 MiB file object (the runner spills it to its temp root).
        status, raw, _ = await read_streamed(
            api, "POST", "/predictions", json={"input": {"size_kb": 2048, "as_object": True}}
        )
        body = json.loads(raw)
        runner_tmp = manager._supervisor.runners[0].temp_dir
        await wait_until(lambda: not os.listdir(runner_tmp), "the runner's temp root empty")
        # Result: the output is whole; the record keeps the one file it moved out of the
        # runner's temp root (nothing is left there).
        assert status == 200 and body["status"] == "succeeded", body.get("error")
        assert base64.b64decode(body["output"].partition(",")[2]) == content(2048, 0)
        (kept,) = kept_files(manager)
        assert kept.endswith("blob.bin")
    # Result: the pool's shutdown took its files dir, kept outputs included.
    assert not path_exists(files_dir)


async def test_without_a_recent_store_the_file_lives_until_the_answer_is_written(
    tmp_path: Path,
) -> None:
    # Steps: no recent store at all; a sync prediction returns a 3 MiB file.
    async with serving(tmp_path, model="bigfile", predictions__recent_max=0) as api:
        status, raw, _ = await read_streamed(
            api,
            "POST",
            "/predictions",
            json={"input": model_input(tmp_path, "f", size_kb=3072, seed=3)},
        )
        # Result: the answer carries the whole file (the request held it past the record's
        # end); once written, nothing holds it and it is removed.
        assert status == 200
        assert decoded(json.loads(raw)["output"]) == content(3072, 3)
        await wait_until(lambda: not kept_files(api.manager), "the file removed")


async def test_a_reader_in_the_middle_of_a_file_keeps_it_past_its_eviction(
    tmp_path: Path,
) -> None:
    size_kb = 16 << 10  # 21 MiB of JSON: more than the socket buffers take at once
    async with serving(tmp_path, model="bigfile", predictions__recent_max=1) as api:
        status, _ = await api.call(
            "POST",
            "/predictions",
            json={"id": "f2", "input": model_input(tmp_path, "f2", size_kb=size_kb, seed=2)},
        )
        assert status == 200
        # Steps: a GET of f2 reads its first MiB and pauses; another prediction evicts f2
        # from the recent store meanwhile; then the GET reads on.
        async with api.session.get(api.url("/predictions/f2")) as resp:
            first = await resp.content.readexactly(1 << 20)
            small = {"input": model_input(tmp_path, "small", size_kb=1)}
            status, _ = await api.call("POST", "/predictions", json=small)
            assert status == 200
            gone, _ = await api.call("GET", "/predictions/f2")
            rest = await resp.read()
        # Result: f2 is no longer known, yet the paused reader got all of it; then its file
        # is removed.
        assert gone == 404
        assert decoded(json.loads(first + rest)["output"]) == content(size_kb, 2)
        await wait_until(lambda: not kept_files(api.manager), "f2's file removed")


async def test_a_large_file_output_costs_the_pool_a_few_slices_of_memory(tmp_path: Path) -> None:
    size = 16 << 20
    async with serving(tmp_path, model="bigfile") as api:
        body = {"input": model_input(tmp_path, "f", size_kb=size >> 10, seed=4)}
        # Steps: tracemalloc traces this process (the pool's manager, its HTTP server and the
        # client) while a 16 MiB file output is answered and read a chunk at a time.
        gc.collect()
        tracemalloc.start()
        try:
            async with api.session.post(api.url("/predictions"), json=body) as resp:
                total = 0
                head = b""
                async for chunk in resp.content.iter_chunked(1 << 20):
                    total += len(chunk)
                    head = head or chunk[:256]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Result: the response is the whole data: URI (4/3 of the file), yet the pool never held
    # the file, its base64 or the JSON text whole: a few 1 MiB slices at most.
    assert resp.status == 200 and b'"succeeded"' in head
    assert total > size * 4 // 3
    assert peak < size // 2, f"peak {peak / size:.2f}x the file"


async def test_a_long_string_output_is_held_once(tmp_path: Path) -> None:
    size_kb = 16 << 10
    async with serving(tmp_path, model="large") as api:
        body = {"input": {"kind": "string", "size_kb": size_kb}}
        # Steps: as above, for a 16 MiB string (it travels raw in a spilled delta).
        gc.collect()
        tracemalloc.start()
        try:
            async with api.session.post(api.url("/predictions"), json=body) as resp:
                total = 0
                async for chunk in resp.content.iter_chunked(1 << 20):
                    total += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Result: the string is held once, as its decoded slices (never joined), plus a slice or
    # two; before, its slices and their join were both alive (2x). (Its characters take 4
    # bytes each in memory: it holds a non-BMP one.)
    size = sys.getsizeof(_large_text(size_kb, "s"))
    assert resp.status == 200 and total > size_kb << 10
    assert peak < 1.5 * size, f"peak {peak / size:.2f}x the string"


async def test_a_file_at_the_inline_bound_is_a_data_uri_at_once(tmp_path: Path) -> None:
    async with serving(tmp_path, model="bigfile") as api:
        size_kb = INLINE_FILE_MAX_BYTES >> 10  # 191 KiB
        status, body = await api.call(
            "POST", "/predictions", json={"input": model_input(tmp_path, "f", size_kb=size_kb)}
        )
        # Result: a small file is encoded at once, as before; the record keeps no file.
        assert status == 200 and decoded(body["output"]) == content(size_kb, 0)
        assert kept_files(api.manager) == []
        # ... and a GET of it reads the same value from the slim copy.
        status, got = await api.call("GET", f"/predictions/{body['id']}")
        assert got["output"] == body["output"]


async def test_the_kept_files_bound_drops_the_oldest_copies(tmp_path: Path) -> None:
    bound = 5 << 20
    async with serving(tmp_path, model="bigfile", predictions__recent_files_max_bytes=bound) as api:
        # Steps: three 2 MiB file outputs, with 5 MiB of kept files allowed; then one of 6 MiB.
        for n in range(3):
            status, _ = await api.call(
                "POST",
                "/predictions",
                json={"id": f"k{n}", "input": model_input(tmp_path, f"k{n}", size_kb=2048)},
            )
            assert status == 200
        await wait_until(lambda: len(kept_files(api.manager)) == 2, "two files kept")
        statuses = [(await api.call("GET", f"/predictions/k{n}"))[0] for n in range(3)]
        status, raw, _ = await read_streamed(
            api,
            "POST",
            "/predictions",
            json={"id": "big", "input": model_input(tmp_path, "big", size_kb=6144)},
        )
        assert status == 200 and decoded(json.loads(raw)["output"]) == content(6144, 0)
        _, big = await api.call("GET", "/predictions/big")
        await wait_until(lambda: len(kept_files(api.manager)) == 2, "the 6 MiB file removed")
    # Result: the oldest copy went with its file; a copy whose file alone is over the bound
    # keeps no output (omitted, with its size); its file went once its answer was written.
    assert statuses == [404, 200, 200]
    assert big["output"] is None and big["omitted"] == {"output": 6144 << 10}
