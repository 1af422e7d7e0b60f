"""Offline lm-eval tasks: PIQA, ARC-Easy and LAMBADA read from local JSONL files.

The YAMLs in this folder are templates: their ``data_files`` path is a placeholder
(``${BALCONY_PIQA_DATA}`` ...). `prepare_tasks` writes a ready-to-use copy with the
real paths into a folder that lm-eval takes as ``--include_path``:

    python -m balcony.eval.tasks piqa=/data/piqa/valid.jsonl arc_easy=/data/ARC-Easy-Test.jsonl \\
        lambada=/data/lambada_dev.jsonl --out my-tasks
    python -m balcony.eval.lm_eval_model --model balcony --include_path my-tasks \\
        --tasks balcony_piqa,balcony_arc_easy,balcony_lambada --model_args budget=S

`balcony eval --task-data piqa=PATH,...` does the same into its output folder. The
paths can also come from the environment: ``BALCONY_TASK_DATA="piqa=PATH,..."`` or
one variable per task (``BALCONY_PIQA_DATA``, ``BALCONY_ARC_EASY_DATA``,
``BALCONY_LAMBADA_DATA``).

Expected files:
    piqa: JSONL with goal / sol1 / sol2, plus either a ``label`` field or a labels
        file with one 0/1 per line (``<stem>-labels.lst`` next to the data, e.g.
        ``valid-labels.lst``, is found by itself; else give ``piqa-labels=PATH``).
    arc_easy: JSONL in the ARC-V1 schema (question.stem, question.choices[{text, label}], answerKey).
    lambada: the OpenAI LAMBADA JSONL (one ``{"text": ...}`` per line).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

TEMPLATE_DIR = Path(__file__).resolve().parent
TASK_DATA_ENV = "BALCONY_TASK_DATA"


@dataclass(frozen=True)
class OfflineTask:
    """One shipped task template.

    Attributes:
        key: Short name used in ``--task-data`` (``piqa``).
        task: The lm-eval task name (``balcony_piqa``).
        env: Environment variable that may hold the data path (also the YAML placeholder).
        fields: Top-level JSON fields every record must have.
    """

    key: str
    task: str
    env: str
    fields: tuple[str, ...]

    @property
    def yaml_name(self) -> str:
        return f"{self.task}.yaml"

    @property
    def placeholder(self) -> str:
        return "${" + self.env + "}"


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.key: t
    for t in (
        OfflineTask("piqa", "balcony_piqa", "BALCONY_PIQA_DATA", ("goal", "sol1", "sol2")),
        OfflineTask("arc_easy", "balcony_arc_easy", "BALCONY_ARC_EASY_DATA", ("question", "answerKey")),
        OfflineTask("lambada", "balcony_lambada", "BALCONY_LAMBADA_DATA", ("text",)),
    )
}
_ALIASES = {
    "piqa": "piqa",
    "balcony_piqa": "piqa",
    "arc_easy": "arc_easy",
    "arc-easy": "arc_easy",
    "arc": "arc_easy",
    "balcony_arc_easy": "arc_easy",
    "lambada": "lambada",
    "lambada_openai": "lambada",
    "balcony_lambada": "lambada",
}
PIQA_LABELS_KEYS = ("piqa-labels", "piqa_labels")


def offline_key(name: str) -> str | None:
    """The offline task key for a name or alias (``"balcony_piqa"`` -> ``"piqa"``), else None."""
    return _ALIASES.get(name.strip().lower())


def parse_task_data(spec: str | Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    """Parse ``"piqa=PATH,arc_easy=PATH,lambada=PATH"`` (or a mapping) into key -> existing file.

    Args:
        spec: Comma-separated ``name=path`` items; names are ``piqa``, ``arc_easy``,
            ``lambada`` (or their task names / aliases) and ``piqa-labels``.

    Raises:
        ValueError: an item is not ``name=path`` or names an unknown task.
        FileNotFoundError: a path does not exist; the message names it.
    """
    if not spec:
        return {}
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"task data item {part.strip()!r} is not NAME=PATH (e.g. piqa=/data/piqa/valid.jsonl)")
            name, _, path = part.partition("=")
            items.append((name.strip(), path.strip()))
    else:
        items = [(str(k), os.fspath(v)) for k, v in spec.items()]
    out: dict[str, Path] = {}
    for name, path in items:
        key = "piqa-labels" if name.lower() in PIQA_LABELS_KEYS else offline_key(name)
        if key is None:
            raise ValueError(
                f"unknown offline task {name!r} in the task data: known are "
                f"{', '.join(OFFLINE_TASKS)} (and piqa-labels for a separate PIQA labels file)"
            )
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data file for {name!r} does not exist: {str(p)!r}")
        out[key] = p.resolve()
    return out


def task_data_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Task data named by ``BALCONY_TASK_DATA`` and the per-task variables (``BALCONY_PIQA_DATA``, ...)."""
    env = os.environ if environ is None else environ
    data = parse_task_data(env.get(TASK_DATA_ENV))
    for key, task in OFFLINE_TASKS.items():
        if key not in data and env.get(task.env):
            data.update(parse_task_data({key: env[task.env]}))
    return data


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {n} is not JSON: {e}") from e
    if not records:
        raise ValueError(f"{str(path)!r} holds no records")
    return records


