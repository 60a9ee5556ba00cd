"""The output lock (shared/core/outputs.py) where `fcntl` does not exist (Windows: msvcrt.locking, simulated here
with fcntl hidden and a stand-in msvcrt), and hostile lock paths (issue 24): a symlink, a file of the user's, a
hard link or a FIFO where the lock file goes is refused in one line, left exactly as it was, and nothing hangs."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest

from shared.core import outputs
from stages.cli import app
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
JOB = outputs.job_id(1)

# msvcrt.locking(fd, mode, nbytes) locks nbytes from the descriptor's position and fails at once (EACCES) under
# LK_NBLCK. The stand-in does the same with POSIX byte-range locks, which are per process, not per descriptor as
# Windows' are: enough for a second process. A read-only descriptor can only take a shared POSIX lock, which still
# conflicts with the holder's exclusive one, as the Windows probe's exclusive lock does.
FAKE_MSVCRT = textwrap.dedent("""
    import errno, fcntl, os, types

    def _locking(fd, mode, nbytes):
        if mode == msvcrt.LK_UNLCK:
            fcntl.lockf(fd, fcntl.LOCK_UN, nbytes, 0, os.SEEK_CUR)
            return
        read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB, nbytes, 0, os.SEEK_CUR)
        except OSError as e:
            raise OSError(errno.EACCES, "Permission denied") from e
        calls.append(os.lseek(fd, 0, os.SEEK_CUR))

    calls = []
    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK, msvcrt.LK_RLCK, msvcrt.LK_NBRLCK = 0, 1, 2, 3, 4
    msvcrt.locking, msvcrt.calls = _locking, calls
