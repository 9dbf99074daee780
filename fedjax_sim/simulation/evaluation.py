"""Evaluation: pooled, per-client, fine-tuned and personalized, each in one jitted call.

* Pooled (`make_evaluator`): the split is padded once (on the host) to a multiple of the batch
  size and reshaped to ``[num_batches, batch, ...]``; a ``lax.map`` over batches sums the
  statistics, so the result is exactly the pooled (example-weighted) loss and accuracy over every
  real label.
* Per client (`make_per_client_evaluator`): the global model on every client's own held-out split.
  All test examples are evaluated in batches as above, each example's statistics tagged with its
  client, and ``jax.ops.segment_sum`` adds them up per client. `client_distribution` turns the
  per-client accuracies into the fairness metrics of q-FFL and AFL: percentiles (p10 ... p90),
  the mean over clients, the mean of the worst 10% of clients and the variance across clients.
* Personalized (`make_fine_tune_evaluator`, `make_personal_evaluator`): every client with its own
  parameters (the global model fine-tuned on the client's training split, or Ditto's personal
  model), as a ``lax.map`` over clients; each client loops over its own test examples only.

`build_evaluators` builds the set a run evaluates (the loop passes its ``eval:`` settings).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sim.algorithms.client_state import client_state_arrays
from fedjax_sim.algorithms.local import STAT_KEYS, gather_batch, local_train, model_loss
from fedjax_sim.core import ClientInput
from fedjax_sim.data.batching import ClientSchedule, client_stream
from fedjax_sim.data.federated_data import FederatedData, FederatedDataset
from fedjax_sim.models.base import Model, batch_statistics
from fedjax_sim.simulation.client_map import CLIENT_AXIS

Params = Any


def pad_to_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, max_examples: int | None = None,
    rng: np.random.Generator | None = None, multiple: int = 1,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{feature: [N, ...]}`` -> ``{feature: [num_batches, batch, ...]}`` and a mask.

    With ``max_examples`` a uniform subset (drawn with ``rng``) of that many examples is kept.
    The batch (at most the examples) is rounded up to a ``multiple``, the padding masked.
    """
    n = len(next(iter(arrays.values())))
    rows = np.arange(n)
    if max_examples is not None and n > max_examples:
        rng = rng or np.random.default_rng(0)
        rows = np.sort(rng.choice(n, max_examples, replace=False))
    batch_size = -(-max(1, min(batch_size, len(rows))) // multiple) * multiple
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
    scored = jnp.maximum(totals["accuracy_count"], 1.0)
    return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / scored,
            "examples": totals["count"]}


