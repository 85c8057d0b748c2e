"""The LEGO box: a catalogue of source models, profiles, components and assemblies (issue 26), in SQLite.

Files stay files; the box indexes them with what users search by — kind, classes (dataset and name), builder,
input, params, FLOPs, accuracy on its task and its source's restricted base, α/β, reconstruction, the source it
was cut from — and each file's path and SHA-256. `verify` rehashes every file. The database is SQLite (the
standard library's), in WAL mode so that several processes can add at once, with a schema version; a box file
whose version or rows are not what this version of modellego writes is refused in one line. Every value that
reaches SQL is a bound parameter.

Default file: `$MODELLEGO_BOX`, else `$XDG_DATA_HOME/modellego/box.sqlite` (`~/.local/share/...`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from modellego.errors import ModellegoError

SCHEMA_VERSION = 1
KINDS = ("model", "component", "assembly", "profile")
BUSY_SECONDS = 60  # how long a writer waits for another process's transaction
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'component', 'assembly', 'profile')),
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    weights_hash TEXT,
    source_hash TEXT,
    builder TEXT,
    input TEXT,
    params INTEGER,
    flops INTEGER,
    accuracy REAL,
    restricted_base REAL,
    settings TEXT,
    reconstructed INTEGER,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS classes (
    entry INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (entry, position)
);
CREATE INDEX IF NOT EXISTS classes_by_name ON classes (dataset, name);
"""


def default_path() -> Path:
    """Where the box lives unless told: $MODELLEGO_BOX, else the user's data folder."""
    if os.environ.get("MODELLEGO_BOX"):
        return Path(os.environ["MODELLEGO_BOX"])
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "modellego" / "box.sqlite"


