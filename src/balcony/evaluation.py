"""Quality at every budget: lm-eval tasks and distillation metrics, in one table.

`balcony eval` scores the full model, every Balcony budget, the plain early-exit
baseline at the same layers and any other exits given as baselines, and writes a
table like the paper's Table 1 (rows: budgets with their non-embedding parameter
counts; columns: tasks, their average and the drop against the full model) as
text, Markdown, CSV and JSON, plus the accuracy / speed-up / parameter plots.

Everything that shares the base model is scored from one pass of it: the base
runs once per batch, every variant's exit runs on the hidden state at its layer,
and the LM head is applied only where a score needs it (`exit_hidden_states`).
Task scoring goes through lm-evaluation-harness (`balcony.lm_eval_model`), so
prompts, truncation and metrics are the harness's own.

Heavy imports (lm-eval, matplotlib) happen inside the functions that need them:
the ``balcony`` command imports this module at start-up.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .arch import find_parts
from .cli import COMMANDS
from .loading import default_exit_layers
from .config import BalconyConfig
from .loading import DEFAULT_EXITS, DEFAULT_MODEL, is_default, load_base
from .model import BalconyModel, resolve_exits_dir

__all__ = [
    "EvalReport",
    "ReportRow",
    "TaskResults",
    "Variant",
    "build_variants",
    "distillation_metrics",
    "early_exit_model",
    "evaluate_command",
    "evaluate_tasks",
    "exit_hidden_states",
    "load_balcony",
    "load_texts",
    "make_report",
    "parse_baselines",
    "pick_device",
    "resolve_tasks",
    "run_evaluation",
    "text_windows",
]

FULL = "full"
BALCONY = "balcony"
EARLY_EXIT = "early-exit"
RESERVED_METHODS = (FULL, BALCONY, EARLY_EXIT)
ENGINES = ("shared", "harness")


# --------------------------------------------------------------------- models
def pick_device(device: str | None) -> str:
    """`device`, or CUDA when available (None / "auto"); a CUDA request without CUDA falls back to the CPU."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device={device!r} asked for but CUDA is not available: running on the CPU", stacklevel=2)
        return "cpu"
    return str(device)


def load_balcony(
    model: str | os.PathLike | torch.nn.Module | None = None,
    exits: str | os.PathLike | None = None,
    *,
    exit_kind: str | None = None,
    exit_layers: Sequence[int] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
) -> tuple[BalconyModel, Any, bool]:
    """A base model with exits, for evaluation.

    Args:
        model: Base model hub id or local path (None / ``""`` / ``"default"``: the embedded
            default), or a loaded HF model (then the tokenizer returned is None).
        exits: Trained exits (directory or hub id). Without them, fresh untrained exits
            are attached at `exit_layers` (default: the paper's depths) with a warning.
        exit_kind: ``norm`` for plain early exit (final norm + head) at the layers of
            `exits` (or `exit_layers`); None for the exits' own kind (``decoder`` when fresh).
        exit_layers: Layers for fresh exits.
        dtype: Weights dtype.
        device: Where to load the base.

    Returns:
        (model, tokenizer, trained): trained is True when `exits` were loaded.

    Raises:
        ValueError: `exit_kind` contradicts the saved exits, or a bad layer / kind.
    """
    if isinstance(model, torch.nn.Module):
        base, tok = model, None
    else:
        base, tok = load_base(model or None, dtype=dtype, device=device)
    if exits:
        directory = resolve_exits_dir(exits)
        saved = BalconyConfig.load(directory)
        if exit_kind == "norm" and saved.exit_kind != "norm":
            config = BalconyConfig(exit_layers=saved.exit_layers, budget_names=saved.budget_names, exit_kind="norm")
            return BalconyModel(base, config), tok, False
        if exit_kind not in (None, saved.exit_kind):
            raise ValueError(f"exit_kind={exit_kind!r} does not match the exits in {str(exits)!r}, which are {saved.exit_kind!r}")
        return BalconyModel.from_pretrained(base, directory), tok, True
    if exit_layers:
        layers = list(exit_layers)
    elif isinstance(model, torch.nn.Module) or not is_default(model or None):
        layers = default_exit_layers(find_parts(base).num_layers)
    else:
        layers = list(DEFAULT_EXITS[DEFAULT_MODEL])
    kind = exit_kind or "decoder"
    if kind != "norm":
        warnings.warn(
            f"no exits given: evaluating freshly initialised, untrained {kind} exits at layers {layers} "
            "(pass trained exits for real numbers, or exit_kind=norm for plain early exit)",
            stacklevel=2,
        )
    return BalconyModel(base, BalconyConfig(exit_layers=layers, exit_kind=kind)), tok, False


def early_exit_model(model: BalconyModel) -> BalconyModel:
    """Plain early exit at `model`'s exit layers (a copy of the final norm + the LM head), on the same base."""
    config = BalconyConfig(exit_layers=model.exit_layers, budget_names=model.config.budget_names, exit_kind="norm")
    return BalconyModel(model.base, config)


