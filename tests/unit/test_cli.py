"""Every entry point answers a usage mistake with one `error:` line and exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")


def _main(job: str):
    spec = importlib.util.spec_from_file_location(f"job_{job}", REPO / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("job", JOBS)
def test_usage_errors_are_one_line_and_exit_2(job, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(job)(["--no-such-flag", "x"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    # Jobs with a required positional name it first; the others name the stray flag.
    assert ("unrecognized arguments: --no-such-flag" in err or "arguments are required" in err) and "see --help" in err


def test_help_still_prints_the_full_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        _main("finetune")(["--help"])
    assert exit_.value.code == 0 and "--backbone-lr-scale" in capsys.readouterr().out


def test_a_bad_elastic_range_is_one_line_before_ray_is_touched(tiny_data_dir, tmp_path, capsys, monkeypatch):
    import cluster.runtime

    # Earlier integration tests may have left this process connected, so the guard is on the
    # call itself: the job must refuse the range before it connects to Ray at all.
    connected = []
    monkeypatch.setattr(cluster.runtime, "connect", lambda *a, **k: connected.append(1))
    with pytest.raises(SystemExit) as exit_:
        _main("train")(["--data", str(tiny_data_dir), "--run-dir", str(tmp_path / "run"),
                        "--workers", "2", "--min-workers", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "min workers" in err, err
    assert not connected
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("job, argv, message", [
    ("predict", ["{img}", "--api-key-file", "{missing}"], "cannot read the API key"),
    ("predict", ["{img}", "--api-key-file", "{empty}"], "the API key file is empty"),
    ("serve", ["{missing}"], "missing"),
])
def test_bad_serving_inputs_are_one_line_before_anything_is_contacted(job, argv, message, tmp_path, capsys):
    """A missing or empty API key file, a missing checkpoint: one line, exit 2, no server or Ray touched."""
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty").write_text("\n")
    paths = {"img": tmp_path / "a.png", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    with pytest.raises(SystemExit) as exit_:
        _main(job)([a.format(**paths) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
