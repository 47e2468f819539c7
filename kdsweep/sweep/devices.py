"""Devices for a study's trials: every running trial holds its own GPUs, shared with no other.

    devices: auto    -> the GPUs the runner sees (kdsweep.gpus); none on a CPU machine
             [0, 1]  -> exactly these ids, as CUDA_VISIBLE_DEVICES takes them (on a CPU machine too)
    device sets      = consecutive groups of devices_per_trial devices; any left over stay unused
    workers unset    -> one per device set (1 when there is no device, as without this module)
    workers > sets   -> a spec error naming the keys
    each trial       : take a free set -> run with CUDA_VISIBLE_DEVICES=<set> -> give it back (finally)
    devices_per_trial > 1 -> KDSWEEP_NPROC_PER_NODE=<n>: `kdsweep distill` runs itself under torchrun

:func:`device_sets` is pure given the visible GPUs; :class:`DevicePool` hands the sets out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kdsweep.errors import UserError
from kdsweep.sweep.spec import StudySpec

NPROC_ENV = "KDSWEEP_NPROC_PER_NODE"  # read by `kdsweep distill --nproc-per-node`


@dataclass(frozen=True)
class DeviceSets:
    """Which devices the trials share out, how many each holds, and how many trials run at once."""

    sets: tuple[tuple[str, ...], ...]  # disjoint; empty when trials run without CUDA_VISIBLE_DEVICES
    per_trial: int
    workers: int
    source: str = "auto"  # "auto" or "list": where the devices came from
    unused: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for ``kdsweep run --check``."""
        ranks = f"; each trial's distill runs under torchrun with {self.per_trial} processes" * (self.per_trial > 1)
        if not self.sets:
            return f"devices: none visible (auto on a CPU machine): trials run on the CPU{ranks}"
        found = f"auto: {sum(map(len, self.sets)) + len(self.unused)} visible" if self.source == "auto" else "listed"
        sets = " ".join("[" + ",".join(s) + "]" for s in self.sets)
        idle = len(self.sets) - self.workers
        return (
            f"devices: {self.per_trial} per trial ({found}): sets {sets}, one per running trial"
            + (f"; {idle} set(s) idle with {self.workers} worker(s)" if idle > 0 else "")
            + (f"; unused: {','.join(self.unused)}" if self.unused else "")
            + ranks
        )


def device_sets(spec: StudySpec, visible: list[str] | None = None) -> DeviceSets:
    """The device sets of a study spec (its ``workers`` and ``execution``); raise :class:`UserError` if it cannot run.

    ``visible`` is the GPUs ``devices: auto`` finds (default: :func:`kdsweep.gpus.visible_gpus`).
    ``workers`` counts as unset when the spec left it out and no ``--workers`` replaced it.
    """
    ex = spec.execution
    per = ex.devices_per_trial
    if ex.devices == "auto":
        if visible is None:
            from kdsweep.gpus import visible_gpus

            visible = visible_gpus()
        devices, source = list(visible), "auto"
    else:
        devices, source = [str(d) for d in ex.devices], "list"
    workers_set = "workers" in spec.model_fields_set
    if not devices:
        return DeviceSets((), per, spec.workers if workers_set else 1, source)
    n_sets = len(devices) // per
    if n_sets == 0:
        raise UserError(
            f"execution.devices_per_trial: {per}, but execution.devices ({source}) has {len(devices)}: "
            f"{','.join(devices)}; lower devices_per_trial"
        )
    if workers_set and spec.workers > n_sets:
        raise UserError(
            f"workers: {spec.workers}, but execution.devices ({source}: {','.join(devices)}) with "
            f"execution.devices_per_trial: {per} make {n_sets} device set(s), and running trials share no "
            f"device: set workers to at most {n_sets} (or leave it out), or lower devices_per_trial"
        )
    sets = tuple(tuple(devices[i * per : (i + 1) * per]) for i in range(n_sets))
    return DeviceSets(sets, per, spec.workers if workers_set else n_sets, source, tuple(devices[n_sets * per :]))


class DevicePool:
    """Hands the device sets to running trials, one set per trial, and takes each back when its trial ends."""

    def __init__(self, layout: DeviceSets):
        self.layout = layout
        self._free = list(layout.sets)
        self._held: dict[Any, tuple[str, ...]] = {}
        self._changed = threading.Condition()

    @contextmanager
    def take(self, holder: Any) -> Iterator[tuple[str, ...] | None]:
        """Hold a free device set for ``holder`` (a trial number) while the block runs; None without devices.

        Waits while every set is held. The set is given back however the block ends, a crash included.
        """
        if not self.layout.sets:
            yield None
            return
        with self._changed:
            while not self._free:
                self._changed.wait()
            devices = self._free.pop(0)
            self._held[holder] = devices
        try:
            yield devices
        finally:
            with self._changed:
                del self._held[holder]
                self._free.append(devices)
                self._changed.notify()

    def env(self, holder: Any) -> dict[str, str]:
        """The environment variables of ``holder``'s trial: its devices, and the processes its distill runs."""
        env = {NPROC_ENV: str(self.layout.per_trial)}
        with self._changed:
            devices = self._held.get(holder)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        return env
