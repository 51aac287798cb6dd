"""Local data files as texts or instruction records: .jsonl, .json, .txt/.raw and .parquet, with one-line errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

Kind = Literal["texts", "records"]



class DataSourceError(ValueError):
    """A data source name, path or file that cannot be used; the message is one line."""



LOCAL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".txt", ".raw", ".parquet")

INSTRUCTION_KEYS = ("instruction", "prompt", "question")

INPUT_KEYS = ("input", "context")

OUTPUT_KEYS = ("output", "response", "answer")

TEXT_KEYS = ("text",)



def read_file(path: Path, limit: int | None) -> tuple[Kind, list]:
    """Read texts or records from a .jsonl, .json, .txt, .raw or .parquet file."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataSourceError(
            f"file {path} has unsupported suffix '{path.suffix}'; allowed: {', '.join(LOCAL_SUFFIXES)}"
        )
    if suffix in (".txt", ".raw"):
        texts = [p.strip() for p in re.split(r"\n[ \t]*\n", _read_text(path))]
        texts = [t for t in texts if t]
        if not texts:
            raise DataSourceError(f"file {path} is empty")
        return "texts", texts[:limit]
    if suffix == ".jsonl":
        rows: Iterable[tuple[str, Any]] = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    else:
        rows = _parquet_rows(path)
    return _classify(path, rows, limit)



def _read_text(path: Path) -> str:
    """A file's UTF-8 text, with decode errors reported as DataSourceError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"file {path} is not UTF-8 text (byte {exc.start})") from exc



def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, object) per non-blank line, read lazily so a limit stops early on large files."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataSourceError(
                        f"invalid JSON in {path} line {number}: {exc.msg} (column {exc.colno})"
                    ) from exc
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"file {path} is not UTF-8 text (byte {exc.start})") from exc



def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, object) per element of a JSON list, or of the first top-level list in a JSON object."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataSourceError(
            f"invalid JSON in {path} line {exc.lineno}: {exc.msg} (column {exc.colno})"
        ) from exc
    if isinstance(data, dict):
        lists = [(key, value) for key, value in data.items() if isinstance(value, list)]
        if not lists:
            raise DataSourceError(
                f"file {path} holds a JSON object with no top-level list; "
                f"expected a list of objects or an object with one (keys found: {', '.join(map(str, data)) or 'none'})"
            )
        key, data = lists[0]
        prefix = f"{key}[%d]"
    elif isinstance(data, list):
        prefix = "item %d"
    else:
        raise DataSourceError(
            f"file {path} holds a JSON {type(data).__name__}; expected a list of objects or an object with a list"
        )
    for index, row in enumerate(data):
        yield prefix % index, row



def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row dict) per row of a Parquet file, read one batch at a time."""
    try:
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        index = 0
        for batch in reader.iter_batches():
            for row in batch.to_pylist():
                yield f"row {index}", row
                index += 1
    except ImportError:
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        for index, row in enumerate(ds):
            yield f"row {index}", row
    except DataSourceError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others for bad files
        raise DataSourceError(f"file {path} is not a readable Parquet file: {' '.join(str(exc).split())}") from exc



def _classify(path: Path, rows: Iterable[tuple[str, Any]], limit: int | None) -> tuple[Kind, list]:
    """Turn objects into texts or records, deciding the kind from the first object."""
    kind: Kind | None = None
    items: list = []
    for where, row in islice(rows, limit):
        if not isinstance(row, dict):
            raise DataSourceError(
                f"file {path} {where} is a JSON {type(row).__name__}; expected an object"
            )
        row_kind = _row_kind(row)
        if row_kind is None or (kind is not None and row_kind != kind):
            found = ", ".join(map(str, row)) or "none"
            raise DataSourceError(
                f"file {path} {where} has keys {found}; expected {_expected_keys(kind)}"
            )
        kind = row_kind
        if kind == "records":
            items.append(record(row))
        else:
            text = row[_first_key(row, TEXT_KEYS)]
            if not isinstance(text, str):
                raise DataSourceError(f"file {path} {where} has a non-string text ({type(text).__name__})")
            items.append(text)
    truncated = limit is not None and len(items) >= limit
    if kind is None or (kind == "texts" and not truncated and not any(text.strip() for text in items)):
        raise DataSourceError(f"file {path} is empty")
    return kind, items



def _row_kind(row: dict) -> Kind | None:
    """'records' for instruction/output objects (aliases allowed), 'texts' for text objects, else None."""
    if _first_key(row, INSTRUCTION_KEYS) and _first_key(row, OUTPUT_KEYS):
        return "records"
    if _first_key(row, TEXT_KEYS):
        return "texts"
    return None



def _expected_keys(kind: Kind | None) -> str:
    """The keys a row needs, for error messages."""
    records = "instruction/prompt/question with output/response/answer (input optional)"
    if kind == "records":
        return records
    if kind == "texts":
        return "text"
    return f"text, or {records}"



def _first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    """The first of keys present in row, if any."""
    return next((key for key in keys if key in row), None)



def record(row: dict) -> dict[str, str]:
    """An instruction record with string fields, mapping aliases and defaulting a missing input to ''."""
    input_key = _first_key(row, INPUT_KEYS)
    return {
        "instruction": as_str(row[_first_key(row, INSTRUCTION_KEYS)]),
        "input": as_str(row[input_key]) if input_key else "",
        "output": as_str(row[_first_key(row, OUTPUT_KEYS)]),
    }



def as_str(value: Any) -> str:
    """A field value as text; None becomes ''."""
    return "" if value is None else str(value)
