"""The box (modellego.box): real model, profile and component files registered, found, verified and removed; two
processes adding at once both land; a changed file is caught; a hostile box file is refused in one line."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from helpers import assert_user_error, invoke
from modellego.box import SCHEMA_VERSION, Box
from modellego.errors import ModellegoError


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_lenet):
    """A LeNet-5 trained briefly on digits, its profile and one component (the default cut), as files."""
    folder = tmp_path_factory.mktemp("box")
    model, profile, part = folder / "lenet.safetensors", folder / "lenet.profile.safetensors", folder / "part.safetensors"
    shutil.copyfile(digits_lenet, model)
    assert invoke("profile", str(model), "--samples-per-class", "8", "--out", str(profile)).returncode == 0
    assert invoke("disassemble", str(model), "--profile", str(profile), "--classes", "3,8",
                  "--out", str(part)).returncode == 0
    return folder, model, profile, part


def test_added_files_are_found_by_class_kind_and_builder_with_their_lineage(files, tmp_path):
    _, model, profile, part = files
    with Box(tmp_path / "box.sqlite") as box:
        added = box.add([model, profile, part])
        assert [entry.kind for entry in added] == ["model", "profile", "component"]
        source, _, component = added
        assert component.classes == [("digits", "3"), ("digits", "8")]
        assert component.reconstructed is True and component.settings["alpha_conv"] == 0.3
        assert component.params < source.params and component.flops < source.flops
        assert [e.id for e in box.find(kind="component", class_name="8")] == [component.id]
        assert {e.id for e in box.find(dataset="digits", class_name="3")} == {e.id for e in added}
        assert box.find(builder="resnet18") == []
        assert [e.id for e in box.lineage(component)] == [added[1].id, source.id]  # its profile, its source
        with pytest.raises(ModellegoError, match="in the box already"):
            box.add([part])
        with pytest.raises(ModellegoError, match="entries made from it"):
            box.remove(source.id)
        assert box.verify() == {e.id: "ok" for e in added}


def test_two_processes_adding_at_once_both_land(files, tmp_path):
    folder, model, _, part = files
    path = tmp_path / "box.sqlite"
    Box(path).close()
    script = "import sys; from modellego.box import Box; Box(sys.argv[1]).add([sys.argv[2]])"
    runs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(file)]) for file in (model, part)]
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    with Box(path) as box:
        assert sorted(entry.kind for entry in box.entries()) == ["component", "model"]


def test_a_changed_file_is_caught_by_verify(files, tmp_path):
    _, model, _, _ = files
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(model.read_bytes())
    box_path = tmp_path / "box.sqlite"
    assert invoke("box", "add", str(copy), "--box", str(box_path)).returncode == 0
    assert "as they were added" in invoke("box", "verify", "--box", str(box_path)).stdout
    copy.write_bytes(copy.read_bytes()[:-1] + b"\x00")
    assert_user_error(invoke("box", "verify", "--box", str(box_path)), "changed or missing")
    listed = json.loads(invoke("box", "list", "--json", "--box", str(box_path)).stdout)
    assert [entry["kind"] for entry in listed] == ["model"]


def test_a_hostile_or_foreign_box_file_is_one_line(files, tmp_path):
    _, model, _, _ = files
    foreign = tmp_path / "notes.sqlite"
    foreign.write_text("not a database at all" * 100)
    assert_user_error(invoke("box", "list", "--box", str(foreign)), "not a modellego box")
    path = tmp_path / "box.sqlite"
    with Box(path) as box:
        box.add([model])
    with sqlite3.connect(path) as connection:  # a name holding SQL is data, never run
        connection.execute("UPDATE classes SET name = ? WHERE position = 0", ("x'); DROP TABLE entries; --",))
    with Box(path) as box:
        assert box.find(class_name="x'); DROP TABLE entries; --")[0].kind == "model"
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert_user_error(invoke("box", "list", "--box", str(path)), f"reads versions 1 to {SCHEMA_VERSION}")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE something (x)")
    assert_user_error(invoke("box", "list", "--box", str(other)), "not a modellego box")
    assert_user_error(invoke("box", "add", str(tmp_path / "missing.safetensors"), "--box", str(tmp_path / "new.sqlite")),
                      "no such file")
    assert not (tmp_path / "new.sqlite").exists()  # nothing written for a refused add


def _edited(path, statement, *values):
    with sqlite3.connect(path) as connection:
        connection.execute(statement, values)


@pytest.mark.parametrize("statement, values, message", [
    ("UPDATE entries SET path = ?", ("/etc/passwd",), "outside the box's folders"),
    ("UPDATE entries SET path = path || ?", ("/../../../etc/passwd",), "outside the box's folders"),
    ("UPDATE entries SET path = ?", ("relative/model.safetensors",), "outside the box's folders"),
    ("INSERT INTO folders VALUES (?)", ("/tmp/../etc",), "not a plain absolute path"),
    ("INSERT INTO folders VALUES (?)", ("/",), "below the root"),
    ("UPDATE entries SET input = ?", ('{"size": 5}',), "input is not an input record"),
    ("UPDATE entries SET builder = ?", (b"\x00",), "builder is not text"),
    ("ALTER TABLE entries DROP COLUMN sha256", (), "not a modellego box"),
    ("ALTER TABLE classes RENAME COLUMN name TO label", (), "not a modellego box"),
    ("UPDATE entries SET accuracy = ?", ("ninety",), "accuracy is not a number"),
    ("UPDATE entries SET flops = ?", (-5,), "flops is not a count"),
    ("UPDATE entries SET sha256 = ?", ("x",), "SHA-256"),
    ("UPDATE entries SET kind = ?", ("'; DROP TABLE entries; --",), "not one a box holds"),
])
def test_edited_rows_are_refused_in_one_line(files, tmp_path, statement, values, message):
    _, model, _, _ = files
    path = tmp_path / "box.sqlite"
    with Box(path) as box:
        box.add([model])
    if "kind" in statement:  # the CHECK constraint stands in the way of an edit through SQL; a raw file need not
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA ignore_check_constraints = ON")
            connection.execute(statement, values)
    else:
        _edited(path, statement, *values)
    assert_user_error(invoke("box", "list", "--box", str(path)), message)


def test_a_schema_1_box_is_migrated_with_its_rows(files, tmp_path):
    _, model, _, _ = files
    path = tmp_path / "box.sqlite"
    from modellego.box.catalogue import SCHEMA, describe

    version_1 = SCHEMA.replace(",\n    parts TEXT", "").replace("CREATE TABLE IF NOT EXISTS folders (path TEXT PRIMARY KEY);", "")
    entry = describe(model)
    with sqlite3.connect(path) as connection:
        connection.executescript(version_1)
        connection.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        connection.execute("INSERT INTO entries (kind, path, sha256, weights_hash, builder, params, added) "
                           "VALUES ('model', ?, ?, ?, 'lenet5', ?, 0)",
                           (entry.path, entry.sha256, entry.weights_hash, entry.params))
        columns = [row[1] for row in connection.execute("PRAGMA table_info(entries)")]
    assert "parts" not in columns
    with Box(path) as box:
        [migrated] = box.entries()
        assert (migrated.path, migrated.params, migrated.parts) == (entry.path, entry.params, None)
        assert str(model.parent) in box.folders
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)


def test_a_link_out_of_the_box_folders_is_refused(files, tmp_path):
    _, model, _, _ = files
    inside = tmp_path / "models"
    inside.mkdir()
    (inside / "lenet.safetensors").write_bytes(model.read_bytes())
    path = tmp_path / "box.sqlite"
    with Box(path) as box:
        box.add([inside / "lenet.safetensors"])
    (inside / "lenet.safetensors").unlink()
    (inside / "lenet.safetensors").symlink_to("/etc/hostname")  # the registered name now leads out of the folders
    assert_user_error(invoke("box", "list", "--box", str(path)), "outside the box's folders")