def make_evaluator(
    model: Model, arrays: Mapping[str, np.ndarray], batch_size: int = 512,
    max_examples: int | None = None, seed: int = 0, mesh: Mesh | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """``evaluate(params) -> {"loss", "accuracy", "examples"}`` on device arrays (no sync).

    ``mesh``: one process's mesh with a ``clients`` axis of several devices: each batch is split
    over them (the batch size rounded up to a multiple of the devices, padding masked) and the
    sums all-reduced, so every device evaluates its share; ``params`` may live on any of them.
    """
    devices = 1 if mesh is None else mesh.shape[CLIENT_AXIS]
    batches, mask = pad_to_batches(arrays, batch_size, max_examples, np.random.default_rng(seed),
                                   multiple=devices)
    if devices == 1:
        batches, mask = jax.device_put((batches, mask))
        return lambda params: _evaluate(model, params, batches, mask)
    batches, mask = jax.device_put((batches, mask),
                                   NamedSharding(mesh, PartitionSpec(None, CLIENT_AXIS)))
    replicated = NamedSharding(mesh, PartitionSpec())
    return lambda params: _evaluate(model, jax.device_put(params, replicated), batches, mask)


# --- Per-client evaluation and its distribution (fairness metrics) ------------------------------

PERCENTILES = (10, 25, 50, 75, 90)
WORST_FRACTION = 0.1


def client_distribution(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The distribution of per-client accuracy: what q-FFL, AFL and personalization are judged by.

    Args:
      stats: per-client sums ``{"loss_sum", "correct", "count"}`` and optionally
        ``"accuracy_count"`` (the labels ``correct`` is out of; default ``count``), each
        ``[K]``. Clients with ``count == 0`` (no held-out labels) are left out; clients with
        ``accuracy_count == 0`` (every held-out label is one the accuracy ignores, e.g. only
        OOV / EOS next words, or no tag among the classes) have no accuracy and are left out
        of the accuracy metrics, but not of ``loss_mean``.

    Returns:
      Scalars: ``accuracy_mean`` (the unweighted mean over clients), ``accuracy_p10`` ...
      ``accuracy_p90`` (percentiles over clients, linear interpolation as ``np.percentile``),
      ``accuracy_worst10pct`` (the mean accuracy of the ``ceil(10%)`` clients with the lowest
      accuracy), ``accuracy_min``, ``accuracy_var`` (the variance across clients, ``ddof=0``),
      ``loss_mean`` (the mean over clients of each client's mean loss), ``accuracy`` (pooled over
      all examples) and ``clients`` (how many clients have held-out labels).
    """
    count = stats["count"]
    has_data = count > 0
    num = jnp.sum(has_data)
    scored = stats.get("accuracy_count", count)
    has_accuracy = has_data & (scored > 0)
    num_scored = jnp.sum(has_accuracy)
    accuracy = jnp.where(has_accuracy, stats["correct"] / jnp.maximum(scored, 1.0), jnp.nan)
    loss = jnp.where(has_data, stats["loss_sum"] / jnp.maximum(count, 1.0), jnp.nan)
    percentiles = jnp.nanpercentile(accuracy, jnp.asarray(PERCENTILES, jnp.float32))
    worst_count = jnp.maximum(jnp.ceil(WORST_FRACTION * num_scored), 1.0)
    ascending = jnp.sort(jnp.where(has_accuracy, accuracy, jnp.inf))
    in_worst = jnp.arange(ascending.shape[0]) < worst_count
    worst = jnp.sum(jnp.where(in_worst, ascending, 0.0)) / worst_count
    metrics = {
        "accuracy_mean": jnp.nanmean(accuracy),
        **{f"accuracy_p{p}": percentiles[i] for i, p in enumerate(PERCENTILES)},
        "accuracy_worst10pct": worst,
        "accuracy_min": jnp.nanmin(accuracy),
        "accuracy_var": jnp.nanvar(accuracy),
        "loss_mean": jnp.nanmean(loss),
        "accuracy": jnp.sum(stats["correct"]) / jnp.maximum(jnp.sum(scored), 1.0),
    }
    # No client with held-out labels (or none with an accuracy): zeros rather than NaN (the
    # loop treats NaN as divergence).
    metrics = {k: jnp.where((num if k == "loss_mean" else num_scored) > 0, v, 0.0)
               for k, v in metrics.items()}
    metrics["clients"] = num.astype(jnp.float32)
    return metrics


@partial(jax.jit, static_argnums=(0, 1))
def _per_client_statistics(model: Model, num_clients: int, params, batches, mask, segment_ids):
    def example_statistics(example, example_mask):
        one = jax.tree.map(lambda x: x[None], example)  # a batch of one: the same masking rules
        return batch_statistics(model, params, one, example_mask[None])

    def batch(args):
        return jax.vmap(example_statistics)(*args)

    stats = jax.lax.map(batch, (batches, mask))  # leaves [num_batches, B]
    ids = segment_ids.reshape(-1)
    return {
        k: jax.ops.segment_sum(v.reshape(-1), ids, num_segments=num_clients,
                               indices_are_sorted=True)
        for k, v in stats.items()
    }


def make_per_client_evaluator(
    model: Model, test: FederatedData, batch_size: int = 512
) -> Callable[[Params], dict[str, jax.Array]]:
    """``evaluate(params) -> {"loss_sum", "correct", "count"}``, each ``[num_clients]``.

    Every example of ``test`` (the clients' held-out splits) is evaluated once with the same
    ``params``, in batches of ``batch_size``; ``jax.ops.segment_sum`` sums its statistics into
    its client's row (padding rows go to an out-of-range segment and are dropped).
    """
    num_clients = test.num_clients
    client_of_example = np.repeat(np.arange(num_clients, dtype=np.int32), test.client_sizes)
    batches, mask = pad_to_batches(test.arrays, batch_size)
    ids, _ = pad_to_batches({"client": client_of_example}, batch_size)  # the same layout
    segment_ids = np.where(mask, ids["client"], num_clients).astype(np.int32)
    batches, mask, segment_ids = jax.device_put((batches, mask, segment_ids))
    return lambda params: _per_client_statistics(
        model, num_clients, params, batches, mask, segment_ids)


def _client_test_statistics(model: Model, params, arrays, start, end, batch_size: int):
    """Masked sums over the flat rows ``start:end`` of ``arrays``, ``batch_size`` at a time."""
    num_batches = (end - start + batch_size - 1) // batch_size

    def body(b, totals):
        rows = start + b * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
        stats = batch_statistics(model, params, gather_batch(arrays, rows), rows < end)
        return {k: totals[k] + stats[k] for k in STAT_KEYS}

    zero = {k: jnp.zeros((), jnp.float32) for k in STAT_KEYS}
    return jax.lax.fori_loop(0, num_batches, body, zero)


def _map_clients(fn, xs, chunk: int):
    """``lax.map`` over the client axis: sequential for ``chunk == 1``, else vmapped chunks."""
    return jax.lax.map(fn, xs) if chunk == 1 else jax.lax.map(fn, xs, batch_size=chunk)


def _test_batch_size(test: FederatedData, batch_size: int) -> int:
    """A per-client loop needs batches no larger than the largest client's held-out split."""
    return max(1, min(batch_size, int(test.client_sizes.max(initial=1))))


def make_personal_evaluator(
    model: Model, test: FederatedData, batch_size: int = 512, chunk: int = 1
) -> Callable[[Params], dict[str, jax.Array]]:
    """``evaluate(store) -> {"loss_sum", "correct", "count"}`` (``[num_clients]`` each).

    ``store`` holds one parameter set per client (every leaf ``[num_clients, ...]``, e.g. Ditto's
    ``personal_params``); client k's row is evaluated on client k's held-out split. The clients
    run as a ``lax.map`` (``chunk`` clients vmapped at a time) in one jitted call.
    """
    batch_size = _test_batch_size(test, batch_size)
    arrays = jax.device_put(dict(test.arrays))
    offsets = jax.device_put(test.offsets.astype(np.int32))

    @jax.jit
    def evaluate(store, arrays, offsets):
        def one(args):
            params, start, end = args
            return _client_test_statistics(model, params, arrays, start, end, batch_size)

        return _map_clients(one, (store, offsets[:-1], offsets[1:]), chunk)

    return lambda store: evaluate(store, arrays, offsets)


def make_fine_tune_evaluator(
    model: Model,
    train: FederatedData,
    test: FederatedData,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    test_batch_size: int = 512,
    chunk: int = 1,
    seed: int = 0,
) -> Callable[[Params], dict[str, jax.Array]]:
    """``evaluate(params) -> {"loss_sum", "correct", "count"}`` after per-client fine-tuning.

    Each client k starts from ``params``, takes ``steps`` SGD steps (``learning_rate``, batches
    of ``batch_size`` drawn from its own training split like the engine's local training:
    shuffled, repeated as needed) and is evaluated on its own held-out split. The clients run as
    a ``lax.map`` (``chunk`` clients vmapped at a time) in one jitted call; the batches depend only
    on ``seed`` and the client, so every evaluation fine-tunes on the same examples.
    """
    if train.num_clients != test.num_clients:
        raise ValueError(f"train has {train.num_clients} clients, test {test.num_clients}: the "
                         "held-out splits must be aligned with the training clients")
    schedule = ClientSchedule(num_steps=steps, batch_size=batch_size, local_epochs=None,
                              max_client_size=max(1, int(train.client_sizes.max(initial=1))))
    optimizer = optax.sgd(learning_rate)
    loss_fn = model_loss(model)
    test_batch_size = _test_batch_size(test, test_batch_size)
    root_key = jax.random.PRNGKey(seed)
    data = jax.device_put({
        "train": dict(train.arrays), "train_offsets": train.offsets.astype(np.int32),
        "test": dict(test.arrays), "test_offsets": test.offsets.astype(np.int32),
    })

    @jax.jit
    def evaluate(params, data):
        train_offsets, test_offsets = data["train_offsets"], data["test_offsets"]

        def one(args):
            client_id, start, end, test_start, test_end = args
            size = end - start
            shuffle_key, train_key = jax.random.split(jax.random.fold_in(root_key, client_id))
            positions, mask = client_stream(shuffle_key, size, schedule)
            client = ClientInput(
                client_id=client_id, indices=start + positions, mask=mask,
                num_steps=schedule.steps_for(size), num_examples=size,
                valid=jnp.ones((), bool), key=train_key, duration=jnp.zeros((), jnp.float32),
                own_trip_count=chunk == 1,
            )
            tuned, _ = local_train(loss_fn, optimizer, params, client, data["train"])
            return _client_test_statistics(model, tuned, data["test"], test_start, test_end,
                                           test_batch_size)

        clients = jnp.arange(train.num_clients, dtype=jnp.int32)
        xs = (clients, train_offsets[:-1], train_offsets[1:], test_offsets[:-1], test_offsets[1:])
        return _map_clients(one, xs, chunk)

    return lambda params: evaluate(params, data)


def _clients_test_split(dataset: FederatedDataset) -> FederatedData:
    """The clients' held-out split, or a ValueError that says what is missing and the fix."""
    test = dataset.test
    if test is None or test.num_examples == 0:
        raise ValueError(
            f"per-client evaluation needs each client's held-out split, and dataset "
            f"{dataset.name!r} has none; set its test split (e.g. dataset.test_fraction=0.2)"
        )
    if test.num_clients != dataset.train.num_clients:
        raise ValueError(
            f"dataset {dataset.name!r} has {test.num_clients} test clients for "
            f"{dataset.train.num_clients} training clients; per-client evaluation needs them "
            "aligned"
        )
    return test


def build_evaluators(
    model: Model,
    dataset: FederatedDataset,
    *,
    batch_size: int = 512,
    max_examples: int | None = None,
    seed: int = 0,
    per_client: bool = False,
    fine_tune_steps: int = 0,
    fine_tune_learning_rate: float | None = None,
    fine_tune_batch_size: int | None = None,
    client_chunk: int = 1,
    mesh: Mesh | None = None,
) -> dict[str, Callable[..., dict]]:
    """``{split: evaluate(algorithm_state)}``: what a run evaluates.

    ``test``: the central test set when the dataset has one; ``clients_test`` (or ``test`` when
    there is no central set): the pool of the clients' held-out splits. Each evaluates the
    state's global ``params`` in batches of ``batch_size`` (``max_examples`` caps these two, a
    subset drawn with ``seed``).

    ``per_client`` (``per_client``, or ``fine_tune_steps > 0`` for the "before"): the global
    model on every client's held-out split, as `client_distribution`; when the state has
    ``personal_params`` (Ditto), also each client's personal model, as ``personal/...``.
    ``fine_tuned`` (``fine_tune_steps > 0``): the same distribution after each client fine-tunes
    the global model (`make_fine_tune_evaluator`: SGD with ``fine_tune_learning_rate``, batches
    of ``fine_tune_batch_size``). Per-client splits are evaluated whole, ``client_chunk`` clients
    vmapped at a time (1: sequential, as on CPU). ``mesh``: one process's devices, over which
    the pooled evaluations split each batch (`make_evaluator`).

    Raises:
      ValueError: per-client evaluation of a dataset without aligned held-out splits, or
        fine-tuning without a learning rate and batch size.
    """
    evaluators = {}
    eval_kwargs = dict(batch_size=batch_size, max_examples=max_examples, seed=seed, mesh=mesh)
    if dataset.central_test is not None:
        evaluate = make_evaluator(model, dataset.central_test, **eval_kwargs)
        evaluators["test"] = lambda state, evaluate=evaluate: evaluate(state.params)
    if dataset.test is not None and dataset.test.num_examples > 0:
        key = "clients_test" if "test" in evaluators else "test"
        evaluate = make_evaluator(model, dataset.test.arrays, **eval_kwargs)
        evaluators[key] = lambda state, evaluate=evaluate: evaluate(state.params)

    if per_client or fine_tune_steps > 0:
        test = _clients_test_split(dataset)
        evaluate_clients = make_per_client_evaluator(model, test, batch_size)
        personal_evaluators = []  # built on first use: only states with personal models need it

        def per_client_metrics(state):
            metrics = client_distribution(evaluate_clients(state.params))
            personal = getattr(state, "personal_params", None)
            if personal is not None:
                if not personal_evaluators:
                    personal_evaluators.append(
                        make_personal_evaluator(model, test, batch_size, client_chunk))
                stats = personal_evaluators[0](client_state_arrays(personal))
                metrics.update({f"personal/{k}": v for k, v in client_distribution(stats).items()})
            return metrics

        evaluators["per_client"] = per_client_metrics
    if fine_tune_steps > 0:
        if fine_tune_learning_rate is None or fine_tune_batch_size is None:
            raise ValueError("fine_tune_steps > 0 needs fine_tune_learning_rate and "
                             "fine_tune_batch_size")
        fine_tune = make_fine_tune_evaluator(
            model, dataset.train, test, steps=fine_tune_steps, batch_size=fine_tune_batch_size,
            learning_rate=fine_tune_learning_rate, test_batch_size=batch_size,
            chunk=client_chunk, seed=seed,
        )
        evaluators["fine_tuned"] = lambda state: client_distribution(fine_tune(state.params))
    return evaluators
