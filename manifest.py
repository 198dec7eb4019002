"""The manifest.json export.py writes beside its files: each file's sha256 and size, with what it was
verified as. artifacts.check_trusted reads it to let a code-bearing file load without --trust-code.
"""
import contextlib
import hashlib
import json
import os

from errors import UserError
from fileio import json_text, kind_of, lock, read_open_file, save_text, unlock

MANIFEST = "manifest.json"


def sha256(blob):
    return hashlib.sha256(blob).hexdigest()


@contextlib.contextmanager
def _manifest_lock(folder):
    """Two export.py processes writing one folder take turns updating its manifest."""
    held = lock(folder, name=None, wait=True)
    try:
        yield
    finally:
        unlock(held)


MAX_MANIFEST_BYTES = 1 << 20  # an entry is 200-500 bytes: thousands of files; anything larger is not one of ours
HEX = set("0123456789abcdef")


def read_manifest(folder):
    """{file name: entry} of the manifest.json in `folder`, {} if there is none. One that is not what
    export.py writes is refused (UserError): a symlink (export.py writes a plain file by rename; a link
    would borrow another folder's record), larger than MAX_MANIFEST_BYTES, not JSON, or listing anything
    but plain file names of this folder with a sha256 each."""
    path = os.path.join(folder, MANIFEST)
    bad = f"{path} is not a manifest export.py writes"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as e:
        if os.path.islink(path):
            raise UserError(f"{bad}: it is a symbolic link (delete it and export again)") from None
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    blob, mode = read_open_file(fd, MAX_MANIFEST_BYTES)
    if blob is None:
        raise UserError(f"{bad}: it is {kind_of(mode)} (remove it and export again)")
    if len(blob) > MAX_MANIFEST_BYTES:
        raise UserError(f"{bad}: larger than {MAX_MANIFEST_BYTES:,} bytes (delete it and export again)")
    try:
        files = json.loads(blob)["files"]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{bad}: not a JSON object with a \"files\" object (delete it and export again)") from None
    if not isinstance(files, dict):
        raise UserError(f"{bad}: its \"files\" is not an object (delete it and export again)")
    for name, entry in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise UserError(f"{bad}: it lists {name!r}, not a file name in its own folder (delete it and export again)")
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= HEX):
            raise UserError(f"{bad}: {name!r} has no sha256 (delete it and export again)")
    return files


def manifest_add(path, info):
    """Record `path`'s sha256 and size (plus `info`) in the manifest.json beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        blob = f.read()
    with _manifest_lock(folder):
        files = read_manifest(folder)
        files[os.path.basename(path)] = dict(sha256=sha256(blob), bytes=len(blob), **info)
        save_text(json_text({"files": dict(sorted(files.items()))}), os.path.join(folder, MANIFEST))
