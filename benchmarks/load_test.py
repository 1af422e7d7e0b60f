"""A bounded load test of `balcony serve` on loopback.

Starts ``balcony serve`` on 127.0.0.1 (or uses ``--url`` of a running server on
this machine), then, with the official `openai` client:

1. **rated load**, once per fixed budget and once under ``auto``: a closed loop
   of ``--concurrency`` clients sends ``--requests`` requests in all; reports
   throughput, p50/p95 latency and the budgets that served them. At this load
   (concurrency <= queue capacity + batch size) no request may fail.
2. **overload**: ``--overload-factor`` times the server's capacity in clients,
   ``--overload-requests`` requests in all; the excess must be refused fast
   (429 in milliseconds) rather than queued without bound.

Everything is bounded: a fixed request count per phase and ``--time-limit`` for
the whole run. Exit status 1 if a request failed at the rated load or the
server queued instead of refusing.

Example:
    python benchmarks/load_test.py --requests 24 --concurrency 4 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

PROMPTS = [
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about the sea.",
    "What is the capital of France? Answer briefly.",
    "Give me three tips for learning a new language.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why do cats purr?",
]


@dataclass
class Outcome:
    """One request's result."""

    status: int
    latency_s: float
    tokens: int = 0
    budget: str | None = None
    error: str | None = None


