"""``cog-pool submit`` against real pools on both brokers."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from ingest_pool import (
    AMQP_URL,
    REDIS_URL,
    amqp_overrides,
    delete_amqp_names,
    pool_config,
    redis_overrides,
    running_pool,
    unique,
)

from ingest.submit import submit_main

pytestmark = pytest.mark.broker


async def test_cog_pool_submit_through_redis_prints_the_result(tmp_path):
    # Through the real command line: `python -m cogpool submit ...` is `cog-pool submit ...`.
    stream = unique("submit")
    config = pool_config(str(tmp_path / "s"), redis_overrides(stream), runners=1)
    async with running_pool(config):
        argv = ["--redis-url", REDIS_URL, "--stream", stream, "-i", "n=42", "--id", "sub-1"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cogpool",
            "submit",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        code = proc.returncode
    assert code == 0, stderr.decode()
    out = json.loads(stdout)
    assert out["id"] == "sub-1" and out["output"] == "echo 42" and out["status"] == "succeeded"
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{stream}*")]
    await client.delete(*keys)
    await client.aclose()


async def test_submit_through_amqp_prints_the_result(tmp_path, capsys):
    queue = unique("submit")
    config = pool_config(str(tmp_path / "s"), amqp_overrides(queue), runners=1)
    async with running_pool(config):
        argv = ["--amqp-url", AMQP_URL, "--queue", queue, "--json", '{"input": {"n": 7}}']
        code = await asyncio.to_thread(submit_main, argv)
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["output"] == "echo 7"
    await delete_amqp_names(queue)


def test_bad_input_flag_is_a_usage_error(capsys):
    assert submit_main(["--redis-url", "redis://x", "-i", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
