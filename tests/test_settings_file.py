"""install-hooks never exposes nor loses what is in the user's settings: its backup is never
readable by more people than the settings are, and an edit another program makes while
we rewrite the file is kept, never silently overwritten. (The file logic, in-process.)"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from shmstore import atomic
from shmstore.agents import claude as claude_settings
from shmstore.agents import settings as settings_file

SECRET = {"env": {"ANTHROPIC_API_KEY": "sk-secret"}, "model": "opus"}


def test_the_backup_of_a_private_settings_file_is_private_from_its_first_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whenever the backup's mode is changed, it must already have been no wider than the
    settings' own (0600). (Before, it was created with the umask's 0644, holding the
    secrets, and narrowed afterwards.)"""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(SECRET))
    settings.chmod(0o600)
    seen: list[int] = []
    real_fchmod, real_copystat = os.fchmod, shutil.copystat

    def fchmod(fd: int, mode: int) -> None:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, mode)

    def copystat(source: Any, target: Any, **kwargs: Any) -> None:
        seen.append(stat.S_IMODE(os.stat(target).st_mode))
        real_copystat(source, target, **kwargs)

    monkeypatch.setattr(os, "fchmod", fchmod)
    monkeypatch.setattr(shutil, "copystat", copystat)
    old_umask = os.umask(0o022)
    try:
        change = claude_settings.install(settings, "/usr/bin/python3 -m shmstore hook")
    finally:
        os.umask(old_umask)
    assert change.backup is not None
    assert seen
    assert all(mode & ~0o600 == 0 for mode in seen), [oct(mode) for mode in seen]
    assert stat.S_IMODE(change.backup.stat().st_mode) == 0o600
    assert json.loads(change.backup.read_text()) == SECRET


def test_an_edit_made_while_we_rewrite_the_settings_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claude Code (or an editor) writes the file between our read and our rename: we
    read it again and apply our change to what it wrote. (Before, its edit was lost.)"""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model": "opus"}))
    real = settings_file.replace_file
    calls = []

    def meanwhile(path: Any, data: bytes, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 1:
            settings.write_text(json.dumps({"model": "opus", "theme": "dark"}))  # the other program's edit
        real(path, data, *args, **kwargs)

    monkeypatch.setattr(settings_file, "replace_file", meanwhile)
    change = claude_settings.install(settings, "/usr/bin/python3 -m shmstore hook")
    written = json.loads(settings.read_text())
    assert written["theme"] == "dark"
    assert "Stop" in written["hooks"]
    assert len(calls) == 2
    assert json.loads(change.before) == {"model": "opus", "theme": "dark"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".bak")) == [change.backup.name]  # type: ignore[union-attr]


def test_a_settings_file_that_keeps_changing_is_refused_unwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text("{}")
    real = settings_file.replace_file
    edits = iter(range(100))

    def always(path: Any, data: bytes, *args: Any, **kwargs: Any) -> None:
        settings.write_text(json.dumps({"edit": next(edits)}))
        real(path, data, *args, **kwargs)

    monkeypatch.setattr(settings_file, "replace_file", always)
    with pytest.raises(atomic.ChangedMeanwhileError, match="changed while it was being rewritten"):
        claude_settings.install(settings, "/usr/bin/python3 -m shmstore hook")
    assert json.loads(settings.read_text()) == {"edit": settings_file.TRIES - 1}
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # no backup, no temporary file left


def test_a_settings_file_with_windows_line_endings_is_rewritten(tmp_path: Path) -> None:
    """The check before the rename compares bytes with bytes. (A CRLF file once always
    looked changed meanwhile, and install-hooks refused it.)"""
    settings = tmp_path / "settings.json"
    settings.write_bytes(b'{\r\n  "model": "opus"\r\n}\r\n')
    change = claude_settings.install(settings, "/usr/bin/python3 -m shmstore hook")
    assert change.events
    assert json.loads(settings.read_text())["model"] == "opus"
