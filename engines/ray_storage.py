"""Before a Ray run does any work: every alive node of the cluster sees its input and output.

One tiny task pinned to each node (``NodeAffinitySchedulingStrategy``, not soft) runs
:func:`shards.visibility.look`; the first node that cannot see something stops the run in one line
naming the node (id, address, host name) and what it cannot see.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mmcurate.errors import UsageError
from mmcurate.shards import visibility

ANSWER_S = 300.0  # a node's first task may wait for its worker and runtime env (a --pip install)


@ray.remote(num_cpus=0, max_retries=0)
def _look(probe: visibility.Probe) -> str | None:
    return visibility.look(probe)


def check_nodes(input_url: str, output_url: str, answer_s: float = ANSWER_S) -> None:
    """UsageError naming the first alive node that cannot read the input or write the output folder."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = visibility.place(input_url, output_url)
    try:
        refs = [_look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe) for n in nodes]
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=answer_s)
        for ref in late:
            ray.cancel(ref, force=True)
        problems = [(node, _answer(ref, ready, answer_s)) for node, ref in zip(nodes, refs, strict=True)]
    finally:
        visibility.remove(probe)
    problems = [(node, what) for node, what in problems if what]
    if problems:
        node, what = problems[0]
        more = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
        raise UsageError(
            f"node {node['NodeID']} ({node.get('NodeManagerAddress')}, {node.get('NodeManagerHostname')}) {what}{more};"
            " every node must see the input and the output (shared storage: NFS, s3://, gs://)"
        )


def _answer(ref: ray.ObjectRef, ready: list[ray.ObjectRef], answer_s: float) -> str | None:
    """What the node's check says it cannot see, or why it did not say."""
    if ref not in ready:
        return f"did not answer the storage check within {answer_s:.0f} s"
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        return f"cannot run mmcurate's storage check ({lines[-1].strip() if lines else type(e).__name__})"
