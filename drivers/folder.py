"""Watch a slide scanner's output folder and turn new files into slides to count.

``FolderWatcher(params, store, submit, ...)`` watches each configured folder with watchdog
(events only wake it early: every pass rescans the folder, so nothing is missed when events
are lost, e.g. on network shares). A pass:

1. lists candidate files (configured extensions; hidden, partial and quarantined files are
   left alone), refusing names with ``..`` and symlinks that lead outside the folder; a
   subfolder holding ``.dcm`` files is one candidate, a DICOM WSI series (one instance file
   per pyramid level), and the same refusals apply to each of its files; ``.dcm`` files
   loose in the watch folder itself are first moved into one new folder per slide (by study
   and container identifier) once all of them have settled, and so are, inside it, the files
   of a series folder that turns out to hold several slides (grouping ``file``);
2. waits until a file is complete: its size and mtime unchanged for ``stable_seconds``, or
   the scanner's completion marker present (``<file><marker>``, ``<slide folder><marker>`` or
   ``<slide folder>/<marker>``); a series is complete when every file in its folder is;
3. groups complete files into slides (one file per slide, one subfolder per slide, or a
   filename regex with a ``slide`` group);
4. records each file by content hash (sha256) in the store's ``scanned_files`` table, so a
   restart or a re-delivered copy is never processed twice (a series' hash covers its
   instance files' names and bytes); only a file that was quarantined (a failed slide's file
   is moved there too) is tried afresh when a person puts it back (e.g. after setting the
   folder's pixel size);
5. opens and plans every file (drivers.wsi_fields.plan_file); a file that cannot be opened or
   decoded, or has no pixel size, is moved to the folder's quarantine subfolder with
   ``<name>.error.txt`` saying why, and recorded; the other files of the slide go on (a
   broken series moves as a whole folder);
6. queues one slide per group in the store with its frozen field plan and calls
   ``submit(slide_id)``; the daemon (daemon/service.py), which counts queued slides, rebuilds
   the FieldSource with ``drivers.wsi_fields.source_from_plan``.

Files that arrived while the service was down are found by the first pass (backlog). Each
pass also settles finished slides: their files become ``done``; a slide that failed moves its
files to quarantine with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from daemon.case import CaseError, CaseInfo, CaseKey, parse_case
from daemon.models import ScannedFile, Slide, utcnow
from drivers.slide_image import DICOM_SUFFIX, dicom_series_files, dicom_slide_key
from drivers.wsi_fields import PlannedFile, SlidePlan, WsiParams, plan_file
from pipeline.detect import DetectParams
from pipeline.errors import ImageError, MarrowError
from pipeline.params import Params

if TYPE_CHECKING:
    from daemon.store import Store

log = logging.getLogger("marrowcount.watch")

HASH_CHUNK = 4 * 2**20
PARTIAL_SUFFIXES = (".part", ".tmp", ".partial")
"""Names a file has while a scanner or copy is still writing it."""
QUARANTINE_NAME_BYTES = 200
"""Longest quarantined name: its ".<k>" and ".error.txt" note stay within 255 bytes."""
CASE_FROM_NAME_BY = "scanner folder"
"""Who the audit trail says tied a folder slide to its case, when ``case_pattern`` read it."""
STORE_ATTEMPTS = 5
"""Passes ``FolderWatcher.scan_retrying`` tries while the store refuses them: 15 s of pauses."""


class WatchError(MarrowError):
    """A watch folder that cannot be used (missing, not a folder)."""


class _CasePattern(Params):
    """``case_pattern``, checked in a folder's entry and in ``folder_defaults`` alike."""

    case_pattern: str | None = Field(
        description="regex on the slide's name whose named groups (accession, patient_id, "
                    "patient_name, specimen, collected_on) fill its case, e.g. "
                    "'^(?P<accession>BM\\d{2}-\\d{5})'; null = the reviewer enters the case")

    @field_validator("case_pattern")
    @classmethod
    def _case_groups(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"case_pattern is not a valid regex: {exc}") from None
        known = set(get_args(CaseKey))
        if not rx.groupindex or set(rx.groupindex) - known:
            raise ValueError(f"case_pattern needs named groups among {', '.join(sorted(known))}"
                             f" (it has {', '.join(rx.groupindex) or 'none'})")
        return v


