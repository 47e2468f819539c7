"""Retention: keep the outputs of the best ``retention.keep_best`` trials, free the others' disk.

After each finished trial::

    ranked = trials by objective, best first
    drop   = ranked[keep_best:] whose outputs are still kept (not in the study's `outputs_removed`)
    protected = cache objects the workspace, HEAD or any experiment not dropped still uses
    delete (objects of drop's `execution.stages` outputs) - protected from the DVC cache
    delete checkpoints/<study>/<number> of each dropped trial
    record the dropped numbers in the study (`outputs_removed`; a finished trial's own attrs are frozen)

The experiments stay listed by ``dvc exp show``; only their cached outputs go.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from tqdm import tqdm

from kdsweep.sweep import dvcexp
from kdsweep.sweep.record import StudyRecord, TrialRecord, records
from kdsweep.sweep.selection import baselines, ranked


def cache_dir(root: Path) -> Path:
    """The repository's local DVC cache directory (``.dvc/cache/files/md5`` unless configured)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


def cached_outs(lock: dict, stages: list[str]) -> list[str]:
    """The md5 hashes of the cached outputs of ``stages`` (``.dir`` hashes for directories)."""
    out = []
    for stage in stages:
        for entry in (lock.get(stage) or {}).get("outs") or []:
            if entry.get("md5"):
                out.append(entry["md5"])
    return out


def _object_path(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def objects(cache: Path, hashes: list[str]) -> set[str]:
    """Every cache object the hashes stand for (a ``.dir`` hash: itself and its files)."""
    found = set()
    for h in hashes:
        found.add(h)
        if h.endswith(".dir"):
            p = _object_path(cache, h)
            try:
                entries = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            found.update(e["md5"] for e in entries if isinstance(e, dict) and "md5" in e)
    return found


def delete_objects(cache: Path, hashes: set[str]) -> int:
    """Remove objects from the DVC cache; returns the bytes freed."""
    freed = 0
    for h in hashes:
        p = _object_path(cache, h)
        try:
            freed += p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            pass
    return freed


class Retention:
    """The retention policy of one study: which trials keep their outputs, and the bytes freed so far."""

    def __init__(self, root: Path, study_name: str, keep_best: int | None, direction: str, run_stages: list[str]):
        self.root = root
        self.study_name = study_name
        self.keep_best = keep_best
        self.direction = direction
        self.run_stages = run_stages
        self.cache = cache_dir(root) if keep_best is not None else None
        self.freed = 0
        self.lock = threading.Lock()  # workers finish trials concurrently

    def retain(self, study) -> None:
        """Keep the best ``keep_best`` trials' outputs and the baselines'; drop the others' from the DVC cache."""
        if self.keep_best is None:
            return
        with self.lock:
            all_trials = records(study)
            trials = ranked(all_trials, self.direction)
            removed = StudyRecord.of(study).removed
            keep = baselines(all_trials)
            drop = [t for t in trials[self.keep_best :] if t.outputs_kept and t.number not in removed | keep]
            if not drop:
                return
            freed = self._delete(drop)
            StudyRecord.set_removed(study, removed | {t.number for t in drop})
            self.freed += freed
            kept = ", ".join(str(t.number) for t in trials[: self.keep_best])
            tqdm.write(
                f"retention: keeping the outputs of the best {self.keep_best} (trials {kept}); removed trials "
                f"{', '.join(str(t.number) for t in drop)}: freed {freed / 2**20:.1f} MB"
            )

    def _delete(self, drop: list[TrialRecord]) -> int:
        """Delete the dropped trials' cache objects that nothing else uses, and their checkpoints."""
        refs = dvcexp.exp_refs(self.root)
        dropped_names = {t.experiment for t in drop}
        hashes = []
        for t in drop:
            name = t.experiment
            if name in refs:
                hashes += cached_outs(dvcexp.exp_lock(self.root, refs[name][1]), self.run_stages)
        protected = objects(self.cache, self._protected(refs, dropped_names))
        freed = delete_objects(self.cache, objects(self.cache, hashes) - protected)
        for t in drop:
            ckpt = self.root / "checkpoints" / self.study_name / str(t.number)
            freed += dvcexp.dir_size(ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
        return freed

    def _protected(self, refs: dict[str, tuple[str, str]], dropped_names: set) -> list[str]:
        """Output hashes still in use: the workspace's and HEAD's dvc.lock, and every experiment kept."""
        workspace = self.root / "dvc.lock"
        locks = [
            dvcexp.lock_stages(workspace.read_text() if workspace.exists() else None),
            dvcexp.lock_stages(dvcexp.show(self.root, "HEAD", "dvc.lock")),
        ]
        locks += [dvcexp.exp_lock(self.root, sha) for name, (_ref, sha) in refs.items() if name not in dropped_names]
        return [h for lock in locks for h in cached_outs(lock, list(lock))]
