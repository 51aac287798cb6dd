"""Store commands that free space: delete (runs, by id or prefix) and gc (old pruned models, dense results,
leftover temporary folders). Torch-free."""

from __future__ import annotations

import argparse

from backend.runs import cleanup
from backend.runs.cleanup import human_bytes
from backend.runs.store import Store


def cmd_delete(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    try:
        ids = [store.find(prefix) for prefix in args.runs]
        return cleanup.delete_runs(store, ids, dry_run=args.dry_run)
    finally:
        store.close()


def cmd_gc(args: argparse.Namespace) -> dict:
    store = Store(args.store)
    try:
        return cleanup.gc(store, keep_models=args.keep_models, older_than_days=args.older_than,
                          dry_run=args.dry_run, unused_dense=args.unused_dense, vacuum=not args.no_vacuum)
    finally:
        store.close()


def size_line(size: dict) -> str:
    return (f"{human_bytes(size['total_bytes'])} ({size['total_bytes']} bytes: database "
            f"{human_bytes(size['db_bytes'])}, artifacts {human_bytes(size['artifact_bytes'])}), "
            f"{size['runs']} runs, {size['models']} pruned models")


def describe(entry: dict) -> str:
    if entry["kind"] == "rows":
        rows = ", ".join(f"{n} {table}" for table, n in entry["rows"].items() if n)
        what = f"run {entry['run_id']}: database rows ({rows})"
    elif entry["kind"] == "dense result":
        what = f"dense result {entry['key']}"
    else:
        what = f"{entry['kind']} {entry['path']}"
    return what


def print_cleanup(result: dict) -> None:
    """What went (or would go) and its bytes, what was refused, and the store's size before and after."""
    verb = "would remove" if result["dry_run"] else "removed"
    print(f"{verb} {len(result['removed'])} item(s), {human_bytes(result['bytes'])} ({result['bytes']} bytes):")
    for entry in result["removed"]:
        print(f"  {human_bytes(entry['bytes']):>9}  {describe(entry)}")
    for entry in result["refused"]:
        print(f"  refused: {entry['kind']} {entry.get('path', '')}: {entry['reason']}")
    for entry in result["errors"]:
        print(f"  failed: {entry['kind']} {entry.get('path', '')}: {entry['reason']}")
    for note in result.get("notes", []):
        print(f"  note: {note}")
    print(f"store before: {size_line(result['before'])}")
    after = "after (projected: files only)" if result["after"].get("projected") else "after"
    print(f"store {after}: {size_line(result['after'])}")
