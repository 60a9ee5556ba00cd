"""The artifact contract: staging folder, manifest written last, atomic rename, fingerprints.

A stage writes into `<out>.staging/`; `manifest.json` is written last, then the folder is renamed into place.
A folder without a manifest is never taken as finished. Downstream stages read only their input folder and its
manifest, and refuse anything else with one line that says which command to run.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from shared.core import graph, integrity
from shared.core.errors import ConfigError, InputError
from shared.core.graph import Format
from shared.core.faults import checkpoint
from shared.core.integrity import sha256_file  # noqa: F401  (one file hasher, re-exported)
from shared.formats.jsonl import dumps_utf8

MANIFEST = "manifest.json"
JOB = "job.json"
PACKAGE_VERSION = "0.1.0"


CORE = ("stage", "version", "code_version", "config", "inputs", "fingerprint", "counts", "created", "holds",
        "files", "trees")


@dataclass
class Manifest:
    stage: str
    version: int
    code_version: str
    config: dict
    inputs: dict
    fingerprint: str
    counts: dict = field(default_factory=dict)
    created: str = ""
    extra: dict = field(default_factory=dict)
    files: dict | None = None   # relative path -> {bytes, sha256, mtime_ns} (see shared/core/integrity.py)
    trees: dict = field(default_factory=dict)  # bulky subfolder -> stamp (their own index holds the hashes)
    #: the formats this output holds, {name: version} (shared/core/graph.py); None: not recorded (an output of
    #: an older sdxl, or of a stage that declares none), read as the formats its `stage` makes
    holds: dict | None = None

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in CORE if k not in ("files", "trees", "holds")}
        if self.holds is not None:
            data["holds"] = self.holds
        data.update(self.extra)
        data.update(files=self.files, trees=self.trees)
        return dumps_utf8(data, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        missing = [k for k in CORE[:6] if k not in data]
        if missing:
            raise KeyError(missing[0])
        return cls(**{k: data[k] for k in CORE if k in data},
                   extra={k: v for k, v in data.items() if k not in CORE})

    def held(self, wanted: Format | None = None) -> dict[str, int]:
        """The formats this output holds, {name: version} (derived from `stage` and `version` when unrecorded)."""
        return graph.held(self.stage, self.holds, self.version, wanted)

    def verified(self, folder: Path, rel: str, fix: str) -> Path:
        """`folder/rel` once checked against this manifest's record of it (see integrity.verified)."""
        return integrity.verified(folder, rel, self.files, fix)


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".staging")


def _trash_dir(out: Path) -> Path:
    return out.with_name(out.name + ".replaced")


