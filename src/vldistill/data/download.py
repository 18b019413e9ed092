"""Resumable, checksum-verified downloads of official archives.

A file is fetched into ``<name>.part`` (resumed with an HTTP Range request when a partial file exists), its sha256
is checked, and only then renamed to its final name: a partial or corrupt download never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from vldistill.data.official import DataError

CHUNK = 1 << 20


def sha256sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``; resume a previous ``dest.part``; verify ``sha256`` when given.

    A checksum mismatch removes the partial file and raises :class:`DataError` naming the file.
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256sum(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = have and getattr(response, "status", 200) == 206
            total = response.headers.get("Content-Length")
            mode = "ab" if resumed else "wb"
            with open(part, mode) as fh, tqdm(total=int(total) if total else None, initial=0, unit="B",
                                                unit_scale=True, desc=dest.name, leave=False) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:  # HTTPError is a URLError; timeouts and resets are OSErrors
        reason = f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else getattr(
            err, "reason", err)
        kept = f"; {part} is kept and a rerun resumes it" if part.is_file() and part.stat().st_size else ""
        raise DataError(f"{url}: download to {dest} failed ({reason}){kept}") from None
    if sha256 is not None:
        got = sha256sum(part)
        if got != sha256:
            part.unlink()
            raise DataError(f"{dest}: sha256 mismatch (expected {sha256}, got {got}); the partial file was removed")
    os.replace(part, dest)
    return dest


def extract(archive: Path, into: Path) -> None:
    """Unpack a .zip / .tar(.gz) archive into ``into`` via a temporary directory renamed at the end."""
    tmp = into.with_name(into.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
    else:
        raise DataError(f"{archive}: not a zip or tar archive")
    into.parent.mkdir(parents=True, exist_ok=True)
    if into.exists():
        for item in tmp.iterdir():
            os.replace(item, into / item.name)
        tmp.rmdir()
    else:
        os.replace(tmp, into)


def missing_source(task: str, cfg) -> str | None:
    """For a stage that is about to prepare ``task``: the one-line problem with an official source's directories
    (``data.<task>.root`` missing with no ``url`` to download it from; ``data.pretrain.vg_root`` missing), else None."""
    if getattr(cfg, "source", None) != "official":
        return None
    if cfg.root and not Path(cfg.root).exists() and not cfg.url:
        return (f"data.{task}.root={json.dumps(cfg.root)}: directory not found, and data.{task}.url is not set; "
                "unpack the official release there (see docs/data.md) or set url")
    vg_root = getattr(cfg, "vg_root", None)
    if vg_root and not Path(vg_root).is_dir():
        return (f"data.{task}.vg_root={json.dumps(vg_root)}: directory not found; it must hold Visual Genome's "
                "region_descriptions.json and VG_100K/ (or set vg_root: null)")
    return None


def ensure_root(root: str | Path, url: str | None, sha256: str | None) -> Path:
    """The task's official root: used as is when it exists; else downloaded from ``url`` (archive or single file)."""
    root = Path(root)
    if root.exists():
        return root
    if not url:
        raise DataError(f"{root}: data root not found and no download url is configured")
    archive = fetch(url, root.with_name(root.name + "-" + Path(url.split("?")[0]).name), sha256)
    if zipfile.is_zipfile(archive) or tarfile.is_tarfile(archive):
        extract(archive, root)
    else:
        root.mkdir(parents=True)
        shutil.copy(archive, root / archive.name.split("-", 1)[-1])
    return root