""")

HOLDER_WITHOUT_FCNTL = FAKE_MSVCRT + textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.modules["fcntl"], sys.modules["msvcrt"] = None, msvcrt
    from shared.core import outputs
    assert outputs.fcntl is None
    outputs.claim(Path(sys.argv[1]), "ingest", 0, outputs.job_id(1))
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def without_fcntl(monkeypatch):
    """A fresh copy of outputs.py imported where `import fcntl` fails and msvcrt is the stand-in above."""
    scope: dict = {}
    exec(FAKE_MSVCRT, scope)
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", scope["msvcrt"])
    spec = importlib.util.spec_from_file_location("outputs_without_fcntl", Path(outputs.__file__))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    monkeypatch.undo()
    assert module.fcntl is None and module.msvcrt is scope["msvcrt"]
    return module


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- without fcntl


def test_without_fcntl_the_lock_excludes_a_second_process_names_it_and_dies_with_it(tmp_path, without_fcntl):
    out, o = tmp_path / "w" / "ingest", without_fcntl
    p = subprocess.Popen([sys.executable, "-c", HOLDER_WITHOUT_FCNTL, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held", p.stderr.read()
        before = o.lock_path(out).read_bytes()
        with pytest.raises(o.BusyError, match=rf"another `sdxl` run is writing it \(`ingest` pid {p.pid}"):
            o.claim(out, "ingest", 0, JOB)
        assert o.held(o.lock_path(out)) and o.holder_info(o.lock_path(out))["pid"] == p.pid
        assert o.lock_path(out).read_bytes() == before  # the refused run left the holder's name alone
    finally:
        p.kill()
        p.wait()
    assert not o.held(o.lock_path(out))
    c = o.claim(out, "ingest", 0, JOB)  # kill -9 freed it
    assert o.claim(out, "ingest", 0, JOB) is c  # reentrant in one process
    assert json.loads(o.lock_path(out).read_text())["pid"] == os.getpid()
    assert o.msvcrt.calls and set(o.msvcrt.calls) == {o._LOCK_BYTE}  # the byte far past the JSON, nothing else
    o.release(c)
    assert o.held(o.lock_path(out))  # still held once
    o.release(c)
    assert not o.held(o.lock_path(out))


def test_without_o_nofollow_a_symlink_is_still_refused(tmp_path, without_fcntl, monkeypatch):
    o = without_fcntl
    monkeypatch.setattr(o, "_OPEN", o._OPEN & ~getattr(os, "O_NOFOLLOW", 0))
    mine = tmp_path / "notes.txt"
    mine.write_bytes(b"")  # empty: what a lock file we made looks like, so only the link check protects it
    out = tmp_path / "w" / "ingest"
    out.parent.mkdir()
    o.lock_path(out).symlink_to(mine)
    with pytest.raises(o.LockFileError, match="is a symbolic link"):
        o.claim(out, "ingest", 0, JOB)
    assert mine.read_bytes() == b""


def test_without_o_nofollow_a_link_swapped_in_while_opening_is_refused(tmp_path, without_fcntl, monkeypatch):
    """The lstat saw a lock file; by the open a symlink stood there and the open followed it: the lstat after
    the open sees the link, so nothing is written."""
    o = without_fcntl
    monkeypatch.setattr(o, "_OPEN", o._OPEN & ~getattr(os, "O_NOFOLLOW", 0))
    mine = tmp_path / "notes.txt"
    mine.write_bytes(b"")
    out = tmp_path / "ingest"
    lock = o.lock_path(out)
    lock.write_bytes(b"")
    real_open = os.open

    def swapping_open(path, flags, *a):
        if Path(path) == lock and lock.is_file() and not lock.is_symlink():
            lock.unlink()
            lock.symlink_to(mine)
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(o.LockFileError, match="is a symbolic link"):
        o.claim(out, "ingest", 0, JOB)
    assert mine.read_bytes() == b"" and o._held == {}


# ---------------------------------------------------------------- hostile lock paths


def test_a_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path):
    mine = tmp_path / "thesis.txt"
    mine.write_bytes(b"three years of work\n")
    out = tmp_path / "w" / "ingest"
    out.parent.mkdir()
    lock = outputs.lock_path(out)
    lock.symlink_to(mine)
    with pytest.raises(outputs.LockFileError) as e:
        outputs.claim(out, "ingest", 0, JOB)
    assert one_line(e.value).startswith(f"{lock}: is a symbolic link")
    assert mine.read_bytes() == b"three years of work\n" and lock.is_symlink()
    assert not outputs.held(lock) and outputs.holder_info(lock) == {} and not outputs.partner_alive(out, 0, JOB)
    dangling = outputs.lock_path(out, 1)
    dangling.symlink_to(tmp_path / "nothing")
    with pytest.raises(outputs.LockFileError, match="is a symbolic link"):
        outputs.claim(out, "ingest", 1, JOB)
    assert not (tmp_path / "nothing").exists()  # not created through the link either
    assert outputs._held == {}


def test_ingest_with_its_lock_path_a_symlink_to_a_users_file_exits_2(tmp_path, runner):
    """Issue 24: it exited 0 and the user's file held the lock's JSON."""
    make_dataset(tmp_path / "src", count=2)
    mine = tmp_path / "notes.txt"
    mine.write_bytes(b"my notes\n")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / ".ingest.lock").symlink_to(mine)
    result = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"),
                                 "--workers", "1", "--min-side", "64"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'w' / '.ingest.lock'}: is a symbolic link")
    assert mine.read_bytes() == b"my notes\n"
    assert not (tmp_path / "w" / "ingest").exists()


@pytest.mark.parametrize("content", [b"my notes\n", b"{\"name\": \"not a lock\"}\n", b"x" * 70000])
def test_a_users_file_at_the_lock_path_is_refused_and_unchanged(tmp_path, content):
    out = tmp_path / "ingest"
    lock = outputs.lock_path(out)
    lock.write_bytes(content)
    os.utime(lock, (1_000_000_000, 1_000_000_000))
    with pytest.raises(outputs.LockFileError) as e:
        outputs.claim(out, "ingest", 0, JOB)
    assert one_line(e.value).startswith(f"{lock}: holds other data, not a lock file of sdxl")
    assert lock.read_bytes() == content and lock.stat().st_mtime == 1_000_000_000
    assert outputs._held == {} and not outputs.held(lock)  # the refusal let go of the lock


def test_a_hard_link_to_a_users_empty_file_is_refused(tmp_path):
    mine = tmp_path / "empty-but-mine"
    mine.write_bytes(b"")
    out = tmp_path / "ingest"
    os.link(mine, outputs.lock_path(out))
    with pytest.raises(outputs.LockFileError, match="with 2 names"):
        outputs.claim(out, "ingest", 0, JOB)
    assert mine.read_bytes() == b""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_at_the_lock_path_is_refused_without_hanging(tmp_path):
    out = tmp_path / "ingest"
    for rank in (0, 1):
        os.mkfifo(outputs.lock_path(out, rank))
    found: dict = {}

    def attempt():
        try:
            outputs.claim(out, "ingest", 0, JOB)
        except outputs.LockFileError as e:
            found["error"] = str(e)
        found["probe"] = (outputs.held(outputs.lock_path(out, 1)), outputs.holder_info(outputs.lock_path(out, 1)),
                          outputs.partner_alive(out, 1, JOB))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "hung on the FIFO"
    assert found["error"].startswith(f"{outputs.lock_path(out)}: is not a regular file")
    assert found["probe"] == (False, {}, False)


@pytest.mark.parametrize("old", [b"", b"\0" * 40, b'{"pid": 12', (json.dumps(
    {"pid": 1, "host": "h", "job": "j", "stage": "ingest", "rank": 0, "command": "sdxl ingest " + "x" * 500,
     "started": "2024-01-01 00:00:00"}) + "\n").encode()])
def test_a_lock_file_of_ours_is_reused_and_rewritten_exactly(tmp_path, old):
    """Empty (made by us), zeroed or cut short by a crash, or an older run's JSON (longer than ours)."""
    out = tmp_path / "ingest"
    lock = outputs.lock_path(out)
    lock.write_bytes(old)
    c = outputs.claim(out, "ingest", 0, JOB)
    try:
        text = lock.read_text()
        assert text.endswith("}\n") and text.count("\n") == 1
        assert json.loads(text)["pid"] == os.getpid() and json.loads(text)["job"] == JOB
    finally:
        outputs.release(c)
    assert not outputs.held(lock) and lock.exists()  # released, and the file stays
