"""The box's catalogue: source models, profiles, components and assemblies, indexed in SQLite.

Files stay files; the box indexes them with what users search by — kind, classes (dataset and name), builder,
input, params, FLOPs, accuracy on its task and its source's restricted base, α/β, reconstruction, the source it
was cut from, the components an assembly is made of — and each file's path and SHA-256. `verify` rehashes every
file. The database is SQLite (the standard library's), in WAL mode so that several processes can add at once,
with a schema version and migrations from earlier versions; a box file whose version or rows are not what this
version of modellego writes is refused in one line. Every value that reaches SQL is a bound parameter.

A registered file must lie in one of the box's folders: those files were added from (recorded as they are
added) and the box's own folder of built files, `<box>-files` beside the box file. A row pointing elsewhere (an
edited box file) is refused.

Default file: `$MODELLEGO_BOX`, else `$XDG_DATA_HOME/modellego/box.sqlite` (`~/.local/share/...`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from modellego.errors import ModellegoError

SCHEMA_VERSION = 2
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
    added REAL NOT NULL,
    parts TEXT
);
CREATE TABLE IF NOT EXISTS folders (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS classes (
    entry INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (entry, position)
);
CREATE INDEX IF NOT EXISTS classes_by_name ON classes (dataset, name);
"""
COLUMNS = {  # what this version reads of each table
    "entries": {"id", "kind", "path", "sha256", "weights_hash", "source_hash", "builder", "input", "params", "flops",
                "accuracy", "restricted_base", "settings", "reconstructed", "added", "parts"},
    "classes": {"entry", "position", "dataset", "name"},
}
# Version N's box becomes version N + 1's by these statements (and `_record_folders`), in one transaction.
MIGRATIONS = {
    1: ["ALTER TABLE entries ADD COLUMN parts TEXT", "CREATE TABLE IF NOT EXISTS folders (path TEXT PRIMARY KEY)"],
}


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
    parts: list[str] | None = None  # an assembly's components, by weights hash

    def is_profile_of(self, model_hash: str | None, classes: Iterable[tuple[str, str]]) -> bool:
        """Whether this entry is a profile of the model with weights `model_hash` holding every class (by name)
        of `classes`."""
        names = {name for _, name in classes}
        return self.kind == "profile" and model_hash is not None and self.source_hash == model_hash and \
            names <= {name for _, name in self.classes}

    def label(self) -> str:
        """`kind id (file name)`, for plans and messages."""
        return f"{self.kind} {self.id} ({Path(self.path).name})"

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Catalogue:
    """A catalogue of modellego files (see the module docstring): `add`, `find`, `get`, `lineage`, `verify`,
    `remove`. One SQLite file; open it as a context or call `close`. `modellego.Box` adds `plan` and `build`."""

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
            self.folders = self._folders()
        except sqlite3.DatabaseError as error:
            raise ModellegoError(f"{self.path} is not a modellego box ({error}); give another --box") from None

    @property
    def files(self) -> Path:
        """The box's own folder, where `build` writes the profiles and components it makes."""
        return self.path.resolve().parent / f"{self.path.stem}-files"

    # --- the file ------------------------------------------------------------------------------------------------

    def _tables(self) -> set[str]:
        rows = self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {row[0] for row in rows}

    def _columns(self, table: str) -> set[str]:
        return {str(row[1]) for row in self.connection.execute(f"PRAGMA table_info({table})").fetchall()}

    def _check_schema(self) -> None:
        if not {"meta", "entries", "classes"} <= self._tables() or not COLUMNS["classes"] <= self._columns("classes") \
                or not COLUMNS["entries"] - {"parts"} <= self._columns("entries"):
            raise ModellegoError(f"{self.path} is not a modellego box (its tables are not a box's); give another --box")
        row = self.connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = row[0] if row is not None else None
        if version not in [str(number) for number in range(1, SCHEMA_VERSION + 1)]:
            found = "none" if row is None else repr(version)[:40]
            raise ModellegoError(f"{self.path} is a box of schema version {found}; this modellego reads versions 1 to "
                                 f"{SCHEMA_VERSION}: use the modellego that wrote it, or start a new box")
        if int(version) < SCHEMA_VERSION:
            self._migrate(int(version))
        if not COLUMNS["entries"] <= self._columns("entries") or "path" not in self._columns("folders"):
            raise ModellegoError(f"{self.path} is not a modellego box of schema version {SCHEMA_VERSION} (its tables "
                                 "lack columns this version writes): the box file was edited; start a new box")

    def _migrate(self, version: int) -> None:
        """Bring a box of an earlier schema version to this one, in one transaction (all or nothing)."""
        with self._transaction():
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    self.connection.execute(statement)
            self.connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            self._record_folders(row[0] for row in self.connection.execute("SELECT path FROM entries").fetchall())

    def _record_folders(self, paths: Iterable[str]) -> None:
        folders = {str(Path(path).parent) for path in paths}
        self.connection.executemany("INSERT OR IGNORE INTO folders VALUES (?)", [(folder,) for folder in folders])

    def _folders(self) -> list[str]:
        folders = [str(row[0]) for row in self.connection.execute("SELECT path FROM folders").fetchall()]
        for folder in folders:
            if not _clean_path(folder) or Path(folder).parent == Path(folder):
                raise ModellegoError(f"{self.path} records a folder {folder[:80]!r} that is not a plain absolute "
                                     "path below the root: the box file was edited; start a new box")
        return folders + [str(self.files)]

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

    def __enter__(self) -> "Catalogue":
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
                present = self.id_of(entry.path)
                if present is not None:
                    raise ModellegoError(f"{entry.path} is in the box already (entry {present}); `box remove` it "
                                         "first to add it again")
                cursor = self.connection.execute(
                    "INSERT INTO entries (kind, path, sha256, weights_hash, source_hash, builder, input, params, "
                    "flops, accuracy, restricted_base, settings, reconstructed, added, parts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry.kind, entry.path, entry.sha256, entry.weights_hash, entry.source_hash, entry.builder,
                     _json(entry.input), entry.params, entry.flops, entry.accuracy, entry.restricted_base,
                     _json(entry.settings), None if entry.reconstructed is None else int(entry.reconstructed),
                     time.time(), _json(entry.parts)))
                entry.id = int(cursor.lastrowid)
                self._record_folders([entry.path])
                self.connection.executemany("INSERT INTO classes VALUES (?, ?, ?, ?)",
                                            [(entry.id, k, dataset, name) for k, (dataset, name) in
                                             enumerate(entry.classes)])
        self.folders = self._folders()
        return [self.get(entry.id) for entry in described]

    def id_of(self, path: str) -> int | None:
        """The id of the entry registered at `path` (absolute, as `describe` gives it), or None."""
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
        path = str(values.get("path"))
        if not _clean_path(path) or not all(any(candidate.startswith(folder.rstrip(os.sep) + os.sep)
                                                for folder in self.folders)
                                            for candidate in (path, os.path.realpath(path))):  # no link out either
            raise ModellegoError(f"{self.path}: entry {values['id']}'s file {path[:80]!r} lies outside the box's "
                                 "folders: the box file was edited; start a new box")
        try:
            classes = self.connection.execute("SELECT dataset, name FROM classes WHERE entry = ? ORDER BY position",
                                              (values["id"],)).fetchall()
        except sqlite3.DatabaseError as error:
            raise ModellegoError(f"{self.path} cannot be read as a box ({error}); start a new box") from None
        try:
            entry = Entry(id=int(values["id"]), kind=values["kind"], path=path,
                          sha256=str(values["sha256"]), classes=[(str(d), str(n)) for d, n in classes],
                          weights_hash=values["weights_hash"], source_hash=values["source_hash"],
                          builder=values["builder"], input=_unjson(values["input"]), params=values["params"],
                          flops=values["flops"], accuracy=values["accuracy"],
                          restricted_base=values["restricted_base"], settings=_unjson(values["settings"]),
                          reconstructed=None if values["reconstructed"] is None else bool(values["reconstructed"]),
                          added=float(values["added"]), parts=_unjson(values["parts"]))
            _check_row(entry)
        except (TypeError, ValueError, KeyError, IndexError, json.JSONDecodeError, sqlite3.DatabaseError) as error:
            raise ModellegoError(f"{self.path}: entry {values['id']} is damaged ({error}); start a new box") from None
        return entry

    def entries(self) -> Iterator[Entry]:
        try:
            rows = self.connection.execute("SELECT * FROM entries ORDER BY id").fetchall()
        except sqlite3.DatabaseError as error:
            raise ModellegoError(f"{self.path} cannot be read as a box ({error}); start a new box") from None
        for row in rows:
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
        """What `entry` was made from, nearest first: an assembly's components, a component's profiles (those of
        its source holding its classes) and source, a profile's model; each once."""
        everything = list(self.entries())
        chain: list[Entry] = []
        seen = {entry.id}
        todo = [entry]
        while todo:
            current = todo.pop(0)
            parents = [other for other in everything if other.weights_hash in (current.parts or [])]
            if current.kind == "component":
                parents += [other for other in everything if other.is_profile_of(current.source_hash, current.classes)]
            if current.source_hash:
                parents += [other for other in everything if other.kind in ("model", "component")
                            and other.weights_hash == current.source_hash]
            for parent in parents:
                if parent.id not in seen:
                    seen.add(parent.id)
                    chain.append(parent)
                    todo.append(parent)
        return chain

    # --- upkeep ------------------------------------------------------------------------------------------------

    def verify(self, entries: Iterable[Entry] | None = None) -> dict[int, str]:
        """Every entry's file (or those of `entries`) rehashed: entry id → 'ok', 'missing' or 'changed'."""
        from modellego.io.atomic import file_hash

        states = {}
        for entry in self.entries() if entries is None else entries:
            path = Path(entry.path)
            if not path.is_file():
                states[entry.id] = "missing"
            else:
                states[entry.id] = "ok" if file_hash(path) == entry.sha256 else "changed"
        return states

    def remove(self, entry_id: int, force: bool = False) -> Entry:
        """Unregister an entry (its file stays); refused while something registered descends from it."""
        entry = self.get(entry_id)
        children = [other for other in self.entries() if entry.weights_hash and
                    (other.source_hash == entry.weights_hash or entry.weights_hash in (other.parts or []))]
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
    disassembled = manifest.provenance.get("disassembled")
    disassembled = disassembled if isinstance(disassembled, dict) else {}
    metrics = manifest.metrics if isinstance(manifest.metrics, dict) else {}
    assembled = manifest.provenance.get("assembled")
    components = assembled.get("components") if isinstance(assembled, dict) else None
    components = [part for part in components if isinstance(part, dict)] if isinstance(components, list) else []
    settings = {key: _number(disassembled.get(key)) for key in ("alpha_conv", "beta_conv", "alpha_fc", "beta_fc")
                if _number(disassembled.get(key)) is not None} or None
    source_hash = disassembled.get("source_hash")
    return Entry(id=0, kind=kind, path=str(path), sha256=file_hash(path),
                 classes=[(ref.dataset, ref.name) for ref in manifest.classes], weights_hash=weights_hash(model),
                 source_hash=source_hash if isinstance(source_hash, str) else None, builder=str(manifest.architecture.get("builder")),
                 input=manifest.input.to_dict(), params=count_params(model),
                 flops=kind_of(manifest.architecture).count_flops(model, manifest.input),
                 accuracy=_number(metrics.get("test_accuracy")), restricted_base=_number(metrics.get("restricted_base")),
                 settings=settings, reconstructed=("reconstruction" in disassembled) if kind == "component" else None,
                 parts=[str(part.get("given_hash", part.get("hash"))) for part in components] if kind == "assembly"
                 else None)


