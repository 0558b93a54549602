"""Run folders, progress and what the CLI says about them."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest

from launchers.entry import progress_file, read_progress
from launchers.local import LocalLauncher
from mpc_fi import Federation, FederationConfig, InputError
from mpc_fi.cli import _ProgressBar, main


def _ours(before: set[Path]) -> set[Path]:
    """Run folders created under the temporary folder since ``before``."""
    return set(Path(tempfile.gettempdir()).glob("mpc-fi-run-*")) - before


def _existing() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("mpc-fi-run-*"))


def test_a_temporary_run_folder_is_removed_after_success_and_progress_is_reported(
        small_federation):
    path, twin = small_federation
    seen: list[tuple[int, int]] = []
    result = Federation(path, progress=lambda done, total: seen.append((done, total))).run()
    np.testing.assert_array_equal(result.prediction.labels, twin)
    assert not result.run_dir_kept and not Path(result.run_dir).exists()
    assert seen and seen[-1] == (3, 3)  # 24 queries in batches of 8
    assert seen == sorted(seen)


def test_keep_run_dir_keeps_the_logs(small_federation):
    path, _ = small_federation
    result = Federation(path, keep_run_dir=True).run()
    run_dir = Path(result.run_dir)
    assert result.run_dir_kept and run_dir.is_dir()
    assert (run_dir / "party-2-querier.log").exists()
    assert read_progress(progress_file(run_dir, 2)) == (3, 3)


def test_a_run_folder_the_caller_named_is_never_removed(small_federation, tmp_path):
    path, _ = small_federation
    result = Federation(path, run_dir=tmp_path / "mine").run()
    assert result.run_dir_kept and (tmp_path / "mine" / "party-0-owner0.log").exists()


def test_a_failed_run_keeps_its_temporary_folder_and_names_it(small_federation):
    path, _ = small_federation
    launcher = LocalLauncher(FederationConfig.load(path), memory_limit_mb=1e-4)
    with pytest.raises(InputError, match="party logs kept in") as info:
        launcher.run()
    assert info.value.run_dir == str(launcher.run_dir)
    assert str(launcher.run_dir) in str(info.value)
    assert (launcher.run_dir / "party-0-owner0.log").exists()
    assert launcher.created_run_dir and not launcher.run_dir_removed


def test_the_cli_names_the_log_folder(small_federation, tmp_path, capsys):
    path, _ = small_federation
    assert main(["run", "--federation", str(path), "--keep-run-dir",
                 "--output", str(tmp_path / "labels.npy")]) == 0
    out = capsys.readouterr().out
    folder = Path(out.split("party logs in ", 1)[1].split()[0])
    assert (folder / "party-2-querier.log").exists()


@pytest.mark.slow
def test_the_cli_says_when_it_removed_the_log_folder(small_federation, tmp_path, capsys):
    path, _ = small_federation
    before = _existing()
    assert main(["run", "--federation", str(path), "--output", str(tmp_path / "l.npy")]) == 0
    assert "party logs removed with their temporary folder" in capsys.readouterr().out
    assert not _ours(before)


def test_the_progress_bar_is_quiet_off_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    bar = _ProgressBar()  # a StringIO is not a TTY
    bar(1, 3)
    bar.close()
    assert stream.getvalue() == ""
    bar = _ProgressBar(enabled=True)
    bar(1, 3)
    bar(3, 3)
    assert bar.bar.n == 3 and bar.bar.total == 3
    bar.close()
    assert "secure inference" in stream.getvalue()


def test_the_run_help_documents_the_housekeeping(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep-run-dir" in text and "progress bar" in text
    assert "as few batches as the parties' memory allows" in text
