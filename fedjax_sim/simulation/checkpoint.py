"""Checkpoints of the whole simulation, written atomically with orbax-checkpoint.

A checkpoint holds the `SimulationState` (algorithm state with its optimizer states and any
per-client state, the round counter and the root PRNG key: the sampler and the shuffles are pure
functions of these, so nothing else is needed to resume the same cohorts) and a JSON record of
the host loop's position (the byte offset of ``metrics.jsonl`` after the checkpointed round).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a process
killed while saving leaves the previous checkpoint intact; ``max_to_keep`` keeps the last n.
Saving is synchronous: when `save` returns, the checkpoint is on disk.

Per-client stores kept on the host (``execution.client_state: host``,
`fedjax_sim.algorithms.client_state.HostClientStore`) are outside the state's arrays: their
written rows go to ``client_state/<round>/`` beside orbax's folders, complete (written to a
temporary folder and renamed) before orbax writes the round, so every round orbax has is
restorable; they are pruned with orbax's rounds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fedjax_sim.algorithms.client_state import host_stores
from fedjax_sim.simulation.round_step import SimulationState


class Checkpointer:
    """Saves and restores `SimulationState` checkpoints under ``directory`` (one per round)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,  # leftovers of a save that was killed
            ),
            item_names=("state", "host"),
        )

    def latest_round(self) -> int | None:
        """The round of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_rounds(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, round_index: int, state: SimulationState, host: dict[str, Any]) -> None:
        """Writes the state after ``round_index`` and the host loop's position."""
        stores = host_stores(state)
        if stores and jax.process_index() == 0:
            folder = self.directory / "client_state" / str(round_index)
            temporary = folder.with_name(f"{round_index}.tmp")
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            for name, rows in stores.items():
                rows.save(temporary / name)
            shutil.rmtree(folder, ignore_errors=True)
            temporary.rename(folder)
        self._manager.save(
            round_index,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        if stores and jax.process_index() == 0:
            kept = {str(step) for step in self._manager.all_steps()}
            for folder in (self.directory / "client_state").iterdir():
                if folder.name not in kept:
                    shutil.rmtree(folder, ignore_errors=True)

    def restore(
        self, template: SimulationState, round_index: int | None = None
    ) -> tuple[SimulationState, dict[str, Any]]:
        """The checkpoint of ``round_index`` (default: the newest), shaped like ``template``."""
        round_index = self.latest_round() if round_index is None else round_index
        if round_index is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(
            round_index,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
            ),
        )
        stores = host_stores(restored.state)
        folder = self.directory / "client_state" / str(round_index)
        for name, rows in stores.items():
            if not (folder / f"{name}.ids.npy").exists():
                raise FileNotFoundError(
                    f"checkpoint {self.directory / str(round_index)} has no rows of the host "
                    f"client store {name!r} ({folder / name}.ids.npy): it was written without "
                    "execution.client_state: host; resume with the placement it was written "
                    "with")
            rows.load(folder / name)
        return restored.state, dict(restored.host)

    def close(self) -> None:
        self._manager.close()