@dataclass
class Phase:
    """The results of one phase."""

    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def summary(self) -> dict:
        ok = self.ok()
        lat = sorted(o.latency_s for o in ok)
        refused = sorted(o.latency_s for o in self.outcomes if o.status == 429)
        budgets: dict[str, int] = {}
        for o in ok:
            budgets[o.budget or "?"] = budgets.get(o.budget or "?", 0) + 1
        statuses: dict[str, int] = {}
        for o in self.outcomes:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        return {
            "phase": self.name,
            "requests": len(self.outcomes),
            "ok": len(ok),
            "statuses": statuses,
            "wall_s": round(self.wall_s, 2),
            "req_per_s": round(len(ok) / self.wall_s, 2) if self.wall_s else 0.0,
            "tok_per_s": round(sum(o.tokens for o in ok) / self.wall_s, 1) if self.wall_s else 0.0,
            "p50_s": round(_quantile(lat, 0.5), 3),
            "p95_s": round(_quantile(lat, 0.95), 3),
            "max_s": round(lat[-1], 3) if lat else float("nan"),
            "refused_p95_s": round(_quantile(refused, 0.95), 4) if refused else None,
            "budgets": budgets,
            "errors": sorted({o.error for o in self.outcomes if o.error})[:3],
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def start_server(args: argparse.Namespace, port: int, log_path: str) -> subprocess.Popen:
    """Launch `balcony serve` on 127.0.0.1:`port`; its output goes to `log_path`."""
    cmd = [
        sys.executable, "-c", "import sys; from balcony.cli import main; sys.exit(main())", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", str(args.max_batch_size), "--queue-capacity", str(args.queue_capacity),
        "--target-latency-ms", str(args.target_latency_ms), "--auto-up-hold-s", str(args.auto_up_hold_s),
        "--max-tokens-limit", str(max(64, args.max_tokens)), "--request-timeout-s", str(args.request_timeout_s),
        "--log-level", "warning",
    ]
    if args.model:
        cmd += ["--model", args.model]
    if args.exits:
        cmd += ["--exits", args.exits]
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(base: str, deadline: float, proc: subprocess.Popen | None) -> dict:
    """Poll /health until the server is warm; returns its body."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            body = _get_json(base + "/health")
            if body.get("status") == "ok":
                return body
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the server did not become ready in time")


def one_request(client, model: str, prompt: str, max_tokens: int, timeout: float) -> Outcome:
    """One chat completion; never raises."""
    import openai

    t0 = time.perf_counter()
    try:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, timeout=timeout,
        )
        return Outcome(200, time.perf_counter() - t0, resp.usage.completion_tokens, (resp.model_extra or {}).get("budget"))
    except openai.APIStatusError as e:
        return Outcome(e.status_code, time.perf_counter() - t0, error=f"{e.status_code} {getattr(e, 'code', '')}")
    except Exception as e:  # noqa: BLE001 - a lost request is a result too
        return Outcome(-1, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


def run_phase(name: str, client, model: str, requests: int, concurrency: int, max_tokens: int, deadline: float) -> Phase:
    """`requests` requests from `concurrency` closed-loop clients, stopping at `deadline`."""
    phase = Phase(name)
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            remaining = deadline - time.monotonic()
            if i is None or remaining <= 1:
                return
            out = one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, timeout=min(120.0, remaining))
            with lock:
                phase.outcomes.append(out)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    phase.wall_s = time.perf_counter() - t0
    return phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="A running server on this machine (http://127.0.0.1:PORT); default: start one.")
    parser.add_argument("--model", help="Base model for the started server (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--exits", help="Trained exits for the started server.")
    parser.add_argument("--requests", type=int, default=24, help="Requests per rated-load phase.")
    parser.add_argument("--concurrency", type=int, default=4, help="Closed-loop clients at the rated load.")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request.")
    parser.add_argument("--budgets", default="S,M,L,XL,auto", help="Phases to run, comma-separated (budget names and/or auto).")
    parser.add_argument("--overload-factor", type=float, default=3.0, help="Overload clients = factor x (queue capacity + batch size); 0 skips.")
    parser.add_argument("--overload-requests", type=int, default=72, help="Requests in the overload phase.")
    parser.add_argument("--max-batch-size", type=int, default=4, help="Started server: --max-batch-size.")
    parser.add_argument("--queue-capacity", type=int, default=8, help="Started server: --queue-capacity.")
    parser.add_argument("--target-latency-ms", type=float, default=1500.0, help="Started server: --target-latency-ms (auto policy SLO).")
    parser.add_argument("--auto-up-hold-s", type=float, default=2.0, help="Started server: --auto-up-hold-s.")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="Started server: --request-timeout-s.")
    parser.add_argument("--time-limit", type=float, default=600.0, help="Seconds for the whole run, server start included.")
    parser.add_argument("--json", help="Also write the summaries to this JSON file.")
    args = parser.parse_args(argv)

    import openai

    deadline = time.monotonic() + args.time_limit
    proc = None
    log_path = os.path.join(tempfile.gettempdir(), f"balcony-load-test-{os.getpid()}.log")
    if args.url:
        base = args.url.rstrip("/").removesuffix("/v1")
        host = base.split("//", 1)[-1].split(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            parser.error("--url must point at this machine (127.0.0.1): the load test only uses loopback")
    else:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(args, port, log_path)
    summaries: list[dict] = []
    failed = False
    try:
        t0 = time.perf_counter()
        health = wait_ready(base, min(deadline, time.monotonic() + 300), proc)
        print(f"server {base} ready in {time.perf_counter() - t0:.1f} s: model {health['model']}, budgets {health['budgets']}")
        name = health["model"]
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        one_request(client, f"{name}:XL", PROMPTS[0], 2, timeout=60)  # warm the HTTP path
        for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
            model = name if budget == "auto" else f"{name}:{budget}"
            phase = run_phase(budget, client, model, args.requests, args.concurrency, args.max_tokens, deadline)
            summaries.append(phase.summary())
            print(json.dumps(summaries[-1]))
            if len(phase.ok()) != len(phase.outcomes) or len(phase.outcomes) < args.requests:
                failed = True
                print(f"  !! phase {budget}: {len(phase.outcomes) - len(phase.ok())} failed, {args.requests - len(phase.outcomes)} not sent (time limit)")
            time.sleep(args.auto_up_hold_s if budget == "auto" else 0)
        if args.overload_factor > 0:
            cap = args.queue_capacity + args.max_batch_size
            clients = max(cap + 1, int(args.overload_factor * cap))
            phase = run_phase("overload(auto)", client, name, args.overload_requests, clients, args.max_tokens, deadline)
            s = phase.summary()
            summaries.append(s)
            print(json.dumps(s))
            refused = s["statuses"].get("429", 0)
            other = len(phase.outcomes) - len(phase.ok()) - refused
            if other or (refused and (s["refused_p95_s"] or 0) > 0.5):
                failed = True
                print(f"  !! overload: {other} requests failed other than with 429, or refusals were slow")
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()  # noqa: S310
        switches = [line for line in metrics.splitlines() if line.startswith("balcony_budget_switches_total")]
        print("auto-policy switches: " + (", ".join(switches) or "none"))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print()
    print(f"{'phase':<16}{'ok/sent':>9}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p95 s':>8}  budgets / statuses")
    for s in summaries:
        extra = s["budgets"] if s["phase"] != "overload(auto)" else {**s["statuses"], "refused_p95_s": s["refused_p95_s"], **s["budgets"]}
        print(f"{s['phase']:<16}{s['ok']:>4}/{s['requests']:<4}{s['req_per_s']:>8}{s['tok_per_s']:>8}{s['p50_s']:>8}{s['p95_s']:>8}  {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summaries, f, indent=2)
    if proc is not None and failed:
        print(f"server log: {log_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