class WatchFolder(_CasePattern):
    """One watched scanner folder (each key's default: ``watch.folder_defaults``)."""

    path: str = Field(min_length=1)
    um_per_px: float | None = Field(gt=0, description="pixel size when a file has none")
    grouping: Literal["file", "subfolder", "pattern"]
    pattern: str | None = Field(description="regex on the file name with a (?P<slide>...) group")
    marker: str | None = Field(description="completion marker suffix, e.g. '.done'; null = "
                                           "wait for size and mtime to settle")
    area_um: tuple[tuple[float, float], ...] | None = Field(
        description="counting area in slide µm; null = found automatically")
    target: int | None = Field(gt=0, description="counted cells per slide; null = acquisition.target")

    @model_validator(mode="after")
    def _pattern(self) -> "WatchFolder":
        if self.grouping == "pattern":
            if not self.pattern:
                raise ValueError("grouping 'pattern' needs a pattern with a (?P<slide>...) group")
            try:
                rx = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regex: {exc}") from None
            if "slide" not in rx.groupindex:
                raise ValueError("pattern needs a named group (?P<slide>...)")
        return self


class WatchFolderDefaults(_CasePattern):
    um_per_px: float | None
    grouping: Literal["file", "subfolder", "pattern"]
    pattern: str | None
    marker: str | None
    area_um: tuple[tuple[float, float], ...] | None
    target: int | None


class WatchParams(Params):
    """The ``watch:`` config section."""

    folders: tuple[WatchFolder, ...]
    folder_defaults: WatchFolderDefaults
    stable_seconds: float = Field(ge=0, description="size and mtime unchanged this long")
    scan_seconds: float = Field(gt=0, description="rescan interval (events wake earlier)")
    extensions: tuple[str, ...] = Field(min_length=1)
    quarantine_dir: str = Field(min_length=1, description="subfolder of each watch folder")
    wsi: WsiParams

    @model_validator(mode="before")
    @classmethod
    def _fill_folders(cls, data: Any) -> Any:
        # Each folder entry is merged over folder_defaults, so a lab writes only what differs
        # (a bare string is a folder path).
        if isinstance(data, dict) and isinstance(data.get("folders"), (list, tuple)):
            defaults = data.get("folder_defaults")
            defaults = defaults.model_dump() if isinstance(defaults, Params) else dict(defaults or {})
            folders = []
            for entry in data["folders"]:
                if isinstance(entry, str):
                    entry = {"path": entry}
                if isinstance(entry, dict):
                    entry = {**defaults, **entry}
                folders.append(entry)
            data = {**data, "folders": folders}
        return data

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in v)

    @field_validator("quarantine_dir")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError("quarantine_dir must be a plain folder name inside the watch folder")
        return v


@dataclass(frozen=True)
class WatchEvent:
    """What a pass did with a file or slide; ``kind`` is one of
    "slide" (queued), "quarantined", "refused", "duplicate", "done", "grouped" (loose DICOM
    files moved into a folder of their own)."""

    kind: str
    path: str
    slide_id: int | None = None
    reason: str | None = None


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content (an MRXS index also covers its data folder listing; a
    DICOM series folder is the names, sizes and bytes of its instance files)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in dicom_series_files(path):
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
            _hash_bytes(h, p)
        return h.hexdigest()
    _hash_bytes(h, path)
    if path.suffix.lower() == ".mrxs":
        data = path.with_suffix("")
        if data.is_dir():
            for p in sorted(data.iterdir()):
                if p.is_file():
                    h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()


def _hash_bytes(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)


