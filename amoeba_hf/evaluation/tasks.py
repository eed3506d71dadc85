"""Evaluation sets as plain items: raw text for perplexity, `context + choices + label` for multiple choice.

Prompts follow lm-evaluation-harness (v0.4) so that numbers are comparable with it: the scored continuation is
`" " + choice`, ARC/PIQA use "Question: ...\\nAnswer:", HellaSwag is cleaned with the harness's `preprocess`, and
MMLU uses its description, "A. .. D." layout and first-n dev exemplars. Files are read with `json`/`csv` line by
line so that a malformed record is reported with its file and line number.
"""

import csv
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..training.data import load_documents

TARGET_DELIMITER = " "
MMLU_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: the model scores `context + TARGET_DELIMITER + choice` for every choice."""

    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class PerplexityTask:
    """Text scored by perplexity: one text (WikiText-2's file), or documents tokenised one by one, joined with EOS."""

    name: str
    text: str | tuple[str, ...]


@dataclass(frozen=True)
class ChoiceTask:
    """Multiple choice scored by accuracy; `subjects` (MMLU) makes the headline accuracy a macro average."""

    name: str
    items: tuple[ChoiceItem, ...] = ()
    subjects: dict[str, tuple[ChoiceItem, ...]] | None = None
    report_acc_norm: bool = True


Task = PerplexityTask | ChoiceTask


def seeded_subset(items: list, limit: int | None, seed: int) -> list:
    """`limit` items drawn with `random.Random(seed)`, kept in file order (all items when `limit` is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def _require(path: Path, task: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{task}: {path} does not exist (check --data-dir)")
    return path


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-empty line; a line that is not a JSON object is a one-line error."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _field(record: dict, key: str, path: Path, number: int):
    if key not in record:
        raise ValueError(f"{path}:{number}: missing field {key!r} (fields: {', '.join(record)})")
    return record[key]


def _checked_item(context: str, choices: list, label, path: Path, number: int) -> ChoiceItem:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{path}:{number}: choices must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{path}:{number}: label must be an int in 0..{len(choices) - 1}, got {label!r}")
    return ChoiceItem(context, tuple(choices), label)


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: drop WikiHow "[title]"/"[step]" artefacts and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[ChoiceItem]:
    """`{ctx, endings[4], label}` lines; the context already holds "activity label: ctx_a ctx_b"."""
    items = []
    for number, record in _json_lines(path):
        endings = _field(record, "endings", path, number)
        label = _field(record, "label", path, number)
        label = int(label) if isinstance(label, str) and label.isdigit() else label
        context = hellaswag_preprocess(_field(record, "ctx", path, number))
        items.append(_checked_item(context, [hellaswag_preprocess(e) for e in endings], label, path, number))
    return items


def read_arc(path: Path) -> list[ChoiceItem]:
    """ARC `{question, choices{text,label}, answerKey}` lines (3-5 choices; letter or digit keys)."""
    items = []
    for number, record in _json_lines(path):
        choices = _field(record, "choices", path, number)
        if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
            raise ValueError(f"{path}:{number}: choices must be an object with 'text' and 'label' lists")
        answer = _field(record, "answerKey", path, number)
        if answer not in choices["label"]:
            raise ValueError(f"{path}:{number}: answerKey {answer!r} is not one of {choices['label']}")
        context = f"Question: {_field(record, 'question', path, number)}\nAnswer:"
        items.append(_checked_item(context, choices["text"], choices["label"].index(answer), path, number))
    return items


def read_piqa(path: Path, labels_path: Path) -> list[ChoiceItem]:
    """PIQA `{goal, sol1, sol2}` lines with the 0/1 answers in a separate, line-aligned file."""
    records = _json_lines(path)
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise ValueError(f"{labels_path} has {len(labels)} labels but {path} has {len(records)} questions")
    items = []
    for (number, record), label in zip(records, labels):
        if label not in ("0", "1"):
            raise ValueError(f"{labels_path}: label for {path}:{number} must be 0 or 1, got {label!r}")
        choices = [_field(record, "sol1", path, number), _field(record, "sol2", path, number)]
        context = f"Question: {_field(record, 'goal', path, number)}\nAnswer:"
        items.append(_checked_item(context, choices, int(label), path, number))
    return items


def read_choice_jsonl(path: Path) -> list[ChoiceItem]:
    """The generic user format: `{"context": str, "choices": [str, ...], "label": int}` per line."""
    items = []
    for number, record in _json_lines(path):
        context = _field(record, "context", path, number)
        if not isinstance(context, str) or not context:
            raise ValueError(f"{path}:{number}: context must be a non-empty string")
        items.append(_checked_item(context, _field(record, "choices", path, number),
                                   _field(record, "label", path, number), path, number))
    return items


@dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def read_mmlu_csv(path: Path) -> list[MMLUQuestion]:
    """MMLU CSV with header `question,choice0..3,answer` and answers 0-3."""
    expected = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != expected:
            raise ValueError(f"{path}: header must be {','.join(expected)}, got {header}")
        questions = []
        for row in reader:
            if len(row) != 6 or row[5] not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}:{reader.line_num}: expected 6 columns ending in an answer 0-3, got {row}")
            questions.append(MMLUQuestion(row[0], tuple(row[1:5]), int(row[5])))
    return questions


def mmlu_question_prompt(question: MMLUQuestion) -> str:
    lines = [question.question.strip()] + [f"{letter}. {c}" for letter, c in zip(MMLU_LETTERS, question.choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_context(subject: str, question: MMLUQuestion, exemplars: list[MMLUQuestion]) -> str:
    """Description, then each exemplar with its answer letter, blank-line separated, then the question."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    shots = "".join(
        f"{mmlu_question_prompt(e)}{TARGET_DELIMITER}{MMLU_LETTERS[e.answer]}\n\n" for e in exemplars
    )
    return description + shots + mmlu_question_prompt(question)