@dataclass
class Variant:
    """One row of the table: a method at one budget.

    Attributes:
        method: ``full``, ``balcony``, ``early-exit`` or a baseline's name.
        budget: The budget name (``S``, ..., the full budget's name for ``full``).
        layer: Exit layer (N for the full model).
        model: The `BalconyModel` holding this exit (all variants share one base).
        full: True for the full model (final norm of the base, no exit module).
    """

    method: str
    budget: str
    layer: int
    model: BalconyModel
    full: bool = False

    @property
    def key(self) -> str:
        """``"full"`` or ``"<method>/<budget>"``."""
        return FULL if self.full else f"{self.method}/{self.budget}"

    @property
    def params(self) -> int:
        """Non-embedding parameters this variant runs."""
        if self.full:
            m = self.model
            return sum(p.numel() for layer in m.parts.layers for p in layer.parameters()) + sum(
                p.numel() for p in m.parts.norm.parameters()
            )
        return self.model.count_parameters(self.layer)


def build_variants(
    model: BalconyModel,
    *,
    early_exit: bool = True,
    baselines: Mapping[str, str | os.PathLike | BalconyModel] | None = None,
    budgets: Sequence[str | int] | None = None,
    method: str = BALCONY,
) -> list[Variant]:
    """The full model, `model`'s budgets, plain early exit at the same layers, and baselines.

    Args:
        model: The Balcony model under test.
        early_exit: Add the plain early-exit baseline at `model`'s exit layers.
        baselines: name -> exits directory (loaded onto `model`'s base) or `BalconyModel`
            on the same base; all their budgets are scored.
        budgets: Restrict `model` and its early-exit twin to these budgets (names or layers).
        method: The name of `model`'s rows.

    Raises:
        ValueError: a budget `model` does not have, a clashing or empty baseline name,
            or a baseline on another base model.
    """
    n = model.num_layers
    pairs = list(zip(model.config.budget_names[:-1], model.exit_layers))
    if budgets:
        wanted = {model.resolve_exit(b) for b in budgets}
        pairs = [(name, j) for name, j in pairs if j in wanted]
    variants = [Variant(FULL, model.config.full_budget, n, model, full=True)]
    variants += [Variant(method, name, j, model) for name, j in pairs]
    if early_exit and model.config.exit_kind != "norm":
        twin = early_exit_model(model)
        variants += [Variant(EARLY_EXIT, name, j, twin) for name, j in pairs]
    for name, source in (baselines or {}).items():
        if not name or "/" in name or name.lower() in RESERVED_METHODS or name == method:
            raise ValueError(f"baseline name {name!r} is not allowed: use a non-empty name without '/', not one of {RESERVED_METHODS}")
        other = source if isinstance(source, BalconyModel) else BalconyModel.from_pretrained(model.base, source)
        if other.base is not model.base:
            raise ValueError(f"baseline {name!r} is built on another base model; baselines must share the evaluated model's base")
        variants += [Variant(name, b, j, other) for b, j in zip(other.config.budget_names[:-1], other.exit_layers)]
    return variants


