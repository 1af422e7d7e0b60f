"""`run_study`: plan, train every variant (skipping finished ones, resuming interrupted ones), check full models, evaluate once, judge, draw.

Everything lands in one output folder, so running the same command again
continues where it stopped (and several runners on one folder share the variants:
each trains those no other runner holds, see `_claim`):

    OUT/plan.json              the steps and every variant's TrainConfig (fixed at the first run)
    OUT/variants/<name>/       each variant's training run (checkpoints while running; exits when done)
    OUT/full_models.json       whether each variant's full model reproduces the base (claim 3)
    OUT/eval/                  the one `balcony eval` run over all variants (results.*, plots)
    OUT/claims.json            the verdicts and the paired differences behind them
    OUT/<study>.png / .md      the figure and the tables
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..eval.report import EvalReport
from ..eval.run import run_evaluation
from ..eval.texts import load_texts
from ..modeling.loading import load_base
from ..modeling.model import BalconyModel
from ..training.config import TrainConfig
from ..training.loop import train
from .calibrate import measure_step_seconds, steps_for_budget
from .claims import ClaimResult, judge_claims
from .plan import Study, differing_fields, get_study, select_variants, study_configs, tokens_per_step
from .scratch import ScratchSpec, build_scratch_base
from .table import study_markdown

TRAINED_BASE = "base"  # where a recipe that trains the base saves it (`balcony.training.loop.train`)


@dataclass
class StudyResult:
    """What `run_study` returns.

    Attributes:
        output: The study folder.
        plan: plan.json's content.
        report: The evaluation (None with ``evaluate=False``).
        claims: The verdicts (empty without an evaluation).
        figure, markdown: Paths of the figure and the Markdown (None without an evaluation).
    """

    output: Path
    plan: dict[str, Any]
    report: EvalReport | None
    claims: list[ClaimResult]
    figure: Path | None
    markdown: Path | None


def variant_done(cfg: TrainConfig) -> bool:
    """True when the variant's run finished all its steps (its exits and metrics.json are written)."""
    out = Path(cfg.output_dir)
    metrics = out / "metrics.json"
    if not metrics.is_file() or not (out / "balcony_config.json").is_file():
        return False
    return json.loads(metrics.read_text()).get("step") == cfg.max_steps


def _load_plan(path: Path, study: Study, configs: Mapping[str, TrainConfig]) -> dict[str, Any]:
    plan = json.loads(path.read_text())
    if plan["study"] != study.name:
        raise ValueError(f"{path.parent} holds study {plan['study']!r}, not {study.name!r}: use another --output")
    for name, cfg in configs.items():
        if name in plan["variants"]:
            saved = TrainConfig.from_dict(plan["variants"][name], source=str(path))
            diff = differing_fields(saved, cfg)
            if diff:
                raise ValueError(f"{path.parent} was planned with other settings for variant {name!r} (saved vs now: {diff}); "
                                 "rerun with the same options to resume, or use another --output")
    return plan


