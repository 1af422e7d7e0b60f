"""The prepared GPU check: what only an accelerator can prove, in one run that prints one table.

Stages (each in its own process, its output in OUT/<stage>.log, its numbers in OUT/<stage>.json):

1. tests    the `gpu`-marked tests (tests/test_gpu.py): float32 and bfloat16 equality with HF, greedy
            self-speculative decoding lossless in float32, compiled and quantized decoding, no host syncs;
2. train    200 steps of `balcony train --config smollm2-quick` in bfloat16: the LR trace, tokens/s, peak memory;
3. bench    `balcony bench` on the device with the exits of stage 2: every budget eager and compiled, HF generate,
            self-speculative decoding;
4. quality  with the time left: the default recipe's exits trained on as many generated tokens as the time
            allows (generation rounds until ~45% of it is spent, steps sized from stage 2's throughput), then
            scored on the held-out text; exits, log and eval table in OUT/quality.

    scripts/gpu_check.sh                              # a CUDA machine: about 8 minutes on an H200
    scripts/gpu_check.sh --device cpu --size small    # the same stages at their smallest (CI, any CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each size runs. "full" is sized for an H200 (8 minutes in all); "small" proves the stages end to end on a CPU.
SIZES = {
    "full": {
        "budget_s": 480,
        "train_set": "precision=bf16,max_steps=200,save_every=0,eval_every=0,log_every=10",
        "bench": ["--max-new-tokens", "128", "--prompt-tokens", "128", "--repeats", "3", "--batch-size", "8", "--compile"],
        "limits": {"tests": 120, "train": 150, "bench": 180},  # seconds a stage may take before it is stopped
        "quality_s": 240,
        "quality_set": "precision=bf16,save_every=0,eval_every=0,log_every=20",
        "eval_tokens": 65536,
    },
    "small": {
        "budget_s": 3600,
        "train_set": "precision=bf16,max_steps=3,save_every=0,eval_every=0,log_every=1,corpus_tokens=512,max_tokens=512,"
                     "eval_tokens=128,seq_len=64,batch_size=2,warm_start_tokens=256,loss_vocab_tokens=256",
        "bench": ["--max-new-tokens", "3", "--prompt-tokens", "8", "--repeats", "1", "--batch-size", "2", "--compile",
                  "--compile-backend", "eager", "--threads", "1"],
        "limits": {"tests": 1800, "train": 1800, "bench": 1800},
        "quality_s": 0,  # not sized from the time left: the fixed settings below
        "quality_set": "precision=bf16,save_every=0,eval_every=0,log_every=1,max_steps=2,corpus_tokens=512,eval_tokens=128,"
                       "seq_len=64,batch_size=2,warm_start_tokens=256,loss_vocab_tokens=256",
        "eval_tokens": 256,
    },
}


def _device(name: str) -> str:
    from balcony.modeling.loading import pick_device

    return pick_device(name)


def _peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _train_args(config: str, sets: str, out: Path, device: str) -> list[str]:
    """`balcony train` arguments; --device where this version of the command takes it."""
    from balcony.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    args = ["train", "--config", config, "--set", f"{sets},output_dir={out},progress=false", "--no-resume"]
    if any("--device" in a.option_strings for a in train._actions):
        args += ["--device", device]
    return args


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------------ stages (each runs in a child process)
def stage_tests(out: Path, device: str, size: dict) -> dict:
    env = {**os.environ, "BALCONY_TEST_DEVICE": device, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py"), f"--junitxml={xml}"]
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase") if xml.is_file() else []:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        status = "skipped" if case.find("skipped") is not None else ("FAILED" if bad is not None else "passed")
        rows.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time", 0)),
                     "message": (bad.get("message") or "")[:160] if bad is not None else ""})
    return {"ok": rc == 0 and bool(rows), "tests": rows}


def stage_train(out: Path, device: str, size: dict) -> dict:
    from balcony.cli import main

    run = out / "train200"
    t0 = time.perf_counter()
    rc = main(_train_args("smollm2-quick", size["train_set"], run, device))
    records = [r for r in _log(run / "log.jsonl") if "lr" in r]
    last = records[-1] if records else {}
    lrs = [r["lr"] for r in records]
    peak = lrs.index(max(lrs)) if lrs else 0
    return {
        "ok": rc == 0 and bool(records) and any(run.glob("*.safetensors")),
        "seconds": time.perf_counter() - t0,
        "steps": last.get("step"),
        "tokens": last.get("tokens"),
        "tokens_per_s": last.get("tokens_per_s"),
        "lr_trace": [(r["step"], r["lr"]) for r in records],
        # one warm-up to a peak, then no rise: the schedule of one process (issue 20, item 1)
        "lr_shape_ok": all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1])),
        "peak_memory_mb": _peak_memory_mb(device),
        "exits": str(run),
    }


def stage_bench(out: Path, device: str, size: dict) -> dict:
    from balcony.cli import main

    exits = out / "train200"
    args = ["bench", "--device", device, "--out", str(out / "bench")] + size["bench"]
    if any(exits.glob("*.safetensors")):
        args += ["--exits", str(exits)]
    rc = main(args)
    result = json.loads((out / "bench" / "bench.json").read_text()) if (out / "bench" / "bench.json").is_file() else {}
    return {"ok": rc == 0 and bool(result), "bench": result}


def stage_quality(out: Path, device: str, size: dict, budget_s: float, train: dict) -> dict:
    """Generate corpus rounds for ~45% of the budget, train steps sized to ~35% of it, score the held-out text."""
    import torch

    from balcony.cli import main
    from balcony.cli.common import build_model
    from balcony.eval.run import run_evaluation
    from balcony.training.config import TrainConfig, _split_overrides, parse_overrides
    from balcony.training.corpus import _count_tokens, corpus_path, generated_corpus
    from balcony.training.loop import load_training_data

    run = out / "quality"
    t0 = time.perf_counter()
    sets = size["quality_set"]
    if budget_s:
        m, tok, _ = build_model(None, None, device=device)
        have = _count_tokens(corpus_path(m, 0))
        while time.perf_counter() - t0 < 0.45 * budget_s:  # a round (~24k tokens) at a time: the cached file grows
            generated_corpus(m, tok, num_tokens=have + 20_000, seed=0, progress=False)
            have = _count_tokens(corpus_path(m, 0))
            print(f"[quality] corpus: {have:,} tokens after {time.perf_counter() - t0:.0f} s", flush=True)
        del m
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        cfg = TrainConfig.from_yaml("smollm2-default")
        step_tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        rate = float(train.get("tokens_per_s") or 0) or 20_000.0  # stage 2's bf16 throughput on this device
        steps = max(10, int(0.35 * budget_s * rate / step_tokens))
        sets = f"{sets},corpus_tokens={have},max_steps={steps}"
    rc = main(_train_args("smollm2-default", sets, run, device))
    overrides = parse_overrides(_split_overrides(sets))
    cfg = TrainConfig.from_yaml("smollm2-default", {**overrides, "output_dir": str(run), "progress": False})
    m, tok, _ = build_model(None, str(run), device=device)
    _, held_out = load_training_data(cfg, tok, m)
    texts = tok.batch_decode(held_out.input_ids, skip_special_tokens=True) if held_out is not None else None
    report = run_evaluation(model=None, exits=str(run), text=texts, tasks=None, output=str(run / "eval"), seq_len=cfg.seq_len,
                            text_tokens=size["eval_tokens"], device=device, dtype="float32", plot=False, log=print)
    print(report.to_text())
    records = [r for r in _log(run / "log.jsonl") if "lr" in r]
    return {"ok": rc == 0 and any(run.glob("*.safetensors")), "corpus_tokens": overrides.get("corpus_tokens"),
            "steps": records[-1]["step"] if records else None, "tokens": records[-1]["tokens"] if records else None,
            "eval": report.to_text(), "exits": str(run)}


# ------------------------------------------------------------------------ the driver
def _child(stage: str, out: Path, device: str, size_name: str, budget_s: float) -> None:
    size = SIZES[size_name]
    if stage == "tests":
        result = stage_tests(out, device, size)
    elif stage == "train":
        result = stage_train(out, device, size)
    elif stage == "bench":
        result = stage_bench(out, device, size)
    else:
        train = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}
        result = stage_quality(out, device, size, budget_s, train)
    (out / f"{stage}.json").write_text(json.dumps(result, indent=2, default=str))


def _run_stage(stage: str, out: Path, device: str, size: str, timeout_s: float, budget_s: float = 0) -> dict:
    """Run one stage in a child process (its output to OUT/<stage>.log), stopped after `timeout_s`."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--stage", stage, "--out", str(out), "--device", device, "--size", size, "--budget-s", str(int(budget_s))]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"[gpu-check] {stage}: up to {timeout_s:.0f} s, log in {out / (stage + '.log')}", flush=True)
    with open(out / f"{stage}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    path = out / f"{stage}.json"
    result = json.loads(path.read_text()) if path.is_file() and rc != "timeout" else {"ok": False}
    result.update(seconds=time.perf_counter() - t0, rc=rc)
    if rc != 0:
        result["ok"] = False
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"[gpu-check] {stage}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']:.0f} s", flush=True)
    return result


