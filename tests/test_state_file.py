"""The state file (stoker/detect/state.py) as the operator meets it: the lines it logs, each naming the
file and saying why, the verdict and checkpoint records it keeps or leaves out, and how a save writes.

tests/test_hardening_files.py attacks the file (FIFOs, links, huge and deep JSON); these specify what the
agent says and keeps, field for field."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from structlog.testing import capture_logs

from stoker.detect import state as state_module
from stoker.detect.state import StateStore, write_fields
from stoker.sim.drive import ManualClock
from tests.test_hardening_files import GOOD_CHECKPOINT
from tests.test_hardening_files import fresh_state as record


def load(path, text: str | None = None, max_age: float = 300.0):
    """(what load() gives, the lines it logged, without their level) for the state file at `path`."""
    if text is not None:
        path.write_text(text)
    with capture_logs() as lines:
        saved = StateStore(str(path), max_age=max_age, wall=ManualClock(1000.0)).load()
    return saved, [{k: v for k, v in line.items() if k != "log_level"} for line in lines]


# -- what it logs ---------------------------------------------------------------------------------------

def test_an_unreadable_file_is_one_warning_naming_the_file_and_why(tmp_path):
    path = tmp_path / "state.json"
    saved, lines = load(path, "[1]")
    assert saved is None
    assert lines == [{"event": "saved job state unreadable; learning it afresh", "component": "state",
                      "path": str(path), "error": "not a JSON object but list"}]


@pytest.mark.parametrize("saved_at, max_age, reason", [
    (1000.5, 300.0, "saved in the future"),
    (699.0, 300.0, "older than 300 s"),
    (999.3, 0.5, "older than 0.5 s"),  # under a second old, and still too old for this max_age
])
def test_a_file_not_used_says_why_at_info(tmp_path, saved_at, max_age, reason):
    path = tmp_path / "state.json"
    path.write_text(json.dumps(record(saved=saved_at)))
    with capture_logs() as lines:
        assert StateStore(str(path), max_age=max_age, wall=ManualClock(1000.0)).load() is None
    assert lines == [{"event": "saved job state not used", "component": "state", "log_level": "info",
                      "path": str(path), "reason": reason}]


def test_a_part_left_out_is_named_with_the_file(tmp_path):
    path = tmp_path / "state.json"
    saved, lines = load(path, json.dumps(record(level=2)))
    assert saved is not None and saved.level is None
    assert lines == [{"event": "part of the saved job state left out", "component": "state", "path": str(path),
                      "part": "level", "error": "level: not a share of the GPUs' time (0 to 1): 2"}]


def test_a_save_that_fails_names_the_file_and_the_systems_reason(tmp_path):
    path = tmp_path / "missing-dir" / "state.json"
    with capture_logs() as lines:
        StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).save(frozenset({1}), 0.5, [])
    assert lines == [{"event": "cannot save the job state", "component": "state", "log_level": "warning",
                      "path": str(path), "error": "No such file or directory"}]


@pytest.mark.parametrize("kind, error", [
    ("symlink", "a symbolic link (not followed)"),
    ("directory", "not a regular file"),
    ("nul", "the path holds a NUL byte"),
])
def test_a_path_that_is_not_a_regular_file_is_unreadable_with_why(tmp_path, kind, error):
    """A link to a good, fresh state file is still not followed: a link planted in the state directory
    could make the agent read (and then replace) any file."""
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(record()))
    path = tmp_path / "state.json"
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    else:
        path = tmp_path / "state\0.json"
    with capture_logs() as lines:
        assert StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).load() is None
    assert [(line["event"], line["error"]) for line in lines] == [
        ("saved job state unreadable; learning it afresh", error)]


def test_saving_over_a_directory_says_it_is_left_as_it_is(tmp_path):
    path = tmp_path / "state.json"
    path.mkdir()
    with capture_logs() as lines:
        StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).save(frozenset({1}), 0.5, [])
    assert [line["error"] for line in lines] == ["the state file is not a regular file; left as it is"]
    assert path.is_dir() and os.listdir(path) == []


# -- the verdict and checkpoint records ---------------------------------------------------------------------

@pytest.mark.parametrize("verdict, kept", [
    ({"cause": "storage"}, ("storage", False, False)),  # fields missing: not cold, not a return
    ({"cause": "host", "cold": True, "came_back": False}, ("host", True, False)),
    ({"cause": "network", "cold": False, "came_back": True}, ("network", False, True)),
    ({"cause": None, "cold": True, "came_back": True}, (None, False, False)),  # no verdict: nothing to carry
])
def test_a_saved_verdict_comes_back_as_it_was(tmp_path, verdict, kept):
    saved, lines = load(tmp_path / "state.json", json.dumps(record(verdict=verdict)))
    assert lines == [] and (saved.cause, saved.cold, saved.came_back) == kept


@pytest.mark.parametrize("part, error", [
    ({"verdict": {"cause": "gremlins"}}, "cause: not one of storage, network, checkpoint, host: 'gremlins'"),
    ({"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "source": "guess"}]},
     "source: not hint or detected: 'guess'"),
    ({"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "stalled": "yes"}]}, "stalled: not true or false"),
    ({"checkpoints": [GOOD_CHECKPOINT, 7]}, "not an object but int"),
    ({"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "mountpoint": 5}]}, "mountpoint: not an absolute path: 5"),
    ({"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "mountpoint": "mnt/ckpt"}]},
     "mountpoint: not an absolute path: 'mnt/ckpt'"),
    ({"checkpoints": [GOOD_CHECKPOINT, {**GOOD_CHECKPOINT, "mountpoint": "/mnt/\0ckpt"}]},
     "mountpoint: not an absolute path: '/mnt/\\x00ckpt'"),
])
def test_a_bad_part_is_left_out_saying_exactly_what_is_wrong(tmp_path, part, error):
    saved, lines = load(tmp_path / "state.json", json.dumps(record(**part)))
    assert [line["error"] for line in lines] == [error]
    assert saved is not None and saved.pids == frozenset({101, 102})
    if "checkpoints" in part:
        assert saved.checkpoints == [GOOD_CHECKPOINT]


def test_a_detected_checkpoint_record_is_kept():
    detected = {**GOOD_CHECKPOINT, "source": "detected", "stalled": True}
    assert state_module._checkpoint(detected) is detected


def test_an_integer_too_large_for_a_float_is_not_a_finite_number(tmp_path):
    saved, lines = load(tmp_path / "state.json", json.dumps(record(level=10 ** 400)))
    assert saved is not None and saved.level is None
    assert lines[0]["error"].startswith("level: not a finite number: 1000")


@pytest.mark.parametrize("saved_at", [0.0, 0.5])
def test_a_file_saved_at_the_epoch_is_read(tmp_path, saved_at):
    """Only a negative time is nonsense: 0 is 1970 (a clock never set), too old for any max_age in use but
    read, and dismissed as old, not as damaged."""
    saved, lines = load(tmp_path / "state.json", json.dumps(record(saved=saved_at)), max_age=1e4)
    assert lines == [] and saved is not None and saved.pids == frozenset({101, 102})


# -- how a save writes ------------------------------------------------------------------------------------

def test_a_save_writes_a_0644_file_through_a_temporary_name_the_next_start_recognises(tmp_path, monkeypatch):
    """The temporary file is `<state file>.<16 hex>.tmp` (what a start removes after a kill) and the state
    file is readable by `stoker check` run as another user, never executable."""
    renamed = []
    replace = os.replace
    monkeypatch.setattr(state_module.os, "replace", lambda a, b: (renamed.append((a, b)), replace(a, b))[1])
    path = tmp_path / "state.json"
    umask = os.umask(0o022)  # systemd's default for services
    try:
        StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).save(frozenset({1}), 0.5, [])
    finally:
        os.umask(umask)
    assert len(renamed) == 1 and renamed[0][1] == str(path)
    assert re.fullmatch(re.escape(str(path)) + state_module.TEMPORARY, renamed[0][0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """Were the random name known (here it is forced), a link planted there still gets no byte: the
    temporary file is created exclusively and never through a link."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    monkeypatch.setattr(state_module.secrets, "token_hex", lambda n: "0" * (2 * n))
    path = tmp_path / "state.json"
    (tmp_path / ("state.json." + "0" * 16 + ".tmp")).symlink_to(victim)
    with capture_logs() as lines:
        StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).save(frozenset({1}), 0.5, [])
    assert victim.read_text() == "precious\n" and not path.exists()
    assert [line["error"] for line in lines] == ["File exists"]


def test_a_save_that_fails_after_creating_its_temporary_file_removes_it(tmp_path, monkeypatch):
    def no_rename(a, b):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(state_module.os, "replace", no_rename)
    path = tmp_path / "state.json"
    with capture_logs() as lines:
        StateStore(str(path), max_age=300.0, wall=ManualClock(1000.0)).save(frozenset({1}), 0.5, [])
    assert os.listdir(tmp_path) == [] and [line["error"] for line in lines] == ["Input/output error"]


def test_leftovers_are_removed_beside_a_state_file_named_without_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "state.json.0123456789abcdef.tmp").write_text("{")
    StateStore("state.json", max_age=300.0).load()
    assert os.listdir(tmp_path) == []


def test_no_field_is_ever_written_as_nan(tmp_path):
    """Other writers (the inventory) share write_fields: JSON's NaN is not JSON, and the file is left as it was."""
    path = tmp_path / "state.json"
    write_fields(str(path), {"inventory": {"gpus": 8}})
    with pytest.raises(ValueError):
        write_fields(str(path), {"inventory": {"gpus": float("nan")}})
    assert json.loads(path.read_text()) == {"inventory": {"gpus": 8}}
