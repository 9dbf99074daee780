"""Checkpoints of the whole simulation, written atomically with orbax-checkpoint.

A checkpoint holds the `SimulationState` (algorithm state with its optimizer states and any
per-client state, the round counter and the root PRNG key: the sampler and the shuffles are pure
functions of these, so nothing else is needed to resume the same cohorts) and a JSON record of
the host loop's position (the byte offset of ``metrics.jsonl`` after the checkpointed round).

orbax writes each checkpoint into a temporary folder and renames it when complete, so a process
killed while saving leaves the previous checkpoint intact; ``max_to_keep`` keeps the last n.
Saving is synchronous: when `save` returns, the checkpoint is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

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
        self._manager.save(
            round_index,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

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
        return restored.state, dict(restored.host)

    def close(self) -> None:
        self._manager.close()