@torch.no_grad()
def exit_hidden_states(
    variants: Sequence[Variant],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One pass of the shared base feeding every variant: key -> (B, T, H) state before the LM head.

    The base runs its N layers once; each exit runs on the hidden state at its
    layer, exactly as `BalconyModel.forward` would at that budget (and as
    `distill_forward` does for one model's exits).

    Raises:
        ValueError: the variants do not all share one base model.
    """
    lead = variants[0].model
    if any(v.model.base is not lead.base for v in variants):
        raise ValueError("variants must share one base model to be scored from one pass")
    # One base pass (as distill_forward) feeds several models' exits.
    wanted = {v.layer for v in variants if not v.full}
    taps, final, (masks, layer_kwargs) = lead.base_pass(input_ids, wanted, attention_mask, position_ids)
    out: dict[str, torch.Tensor] = {}
    for v in variants:
        if v.full:
            out[v.key] = final
        else:
            out[v.key] = v.model._run_exit(v.layer, taps[v.layer], masks, layer_kwargs, None, False)
    return out


# ----------------------------------------------------------- distillation
def load_texts(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Passages for the distillation metrics.

    Args:
        source: A list of passages, or a file: ``.jsonl`` (one record per line, its
            ``text`` field; ``content`` / ``passage`` / ``document`` also work) or text
            (``.txt`` and others: passages separated by blank lines).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no passage found, or a JSONL record without a text field.
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = [str(t) for t in source if str(t).strip()]
        if not texts:
            raise ValueError("the text set is empty: give at least one non-empty passage")
        return texts
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    texts: list[str] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{str(path)!r} line {n} is not JSON: {e}") from e
                if isinstance(record, str):
                    texts.append(record)
                    continue
                key = next((k for k in ("text", "content", "passage", "document") if isinstance(record.get(k), str)), None)
                if key is None:
                    raise ValueError(f"{str(path)!r} line {n} has no 'text' field (keys: {', '.join(sorted(record))})")
                texts.append(record[key])
    else:
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"text file {str(path)!r} holds no passages")
    return texts


def text_windows(tokenizer, texts: Sequence[str], seq_len: int = 512, max_tokens: int = 8192) -> list[list[int]]:
    """Tokenise passages and cut them into windows of at most `seq_len` tokens, `max_tokens` in all."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window predicts its next tokens)")
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for s in range(0, len(ids), seq_len):
            w = ids[s : s + seq_len][: max(0, max_tokens - total)]
            if len(w) >= 2:
                windows.append(w)
                total += len(w)
            if total >= max_tokens:
                return windows
    return windows


@torch.no_grad()
def distillation_metrics(
    variants: Sequence[Variant],
    tokenizer,
    texts: Sequence[str] | str | os.PathLike,
    *,
    seq_len: int = 512,
    max_tokens: int = 8192,
    batch_size: int = 8,
    chunk_tokens: int = 256,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """KL(full || variant), top-1 agreement with the full model and perplexity, per variant.

    One base pass per batch feeds every variant; logits are made `chunk_tokens`
    positions at a time (the teacher's once per chunk), so memory never holds
    (tokens x vocab) for more than one variant.

    Args:
        variants: Must include the full model (`build_variants` does).
        tokenizer: The base model's tokenizer.
        texts: Passages, or a file for `load_texts`.
        seq_len: Tokens per window.
        max_tokens: Tokens scored in all.
        batch_size: Windows per forward pass.
        chunk_tokens: Positions per logits chunk.
        progress: Show a progress bar.

    Returns:
        key -> {"kl": nats/token, "agreement": fraction, "ppl": perplexity,
        "nll": nats/token, "tokens": positions scored}. KL and agreement count every
        position; perplexity the positions that have a next token.
    """
    full = next((v for v in variants if v.full), None)
    if full is None:
        raise ValueError("distillation metrics need the full model among the variants (the teacher)")
    passages = load_texts(texts) if isinstance(texts, (str, os.PathLike)) else list(texts)
    windows = sorted(text_windows(tokenizer, passages, seq_len, max_tokens), key=len, reverse=True)
    if not windows:
        raise ValueError("the text set gives no window of 2 or more tokens")
    head = full.model.parts.lm_head
    device = next(head.parameters()).device
    sums = {v.key: {"kl": 0.0, "agree": 0, "nll": 0.0, "tokens": 0, "targets": 0} for v in variants}
    batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="distillation metrics", unit="batch")
    for batch in batches:
        width = len(batch[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        real = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
        target = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
        for i, w in enumerate(batch):
            ids[i, : len(w)] = torch.tensor(w)
            real[i, : len(w)] = True
            target[i, : len(w) - 1] = torch.tensor(w[1:])
        # Right padding needs no mask: causal attention never lets a real position see it.
        hidden = exit_hidden_states(variants, ids)
        flat_real = real.reshape(-1)
        rows = {k: h.reshape(-1, h.shape[-1])[flat_real] for k, h in hidden.items()}
        tgt_all = target.reshape(-1)[flat_real]
        for c in range(0, len(tgt_all), chunk_tokens):
            tgt = tgt_all[c : c + chunk_tokens]
            has = tgt != -100
            log_p = torch.log_softmax(head(rows[full.key][c : c + chunk_tokens]).float(), dim=-1)
            p = log_p.exp()
            top = log_p.argmax(-1)
            for v in variants:
                acc = sums[v.key]
                if v.full:
                    log_q = log_p
                else:
                    log_q = torch.log_softmax(head(rows[v.key][c : c + chunk_tokens]).float(), dim=-1)
                    acc["kl"] += (p * (log_p - log_q)).sum().item()  # KL(p || q), as losses.kl_per_token
                acc["agree"] += int((log_q.argmax(-1) == top).sum())
                acc["tokens"] += len(tgt)
                acc["nll"] -= log_q[has].gather(-1, tgt[has, None]).sum().item()
                acc["targets"] += int(has.sum())
    out = {}
    for key, acc in sums.items():
        nll = acc["nll"] / max(acc["targets"], 1)
        out[key] = {
            "kl": acc["kl"] / max(acc["tokens"], 1),
            "agreement": acc["agree"] / max(acc["tokens"], 1),
            "ppl": math.exp(nll),
            "nll": nll,
            "tokens": acc["tokens"],
        }
    return out


# ------------------------------------------------------------------- tasks
@dataclass
class TaskResults:
    """Harness results per variant.

    Attributes:
        scores: variant key -> task -> metric -> value (the harness's numbers, unscaled).
        samples: task -> number of documents scored.
        higher_is_better: task -> metric -> bool.
        seconds: variant key -> wall time of its harness run.
        requested: The task names asked for (a group's subtasks also appear in `scores`).
        items: variant key -> task -> metric -> per-document values in document order, for the
            metrics whose harness score is the mean over documents (acc, acc_norm, exact_match):
            what paired comparisons between variants are computed from (`paired_difference`).
    """

    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    items: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    requested: list[str] = field(default_factory=list)


def resolve_tasks(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] | None = None):
    """An lm-eval `TaskManager` that knows every task in `tasks`.

    Only the include paths are indexed when they hold all the tasks (fast); the
    harness's own task index (about 10 s) is added when some are not there.

    Raises:
        ValueError: a task is found nowhere; the message names it and close matches.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    if not tasks:
        raise ValueError("no tasks to evaluate")
    manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths or None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        hints = []
        for t in missing:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"unknown task {t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" in the harness's tasks or {', '.join(paths)}" if paths else " in the harness's tasks"
        raise ValueError("; ".join(hints) + where + ". Offline PIQA/ARC-Easy/LAMBADA need --task-data NAME=PATH.")
    return manager


def _split_metric(key: str) -> tuple[str, str] | None:
    """``"acc,none"`` -> ("acc", "none"); None for stderr entries and non-metrics."""
    if "," not in key:
        return None
    name, filt = key.split(",", 1)
    if name.endswith("_stderr"):
        return None
    return name, filt


def evaluate_tasks(
    variants: Sequence[Variant],
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: Sequence[str | os.PathLike] | None = None,
    task_manager=None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "shared",
    log: Callable[[str], None] | None = None,
) -> TaskResults:
    """Run lm-eval tasks at every variant.

    With ``engine="shared"``, loglikelihood requests (multiple choice, loglikelihood,
    rolling loglikelihood) are scored for every variant from one base pass and cached,
    so later variants cost no forward passes; generation tasks run per variant.
    ``engine="harness"`` runs the harness's own `HFLM` loop once per variant.

    Args:
        variants: From `build_variants`.
        tokenizer: The base model's tokenizer.
        tasks: lm-eval task (or group) names.
        include_path: Folders of extra task YAMLs.
        task_manager: A ready `TaskManager` (else one from `resolve_tasks`).
        limit: Documents per task (None: all).
        batch_size: Sequences per forward pass.
        num_fewshot: Few-shot examples (None: each task's default).
        engine: ``shared`` or ``harness``.
        log: Progress messages (e.g. print).

    Returns:
        `TaskResults`.
    """
    import logging

    import lm_eval

    from .lm_eval_model import SharedBudgetsLM

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    manager = task_manager or resolve_tasks(tasks, include_path)
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # HFLM warns that it was handed a ready model: expected here
    try:
        lm = SharedBudgetsLM(list(variants), tokenizer, batch_size=batch_size, shared=engine == "shared")
    finally:
        lm_logger.setLevel(max(level, logging.WARNING))
    out = TaskResults(requested=list(tasks))
    for v in variants:
        lm.select(v.key)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="WARNING",
        )
        out.seconds[v.key] = time.perf_counter() - t0
        scores: dict[str, dict[str, float]] = {}
        for task, metrics in res["results"].items():
            row = {}
            for key, value in metrics.items():
                split = _split_metric(key)
                if split is None or not isinstance(value, (int, float)):
                    continue
                name, filt = split
                row[name if filt == "none" else f"{name}[{filt}]"] = float(value)
            scores[task] = row
            hib = res.get("higher_is_better", {}).get(task, {})
            out.higher_is_better.setdefault(task, {k: bool(b) for k, b in hib.items() if b is not None})
            n = res.get("n-samples", {}).get(task, {})
            if n:
                out.samples[task] = int(n.get("effective", n.get("original", 0)))
        out.scores[v.key] = scores
        out.items[v.key] = _per_document(res.get("samples") or {}, scores)
        if log:
            summary = ", ".join(f"{t}: " + "/".join(f"{m} {x:.4g}" for m, x in s.items()) for t, s in scores.items())
            log(f"[eval] {v.key:<18} {out.seconds[v.key]:6.1f} s  {summary}")
    return out


def _per_document(samples: Mapping[str, Sequence[Mapping[str, Any]]], scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, list[float]]]:
    """task -> metric -> values per document (by doc_id), kept only where their mean is the harness's score."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, docs in samples.items():
        if task not in scores or not docs:
            continue
        docs = sorted(docs, key=lambda d: d.get("doc_id", 0))
        for name, score in scores[task].items():
            values = [d.get(name) for d in docs]
            if not all(isinstance(x, (int, float)) for x in values):
                continue  # e.g. perplexity: per document a (loglikelihood, length) pair
            values = [float(x) for x in values]
            if abs(sum(values) / len(values) - score) <= 1e-9 * max(1.0, abs(score)):
                out.setdefault(task, {})[name] = values
    return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of a - b over the same documents, with its standard error.

    Two variants scored on the same items are compared item by item: the standard error of
    the mean difference is std(a_i - b_i) / sqrt(n), much smaller than that of either score
    when both get mostly the same items right, and the honest scale for "does A beat B".

    Args:
        a, b: Per-document values (e.g. 0/1 correctness) of two variants, same documents in the same order.

    Returns:
        {"diff": mean(a - b), "se": its standard error (nan for n < 2), "n": n,
        "wins": documents where a > b, "losses": where a < b}.

    Example:
        >>> paired_difference([1, 1, 0, 1], [1, 0, 0, 0])["diff"]
        0.5
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty sequences, got {len(a)} and {len(b)} values")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"diff": mean, "se": se, "n": n, "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)}


# ------------------------------------------------------------------ report
def primary_metric(metrics: Mapping[str, float], higher_is_better: Mapping[str, bool] | None = None, prefer: str | None = None) -> str | None:
    """The metric a task is shown with: `prefer`, else acc, exact_match, acc_norm, f1, else the first higher-is-better one."""
    hib = higher_is_better or {}
    for name in ([prefer] if prefer else []) + ["acc", "exact_match", "acc_norm", "f1"]:
        if name in metrics:
            return name
    for name in metrics:
        if hib.get(name, True):
            return name
    return next(iter(metrics), None)


@dataclass
class ReportRow:
    """One row of the table.

    Attributes:
        key, method, budget, layer, params: the variant (params: non-embedding).
        scores: task -> shown value (fractions as percentages).
        average: mean of the higher-is-better shown values (None without tasks).
        drop: average minus the full model's average (points; 0 for the full model).
        distill: {"kl", "agreement", "ppl", ...} on the text set, when given.
        speedup: measured speed-up from `balcony bench`, when given.
        ideal_speedup: compute of the full model / compute of this row (layers, exit, norm and LM head).
        metrics: task -> every metric the harness reported (unscaled).
        paired: task -> metric -> `paired_difference` of this row against plain early exit at
            the same layer over the same documents ("diff"/"se" in points where the column is a
            percentage), plus "against": that row's key. Empty for the full model and early exit.
    """

    key: str
    method: str
    budget: str
    layer: int
    params: int
    scores: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    drop: float | None = None
    distill: dict[str, float] | None = None
    speedup: float | None = None
    ideal_speedup: float = 1.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    paired: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class EvalReport:
    """The evaluation table and what it was made from.

    Attributes:
        rows: Full model first, then each method's budgets by depth.
        tasks: Task column names (harness task names).
        shown: task -> the metric shown in its column.
        percent: task -> whether the column is a fraction shown in percent.
        meta: Model, exits, limit, timings, ...
    """

    rows: list[ReportRow]
    tasks: list[str]
    shown: dict[str, str]
    percent: dict[str, bool]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, key: str) -> ReportRow:
        """The row of variant `key` (``"full"``, ``"balcony/S"``, ...)."""
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"no row {key!r}: rows are {', '.join(r.key for r in self.rows)}")

    # ---------------------------------------------------------------- tables
    def columns(self) -> list[str]:
        cols = ["method", "budget", "layer", "params", "ideal x"]
        if any(r.speedup is not None for r in self.rows):
            cols.append("speed-up")
        cols += [_task_label(t, self.shown[t], self.percent[t]) for t in self.tasks]
        if self.tasks:
            cols += ["avg", "drop vs full"]
        if any(r.distill for r in self.rows):
            cols += ["KL(full||exit)", "top-1 agree %", "ppl"]
        return cols

    def records(self) -> list[list[str]]:
        """The table's cells as strings, one list per row."""
        has_speed = any(r.speedup is not None for r in self.rows)
        has_distill = any(r.distill for r in self.rows)
        out = []
        for r in self.rows:
            cells = [r.method, r.budget, str(r.layer), _fmt_params(r.params), f"{r.ideal_speedup:.2f}"]
            if has_speed:
                cells.append("" if r.speedup is None else f"{r.speedup:.2f}")
            cells += [_fmt(r.scores.get(t)) for t in self.tasks]
            if self.tasks:
                cells += [_fmt(r.average), "" if r.drop is None else f"{r.drop:+.2f}"]
            if has_distill:
                d = r.distill or {}
                cells += [_fmt(d.get("kl"), 4), _fmt(None if "agreement" not in d else 100 * d["agreement"]), _fmt(d.get("ppl"))]
            out.append(cells)
        return out

    def to_text(self) -> str:
        """An aligned plain-text table."""
        cols, rows = self.columns(), self.records()
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows] + self.paired_lines())

    def paired_lines(self) -> list[str]:
        """Each row against plain early exit at its layer, item by item: difference +- standard error."""
        lines = []
        for r in self.rows:
            for t, by_metric in r.paired.items():
                for name, p in by_metric.items():
                    label = _task_label(t, name, self.percent.get(t, False))
                    lines.append(f"  {r.key:<14} {label:<22} {p['diff']:+.2f} +- {p['se']:.2f}  "
                                 f"({p['wins']} items won, {p['losses']} lost of {p['n']})")
        if lines:
            against = "paired: each row minus plain early exit at the same layer, on the same items (diff +- standard error)"
            lines = ["", against] + lines
        return lines

    def to_markdown(self) -> str:
        """A GitHub Markdown table."""
        esc = lambda cells: [c.replace("|", "\\|") for c in cells]
        cols, rows = esc(self.columns()), [esc(r) for r in self.records()]
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)

    def to_csv(self) -> str:
        """CSV with numbers at full precision (no formatting)."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        distill_keys = ["kl", "agreement", "ppl"] if any(r.distill for r in self.rows) else []
        writer.writerow(
            ["method", "budget", "layer", "params", "ideal_speedup", "speedup"] + self.tasks + (["average", "drop"] if self.tasks else []) + distill_keys
        )
        for r in self.rows:
            writer.writerow(
                [r.method, r.budget, r.layer, r.params, f"{r.ideal_speedup:.6g}", "" if r.speedup is None else r.speedup]
                + [r.scores.get(t, "") for t in self.tasks]
                + ([("" if r.average is None else r.average), ("" if r.drop is None else r.drop)] if self.tasks else [])
                + [(r.distill or {}).get(k, "") for k in distill_keys]
            )
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-friendly."""
        return {
            "tasks": self.tasks,
            "shown_metric": self.shown,
            "percent": self.percent,
            "rows": [r.__dict__ for r in self.rows],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalReport":
        """The inverse of `to_dict`."""
        return cls(
            rows=[ReportRow(**r) for r in data["rows"]],
            tasks=list(data["tasks"]),
            shown=dict(data["shown_metric"]),
            percent=dict(data["percent"]),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalReport":
        """Read a results.json written by `write` (e.g. to re-plot with a bench JSON)."""
        p = Path(path)
        if p.is_dir():
            p = p / RESULT_FILES["json"]
        if not p.is_file():
            raise FileNotFoundError(f"no evaluation results at {str(p)!r}")
        return cls.from_dict(json.loads(p.read_text()))

    def write(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write results.json, results.csv, results.md and results.txt into `output_dir`."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {kind: out / name for kind, name in RESULT_FILES.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        paths["csv"].write_text(self.to_csv())
        paths["markdown"].write_text(self.to_markdown() + "\n")
        paths["text"].write_text(self.to_text() + "\n")
        return paths


RESULT_FILES = {"json": "results.json", "csv": "results.csv", "markdown": "results.md", "text": "results.txt"}


def _task_label(task: str, metric: str, percent: bool) -> str:
    from .tasks import OFFLINE_TASKS, offline_key

    key = offline_key(task)
    name = key if key and OFFLINE_TASKS[key].task == task else task
    return f"{name} {metric}" + (" %" if percent else "")


def _fmt_params(n: int) -> str:
    """134515008 -> "134.5M", 25344 -> "25.3K"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if abs(x) >= 1e5:  # an untrained exit's perplexity
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def make_report(
    variants: Sequence[Variant],
    task_results: TaskResults | None = None,
    distill: Mapping[str, Mapping[str, float]] | None = None,
    *,
    bench: Sequence[Any] | None = None,
    metric: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Assemble the table: per-task shown metric, average, drop vs the full model, distillation, speed-ups.

    Args:
        variants: The rows, from `build_variants`.
        task_results: From `evaluate_tasks`.
        distill: From `distillation_metrics`.
        bench: Points from `balcony.plots.read_bench` (measured speed-ups).
        metric: Preferred metric per task column (default acc, then exact_match, ...).
        meta: Extra information for the JSON.
    """
    from .plots import match_speedup

    tasks = list(task_results.scores[variants[0].key]) if task_results and task_results.scores else []
    if task_results and any(t in tasks for t in task_results.requested):
        tasks = [t for t in task_results.requested if t in tasks]  # a group's row, not its subtasks
    shown, percent = {}, {}
    for t in tasks:
        hib = task_results.higher_is_better.get(t, {})
        shown[t] = primary_metric(task_results.scores[variants[0].key][t], hib, metric)
        values = [task_results.scores[v.key][t].get(shown[t]) for v in variants]
        percent[t] = hib.get(shown[t], True) and all(x is None or 0.0 <= x <= 1.0 for x in values)
    tasks = [t for t in tasks if shown[t] is not None]
    full_params = next(v.params for v in variants if v.full)
    rows = []
    for v in variants:
        scores = {}
        for t in tasks:
            x = task_results.scores[v.key][t].get(shown[t])
            if x is not None:
                scores[t] = 100 * x if percent[t] else x
        averaged = [scores[t] for t in tasks if t in scores and task_results.higher_is_better.get(t, {}).get(shown[t], True)]
        rows.append(
            ReportRow(
                key=v.key,
                method=v.method,
                budget=v.budget,
                layer=v.layer,
                params=v.params,
                scores=scores,
                average=sum(averaged) / len(averaged) if averaged else None,
                distill=dict(distill[v.key]) if distill and v.key in distill else None,
                speedup=1.0 if v.full and bench else (match_speedup(bench, v.method, v.budget, v.layer) if bench else None),
                # compute per token: layers + exit + norm + the LM head (as `balcony bench` counts it)
                ideal_speedup=(full_params + v.model.parts.lm_head.weight.numel()) / (v.params + v.model.parts.lm_head.weight.numel()),
                metrics=task_results.scores[v.key] if task_results else {},
            )
        )
    full_avg = rows[0].average if rows and variants[0].full else None
    for r in rows:
        r.drop = None if r.average is None or full_avg is None else r.average - full_avg
    if task_results and task_results.items:
        twins = {v.layer: v.key for v in variants if v.method == EARLY_EXIT}
        for r in rows:
            twin = twins.get(r.layer)
            if r.method in (FULL, EARLY_EXIT) or twin is None:
                continue
            mine, theirs = task_results.items.get(r.key, {}), task_results.items.get(twin, {})
            for t in tasks:
                for name in sorted(set(mine.get(t, {})) & set(theirs.get(t, {}))):
                    a, b = mine[t][name], theirs[t][name]
                    if len(a) != len(b):
                        continue
                    p = paired_difference(a, b)
                    if percent[t]:
                        p["diff"], p["se"] = 100 * p["diff"], 100 * p["se"]
                    r.paired.setdefault(t, {})[name] = {**p, "against": twin}
    order = {m: i for i, m in enumerate(dict.fromkeys(v.method for v in variants))}
    rows.sort(key=lambda r: (r.key != FULL, order[r.method], r.layer))
    return EvalReport(rows=rows, tasks=tasks, shown=shown, percent=percent, meta=dict(meta or {}))


# --------------------------------------------------------------- pipeline
def _split_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p).strip() for p in value if str(p).strip()]


def parse_baselines(spec: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``"name=dir,name2=dir2"`` (or a list of ``name=dir``) -> {name: dir}.

    Raises:
        ValueError: an item is not ``name=dir``, or a name repeats.
        FileNotFoundError: a directory does not exist.
    """
    if not spec:
        return {}
    items = list(spec.items()) if isinstance(spec, Mapping) else [tuple(p.split("=", 1)) if "=" in p else (p, None) for p in _split_list(spec)]
    out: dict[str, str] = {}
    for name, path in items:
        if path is None or not str(name).strip() or not str(path).strip():
            raise ValueError(f"baseline {name!r} is not NAME=DIR (e.g. --baseline sorted=runs/sorted-exits)")
        name = str(name).strip()
        if name in out:
            raise ValueError(f"baseline name {name!r} is given twice")
        if not Path(str(path)).expanduser().is_dir() and str(path).count("/") != 1:
            raise FileNotFoundError(f"baseline {name!r}: exits directory {str(path)!r} does not exist")
        out[name] = str(Path(str(path)).expanduser()) if Path(str(path)).expanduser().is_dir() else str(path)
    return out


def _plan_tasks(tasks: str | Sequence[str] | None, task_data: Mapping[str, Path]) -> list[str]:
    """Task names for the harness: offline aliases become balcony_* when their data is given."""
    from .tasks import OFFLINE_TASKS, offline_key

    names = _split_list(tasks)
    if not names:
        return [OFFLINE_TASKS[k].task for k in OFFLINE_TASKS if k in task_data]
    out = []
    for name in names:
        key = offline_key(name)
        if key and key in task_data:
            out.append(OFFLINE_TASKS[key].task)
        elif key and name.lower() == OFFLINE_TASKS[key].task:
            raise ValueError(f"task {name!r} reads local data: give it with --task-data {key}=PATH")
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def run_evaluation(
    *,
    model: str | None = None,
    exits: str | None = None,
    tasks: str | Sequence[str] | None = None,
    task_data: str | Mapping[str, str] | None = None,
    include_path: str | Sequence[str] | None = None,
    text: str | Sequence[str] | None = None,
    baselines: str | Mapping[str, str] | None = None,
    early_exit: bool = True,
    budgets: str | Sequence[str | int] | None = None,
    exit_layers: Sequence[int] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "shared",
    metric: str | None = None,
    seq_len: int = 512,
    text_tokens: int = 8192,
    output: str | os.PathLike | None = None,
    bench_json: str | os.PathLike | None = None,
    plot: bool = True,
    dtype: str = "float32",
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> EvalReport:
    """Score every budget (and the baselines) on tasks and a text set; write the table and plots.

    Inputs are all checked (task names, data files, baselines, bench JSON, text)
    before the model is loaded. See `evaluate_command` for the arguments.

    Returns:
        The `EvalReport` (also written into `output` when given).
    """
    from .tasks import parse_task_data, prepare_tasks, task_data_from_env

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (items per task)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    data = parse_task_data(task_data) if task_data else task_data_from_env()
    task_names = _plan_tasks(tasks, data)
    if not task_names and not text:
        raise ValueError("nothing to evaluate: give --tasks / --task-data and/or --text")
    baseline_dirs = parse_baselines(baselines)
    out_dir = Path(output) if output else None
    include = _split_list(include_path)
    for p in include:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"include path {p!r} is not a directory")
    tmp = None
    if data and any(n.startswith("balcony_") for n in task_names):
        task_dir = out_dir / "tasks" if out_dir else Path(tmp := tempfile.mkdtemp(prefix="balcony-tasks-"))
        include.insert(0, str(prepare_tasks(data, task_dir)))
    manager = resolve_tasks(task_names, include) if task_names else None
    bench = None
    if bench_json:
        from .plots import read_bench

        bench = read_bench(bench_json)
    passages = load_texts(text) if text else None

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m, tok, trained = load_balcony(model, exits, exit_layers=exit_layers, dtype=dtype, device=device)
    for w in caught:
        if log:
            log(f"[eval] warning: {w.message}")
    variants = build_variants(m, early_exit=early_exit, baselines=baseline_dirs, budgets=_split_list(budgets) if isinstance(budgets, str) else budgets)
    if log:
        log(f"[eval] {len(variants)} variants: {', '.join(v.key for v in variants)} (model loaded in {time.perf_counter() - t0:.1f} s)")
    meta: dict[str, Any] = {
        "model": m.config.base_model_name_or_path,
        "exits": exits,
        "trained_exits": trained,
        "baselines": baseline_dirs,
        "tasks": task_names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "engine": engine,
        "batch_size": batch_size,
        "text": str(text) if isinstance(text, (str, os.PathLike)) else None if text is None else f"{len(passages)} passages",
        "seq_len": seq_len,
        "text_tokens": text_tokens,
        "bench_json": None if bench_json is None else str(bench_json),
    }
    task_results = None
    if task_names:
        t1 = time.perf_counter()
        task_results = evaluate_tasks(
            variants, tok, task_names, task_manager=manager, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, engine=engine, log=log
        )
        meta["task_seconds"] = time.perf_counter() - t1
        meta["task_samples"] = task_results.samples
    distill = None
    if passages:
        t1 = time.perf_counter()
        distill = distillation_metrics(variants, tok, passages, seq_len=seq_len, max_tokens=text_tokens, batch_size=batch_size, progress=log is not None)
        meta["distill_seconds"] = time.perf_counter() - t1
        meta["distill_tokens"] = distill[FULL]["tokens"]
    report = make_report(variants, task_results, distill, bench=bench, metric=metric, meta=meta)
    if out_dir:
        plots = {}
        if plot:
            from .plots import plot_report

            plots = plot_report(report, out_dir, bench=bench)
        report.meta["files"] = {**{k: str(out_dir / name) for k, name in RESULT_FILES.items()}, **{k: str(p) for k, p in plots.items()}}
        report.write(out_dir)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return report


def evaluate_command(
    tasks: str | None = None,
    task_data: str | None = None,
    include_path: str | None = None,
    text: str | None = None,
    model: str | None = None,
    exits: str | None = None,
    baseline: list[str] | None = None,
    early_exit: bool = True,
    budgets: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "shared",
    metric: str | None = None,
    seq_len: int = 512,
    text_tokens: int = 8192,
    output: str = "outputs/eval",
    bench_json: str | None = None,
    plot: bool = True,
    dtype: str = "float32",
    device: str | None = None,
) -> int:
    """Score every budget on tasks and a text set; print and write a Table-1 style table and plots.

    Rows: the full model, each budget (with its non-embedding parameters), plain early exit at
    the same layers and every --baseline; columns: tasks, their average, the drop against the
    full model, and KL / top-1 agreement / perplexity on --text. Writes results.{txt,md,csv,json}
    and accuracy_vs_speedup.png / accuracy_vs_params.png into --output.

    Args:
        tasks: Comma-separated lm-eval task names (downloaded by the harness) or piqa, arc_easy, lambada for the offline copies given by --task-data (default: every task with --task-data).
        task_data: Local data for the offline tasks: piqa=PATH,arc_easy=PATH,lambada=PATH[,piqa-labels=PATH] (default: $BALCONY_TASK_DATA).
        include_path: Extra lm-eval task YAML folders, comma-separated.
        text: Text set for the distillation metrics: a .txt (passages split by blank lines) or .jsonl ("text" field) file.
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Trained exits directory (or hub id); without it, fresh untrained exits are scored (with a warning).
        baseline: Other exits to compare, as NAME=DIR (repeatable, or comma-separated; same base model).
        early_exit: Include plain early exit (final norm + head) at the same layers.
        budgets: Only these budgets of --exits (names or layers, comma-separated); the full model is always scored.
        limit: Items per task (None: all).
        batch_size: Sequences per forward pass.
        num_fewshot: Few-shot examples per task (default: each task's own).
        engine: shared (one forward feeds every budget) or harness (the harness's own loop, once per budget).
        metric: Metric shown per task (default: acc, else exact_match, acc_norm, f1).
        seq_len: Tokens per window for the distillation metrics.
        text_tokens: Tokens of --text to score in all.
        output: Folder for the table, JSON/CSV/Markdown and plots.
        bench_json: `balcony bench` JSON with measured speed-ups ({"budgets": [{"budget": "S", "speedup": 1.9}, ...]}).
        plot: Write the PNG plots.
        dtype: Weights dtype (float32, bfloat16, ...).
        device: cpu or cuda (default: CUDA when available).
    """
    report = run_evaluation(
        model=model,
        exits=exits,
        tasks=tasks,
        task_data=task_data,
        include_path=include_path,
        text=text,
        baselines=",".join(baseline) if baseline else None,
        early_exit=early_exit,
        budgets=budgets,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        engine=engine,
        metric=metric,
        seq_len=seq_len,
        text_tokens=text_tokens,
        output=output,
        bench_json=bench_json,
        plot=plot,
        dtype=dtype,
        device=pick_device(device),
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(report.to_text())
    if not report.meta.get("trained_exits"):
        print("(exits untrained: pass --exits DIR for trained ones)")
    files = report.meta.get("files", {})
    if files:
        print(f"wrote {', '.join(sorted(files.values()))}")
    return 0


# Registered by hand: the command is `balcony eval`, and `eval` is a Python builtin.
COMMANDS["eval"] = evaluate_command
