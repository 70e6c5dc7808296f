"""Train state and its sharded creation.

The state is created *already sharded*: ``jax.eval_shape`` of the initialiser gives the
logical axis names of every parameter, those map to ``NamedSharding``s through the one
rules table, and the initialiser is jitted with ``out_shardings`` - nothing is ever
materialised on a single device first.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdit.parallel.mesh import LOGICAL_RULES


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    model_state: Any  # non-parameter variable collections (e.g. running thresholds)
    rng: jax.Array


def strip_boxes(tree):
    """Removes logical-partitioning boxes without applying sharding constraints (for
    abstract ``ShapeDtypeStruct`` trees)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
    """Logical-axis boxes -> ``NamedSharding`` tree (unboxed structure)."""
    specs = nn.get_partition_spec(abstract_boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def path_names(path) -> tuple:
    """A pytree key path as plain names: dict keys, attribute names, sequence indices."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def opt_state_shardings(abstract_opt_state, abstract_params, param_sh, mesh: Mesh):
    """Optimizer-state leaves that mirror a parameter (their key path ends with the
    parameter's full path and the shapes agree: Adam moments, momentum) share its sharding;
    any other leaf (counts, factored row/column statistics) is replicated. Matching by path
    holds through any optax wrapper (chains, masks, multi_transform)."""
    rep = NamedSharding(mesh, P())
    by_path = {path_names(path): (leaf.shape, sh) for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_sh))}

    def pick(path, leaf):
        keys = path_names(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep
    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


# A PRNG key as ``eval_shape`` sees it: nothing runs eagerly, so this works under a mesh of
# devices that cannot execute (a TPU topology compiled for from a CPU host).
ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def state_shardings(init_variables: Callable, tx, mesh: Mesh,
                    rules=LOGICAL_RULES) -> TrainState:
    """TrainState of ``NamedSharding``s, derived with ``eval_shape`` (nothing allocated).

    Args:
      init_variables: ``rng -> variables`` (a ``model.init`` closure), returning boxed
        (logically partitioned) params under ``"params"``.
    """
    with nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_variables, ABSTRACT_KEY)
    p_sh = param_shardings(abstract["params"], mesh, rules)
    abs_params = strip_boxes(abstract["params"])
    rep = NamedSharding(mesh, P())
    others = strip_boxes({k: v for k, v in abstract.items() if k != "params"})
    return TrainState(step=rep, params=p_sh, ema_params=p_sh,
                      opt_state=opt_state_shardings(jax.eval_shape(tx.init, abs_params),
                                                    abs_params, p_sh, mesh),
                      model_state=jax.tree.map(lambda _: rep, others), rng=rep)


def create_train_state(init_variables: Callable, tx, mesh: Mesh, seed: int,
                       rules=LOGICAL_RULES, shardings: TrainState | None = None
                       ) -> tuple[TrainState, TrainState]:
    """Builds the :class:`TrainState` directly in its shardings (jitted init with
    ``out_shardings``; ``shardings`` default to :func:`state_shardings`).
    Returns ``(state, shardings)``."""
    if shardings is None:
        shardings = state_shardings(init_variables, tx, mesh, rules)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))

    def init_state(init_rng, state_rng):
        variables = nn.unbox(init_variables(init_rng))
        params = variables.pop("params")
        ema = jax.tree.map(jnp.copy, params)
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, ema_params=ema,
                          opt_state=tx.init(params), model_state=dict(variables), rng=state_rng)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(init_state, out_shardings=shardings)(init_rng, state_rng)
    return state, shardings


def abstract_state(state_shardings: TrainState, init_variables: Callable, tx,
                   rules=LOGICAL_RULES) -> TrainState:
    """``ShapeDtypeStruct`` tree (with shardings) of the state, for Orbax restore."""
    with nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init_variables, ABSTRACT_KEY)
    variables = strip_boxes(abstract)
    params = variables.pop("params")
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        ema_params=params, opt_state=jax.eval_shape(tx.init, params),
                        model_state=dict(variables),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