class FolderWatcher:
    """Watch ``params.folders`` and queue each complete slide in ``store`` exactly once.

    ``submit(slide_id)`` is called after a slide is queued (the daemon wakes its worker);
    ``on_event`` receives every WatchEvent. ``target`` and ``taxonomy`` are recorded on new
    slides; ``detect`` drives the automatic counting-area pass. ``start()`` runs the watcher
    in background threads, ``stop()`` ends them; ``scan_once()`` is one synchronous pass.
    """

    def __init__(
        self,
        params: WatchParams,
        store: "Store",
        submit: Callable[[int], None] | None = None,
        *,
        target: int,
        taxonomy: str,
        detect: DetectParams,
        on_event: Callable[[WatchEvent], None] | None = None,
    ) -> None:
        self.params, self.store = params, store
        self.submit = submit or (lambda slide_id: None)
        self.on_event = on_event or (lambda ev: None)
        self.target, self.taxonomy, self.detect = target, taxonomy, detect
        self._seen: dict[Path, _Seen] = {}
        self._hashes: dict[Path, tuple[int, int, str]] = {}
        self._settled: set[tuple[Path, int, int]] = set()
        self._warned: set[str] = set()
        self._stuck: set[Path] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None

    @classmethod
    def from_config(cls, cfg: Any, store: "Store", submit: Callable[[int], None] | None = None,
                    on_event: Callable[[WatchEvent], None] | None = None) -> "FolderWatcher":
        """The watcher the daemon runs: ``cfg.watch`` folders, new slides get
        ``cfg.acquisition.target`` and the active taxonomy. With no folders it does nothing."""
        return cls(cfg.watch, store, submit, target=cfg.acquisition.target,
                   taxonomy=cfg.taxonomy, detect=cfg.detect, on_event=on_event)

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching (the first pass processes the backlog). Idempotent."""
        if self._thread is not None:
            return
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self._wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:  # noqa: ARG002
                wake.set()

        self._stop.clear()
        self._observer = Observer()
        for folder in self.params.folders:
            path = Path(folder.path)
            if path.is_dir():
                self._observer.schedule(_Wake(), str(path), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="folder-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching; a file being planned is finished first (nothing is left half-done)."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Still planning a large file: it stops at the next slide boundary, which it
                # only does while _thread is set (see the pass loop); keep it set.
                log.warning("folder watcher still finishing a file after %.0f s", timeout)
            else:
                self._thread = None

    def __enter__(self) -> "FolderWatcher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:  # noqa: BLE001  (one bad pass must not end the watcher)
                log.exception("watch pass failed; retrying")
            if self._wake.wait(self._next_wait()):
                # A file being written sends an event per chunk: let them gather first.
                self._stop.wait(0.2)
            self._wake.clear()

    def _next_wait(self) -> float:
        wait = self.params.scan_seconds
        now = time.monotonic()
        for seen in self._seen.values():
            due = seen.since + self.params.stable_seconds - now
            if due > 0:
                wait = min(wait, due + 0.05)
        return max(0.05, wait)

    # -- one pass ---------------------------------------------------------------------------

    def scan_once(self) -> list[WatchEvent]:
        """One pass over every folder; returns what it did. A store error (SQLAlchemyError)
        ends the pass and is raised, after what the pass had already done is reported."""
        events: list[WatchEvent] = []
        try:
            for folder in self.params.folders:
                if self._stop.is_set() and self._thread is not None:
                    break
                root = Path(folder.path)
                if not root.is_dir():
                    self._warn_once(str(root), f"watch folder {root} does not exist (yet)")
                    continue
                self._warned.discard(str(root))  # said again if it goes away again
                try:
                    self._scan_folder(folder, root, events)
                except OSError as exc:
                    log.error("watch folder %s: %s", root, exc)
            self._settle(events)
        finally:
            # Slides queued before the store failed are queued: unreported, `watch --once`
            # had never shown them, and the next pass finds them recorded.
            for ev in events:
                log.info("%s: %s%s", ev.kind, ev.path, f" ({ev.reason})" if ev.reason else "")
                self.on_event(ev)
        return events

    def scan_retrying(self, attempts: int = STORE_ATTEMPTS) -> list[WatchEvent]:
        """``scan_once``, tried again after a growing pause (1, 2, 4 ... s) while the store
        refuses it (locked by a backup, its server restarting), ``attempts`` times in all;
        for a one-off run (``watch --once``), which has no next pass to leave it to."""
        for attempt in range(attempts):
            try:
                return self.scan_once()
            except SQLAlchemyError as exc:
                if attempt == attempts - 1:
                    raise
                log.warning("watch pass: the store refused it (%s); trying again in %d s",
                            str(exc).splitlines()[0], 2 ** attempt)
                time.sleep(2 ** attempt)
        return []

    def _scan_folder(self, folder: WatchFolder, root: Path, events: list[WatchEvent]) -> None:
        """One folder's pass; what it does is added to ``events`` as it is done."""
        events += self._group_loose_dicom(folder, root)
        real_root = root.resolve()
        groups: dict[str, list[Path]] = {}
        ready: dict[str, bool] = {}
        now = time.monotonic()
        known: dict[Path, tuple[int, float]] | None = None
        present: set[Path] = set()
        for path in self._candidates(root):
            present.add(path)
            stat = self._admitted(folder, root, real_root, path, events)
            if stat is None:
                continue
            size, mtime = stat
            if (path, size, mtime) in self._settled:
                continue
            if known is None:
                known = self._recorded(root)
            rec = known.get(path)
            if rec is not None and rec[0] == size and mtime / 1e9 < rec[1]:
                # Recorded (done, queued or quarantined) and not written since: no need to hash
                # it again, which matters for a folder holding an archive of large slides.
                self._settled.add((path, size, mtime))
                continue
            key = self._slide_key(folder, root, path)
            if key is None:
                continue
            groups.setdefault(key, []).append(path)
            complete = self._complete(folder, root, path, size, mtime, now)
            ready[key] = ready.get(key, True) and complete
        loose = set(dicom_series_files(root))  # settling towards _group_loose_dicom
        for gone in [p for p in self._seen
                     if p.is_relative_to(root) and p not in present and p not in loose]:
            del self._seen[gone]  # deleted or moved away before it settled
        for key in sorted(groups):
            if self._stop.is_set() and self._thread is not None:
                break
            if not ready[key]:
                continue
            if folder.grouping == "file" and groups[key][0].is_dir():
                split = self._split_batch_folder(groups[key][0])
                if split:
                    events += split
                    continue
            try:
                events += self._process_group(folder, root, key, sorted(groups[key]))
            except SQLAlchemyError:
                raise  # the store, not this slide: the pass ends and the next one retries
            except Exception:  # noqa: BLE001  (one slide's fault must not hold up the others)
                log.exception("%s: cannot be queued; left where it is until a restart",
                              printable(str(root / key)))
                self._stuck.update(groups[key])

    def _group_loose_dicom(self, folder: WatchFolder, root: Path) -> list[WatchEvent]:
        """DICOM instance files written loose into the watch folder (a DICOM store that
        writes one flat folder): once every one has settled and no partial file is being
        written beside them, each slide's files (same study and container identifier: its
        pyramid, label and overview series) move into a new folder of their own, named after
        the container, which the next passes take as a series. A file that is not a
        whole-slide instance is quarantined with the reason."""
        if DICOM_SUFFIX not in self.params.extensions:
            return []
        files = dicom_series_files(root)
        if not files:
            return []
        events: list[WatchEvent] = []
        real_root = root.resolve()
        now = time.monotonic()
        settled = True
        safe = []
        for f in files:
            stat = self._admitted(folder, root, real_root, f, events)
            if stat is None:  # refused or vanished just now: look at the folder again first
                settled = settled and f in self._stuck
                continue
            settled = self._complete(folder, root, f, *stat, now) and settled
            safe.append(f)
        partial = any(p.name.endswith(PARTIAL_SUFFIXES) for p in root.iterdir())
        if not settled or partial or not safe:
            return events
        by_slide: dict[tuple[str, str], list[Path]] = {}
        for f in safe:
            try:
                by_slide.setdefault(dicom_slide_key(f), []).append(f)
            except ImageError as exc:
                events.append(self._quarantine(folder, root, f, str(exc), None))
        return events + self._move_by_slide(root, by_slide, "loose")

    def _split_batch_folder(self, path: Path) -> list[WatchEvent]:
        """A settled series folder holding several slides' files (a scanner's batch export):
        each slide's files move into a folder of their own inside it, taken as series by the
        next passes. [] when it holds one slide, or a file that is no whole-slide instance
        (then it is processed, and quarantined, as one series with the reason)."""
        by_slide: dict[tuple[str, str], list[Path]] = {}
        try:
            for f in dicom_series_files(path):
                by_slide.setdefault(dicom_slide_key(f), []).append(f)
        except ImageError:
            return []
        if len({container for _, container in by_slide}) < 2:
            return []
        return self._move_by_slide(path, by_slide, "batch")

    def _move_by_slide(self, parent: Path, by_slide: dict[tuple[str, str], list[Path]],
                       kind: str) -> list[WatchEvent]:
        """Move each slide's files into a new folder in ``parent`` named after its container
        identifier; one "grouped" event per folder."""
        events = []
        for (_, container), group in sorted(by_slide.items()):
            base = re.sub(r"[^A-Za-z0-9._-]+", "_", container).strip("._-") or "slide"
            if base == self.params.quarantine_dir:
                base += "_slide"
            dest, k = parent / base, 1
            while dest.exists() or dest.is_symlink():  # a slide of that name came before
                k += 1
                dest = parent / f"{base}~{k}"
            try:
                dest.mkdir()
                for f in group:
                    os.rename(f, dest / f.name)
                    self._seen.pop(f, None)
            except OSError as exc:
                self._stuck.update(group)
                log.error("cannot group %s DICOM files of slide %s into %s/ (%s); they are "
                          "left where they are", kind, container, dest.name, exc.strerror)
                continue
            events.append(WatchEvent("grouped", str(dest), None,
                                     f"{len(group)} {kind} DICOM file(s) of slide {container}"))
        return events

    def _admitted(self, folder: WatchFolder, root: Path, real_root: Path, path: Path,
                  events: list[WatchEvent]) -> tuple[int, int] | None:
        """``(size, mtime)`` of a listed path that may be looked at; None when it is stuck
        (could not be moved before), refused for its path (quarantined, event added) or gone."""
        if path in self._stuck:
            return None
        unsafe = self._unsafe(path, root, real_root)
        if unsafe:
            events.append(self._quarantine(folder, root, path, f"refused: {unsafe}", None,
                                           kind="refused"))
            return None
        try:
            return _content_stat(path)
        except OSError:
            return None  # vanished between listing and stat

    def _recorded(self, root: Path) -> dict[Path, tuple[int, float]]:
        """Files under ``root`` already decided in the store: path -> (size, recorded at, s).
        Not a quarantined one: it was moved out (or was gone), so one found at its recorded
        path was put back by a person, to be tried again (a file that could not be moved to
        quarantine is in ``_stuck`` for this run)."""
        with self.store.session() as s:
            found = s.execute(
                select(ScannedFile.path, ScannedFile.size, ScannedFile.updated_at)
                .where(ScannedFile.state.not_in(("pending", "quarantined")),
                       ScannedFile.path.startswith(str(root)))
            ).all()
        out = {}
        for path, size, at in found:
            if at.tzinfo is None:  # SQLite hands back naive UTC
                at = at.replace(tzinfo=timezone.utc)
            out[Path(path)] = (int(size), at.timestamp())
        return out

    def _candidates(self, root: Path) -> Iterable[Path]:
        exts = tuple(x for x in self.params.extensions if x != DICOM_SUFFIX)
        series = DICOM_SUFFIX in self.params.extensions
        real_root = root.resolve()
        quarantine = self.params.quarantine_dir
        stack = [(root, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            if depth > 0 and series and any(e.name.lower().endswith(DICOM_SUFFIX) for e in entries):
                yield d  # a DICOM series: the folder is the slide's one candidate
                continue
            # .dcm files loose in the watch folder itself are grouped into folders first
            # (_group_loose_dicom); they are never candidates of their own.
            for e in entries:
                name = e.name
                if name.startswith((".", "~")) or name.endswith(PARTIAL_SUFFIXES):
                    continue
                if depth == 0 and name == quarantine:
                    continue
                if e.is_dir(follow_symlinks=False):
                    if depth < 3:
                        stack.append((Path(e.path), depth + 1))
                    continue
                if e.is_symlink() and e.is_dir():
                    if not Path(e.path).resolve().is_relative_to(real_root):
                        yield Path(e.path)  # a link out of the folder: refused by _unsafe
                    continue
                if any(name.lower().endswith(x) for x in exts):
                    yield Path(e.path)

    @classmethod
    def _unsafe(cls, path: Path, root: Path, real_root: Path) -> str | None:
        if path.is_dir() and not path.is_symlink():
            for part in [path, *dicom_series_files(path)]:
                why = cls._unsafe_file(part, root, real_root)
                if why:
                    return why if part == path else f"{part.name}: {why}"
            return None
        return cls._unsafe_file(path, root, real_root)

    @staticmethod
    def _unsafe_file(path: Path, root: Path, real_root: Path) -> str | None:
        rel = path.relative_to(root)
        try:
            str(rel).encode("utf-8")
        except UnicodeEncodeError:
            # A Latin-1 name from an SMB share: the store cannot record it, and the failed
            # write had ended every pass before the files after it.
            return (f"file name {printable(str(rel))} is not valid UTF-8: rename it "
                    "(e.g. without accents) and put it back")
        if any(".." in part for part in rel.parts):
            return "name contains '..'"
        if path.is_symlink() or any(p.is_symlink() for p in list(path.parents)[: len(rel.parts) - 1]):
            target = path.resolve()
            if not target.is_relative_to(real_root):
                return f"symlink points outside the watch folder ({target})"
        return None

    def _slide_key(self, folder: WatchFolder, root: Path, path: Path) -> str | None:
        rel = path.relative_to(root)
        if folder.grouping == "subfolder" and len(rel.parts) > 1:
            return rel.parts[0]
        if folder.grouping == "pattern":
            m = re.search(folder.pattern or "", rel.name)
            if m is None or not m.group("slide"):
                self._warn_once(str(path), f"{rel}: name does not match the slide pattern; ignored")
                return None
            return m.group("slide").strip()
        return str(rel)

    def _complete(self, folder: WatchFolder, root: Path, path: Path, size: int, mtime: int,
                  now: float) -> bool:
        if folder.marker:
            return any(m.exists() for m in self._markers(folder, root, path))
        seen = self._seen.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (size, mtime):
            self._seen[path] = _Seen(size, mtime, now)
            return False
        quiet = now - seen.since >= self.params.stable_seconds
        # A backlog file whose mtime is already old is complete after a second identical look.
        old = time.time() - mtime / 1e9 >= self.params.stable_seconds
        return quiet or old

    def _markers(self, folder: WatchFolder, root: Path, path: Path) -> list[Path]:
        marker = folder.marker or ""
        rel = path.relative_to(root)
        out = [path.with_name(path.name + marker)]
        if path.is_dir():
            out.append(path / marker)
        if folder.grouping == "subfolder" and len(rel.parts) > 1:
            sub = root / rel.parts[0]
            out += [sub.with_name(sub.name + marker), sub / marker]
        if folder.grouping == "pattern":
            key = self._slide_key(folder, root, path)
            if key:
                out.append(path.parent / f"{key}{marker}")
        return out

    # -- processing a complete slide ---------------------------------------------------------

    def _process_group(self, folder: WatchFolder, root: Path, key: str,
                       paths: list[Path]) -> list[WatchEvent]:
        events: list[WatchEvent] = []
        planned: list[PlannedFile] = []
        for path in paths:
            try:
                size, mtime = _content_stat(path)
                sha = self._sha(path, size, mtime)
            except OSError as exc:
                log.warning("%s: cannot read (%s); will retry", path, exc.strerror)
                continue
            row = self._row(sha)
            if row is not None and row.state in ("done", "processing"):
                self._settled.add((path, size, mtime))
                if Path(row.path) != path:
                    events.append(WatchEvent("duplicate", str(path), row.slide_id,
                                             f"same content as {row.path}, already {row.state}"))
                else:  # only its inode changed (chmod, chown): recorded as looked at now, or
                    self._touch(sha)  # every restart would hash it again
                continue
            if row is not None and row.state == "quarantined":
                # Put back by a person, maybe after fixing what stopped it (e.g. the folder's
                # pixel size): tried afresh, and judged again under its own name.
                log.info("%s: quarantined before (%s); trying it again", path,
                         row.error or "no reason recorded")
            self._record(sha, path, size, "pending")
            try:
                planned.append(plan_file(path, sha, folder.um_per_px, self.params.wsi,
                                         self.detect, folder.area_um))
            except ImageError as exc:
                if not os.path.lexists(path):
                    # Gone while it was read (a scanner rewriting it): nothing to quarantine,
                    # and it is taken afresh when it comes back (quarantining a missing file
                    # left a note in the watch folder and blocked its path until a restart).
                    log.warning("%s vanished while it was read (%s); it is taken again if it "
                                "comes back", path, exc)
                    self._seen.pop(path, None)
                    continue
                events.append(self._quarantine(folder, root, path, str(exc), sha))
            except (MemoryError, OSError) as exc:
                log.warning("%s: cannot plan now (%s); will retry", path, exc)
        if not planned:
            return events
        plan = SlidePlan(tuple(planned))
        slide_id = self._queue_slide(folder, key, plan)
        for pf in planned:
            self._settled.add((Path(pf.path), *_content_stat(Path(pf.path))))
        events.append(WatchEvent("slide", str(root / key), slide_id,
                                 f"{len(planned)} file(s), {plan.n_fields} field(s) planned"))
        self.submit(slide_id)
        return events

    def _queue_slide(self, folder: WatchFolder, key: str, plan: SlidePlan) -> int:
        from daemon.store import StoreError

        shas = sorted(f.sha256 for f in plan.files)
        name, n = key, 1
        while True:
            # A slide already queued for exactly these files (a crash came between queueing
            # and recording) is taken over, never queued twice.
            with self.store.session() as s:
                existing = s.scalar(select(Slide).where(Slide.name == name))
                if existing is not None:
                    files = (existing.plan or {}).get("files", [])
                    # A failed slide of these files is kept as it was: its file came again.
                    same = (existing.status != "failed"
                            and sorted(f.get("sha256", "") for f in files) == shas)
                    slide_id = existing.id if same else None
                else:
                    slide_id = None
            if existing is None:
                case = self._case_of(folder, key)
                try:
                    slide_id = self.store.create_slide(
                        name, "folder", str(Path(folder.path) / key), folder.target or self.target,
                        self.taxonomy, um_per_px=plan.files[0].um_per_px, plan=plan.as_dict(),
                        case=case)
                except StoreError:
                    continue  # taken meanwhile: look again
                if case is not None:
                    # Which rule tied this glass to this patient: later case edits are
                    # audited too.
                    self.store.audit(CASE_FROM_NAME_BY, "submit", slide_id, after={
                        "source": printable(str(Path(folder.path) / key)),
                        "case": case.stored(), "case_pattern": folder.case_pattern})
            if slide_id is not None:
                break
            n += 1
            name = f"{key} ({n})"
        with self.store.session() as s:
            for pf in plan.files:
                row = s.scalar(select(ScannedFile).where(ScannedFile.sha256 == pf.sha256))
                if row is not None:
                    row.state, row.slide_id, row.updated_at = "processing", slide_id, utcnow()
        return slide_id

    @staticmethod
    def _case_of(folder: WatchFolder, key: str) -> CaseInfo | None:
        """The case the folder's ``case_pattern`` reads from a slide's name. A name it does
        not fit, or values that are no valid case, queue the slide without one: the reviewer
        enters it, and sign-off waits for what ``review.require_case`` asks."""
        if folder.case_pattern is None:
            return None
        m = re.search(folder.case_pattern, Path(key).name)
        if m is None:
            log.warning("%s: the name does not fit case_pattern %s; its case is left for the "
                        "reviewer", printable(key), folder.case_pattern)
            return None
        try:
            case = parse_case({k: v for k, v in m.groupdict().items() if v})
        except CaseError as exc:
            log.warning("%s: case_pattern read no valid case (%s); it is left for the "
                        "reviewer", printable(key), exc)
            return None
        return case if case.stored() else None

    def _sha(self, path: Path, size: int, mtime: int) -> str:
        cached = self._hashes.get(path)
        if cached and cached[:2] == (size, mtime):
            return cached[2]
        sha = sha256_file(path)
        self._hashes[path] = (size, mtime, sha)
        return sha

    def _row(self, sha: str) -> ScannedFile | None:
        with self.store.session() as s:
            return s.scalar(select(ScannedFile).where(ScannedFile.sha256 == sha))

    def _touch(self, sha: str) -> None:
        with self.store.session() as s:
            s.execute(update(ScannedFile).where(ScannedFile.sha256 == sha)
                      .values(updated_at=utcnow()))

    def _record(self, sha: str, path: Path, size: int, state: str, error: str | None = None,
                ) -> None:
        with self.store.session() as s:
            row = s.scalar(select(ScannedFile).where(ScannedFile.sha256 == sha))
            if row is None:
                s.add(ScannedFile(sha256=sha, path=str(path), size=size, state=state, error=error))
            else:
                row.path, row.size, row.state, row.error = str(path), size, state, error
                row.updated_at = utcnow()

    def _quarantine(self, folder: WatchFolder, root: Path, path: Path, reason: str,
                    sha: str | None, kind: str = "quarantined") -> WatchEvent:
        """Move ``path`` into the quarantine folder beside ``<name>.error.txt``; record it.
        An MRXS index takes its data folder along, renamed to match, so the pair stays whole
        and the folder is not left in the watch folder to be mistaken for a slide; a DICOM
        series moves as its whole folder."""
        qdir = root / self.params.quarantine_dir
        rel = path.relative_to(root)
        base = "__".join(rel.parts).replace("..", "__")
        if len(os.fsencode(base)) > QUARANTINE_NAME_BYTES:
            # Its note (+ ".error.txt") must fit the 255-byte name limit too; the hash keeps
            # two long names that share a beginning apart.
            digest = hashlib.sha1(os.fsencode(base)).hexdigest()[:10]
            suffix = "".join(Path(base).suffixes[-1:])[:16]
            n = len(base)
            while len(os.fsencode(base[:n])) > QUARANTINE_NAME_BYTES - 30:
                n -= 1
            base = f"{base[:n]}~{digest}{suffix}"
        dest = qdir / base
        k = 1
        while dest.exists() or dest.is_symlink() or dest.with_name(dest.name + ".error.txt").exists():
            dest = qdir / f"{base}.{k}"
            k += 1
        size = 0
        try:
            size = path.lstat().st_size if path.is_symlink() else _content_stat(path)[0]
            qdir.mkdir(exist_ok=True)
            os.replace(path, dest)
            data = path.with_suffix("")
            if path.suffix.lower() == ".mrxs" and data.is_dir() and not data.is_symlink():
                # dest is "<name>.mrxs" or, after a name clash, "<name>.mrxs.<k>".
                os.replace(data, dest.with_name(dest.name[:-5] if dest.suffix.lower() == ".mrxs"
                                                else dest.name + ".data"))
        except OSError as exc:
            # A read-only share: leave the file, say why beside it if possible, and never
            # look at it again in this run.
            reason = f"{reason} (could not move it to {qdir.name}/: {exc.strerror})"
            dest = path
            self._stuck.add(path)
        try:
            dest.with_name(dest.name + ".error.txt").write_text(
                f"{printable(str(path))}\n{reason}\n{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n",
                encoding="utf-8")
        except OSError as exc:
            log.error("%s: cannot write the error note (%s): %s", printable(str(path)),
                      exc.strerror, reason)
        if sha is not None:
            self._record(sha, path, size, "quarantined", reason)
        self._seen.pop(path, None)
        return WatchEvent(kind, printable(str(path)), None, reason)

    # -- finished slides --------------------------------------------------------------------

    def _settle(self, events: list[WatchEvent]) -> None:
        """Mark files of finished slides done; a failed slide's files go to quarantine."""
        with self.store.session() as s:
            rows = s.execute(
                select(ScannedFile, Slide)
                .join(Slide, ScannedFile.slide_id == Slide.id)
                .where(ScannedFile.state == "processing",
                       Slide.status.in_(("awaiting_review", "signed", "failed")))
            ).all()
            finished = [(r.id, r.path, r.sha256, r.size, sl.status,
                         sl.error or sl.stopped_because) for r, sl in rows]
        for row_id, path_s, sha, size, status, error in finished:
            path = Path(path_s)
            folder_root = self._root_of(path)
            if folder_root and not path.exists() and folder_away(path, folder_root[1]):
                continue  # the share is away: "gone" would count it afresh when it is back
            if status == "failed":
                # No result: the file is quarantined with the slide's error, where a person
                # sees it and, once the cause is fixed, puts it back to be counted afresh. A
                # file gone meanwhile is only recorded so: put back, it is tried again too.
                reason = f"its slide failed: {error or 'no reason given'}"
                if folder_root and path.exists():
                    events.append(self._quarantine(*folder_root, path, reason, sha))
                else:
                    self._record(sha, path, size, "quarantined", reason)
                    events.append(WatchEvent("done", path_s, None, reason))
                continue
            with self.store.session() as s:
                row = s.get(ScannedFile, row_id)
                if row is not None:
                    row.state, row.updated_at, row.error = "done", utcnow(), None
            events.append(WatchEvent("done", path_s, None, None))

    def _root_of(self, path: Path) -> tuple[WatchFolder, Path] | None:
        for folder in self.params.folders:
            root = Path(folder.path)
            if path.is_relative_to(root):
                return folder, root
        return None

    def waiting(self) -> int:
        """Files seen but not yet complete or processed (0 = the backlog is through)."""
        settled = {p for p, _, _ in self._settled}
        return sum(1 for p in list(self._seen)
                   if p not in settled and p not in self._stuck and p.exists())

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)


def folder_away(path: Path, root: Path) -> Path | None:
    """The folder on the way from ``root`` (the watch folder) down to ``path`` (a file that
    is missing) that is away: gone, empty, unreadable, or a link to nothing. None when the
    nearest folder of ``path`` that is there holds something: ``path``, or its case folder,
    was removed from a share that is there.

    A share may be mounted at the watch folder or below it (scans/scannerA beside
    scans/scannerB): unmounted, it leaves an empty mount point, which the walk up from
    ``path`` meets before the populated folder above it. A case folder deleted so that its
    share is left empty reads as away too; the daemon fails such a slide only once it has
    stayed so for ``daemon.service.FOLDER_AWAY_MAX_S``."""
    d = path.parent
    while True:
        try:
            if d.is_dir():
                return None if any(d.iterdir()) else d
        except OSError:  # a stale network mount, permissions taken away
            return d
        if os.path.lexists(d) or d == root or not d.is_relative_to(root):
            return d
        d = d.parent


def printable(name: str) -> str:
    """``name`` with bytes that are not UTF-8 (kept by Python as surrogates) written as
    ``\\xe9``: safe for the log, the store and a note."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _content_stat(path: Path) -> tuple[int, int]:
    """(bytes, newest change in ns) of what a candidate consists of, the figures that must
    settle: a file; an MRXS index plus its data folder; a DICOM series folder with every file
    in it (partial and hidden ones too: a scanner still writing one is not finished). A change
    is the later of the modification and the inode change time: a copy that keeps the
    source's modification time (cp -p, rsync -t, robocopy) still changes the inode, and a
    rescan of the same size under the same name had been passed over as recorded."""
    st = path.stat()
    size, mtime = st.st_size, max(st.st_mtime_ns, st.st_ctime_ns)
    if path.is_dir():
        size = 0
        members = path.iterdir()
    elif path.suffix.lower() == ".mrxs" and path.with_suffix("").is_dir():
        members = path.with_suffix("").iterdir()
    else:
        return size, mtime
    for p in members:
        try:
            st = p.stat()
        except OSError:
            continue
        if not p.is_dir():
            size += st.st_size
        mtime = max(mtime, st.st_mtime_ns, st.st_ctime_ns)
    return size, mtime