def now() -> str:
    """The time as recorded in manifests and file metadata: SOURCE_DATE_EPOCH when it is set (reproducible
    builds: identical runs then write identical checkpoints and exports), else the current time (UTC)."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if fixed:
        try:
            return _dt.datetime.fromtimestamp(int(fixed), _dt.timezone.utc).isoformat(timespec="seconds")
        except (ValueError, OverflowError, OSError):
            raise ConfigError(f"SOURCE_DATE_EPOCH={fixed!r}: not a time (whole seconds since 1970-01-01 UTC); "
                              f"set it to one, or unset it") from None
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def commit(staging: Path, out: Path, manifest: Manifest, trees: tuple[str, ...] = (),
           skip: tuple[str, ...] = ()) -> None:
    """Record the files, write the manifest last, then move the staging folder into place (replacing an old
    output of the same stage, which `outputs.check_target` made sure of before the stage began).

    Killed at any step (the `commit.*` fault points), what is left is recognisable to a rerun, which then
    finishes or redoes the work: the staging folder names its stage in job.json until its manifest is written
    (and by the manifest after), the old output and `<out>.replaced` keep their manifest until last (see
    `remove_output`), and the new output has its manifest before it has its name."""
    normalise_modes(staging)
    manifest.files, manifest.trees = integrity.record(staging, trees, skip)
    checkpoint("commit.recorded")
    write_atomic(staging / MANIFEST, manifest.to_json())
    checkpoint("commit.manifest")
    (staging / JOB).unlink(missing_ok=True)  # the manifest (same stage) names the folder from here on
    checkpoint("commit.job_removed")
    trash = _trash_dir(out)
    remove_output(trash)
    checkpoint("commit.trash_cleared")
    if out.exists():
        os.replace(out, trash)
        checkpoint("commit.old_moved")
    os.replace(staging, out)
    checkpoint("commit.renamed")
    remove_output(trash)


def finish_commit(out: Path, stage: str) -> str | None:
    """Complete what a commit killed after writing its manifest left undone (called by the main rank once it
    holds the output's lock, before it decides whether the stage must run): move the finished staging folder
    into place and remove `<out>.replaced` when it is this stage's. What was done, in words, or None."""
    staging, trash = staging_dir(out), _trash_dir(out)
    done = None
    found = read_manifest(staging) if os.path.isdir(staging) and not os.path.islink(staging) else None
    if found is not None and found.stage == stage and not read_job(staging).get("repair"):
        (staging / JOB).unlink(missing_ok=True)
        if _ours(trash, stage):
            remove_output(trash)
        if os.path.isdir(out) and not os.path.islink(out):
            os.replace(out, trash)
        os.replace(staging, out)
        done = f"finished the commit of an interrupted run ({staging.name} -> {out.name})"
    if _ours(trash, stage) and os.path.lexists(trash):
        remove_output(trash)
        done = done or f"removed {trash.name}, left by an interrupted run"
    return done


def _ours(folder: Path, stage: str) -> bool:
    """A real folder that is empty or holds this stage's manifest (a replaced output being removed)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    found = read_manifest(folder)
    return (found is not None and found.stage == stage) or not any(os.scandir(folder))


def remove_output(folder: Path) -> None:
    """Delete a folder sdxl made (an old output, a staging folder) so that, killed at any moment, what is left
    is still recognisable as ours: everything but its markers (job.json, manifest.json) first, then the
    markers, then the empty folder. Never follows a symbolic link (`outputs.check_target` refuses them)."""
    if not os.path.lexists(folder):
        return
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise OSError(errno.ENOTDIR, "not a folder sdxl made (a symbolic link or a file); left as it is",
                      str(folder))
    with os.scandir(folder) as entries:
        rest = [e for e in entries if e.name not in _MARKERS]
    for number, entry in enumerate(rest):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        if number == 0:
            checkpoint("remove.partial")
    for name in _MARKERS:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
    os.rmdir(folder)


_MARKERS = (JOB, MANIFEST)  # in removal order: a staging folder may hold both; the manifest goes last


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalise_modes(folder: Path) -> None:
    """Give every regular file under `folder` the mode a plain `open` gives (0666 less the umask): some writers
    (safetensors' save_file) create theirs 0600, which would make an output unreadable to the people it is
    shared with although the umask allows it."""
    mode = 0o666 & ~umask()
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)


def fresh_staging(out: Path, stage: str = "?") -> Path:
    """An empty staging folder for a stage that does not resume (leftovers of a crash are discarded); its
    job.json says whose it is, so a later run knows it may replace it."""
    staging = staging_dir(out)
    remove_output(staging)
    staging.mkdir(parents=True)
    write_atomic(staging / JOB, json.dumps({"stage": stage, "started": now()}) + "\n")
    return staging


def read_job(staging: Path) -> dict:
    try:
        data = json.loads((staging / JOB).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_job(staging: Path, stage: str, fingerprint: str, job: str, **more: Any) -> None:
    write_atomic(staging / JOB, json.dumps({"stage": stage, "fingerprint": fingerprint, "job": job,
                                            "started": now(), **more}) + "\n")


def resumable_staging(out: Path, stage: str, fingerprint: str, job: str) -> Path:
    """The staging folder of a stage that resumes (made by the main rank): kept when it was started for the
    same fingerprint (its job.json, or the manifest of a commit killed before its rename, says so), emptied
    otherwise; its job.json names this job, which the other ranks wait for. A kept folder's manifest is
    dropped (after job.json names the folder again): the commit writes it anew."""
    staging = staging_dir(out)
    if staging.exists() and _started_for(staging) != fingerprint:
        remove_output(staging)
    staging.mkdir(parents=True, exist_ok=True)
    write_job(staging, stage, fingerprint, job)
    for name in (MANIFEST, MANIFEST + ".tmp"):
        (staging / name).unlink(missing_ok=True)
    return staging


def _started_for(staging: Path) -> str | None:
    """The fingerprint a staging folder is being built for: its job.json's, else its manifest's (a commit
    killed between writing the manifest and renaming the folder)."""
    found = read_job(staging).get("fingerprint")
    if found is None:
        manifest = read_manifest(staging)
        found = manifest.fingerprint if manifest is not None else None
    return found


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of a finished output folder, or None when there is none (or it is unreadable)."""
    path = Path(folder) / MANIFEST
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wanted_format(wanted: Format | str, versions: Iterable[int] | None = None) -> Format:
    """`wanted` as a Format: a declared format's name, or (as callers wrote before formats were declared) the
    name of the stage whose output is wanted: the format it makes, else its output by that name alone."""
    if isinstance(wanted, Format):
        return wanted
    found = graph.FORMATS.get(wanted) or next((f for f in graph.FORMATS.entries() if f.made_by == wanted), None)
    if found is not None:
        return found
    versions = tuple(versions or (1,))
    return Format(wanted, max(versions), f"the output of `sdxl {wanted}`", made_by=wanted, readable=versions)


def require_input(folder: Path, wanted: Format | str, versions: Iterable[int] | None = None,
                  fix: str | None = None) -> Manifest:
    """The finished output at `folder` that holds the format `wanted` (a Format, or a format's or its producing
    stage's name), of a version in `versions` [default: the ones the format's owner reads]; else an InputError.
    Whichever stage wrote it, under whatever folder name. `fix` (the command that writes that output)
    [default: the stage graph's, graph.fix] is proposed only where running it cannot replace anything but the
    stage's own output."""
    fmt = wanted_format(wanted, versions)
    folder = Path(folder)
    who = graph.who(fmt)
    if folder.name.endswith(".staging"):
        raise InputError(f"{folder}: the staging folder of an unfinished run, not a finished {who} output; "
                         f"give --in the folder without .staging once its run has finished")
    if not folder.exists():
        fix = fix or graph.fix(fmt, folder)
        if staging_dir(folder).exists():
            raise InputError(f"{folder}: {who} did not finish there (only {staging_dir(folder).name} "
                             f"exists); rerun: {fix}")
        raise InputError(f"{folder}: no {who} output found; run: {fix}")
    manifest = read_manifest(folder)
    if manifest is None:
        raise InputError(f"{folder}: no readable {MANIFEST}, so it is not a finished {who} output; give --in "
                         f"a folder that {graph.who(fmt, '`sdxl {}`')} wrote")
    return check_manifest(manifest, folder, fmt, versions, fix)


def check_manifest(manifest: Manifest, where: Path | str, wanted: Format | str, versions: Any = None,
                   fix: str | None = None) -> Manifest:
    """`manifest` when its output holds the format `wanted` at a version in `versions` [default: the format's
    readable ones] (read from `where`, a folder or URL); else an InputError naming what it holds and the fix."""
    fmt = wanted_format(wanted, versions)
    versions = set(versions if versions is not None else fmt.readable)
    holds = manifest.held(fmt)
    if fmt.name not in holds:
        has = ", ".join(f"{k} v{v}" for k, v in holds.items()) or "no format a stage reads"
        raise InputError(f"{where}: holds `{manifest.stage}` output, expected {graph.who(fmt)} output (format "
                         f"{fmt.name}; it holds {has}); give --in a folder that {graph.who(fmt, '`sdxl {}`')} "
                         f"wrote")
    if holds[fmt.name] not in versions:
        fix = fix or graph.fix(fmt, where, manifest.stage)
        raise InputError(f"{where}: `{manifest.stage}` output of {fmt.name} format version {holds[fmt.name]}, "
                         f"which this version of sdxl cannot read; rerun: {fix}")
    return manifest


def hash_json(obj: Any) -> str:
    """sha256 of a canonical JSON encoding."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


PROJECT_PACKAGES = ("shared", "stages")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def code_version(module: str, root: Path = PROJECT_ROOT) -> str:
    """Package version plus a hash of the source of `module` and of every project module it reaches through
    its imports (`shared.*`, `stages.*`, followed transitively, lazy imports inside functions included).

    Derived from the code rather than listed by hand, so it cannot go stale: a changed helper re-runs exactly
    the stages that use it. Hashing the source means a changed algorithm never reuses a stale artifact; the
    price is that an upgrade re-runs stages, the safe side to err on."""
    h = hashlib.sha256()
    for path in sorted(reached_files(module, root)):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return f"{PACKAGE_VERSION}+{h.hexdigest()[:12]}"


def _module_file(dotted: str, root: Path) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path, dotted: str) -> set[str]:
    """Project module names that the source at `path` (module `dotted`) imports anywhere in its body."""
    import ast

    found: set[str] = set()
    package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in found if n.split(".")[0] in PROJECT_PACKAGES}


def reached_files(module: str, root: Path = PROJECT_ROOT) -> set[Path]:
    """The source files of `module`, the packages above it and every project module it imports, transitively."""
    todo, files = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = _module_file(".".join(parts[:k]), root)
            if path is not None and path not in files:
                files.add(path)
                todo.extend(_imported(path, ".".join(parts[:k])))
    return files