def mmlu_subjects(data_dir: Path) -> list[str]:
    test_dir = data_dir / "mmlu" / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"mmlu: {test_dir} does not exist (check --data-dir)")
    subjects = sorted(p.name.removesuffix("_test.csv") for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise FileNotFoundError(f"mmlu: {test_dir} holds no *_test.csv files")
    return subjects


def load_mmlu(data_dir: Path, num_fewshot: int, limit: int | None, seed: int) -> ChoiceTask:
    """Every subject's test questions (a seeded subset of `limit` per subject) with the first `num_fewshot` dev ones."""
    if not 0 <= num_fewshot <= 5:
        raise ValueError(f"MMLU has 5 dev exemplars per subject; num_fewshot must be in 0..5, got {num_fewshot}")
    subjects = {}
    for subject in mmlu_subjects(data_dir):
        questions = read_mmlu_csv(_require(data_dir / "mmlu" / "test" / f"{subject}_test.csv", "mmlu"))
        exemplars = read_mmlu_csv(_require(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv", "mmlu"))[:num_fewshot]
        subjects[subject] = tuple(
            ChoiceItem(mmlu_context(subject, q, exemplars), MMLU_LETTERS, q.answer)
            for q in seeded_subset(questions, limit, seed)
        )
    return ChoiceTask(f"mmlu_{num_fewshot}shot", subjects=subjects, report_acc_norm=False)


CHOICE_READERS: dict[str, tuple[tuple[str, ...], Callable[..., list[ChoiceItem]]]] = {
    "hellaswag": (("hellaswag/hellaswag_val.jsonl",), read_hellaswag),
    "arc_easy": (("arc_easy/test.jsonl",), read_arc),
    "piqa": (("piqa/valid.jsonl", "piqa/valid-labels.lst"), read_piqa),
}
WIKITEXT2_FILE = "wikitext2/wiki.test.raw"
MMLU_TASK = re.compile(r"mmlu(?:_([0-5])shot)?")
TASK_NAMES = ("wikitext2", *CHOICE_READERS, "mmlu", "mmlu_0shot", "mmlu_5shot")


def task_label(name: str) -> str:
    """The key a task's results are stored under: `mmlu` is `mmlu_5shot`, a JSONL file is its stem."""
    if name == "mmlu":
        return "mmlu_5shot"
    return Path(name).stem if name.endswith(".jsonl") else name


def load_task(
    name: str, data_dir: str | Path, *, limit: int | None = None, mmlu_limit: int | None = None, seed: int = 1234
) -> Task:
    """A built-in task read from `data_dir`, or a `.jsonl` file of `{context, choices, label}` (path as given,
    else relative to `data_dir`). `limit` subsets multiple-choice tasks, `mmlu_limit` each MMLU subject.

    `mmlu` is 5-shot; `mmlu_Kshot` uses the first K (0-5) dev questions of each subject as exemplars. A Hub dataset
    `name[:config]@split` (the split is required, to never evaluate on training data by default) is a perplexity
    task on its text field, a document per record.
    """
    data_dir = Path(data_dir)
    if name == "wikitext2":
        return PerplexityTask(name, _require(data_dir / WIKITEXT2_FILE, name).read_text(encoding="utf-8"))
    if match := MMLU_TASK.fullmatch(name):
        return load_mmlu(data_dir, int(match.group(1) or 5), mmlu_limit, seed)
    if name in CHOICE_READERS:
        files, reader = CHOICE_READERS[name]
        items = reader(*(_require(data_dir / f, name) for f in files))
        return ChoiceTask(name, tuple(seeded_subset(items, limit, seed)))
    if name.endswith(".jsonl"):
        path = Path(name) if Path(name).is_file() else data_dir / name
        items = read_choice_jsonl(_require(path, name))
        return ChoiceTask(task_label(name), tuple(seeded_subset(items, limit, seed)))
    if "@" in name:
        return PerplexityTask(name, tuple(load_documents(name, "evaluation text")))
    raise ValueError(
        f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}, a .jsonl file of "
        '{"context", "choices", "label"} lines, or a Hub dataset name[:config]@split for perplexity'
    )


__all__ = [
    "TASK_NAMES",
    "ChoiceItem",
    "ChoiceTask",
    "PerplexityTask",
    "Task",
    "load_task",
    "mmlu_context",
    "seeded_subset",
    "task_label",
]
