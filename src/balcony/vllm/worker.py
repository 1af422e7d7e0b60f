"""Run exported budgets through ``vllm.LLM`` and write what they generated (and how long it took) as JSON.

balcony's main environment and vLLM's need different transformers versions, so
the tests and the benchmark drive vLLM from outside: they write a job, run
``python -m balcony.vllm.worker JOB.json OUT.json`` with vLLM's Python, and read
the result. The job loads one engine at a time in this one process (with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine runs in-process, so a second
engine starts in seconds rather than a minute).

Job format::

    {"engine": {"dtype": "float32", "max_model_len": 256, ...},   # vllm.LLM keyword arguments
     "interleave": false,                                         # true: all engines at once, timed in turns
     "runs": [{"model": "out/S",                                 # one engine per run
               "engine": {...},                                   # per-run overrides (e.g. speculative_config)
               "requests": [{"prompts": [[1, 2, 3], [4, 5]],     # token ids; one generate() call per request
                             "max_tokens": 8, "logprobs": 1, "repeats": 1}]}]}

Result: per run, the engine's start-up seconds and per request the generated token
ids, the logprob of each generated token, the wall seconds of each repeat and (with
``"disable_log_stats": false``) vLLM's own timing of each: time to first token and
the decode window.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run every engine of `job` in turn (or all at once, round-robin, with ``"interleave": true``); see the module docstring."""
    if job.get("interleave"):
        return _run_interleaved(job)
    from vllm import LLM

    results = []
    for run in job["runs"]:
        kwargs = {"enforce_eager": True, "seed": 0, **job.get("engine", {}), **run.get("engine", {})}
        t0 = time.perf_counter()
        llm = LLM(model=run["model"], **kwargs)
        startup = time.perf_counter() - t0
        out: dict[str, Any] = {"model": run["model"], "startup_s": startup, "requests": []}
        for req in run["requests"]:
            params = _params(req)
            prompts = [{"prompt_token_ids": list(p)} for p in req["prompts"]]
            times, timings, outputs = [], [], None
            for _ in range(int(req.get("repeats", 1))):
                t1 = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                times.append(time.perf_counter() - t1)
                timings.append(_timing(outputs))
            entry: dict[str, Any] = {"seconds": times, "timing": timings, "tokens": [], "logprobs": []}
            for o in outputs or []:
                c = o.outputs[0]
                entry["tokens"].append(list(c.token_ids))
                if c.logprobs is not None:
                    entry["logprobs"].append([float(step[t].logprob) for t, step in zip(c.token_ids, c.logprobs)])
            out["requests"].append(entry)
        stats = _spec_stats(llm)
        if stats:
            out["speculative"] = stats
        results.append(out)
        del llm
        gc.collect()
    return {"runs": results}


def _params(req: dict[str, Any]):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=int(req["max_tokens"]), logprobs=req.get("logprobs"), ignore_eos=bool(req.get("ignore_eos", True)))


def _run_interleaved(job: dict[str, Any]) -> dict[str, Any]:
    """Load every run's engine at once, then time them in turns: repeat r of request k runs on each engine before
    repeat r + 1, so a machine whose speed drifts (a shared one) slows every engine alike. Every run needs the
    same number of requests."""
    from vllm import LLM

    engines, results = [], []
    for run in job["runs"]:
        t0 = time.perf_counter()
        engines.append(LLM(model=run["model"], **{"enforce_eager": True, "seed": 0, **job.get("engine", {}), **run.get("engine", {})}))
        results.append({"model": run["model"], "startup_s": time.perf_counter() - t0, "requests": []})
    for k in range(len(job["runs"][0]["requests"])):
        for res in results:
            res["requests"].append({"seconds": [], "timing": [], "tokens": [], "logprobs": []})
        for _ in range(int(job["runs"][0]["requests"][k].get("repeats", 1))):
            for llm, run, res in zip(engines, job["runs"], results):
                req = run["requests"][k]
                t1 = time.perf_counter()
                outputs = llm.generate([{"prompt_token_ids": list(p)} for p in req["prompts"]], _params(req), use_tqdm=False)
                res["requests"][k]["seconds"].append(time.perf_counter() - t1)
                res["requests"][k]["timing"].append(_timing(outputs))
                res["requests"][k]["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    return {"runs": results}


def _timing(outputs) -> dict[str, float] | None:
    """Engine-side timing of one generate() call (needs ``disable_log_stats=False``): median time to first
    token, and the decode window from the last sequence's first token to the last token of all."""
    stats = [o.metrics for o in outputs if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_ts", 0)]
    if not stats:
        return None
    ttft = sorted(m.first_token_latency for m in stats)[len(stats) // 2]
    return {"ttft_s": ttft, "decode_s": max(m.last_token_ts for m in stats) - max(m.first_token_ts for m in stats)}


def _spec_stats(llm) -> dict[str, float] | None:
    """Draft / accepted token counters of a speculative engine, when vLLM reports them."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - metrics are optional (disabled stats, older vLLM)
        return None
    out = {}
    for m in metrics:
        if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"):
            out[m.name.split(":")[1]] = float(getattr(m, "value", 0.0))
    return out or None


def main(argv: list[str] | None = None) -> int:
    """``python -m balcony.vllm.worker JOB.json OUT.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m balcony.vllm.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        job = json.load(f)
    result = run_job(job)
    with open(args[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running the job
    sys.exit(main())