@dataclass
class Entry:
    """One registered file and what the box knows of it."""

    id: int
    kind: str
    path: str
    sha256: str
    classes: list[tuple[str, str]] = field(default_factory=list)  # (dataset, name), in output order
    weights_hash: str | None = None
    source_hash: str | None = None
    builder: str | None = None
    input: dict | None = None
    params: int | None = None
    flops: int | None = None
    accuracy: float | None = None
    restricted_base: float | None = None
    settings: dict | None = None
    reconstructed: bool | None = None
    added: float = 0.0

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Box:
    """A catalogue of modellego files (see the module docstring): `add`, `find`, `get`, `lineage`, `verify`,
    `remove`. One SQLite file; open it as a context or call `close`."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        if self.path.is_dir():
            raise ModellegoError(f"the box {self.path} is a folder; give a file such as {self.path}/box.sqlite")
        fresh = not self.path.exists()
        if fresh:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ModellegoError(f"cannot create the box's folder {self.path.parent} ({error.strerror})") from None
        try:
            self.connection = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
            self.connection.row_factory = sqlite3.Row  # rows by column name
            self.connection.execute("PRAGMA foreign_keys = ON")
            if fresh or not self._tables():
                self.connection.execute("PRAGMA journal_mode = WAL")
                with self._transaction():
                    for statement in filter(str.strip, SCHEMA.split(";")):
                        self.connection.execute(statement)
                    self.connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                            (str(SCHEMA_VERSION),))
            self._check_schema()
        except sqlite3.DatabaseError as error:
            raise ModellegoError(f"{self.path} is not a modellego box ({error}); give another --box") from None

    # --- the file ------------------------------------------------------------------------------------------------

    def _tables(self) -> set[str]:
        rows = self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {row[0] for row in rows}

    def _check_schema(self) -> None:
        if not {"meta", "entries", "classes"} <= self._tables():
            raise ModellegoError(f"{self.path} is not a modellego box (its tables are not a box's); give another --box")
        row = self.connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            found = "none" if row is None else repr(row[0])[:40]
            raise ModellegoError(f"{self.path} is a box of schema version {found}; this modellego reads version "
                                 f"{SCHEMA_VERSION}: use the modellego that wrote it, or start a new box")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write, taking the database's write lock at once (other processes wait up to BUSY_SECONDS)."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Box":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- adding ------------------------------------------------------------------------------------------------

    def add(self, paths: Sequence[str | os.PathLike | Entry]) -> list[Entry]:
        """Register modellego files (models, components, assemblies, profiles) from their manifests or headers
        (or as `describe` gave them); refuse, in one line, a file that is not a modellego file or is registered
        already. All or none land."""
        described = [path if isinstance(path, Entry) else describe(Path(path)) for path in paths]
        with self._transaction():
            for entry in described:
                present = self._row_by_path(entry.path)
                if present is not None:
                    raise ModellegoError(f"{entry.path} is in the box already (entry {present}); `box remove` it "
                                         "first to add it again")
                cursor = self.connection.execute(
                    "INSERT INTO entries (kind, path, sha256, weights_hash, source_hash, builder, input, params, "
                    "flops, accuracy, restricted_base, settings, reconstructed, added) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry.kind, entry.path, entry.sha256, entry.weights_hash, entry.source_hash, entry.builder,
                     _json(entry.input), entry.params, entry.flops, entry.accuracy, entry.restricted_base,
                     _json(entry.settings), None if entry.reconstructed is None else int(entry.reconstructed),
                     time.time()))
                entry.id = int(cursor.lastrowid)
                self.connection.executemany("INSERT INTO classes VALUES (?, ?, ?, ?)",
                                            [(entry.id, k, dataset, name) for k, (dataset, name) in
                                             enumerate(entry.classes)])
        return [self.get(entry.id) for entry in described]

    def _row_by_path(self, path: str) -> int | None:
        row = self.connection.execute("SELECT id FROM entries WHERE path = ?", (path,)).fetchone()
        return None if row is None else int(row[0])

    # --- reading -----------------------------------------------------------------------------------------------

    def get(self, entry_id: int) -> Entry:
        """One entry by its id (a one-line error when there is none)."""
        row = self.connection.execute("SELECT * FROM entries WHERE id = ?", (int(entry_id),)).fetchone()
        if row is None:
            raise ModellegoError(f"the box has no entry {entry_id}; `modellego box list` shows its entries")
        return self._entry(row)

    def _entry(self, row: sqlite3.Row) -> Entry:
        values = dict(row)
        if values["kind"] not in KINDS:
            raise ModellegoError(f"{self.path}: entry {values['id']} has kind {str(values['kind'])[:40]!r}, not one "
                                 "a box holds: the box file was edited; start a new box")
        classes = self.connection.execute("SELECT dataset, name FROM classes WHERE entry = ? ORDER BY position",
                                          (values["id"],)).fetchall()
        try:
            entry = Entry(id=int(values["id"]), kind=values["kind"], path=str(values["path"]),
                          sha256=str(values["sha256"]), classes=[(str(d), str(n)) for d, n in classes],
                          weights_hash=values["weights_hash"], source_hash=values["source_hash"],
                          builder=values["builder"], input=_unjson(values["input"]), params=values["params"],
                          flops=values["flops"], accuracy=values["accuracy"],
                          restricted_base=values["restricted_base"], settings=_unjson(values["settings"]),
                          reconstructed=None if values["reconstructed"] is None else bool(values["reconstructed"]),
                          added=float(values["added"]))
        except (TypeError, ValueError) as error:
            raise ModellegoError(f"{self.path}: entry {values['id']} is damaged ({error}); start a new box") from None
        return entry

    def entries(self) -> Iterator[Entry]:
        for row in self.connection.execute("SELECT * FROM entries ORDER BY id").fetchall():
            yield self._entry(row)

    def find(self, kind: str | None = None, dataset: str | None = None, class_name: str | None = None,
             builder: str | None = None) -> list[Entry]:
        """The entries of `kind` holding a class `class_name` (of `dataset`), of `builder`; None: any."""
        found = []
        for entry in self.entries():
            if kind is not None and entry.kind != kind:
                continue
            if builder is not None and entry.builder != builder:
                continue
            if dataset is not None and all(d != dataset for d, _ in entry.classes):
                continue
            if class_name is not None and all(n.lower() != class_name.lower() or (dataset and d != dataset)
                                              for d, n in entry.classes):
                continue
            found.append(entry)
        return found

    def lineage(self, entry: Entry) -> list[Entry]:
        """The entries `entry` descends from, nearest first: a component's source, a profile's model."""
        chain, seen = [], {entry.id}
        current = entry
        while current.source_hash:
            parents = [other for other in self.entries() if other.weights_hash == current.source_hash
                       and other.id not in seen]
            if not parents:
                break
            current = parents[0]
            seen.add(current.id)
            chain.append(current)
        return chain

    # --- upkeep ------------------------------------------------------------------------------------------------

    def verify(self) -> dict[int, str]:
        """Every entry's file rehashed: entry id → 'ok', 'missing' or 'changed'."""
        from modellego.io.atomic import file_hash

        states = {}
        for entry in self.entries():
            path = Path(entry.path)
            if not path.is_file():
                states[entry.id] = "missing"
            else:
                states[entry.id] = "ok" if file_hash(path) == entry.sha256 else "changed"
        return states

    def remove(self, entry_id: int, force: bool = False) -> Entry:
        """Unregister an entry (its file stays); refused while something registered descends from it."""
        entry = self.get(entry_id)
        children = [other for other in self.entries() if entry.weights_hash and other.source_hash == entry.weights_hash]
        if children and not force:
            raise ModellegoError(f"entry {entry.id} has {len(children)} registered entr"
                                 f"{'y' if len(children) == 1 else 'ies'} made from it ({', '.join(str(c.id) for c in children[:5])}); "
                                 "remove those first, or --force")
        with self._transaction():
            self.connection.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
        return entry