def table(results: dict, env: dict) -> str:
    """The one table: a row per test, per training, per bench budget, and the quality run."""
    lines = [f"GPU check on {env['device']} ({env['name']}), torch {env['torch']}", "",
             f"{'stage':<9}{'what':<60}{'result':<46}{'s':>7}", "-" * 122]

    def row(stage: str, what: str, result: str, seconds: float | None = None) -> None:
        lines.append(f"{stage:<9}{what[:59]:<60}{result[:45]:<46}{'' if seconds is None else f'{seconds:7.1f}'}")

    t = results.get("tests", {})
    for r in t.get("tests", []):
        row("tests", r["test"], r["status"] + (f": {r['message']}" if r["message"] else ""), r["seconds"])
    if not t.get("tests"):
        row("tests", "tests/test_gpu.py", f"did not run (rc {t.get('rc')})", t.get("seconds"))
    tr = results.get("train", {})
    trace = tr.get("lr_trace") or []
    picks = [trace[i] for i in sorted({0, len(trace) // 4, len(trace) // 2, 3 * len(trace) // 4, len(trace) - 1})] if trace else []
    row("train", "smollm2-quick bf16: steps, tokens/s, peak memory",
        f"{tr.get('steps')} steps, {tr.get('tokens_per_s') or 0:,.0f} tok/s, {tr.get('peak_memory_mb') or 0:,.0f} MiB"
        if tr.get("ok") else f"FAILED (rc {tr.get('rc')})", tr.get("seconds"))
    row("train", "LR at steps " + ", ".join(str(s) for s, _ in picks), ("ok: " if tr.get("lr_shape_ok") else "WRONG SHAPE: ")
        + ", ".join(f"{lr:.1e}" for _, lr in picks))
    b = results.get("bench", {}).get("bench") or {}
    for r in b.get("budgets", []):
        compiled = f", compiled {r['compiled_decode_tok_s']:.0f} ({r['compiled_over_eager']:.2f}x)" if "compiled_decode_tok_s" in r else ""
        row("bench", f"engine {r['budget']} (layer {r['exit_layer']}) decode tok/s, batch 1, {b.get('dtype')}",
            f"{r['decode_tok_s']:.0f}{compiled}")
    for key, r in (b.get("hf") or {}).items():
        who, batch = ("engine", key[len("engine_batch"):]) if key.startswith("engine") else ("HF generate", key[len("batch"):])
        row("bench", f"{who}, batch {batch}, full depth: decode tok/s", f"{r['decode_tok_s']:.0f}")
    for r in b.get("speculative", []):
        row("bench", f"speculative, draft {r['budget']}: tok/s, acceptance", f"{r['decode_tok_s']:.0f} ({r['speedup']:.2f}x), {r['acceptance_rate']:.0%}")
    if not b:
        row("bench", "balcony bench", f"FAILED (rc {results.get('bench', {}).get('rc')})", results.get("bench", {}).get("seconds"))
    q = results.get("quality", {})
    row("quality", f"default recipe: {q.get('corpus_tokens')} corpus tokens, {q.get('steps')} steps",
        f"{q.get('tokens') or 0:,} tokens trained; exits, eval in quality/" if q.get("ok") else f"FAILED (rc {q.get('rc')})",
        q.get("seconds"))
    if q.get("eval"):
        lines += ["", "quality run, held-out text (quality/eval/results.txt):", q["eval"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu, ... (default: CUDA, then MPS, else the CPU)")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="full (an H200, ~8 min) or small (any CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"), help="where results go ($OUT)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for all stages (default: the size's)")
    parser.add_argument("--stages", default="tests,train,bench,quality", help="which stages, comma-separated")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        _child(args.stage, out, args.device, args.size, args.budget_s or 0)
        return 0
    import torch

    device = _device(args.device)
    if device == "cpu" and args.device not in ("cpu",) and _has_nvidia_gpu():
        print("[gpu-check] an NVIDIA GPU is here but this torch has no CUDA: recreate the environment with a CUDA build, e.g.\n"
              "  rm -rf .venv && TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' scripts/setup.sh",
              file=sys.stderr)
        return 2
    env = {"device": device, "torch": torch.__version__,
           "name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"}
    size = SIZES[args.size]
    budget = args.budget_s or size["budget_s"]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    t0 = time.perf_counter()
    results = {}
    for stage in stages:
        if stage == "quality":  # the time left: sized to end ~20 s before the budget, stopped a minute after it
            left = budget - (time.perf_counter() - t0)
            share = min(size["quality_s"], max(left - 20, 30)) if size["quality_s"] else 0
            results[stage] = _run_stage(stage, out, device, args.size, max(left, 60) + 60, share)
        else:
            results[stage] = _run_stage(stage, out, device, args.size, size["limits"][stage])
    text = table(results, env)
    text += f"\n\ntotal {time.perf_counter() - t0:.0f} s; results, logs, exits and eval tables in {out}"
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    return 0 if all(r.get("ok") for r in results.values()) else 1


def _has_nvidia_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":
    sys.exit(main())
