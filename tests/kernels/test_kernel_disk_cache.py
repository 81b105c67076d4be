"""Triton's on-disk kernel cache is pruned to a byte budget, least recently used first
(kernels.kernel_disk_cache). Against real Triton entries:
tests/kernels/compiled_kernels_check.py."""

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gradserve.kernels import compiled_kernels, kernel_disk_cache
from gradserve.server.config import parse_config

NOW = time.time()


def make_entry(root: Path, name: str, sizes: list[int], age_s: float) -> Path:
    """An entry as Triton writes one: a directory of files (one in a leftover temp dir)."""
    entry = root / name
    (entry / "tmp.pid_1_x").mkdir(parents=True)
    for i, size in enumerate(sizes):
        where = entry / "tmp.pid_1_x" if i == len(sizes) - 1 else entry
        (where / f"f{i}.bin").write_bytes(os.urandom(size))
    os.utime(entry, (NOW - age_s, NOW - age_s))
    return entry


@pytest.fixture
def cache(tmp_path):
    """Four entries of 3000 bytes each, aged 400, 300, 200 and 100 s, and a loose file."""
    root = tmp_path / "cache"
    for i, age in enumerate((400, 300, 200, 100)):
        make_entry(root, f"E{i}", [1000, 1500, 500], age)
    (root / "not-an-entry.txt").write_bytes(b"x" * 10_000)
    return root


def names(root: Path) -> list[str]:
    return [entry.path.name for entry in kernel_disk_cache.entries(root)]


def test_entries_are_listed_oldest_first_with_their_bytes(cache):
    found = kernel_disk_cache.entries(cache)
    assert [e.path.name for e in found] == ["E0", "E1", "E2", "E3"]
    assert [e.bytes for e in found] == [3000] * 4  # nested files counted, loose file not


def test_the_oldest_entries_go_until_the_cache_fits(cache):
    pruned = kernel_disk_cache.prune(cache, 6500, now=NOW)
    assert pruned == kernel_disk_cache.Pruned(removed=2, bytes_before=12_000, bytes_after=6000)
    assert names(cache) == ["E2", "E3"]
    assert (cache / "not-an-entry.txt").exists()  # not Triton's: left alone
    assert sorted(p.name for p in cache.iterdir()) == ["E2", "E3", "not-an-entry.txt"]


def test_a_cache_within_its_budget_is_left_alone(cache):
    assert kernel_disk_cache.prune(cache, 12_000, now=NOW).removed == 0
    assert names(cache) == ["E0", "E1", "E2", "E3"]


def test_a_budget_of_zero_removes_every_entry_old_enough(cache):
    pruned = kernel_disk_cache.prune(cache, 0, min_age_s=150, now=NOW)
    assert pruned.removed == 3 and pruned.bytes_after == 3000
    assert names(cache) == ["E3"]  # 100 s old: may still be being written by another process


def test_a_touched_entry_is_the_last_to_go(cache):
    kernel_disk_cache.touch([cache / "E0", cache / "gone"])  # a missing entry is no error
    kernel_disk_cache.prune(cache, 3000, now=time.time() + 1000)
    assert names(cache) == ["E0"]


def test_a_missing_cache_directory_holds_nothing(tmp_path):
    assert kernel_disk_cache.entries(tmp_path / "absent") == []
    assert kernel_disk_cache.prune(tmp_path / "absent", 0) == kernel_disk_cache.Pruned(0, 0, 0)


def test_the_cache_directory_is_tritons(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert kernel_disk_cache.cache_dir() == tmp_path


def test_a_compiled_kernel_names_its_entry(tmp_path):
    compiled = SimpleNamespace(metadata_group={"k.json": str(tmp_path / "E" / "k.json")})
    assert kernel_disk_cache.entry_of(compiled) == tmp_path / "E"
    assert kernel_disk_cache.entry_of(SimpleNamespace()) is None


def test_the_process_prunes_the_cache_triton_uses(monkeypatch, cache):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    limit = compiled_kernels.DEFAULT_DISK_BYTES
    try:
        compiled_kernels.set_disk_limit(3000, min_age_s=0)
        assert compiled_kernels.prune_disk().removed == 3
        assert compiled_kernels.disk_bytes() == 3000 and names(cache) == ["E3"]
    finally:
        compiled_kernels.set_disk_limit(limit)


def test_the_budget_is_not_negative_and_comes_from_the_servers_flag():
    with pytest.raises(ValueError, match=">= 0"):
        compiled_kernels.set_disk_limit(-1)
    default = parse_config([], environ={}).max_kernel_cache_bytes
    assert default == compiled_kernels.DEFAULT_DISK_BYTES
    config = parse_config([], environ={"GRADSERVE_MAX_KERNEL_CACHE_BYTES": "5000"})
    assert config.max_kernel_cache_bytes == 5000
    with pytest.raises(SystemExit):
        parse_config(["--max-kernel-cache-bytes", "-1"], environ={})


def test_an_entry_it_may_not_remove_is_skipped(cache, monkeypatch):
    """Pruning runs after a job: a cache it cannot fully clean must not fail the job."""
    rename = Path.rename

    def refuse_e0(self, target):
        if self.name == "E0":
            raise PermissionError(13, "Permission denied", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_e0)
    pruned = kernel_disk_cache.prune(cache, 6000, now=NOW)
    assert pruned.removed == 2 and pruned.bytes_after == 6000
    assert names(cache) == ["E0", "E3"]  # E0 stays; E1 and E2 go in its place