def _write_json(path: Path, data: Any) -> None:
    """Write atomically; runners sharing a study each write through a temporary file of their own."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def check_full_models(model: str | None, dirs: Mapping[str, Path], trains_base: Mapping[str, bool], tokenizer_text: str) -> dict[str, Any]:
    """Does each variant's full budget reproduce the base model's logits exactly?

    A frozen variant's exits load onto the untouched base, so its full budget must give
    the base's logits bit for bit; a recipe that trained the base serves a changed one.

    Returns:
        name -> {"exact": bool, "max_abs_diff": float, "trains_base": bool}.

    Raises:
        AssertionError: a frozen variant's full model differs from the base, or it saved a base.
    """
    base, tok = load_base(model)
    ids = tok(tokenizer_text, return_tensors="pt")["input_ids"][:, :256]
    reference = base(ids).logits
    out = {}
    for name, directory in dirs.items():
        own = Path(directory) / TRAINED_BASE
        if trains_base[name]:
            served, _ = load_base(str(own))
            logits = BalconyModel.from_pretrained(served, directory)(ids).logits
        else:
            if own.exists():  # raised, not asserted: the check must hold under python -O too
                raise AssertionError(f"frozen variant {name!r} saved a base model in {own}: its base must stay the original")
            logits = BalconyModel.from_pretrained(base, directory)(ids).logits
        exact = torch.equal(logits, reference)
        out[name] = {"exact": exact, "max_abs_diff": float((logits - reference).abs().max()), "trains_base": trains_base[name]}
        if not trains_base[name] and not exact:
            raise AssertionError(f"frozen variant {name!r}: the full budget differs from the base model (max |diff| {out[name]['max_abs_diff']:.3g})")
    return out


def run_study(
    study: str = "figure5",
    *,
    output: str | os.PathLike = "runs/ablate",
    model: str | None = None,
    exits: list[int] | None = None,
    config: str = "smollm2-default",
    overrides: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    text_field: str = "text",
    steps: int | None = None,
    budget_minutes: float | None = None,
    variants: str | list[str] | None = None,
    text: str | None = None,
    tasks: str | None = None,
    task_data: str | None = None,
    limit: int | None = None,
    text_tokens: int = 16384,
    eval_seq_len: int = 512,
    eval_batch_size: int = 8,
    evaluate: bool = True,
    scratch: ScratchSpec | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> StudyResult:
    """Run a study end to end (or continue it): train the variants at equal compute, evaluate them in one run, judge the claims.

    Args:
        study: ``figure5`` (exit module, init, loss, recipe on a pretrained base; claims 1-3)
            or ``table4`` (Balcony against Sorted pretrained from scratch; claim 4).
        output: The study folder (rerun the same command to resume).
        model: Base model for figure5 (None: the embedded SmolLM2-135M-Instruct).
        exits: Exit layers (figure5 default: the config's; table4: a quarter, half and three quarters of the depth).
        config: The best-known recipe: a shipped config name or a YAML file.
        overrides: TrainConfig fields to set for every variant (e.g. {"lr": 1e-3}).
        dataset: Training corpus (figure5 default: the generated corpus; table4: required).
        text_field: The corpus's text column.
        steps: Optimizer steps per variant (default: from `budget_minutes`).
        budget_minutes: Training time for all variants together; each variant's step time is
            measured for a few steps, then every variant gets the same steps that fit.
        variants: Only these variants (comma-separated names; the reference always runs).
        text: Held-out text for KL / top-1 agreement / NLL (.txt or .jsonl), paired window by window.
        tasks: lm-eval tasks (default: every task given by `task_data`).
        task_data: Offline task data, as `balcony eval --task-data`.
        limit: Items per task.
        text_tokens: Tokens of `text` to score.
        eval_seq_len, eval_batch_size: Windows and batch of the evaluation.
        evaluate: Run the evaluation (False: only train).
        scratch: Shape of table4's from-scratch base (default `ScratchSpec()`).
        progress: Progress bars while training.
        log: Where progress lines go (None: silent).

    Returns:
        A `StudyResult`.

    Raises:
        ValueError: bad options (named), or an output folder planned with other settings.

    Example:
        >>> run_study("figure5", output="runs/ablate", budget_minutes=60, text="lambada.jsonl")  # doctest: +SKIP
    """
    say = log or (lambda s: None)
    spec = get_study(study)
    if steps is None and budget_minutes is None and not (Path(output) / "plan.json").is_file():
        raise ValueError("give --steps or --budget-minutes (or resume a folder that holds a plan.json)")
    if evaluate and not (text or task_data or tasks):
        raise ValueError("nothing to evaluate on: give --text (held-out text) and/or --task-data / --tasks, or --no-evaluate")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    chosen = select_variants(spec, variants)
    base = _base_config(spec, out, model, exits, config, overrides, dataset, text_field, scratch, progress)
    plan_path = out / "plan.json"
    wall: dict[str, float] = {}
    if plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        configs = study_configs(spec, base, steps=saved["steps"], output=out, variants=chosen)
        plan = _load_plan(plan_path, spec, configs)
        if steps is not None and steps != plan["steps"]:
            raise ValueError(f"{out} was planned with {plan['steps']} steps, not {steps}: use another --output to change them")
        say(f"[ablate] resuming {out}: {plan['steps']} steps per variant")
    else:
        plan = {"study": spec.name, "budget_minutes": budget_minutes, "dropped": dict(spec.dropped), "variants": {}, "wall_seconds": {}}
        if steps is None:
            t = time.perf_counter()
            probes = study_configs(spec, base, steps=1, output=out, variants=chosen)
            plan["seconds_per_step"] = measure_step_seconds(probes, out / "calibration", log=log)
            steps = steps_for_budget(plan["seconds_per_step"], budget_minutes)
            wall["calibration"] = time.perf_counter() - t
            say(f"[ablate] {budget_minutes:g} min of training -> {steps} steps per variant")
        plan["steps"] = steps
        configs = study_configs(spec, base, steps=steps, output=out, variants=chosen)
    plan["tokens_per_step"] = tokens_per_step(base)
    plan["variants"].update({n: c.to_dict() for n, c in configs.items()})
    plan["reference_config"] = configs[spec.reference].to_dict()
    plan.setdefault("wall_seconds", {}).update(wall)
    _write_json(plan_path, plan)

    _train_all(configs, spec, say)
    for name, cfg in configs.items():
        spent = Path(cfg.output_dir) / WALL_FILE
        if spent.is_file():
            plan["wall_seconds"][f"train {name}"] = json.loads(spent.read_text())["seconds"]
    _write_json(plan_path, plan)

    with _claim(out, wait=True):  # one runner checks and evaluates; another waits, then reuses its results
        return _finish(spec, out, model, configs, plan, plan_path, text, tasks, task_data, limit, text_tokens, eval_seq_len, eval_batch_size,
                       evaluate, log, say)


def _finish(spec, out, model, configs, plan, plan_path, text, tasks, task_data, limit, text_tokens, eval_seq_len, eval_batch_size, evaluate,
            log, say) -> StudyResult:
    """The full-model check, the evaluation, the claims, the figure and the Markdown."""
    dirs = {n: Path(c.output_dir) for n, c in configs.items()}
    full_models = None
    full_path = out / "full_models.json"
    if not spec.from_scratch:
        probe_text = " ".join(load_texts(text)[:3]) if text else _PROBE_TEXT
        full_models = check_full_models(model, dirs, {n: c.recipe != "balcony" for n, c in configs.items()}, probe_text)
        _write_json(full_path, full_models)
        say("[ablate] full models: " + ", ".join(f"{n} {'exact' if f['exact'] else 'changed'}" for n, f in full_models.items()))
    if not evaluate:
        return StudyResult(out, plan, None, [], None, None)

    report = _evaluate(spec, out, model, dirs, text, tasks, task_data, limit, text_tokens, eval_seq_len, eval_batch_size, plan, log)
    claims = judge_claims(report, spec, full_models)
    _write_json(out / "claims.json", [c.to_dict() for c in claims])
    labels = {v.name: v.label for v in spec.variants}
    figure = None
    if any(r.distill for r in report.rows) or report.tasks:
        from .figure import draw_study_figure

        figure = draw_study_figure(report, spec, out / f"{spec.name}.png", labels=labels)
    _write_json(plan_path, plan)
    markdown = out / f"{spec.name}.md"
    markdown.write_text(study_markdown(report, spec, claims, plan, labels, figure=figure.name if figure else None))
    for c in claims:
        say(f"[ablate] claim {c.claim}: {c.verdict} ({c.reason})")
    return StudyResult(out, plan, report, claims, figure, markdown)


WALL_FILE = "study_wall_seconds.json"


@contextlib.contextmanager
def _claim(directory: Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on a folder (a variant's, or the study's for the evaluation): True if this process got it.

    Several `run_study` processes on one study (one per machine, GPU or spare core) then
    share the variants: each trains those nobody else holds and waits for the rest; the
    evaluation runs once (`wait=True` blocks until the runner holding it is done).
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): one runner per study
        yield True
        return
    with open(directory / ".study.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_all(configs: Mapping[str, TrainConfig], spec: Study, say: Callable[[str], None], poll_seconds: float = 30.0) -> None:
    """Train every unfinished variant; those another runner holds are waited for."""
    pending = dict(configs)
    while pending:
        waiting = []
        for name, cfg in list(pending.items()):
            if variant_done(cfg):
                say(f"[ablate] {name}: done, skipped")
                del pending[name]
                continue
            with _claim(Path(cfg.output_dir)) as mine:
                if not mine:
                    waiting.append(name)
                    continue
                if variant_done(cfg):  # finished by another runner meanwhile
                    del pending[name]
                    continue
                say(f"[ablate] training {name} ({spec.variant(name).label}): {cfg.max_steps} steps")
                t = time.perf_counter()
                train(cfg)
                spent = Path(cfg.output_dir) / WALL_FILE
                before = json.loads(spent.read_text())["seconds"] if spent.is_file() else 0.0
                _write_json(spent, {"seconds": before + time.perf_counter() - t})
                del pending[name]
        if waiting and len(waiting) == len(pending):
            say(f"[ablate] waiting for another runner to finish {', '.join(waiting)}")
            _sleep(poll_seconds)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


_PROBE_TEXT = ("The committee met on a cold morning to decide where the new bridge would go. Engineers argued for the narrow "
               "crossing upstream, where the rock is solid, while the town wanted it near the market.")


def _base_config(spec: Study, out: Path, model, exits, config, overrides, dataset, text_field, scratch, progress) -> TrainConfig:
    fields: dict[str, Any] = dict(overrides or {})
    fields.update({"text_field": text_field, "progress": progress})
    if dataset is not None:
        fields["dataset"] = str(dataset)
    if spec.from_scratch:
        if dataset is None:
            raise ValueError("study table4 pretrains from scratch on a real corpus: give --dataset (a local .txt / .jsonl file or folder)")
        shape = scratch or ScratchSpec()
        fields["model"] = str(build_scratch_base(out / "scratch-base", str(dataset), shape, text_field=text_field))
        fields["exit_layers"] = list(exits) if exits else sorted({max(1, shape.layers * k // 4) for k in (1, 2, 3)})
        fields["budget_names"] = None
    else:
        if model is not None:
            fields["model"] = model
        if exits:
            fields["exit_layers"] = list(exits)
    return TrainConfig.from_yaml(config, fields)


def _evaluate(spec: Study, out: Path, model, dirs, text, tasks, task_data, limit, text_tokens, seq_len, batch_size, plan, log) -> EvalReport:
    """One `run_evaluation` over every variant (reused when results.json matches), paired against the reference."""
    eval_dir = out / "eval"
    ref = dirs[spec.reference]
    baselines = {n: str(d) for n, d in dirs.items() if n != spec.reference}
    settings = {"variants": sorted(dirs), "text": text, "tasks": tasks, "task_data": task_data, "limit": limit, "text_tokens": text_tokens,
                "seq_len": seq_len, "steps": plan["steps"]}
    results = eval_dir / "results.json"
    if results.is_file():
        report = EvalReport.load(results)
        if report.meta.get("study_eval") == settings:
            if log:
                log(f"[ablate] evaluation in {eval_dir} is up to date, reused")
            return report
    t = time.perf_counter()
    report = run_evaluation(
        model=str(ref / TRAINED_BASE) if spec.from_scratch else model,
        exits=str(ref),
        method=spec.reference,
        baselines=baselines,
        early_exit=not spec.from_scratch,
        paired_against=spec.reference,
        text=text,
        tasks=tasks,
        task_data=task_data,
        limit=limit,
        text_tokens=text_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        output=None,
        log=log,
    )
    report.meta["study_eval"] = settings
    eval_dir.mkdir(parents=True, exist_ok=True)
    report.write(eval_dir)
    plan["wall_seconds"]["evaluation"] = time.perf_counter() - t
    return report