def _check_fields(task: OfflineTask, path: Path, record: dict) -> None:
    missing = [f for f in task.fields if f not in record]
    if missing:
        raise ValueError(
            f"{str(path)!r} does not look like {task.key} data: its first record lacks "
            f"{', '.join(missing)} (has {', '.join(sorted(record)) or 'nothing'})"
        )


def _piqa_with_labels(data: Path, labels: Path | None, out_dir: Path) -> Path:
    """The PIQA file to read: `data` itself when it has labels, else a copy with the labels merged in."""
    records = _read_jsonl(data)
    _check_fields(OFFLINE_TASKS["piqa"], data, records[0])
    if labels is None:
        if all("label" in r for r in records):
            return data
        sibling = data.with_name(f"{data.stem}-labels.lst")
        if not sibling.is_file():
            raise FileNotFoundError(
                f"PIQA data {str(data)!r} has no 'label' field and there is no labels file {str(sibling)!r}: "
                "give one with piqa-labels=PATH"
            )
        labels = sibling
    values = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(values) != len(records):
        raise ValueError(f"PIQA labels {str(labels)!r} has {len(values)} lines but {str(data)!r} has {len(records)} records")
    bad = [v for v in values if v not in ("0", "1")]
    if bad:
        raise ValueError(f"PIQA labels {str(labels)!r} holds {bad[0]!r}; labels are 0 or 1")
    out = out_dir / "data" / "piqa.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record, label in zip(records, values):
            f.write(json.dumps({**record, "label": int(label)}, ensure_ascii=False) + "\n")
    return out


def prepare_tasks(task_data: Mapping[str, str | os.PathLike] | str, out_dir: str | os.PathLike) -> Path:
    """Write the offline task YAMLs, pointed at `task_data`, into `out_dir` (an lm-eval include path).

    Only the tasks given data are written. A PIQA file without labels gets them
    merged from its labels file into ``out_dir/data/piqa.jsonl``.

    Args:
        task_data: ``{"piqa": path, "arc_easy": path, "lambada": path, "piqa-labels": path}``
            (any subset) or the same as a ``"name=path,..."`` string.
        out_dir: Folder to write (created; files in it are overwritten).

    Returns:
        `out_dir`, to pass as ``include_path``.

    Raises:
        ValueError: no task has data, or a file does not have the task's format.
        FileNotFoundError: a data or labels file is missing.

    Example:
        >>> prepare_tasks({"lambada": "lambada_dev.jsonl"}, "my-tasks")  # doctest: +SKIP
        PosixPath('my-tasks')
    """
    data = parse_task_data(task_data)
    tasks = {k: v for k, v in data.items() if k in OFFLINE_TASKS}
    if not tasks:
        raise ValueError(f"no task data given: name at least one of {', '.join(OFFLINE_TASKS)} (e.g. piqa=/data/piqa/valid.jsonl)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATE_DIR / "utils.py", out / "utils.py")
    for key, path in tasks.items():
        task = OFFLINE_TASKS[key]
        if key == "piqa":
            path = _piqa_with_labels(path, data.get("piqa-labels"), out)
        else:
            _check_fields(task, path, _read_jsonl_head(path))
        text = (TEMPLATE_DIR / task.yaml_name).read_text(encoding="utf-8")
        if task.placeholder not in text:
            raise RuntimeError(f"template {task.yaml_name} lost its placeholder {task.placeholder}")
        (out / task.yaml_name).write_text(text.replace(task.placeholder, json.dumps(str(path))), encoding="utf-8")
    return out


def _read_jsonl_head(path: Path) -> dict:
    """The first record of a JSONL file (without reading the rest)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{str(path)!r} is not JSONL: its first line does not parse ({e})") from e
    raise ValueError(f"{str(path)!r} holds no records")


def main(argv: list[str] | None = None) -> int:
    """``python -m balcony.eval.tasks NAME=PATH ... --out DIR``: write a ready include path for lm-eval."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m balcony.eval.tasks",
        description="Write balcony's offline lm-eval tasks (PIQA, ARC-Easy, LAMBADA from local JSONL) into an include path.",
    )
    parser.add_argument("data", nargs="*", help="NAME=PATH items: piqa, arc_easy, lambada, piqa-labels (default: from $BALCONY_TASK_DATA / $BALCONY_*_DATA)")
    parser.add_argument("--out", required=True, help="folder to write (pass it to lm-eval as --include_path)")
    args = parser.parse_args(argv)
    try:
        data = parse_task_data(",".join(args.data)) if args.data else task_data_from_env()
        out = prepare_tasks(data, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ",".join(OFFLINE_TASKS[k].task for k in data if k in OFFLINE_TASKS)
    print(f"wrote {out}: run lm-eval with --include_path {out} --tasks {names}")
    return 0
