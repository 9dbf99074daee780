"""Evaluation: masked loss/accuracy sums over a whole split in one jitted call.

The split is padded once (on the host) to a multiple of the batch size and reshaped to
``[num_batches, batch, ...]``; a ``lax.map`` over batches sums the statistics, so the result is
exactly the pooled (example-weighted) loss and accuracy over every real label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.models.base import Model, batch_statistics


def pad_to_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, max_examples: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{feature: [N, ...]}`` -> ``{feature: [num_batches, batch, ...]}`` and a mask.

    With ``max_examples`` a uniform subset (drawn with ``rng``) of that many examples is kept.
    """
    n = len(next(iter(arrays.values())))
    rows = np.arange(n)
    if max_examples is not None and n > max_examples:
        rng = rng or np.random.default_rng(0)
        rows = np.sort(rng.choice(n, max_examples, replace=False))
    batch_size = max(1, min(batch_size, len(rows)))
    num_batches = -(-len(rows) // batch_size)
    padded = np.zeros(num_batches * batch_size, np.int64)
    padded[: len(rows)] = rows
    mask = np.arange(num_batches * batch_size) < len(rows)
    out = {
        k: np.asarray(v)[padded].reshape((num_batches, batch_size) + np.shape(v)[1:])
        for k, v in arrays.items()
    }
    return out, mask.reshape(num_batches, batch_size)


@partial(jax.jit, static_argnums=0)
def _evaluate(model: Model, params, batches, mask):
    def one(args):
        batch, m = args
        return batch_statistics(model, params, batch, m)

    stats = jax.lax.map(one, (batches, mask))
    totals = jax.tree.map(jnp.sum, stats)
    count = jnp.maximum(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
            "examples": totals["count"]}


def make_evaluator(
    model: Model, arrays: Mapping[str, np.ndarray], batch_size: int = 512,
    max_examples: int | None = None, seed: int = 0,
) -> Callable[..., dict[str, jax.Array]]:
    """``evaluate(params) -> {"loss", "accuracy", "examples"}`` on device arrays (no sync)."""
    batches, mask = pad_to_batches(arrays, batch_size, max_examples, np.random.default_rng(seed))
    batches, mask = jax.device_put((batches, mask))
    return lambda params: _evaluate(model, params, batches, mask)


def build_evaluators(config, model: Model, dataset) -> dict[str, Callable[..., dict]]:
    """``{split: evaluate(algorithm_state)}`` for the config's ``eval`` section.

    ``test``: the central test set when the dataset has one; ``clients_test`` (or ``test`` when
    there is no central set): the pool of the clients' held-out splits. Each evaluates the
    state's global ``params``.
    """
    evaluators = {}
    eval_kwargs = dict(batch_size=config.eval.batch_size, max_examples=config.eval.max_examples,
                       seed=config.seed)
    if dataset.central_test is not None:
        evaluate = make_evaluator(model, dataset.central_test, **eval_kwargs)
        evaluators["test"] = lambda state, evaluate=evaluate: evaluate(state.params)
    if dataset.test is not None and dataset.test.num_examples > 0:
        key = "clients_test" if "test" in evaluators else "test"
        evaluate = make_evaluator(model, dataset.test.arrays, **eval_kwargs)
        evaluators[key] = lambda state, evaluate=evaluate: evaluate(state.params)
    return evaluators