def _check_row(entry: Entry) -> None:
    """A row's values have the types this version writes (an edited box file may hold anything)."""
    if not (isinstance(entry.sha256, str) and len(entry.sha256) == 64):
        raise ValueError("its SHA-256 is not one")
    for name in ("params", "flops"):
        value = getattr(entry, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"its {name} is not a count")
    for name in ("accuracy", "restricted_base"):
        value = getattr(entry, name)
        if value is not None and _number(value) is None:
            raise ValueError(f"its {name} is not a number")
    for name in ("builder", "weights_hash", "source_hash"):
        if getattr(entry, name) is not None and not isinstance(getattr(entry, name), str):
            raise ValueError(f"its {name} is not text")
    if entry.input is not None and not _input_shape(entry.input):
        raise ValueError("its input is not an input record")
    for name, expected in (("input", dict), ("settings", dict), ("parts", list)):
        if getattr(entry, name) is not None and not isinstance(getattr(entry, name), expected):
            raise ValueError(f"its {name} is not a {expected.__name__}")
    if entry.parts is not None and not all(isinstance(part, str) for part in entry.parts):
        raise ValueError("its parts are not hashes")


def _input_shape(record: Any) -> bool:
    """Whether `record` reads as an input: images (channels, two sides) or graph nodes (features)."""
    if not isinstance(record, dict):
        return False
    if record.get("kind") == "graph":
        return isinstance(record.get("features"), int)
    size = record.get("size")
    return isinstance(record.get("channels"), int) and isinstance(size, list) and len(size) == 2 and \
        all(isinstance(side, int) for side in size)


def _number(value: Any) -> float | None:
    """A finite number from a manifest's free-form records, else None (what the box may compute with)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _clean_path(path: str) -> bool:
    """An absolute path with nothing to resolve (no `..`, no doubled separators) and no control characters."""
    return path.isprintable() and os.path.isabs(path) and os.path.normpath(path) == path


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _unjson(text: Any) -> Any:
    if text is None:
        return None
    return json.loads(str(text))
