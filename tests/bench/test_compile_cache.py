"""torch.compile's caches live in torchchat's cache folder unless the user chose one."""

from __future__ import annotations

import os
from pathlib import Path

from torchchat.compile_cache import CACHE_DIR_ENV, enable_compile_cache


def test_default_is_under_the_torchchat_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert enable_compile_cache() == tmp_path / "torchchat" / "inductor"
    assert Path(os.environ[CACHE_DIR_ENV]) == tmp_path / "torchchat" / "inductor"


def test_home_cache_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert enable_compile_cache() == tmp_path / ".cache" / "torchchat" / "inductor"


def test_user_choice_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert enable_compile_cache() == tmp_path / "mine"
