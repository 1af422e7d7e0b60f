"""Document processing for balcony's offline lm-eval tasks.

lm-eval loads this file by path (``process_docs: !function utils.process_arc``),
next to the task YAMLs, so it imports nothing from balcony.
"""

from __future__ import annotations


def _choice_lists(choices) -> tuple[list[str], list[str]]:
    """ARC choices as (texts, labels), whether datasets gives a list of dicts or a dict of lists."""
    if isinstance(choices, dict):
        return list(choices["text"]), [str(label) for label in choices["label"]]
    return [c["text"] for c in choices], [str(c["label"]) for c in choices]


def arc_doc(doc: dict) -> dict:
    """One ARC-V1 record -> {"id", "question", "choices", "gold"} (gold: index of the answer)."""
    question = doc["question"]
    texts, labels = _choice_lists(question["choices"])
    key = str(doc["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"ARC item {doc.get('id')!r}: answerKey {key!r} is not one of the choice labels {labels}")
    return {"id": str(doc.get("id", "")), "question": question["stem"], "choices": texts, "gold": labels.index(key)}


def process_arc(dataset):
    """Flatten ARC-V1 (question.stem, question.choices[{text, label}], answerKey) for the prompt."""
    return dataset.map(arc_doc, remove_columns=dataset.column_names)


def piqa_doc(doc: dict) -> dict:
    """Check one PIQA record and make its label an int (0: sol1, 1: sol2)."""
    label = doc.get("label")
    if label is None or str(label).strip() == "":
        raise ValueError(
            f"PIQA item {doc.get('goal')!r} has no label: give the labels file "
            "(valid-labels.lst next to the data, or --task-data piqa-labels=PATH)"
        )
    return {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(label)}


def process_piqa(dataset):
    """PIQA with integer labels."""
    return dataset.map(piqa_doc, remove_columns=dataset.column_names)
