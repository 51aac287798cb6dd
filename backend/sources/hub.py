"""Named sources from the Hugging Face hub (the exact files each is defined by), and a quick check whether the hub
answers at all, so offline machines fail fast with a clear message."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import islice
from typing import Any
from urllib.parse import urlparse

from backend.sources.files import DataSourceError, as_str, record

HUB_IDS: dict[str, str] = {
    "c4": "allenai/c4",
    "c4-validation": "allenai/c4",
    "alpaca": "tatsu-lab/alpaca",
    "unnatural": "mrm8488/unnatural-instructions-core",
    "wikitext2": "wikitext",
}

C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"

C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"

C4_VALIDATION_DOCS = 2000

HUB_PROBE_TIMEOUT_S = 1.5

_TRUE = {"1", "true", "yes", "on"}



def hub_reachable() -> bool:
    """False when offline mode is set or the hub host does not answer, without waiting long."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co")
    if not endpoint.hostname:
        return False
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    return _probe(endpoint.hostname, port)



@lru_cache(maxsize=None)
def _probe(host: str, port: int, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within timeout, DNS included; cached per process."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])



def load_hub(name: str, limit: int | None) -> list:
    """Fetch a named source from the Hugging Face hub as texts or records."""
    try:
        return _fetch_hub(name, limit)
    except DataSourceError:
        raise
    except Exception as exc:  # the hub and datasets raise many unrelated types
        detail = " ".join(str(exc).split())[:300]
        raise DataSourceError(
            f"data source '{name}' could not be loaded from the Hugging Face hub "
            f"({HUB_IDS[name]}): {type(exc).__name__}: {detail}"
        ) from exc



def _fetch_hub(name: str, limit: int | None) -> list:
    """Call datasets.load_dataset with the exact files each named source is defined by."""
    from datasets import load_dataset

    if name == "c4":
        ds = load_dataset("allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train")
        return _head_column(ds, "text", limit)
    if name == "c4-validation":
        stream = load_dataset(
            "allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation", streaming=True
        )
        return [row["text"] for row in stream.take(limit or C4_VALIDATION_DOCS)]
    if name == "alpaca":
        ds = load_dataset("tatsu-lab/alpaca", split="train")
        rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
        return [record(row) for row in rows]
    if name == "unnatural":
        ds = load_dataset("mrm8488/unnatural-instructions-core", split="train")
        return list(islice(_flatten_unnatural(ds), limit))
    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return _head_column(ds, "text", limit)
    raise DataSourceError(f"data source '{name}' has no hub loader; the hub has: {', '.join(HUB_IDS)}")



def _head_column(ds: Any, column: str, limit: int | None) -> list[str]:
    """The first limit values of a column of an in-memory datasets.Dataset."""
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return list(ds[column])



def _flatten_unnatural(rows: Iterable[dict]) -> Iterator[dict[str, str]]:
    """One record per Unnatural Instructions instance: the task instruction with that instance's input and output."""
    for row in rows:
        for instance in row.get("instances") or []:
            yield {
                "instruction": as_str(row.get("instruction")),
                "input": as_str(instance.get("input")),
                "output": as_str(instance.get("output")),
            }