def describe(path: Path) -> Entry:
    """What the box records of one file: its kind, classes and search fields, from its manifest (models) or
    header (profiles), and its SHA-256."""
    from modellego.commands.evaluate import ProfileInfo, info
    from modellego.core.evaluate import count_params
    from modellego.core.hashing import weights_hash
    from modellego.io.atomic import file_hash
    from modellego.io.modelfile import load
    from modellego.kinds import kind_of

    path = path.resolve()
    if not path.is_file():
        raise ModellegoError(f"no such file: {path}")
    described = info(path)
    if isinstance(described, ProfileInfo):
        return Entry(id=0, kind="profile", path=str(path), sha256=file_hash(path),
                     classes=[(described.dataset, name) for _, name, _ in described.classes],
                     source_hash=described.model_hash)
    model, manifest = load(path)
    kind = manifest.kind if manifest.kind in ("component", "assembly") else "model"
    disassembled = manifest.provenance.get("disassembled", {})
    metrics = manifest.metrics or {}
    settings = {key: disassembled[key] for key in ("alpha_conv", "beta_conv", "alpha_fc", "beta_fc")
                if key in disassembled} or None
    return Entry(id=0, kind=kind, path=str(path), sha256=file_hash(path),
                 classes=[(ref.dataset, ref.name) for ref in manifest.classes], weights_hash=weights_hash(model),
                 source_hash=disassembled.get("source_hash"), builder=str(manifest.architecture.get("builder")),
                 input=manifest.input.to_dict(), params=count_params(model),
                 flops=kind_of(manifest.architecture).count_flops(model, manifest.input),
                 accuracy=metrics.get("test_accuracy"), restricted_base=metrics.get("restricted_base"),
                 settings=settings, reconstructed=("reconstruction" in disassembled) if kind == "component" else None)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _unjson(text: Any) -> Any:
    if text is None:
        return None
    return json.loads(str(text))
