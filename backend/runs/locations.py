"""Where an artifact lives: a folder on this machine, or an fsspec URL (s3://, gs://, az://, file://, ...) that every
node of a cluster can reach. The few operations artifacts need, for both."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def is_url(location: str | Path) -> bool:
    """An fsspec URL rather than a path on this machine."""
    return "://" in str(location)


def location(text: str) -> Path | str:
    """A stored artifact location as it is used: a Path for a folder, the URL itself for anything else."""
    return text if is_url(text) else Path(text)


def filesystem(url: str):
    """The fsspec filesystem of `url` and the path inside it; a scheme fsspec does not know is named."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ValueError(f"artifact location {url}: {err}") from err


def upload(folder: Path, url: str) -> None:
    """Copy the files of a folder to `url`/ (file by file: files of the same name are replaced)."""
    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{root.rstrip('/')}/{path.name}")


def download(url: str, folder: Path, names: list[str]) -> None:
    """Copy the named files of `url` into a folder on this machine."""
    fs, root = filesystem(url)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        fs.get_file(f"{root.rstrip('/')}/{name}", str(folder / name))


def copy_folder(source: Path | str, target: Path, names: list[str]) -> None:
    """An artifact's files into a folder on this machine, from a folder or a URL."""
    if is_url(source):
        download(str(source), target, names)
    else:
        shutil.copytree(source, target, dirs_exist_ok=True)


def remote_sizes(url: str) -> dict[str, int] | None:
    """The size of each file directly under `url` (None when nothing is there)."""
    fs, root = filesystem(url)
    if not fs.isdir(root):
        return None
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"])
            for entry in fs.ls(root, detail=True) if entry["type"] == "file"}


def remote_sha256(url: str, name: str, chunk: int = 1 << 22) -> str:
    """The sha256 of one file under `url`, streamed."""
    fs, root = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(f"{root.rstrip('/')}/{name}", "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
