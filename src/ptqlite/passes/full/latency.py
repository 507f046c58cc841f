"""Latency-aware planning of FULL_QUANT ("never slower than float"): the int8 graph is timed against the prepared
float graph on the machine that converts (ptqlite.latency: first calibration sample, one thread, interleaved run
by run). Where the int8 graph is slower, the weights read inside If/Loop/Scan bodies go back to float first (they
are stored int8 behind a DequantizeLinear that runs on every call and speeds nothing up), then the weighted layers
with the fewest multiply-adds (their int8 kernels gain least, and the quantize/dequantize at their edges costs the
same), in growing shares, until the graph is no slower than float ([full_quant_param] latency_aware,
docs/full_quant.md "Latency-aware planning"). A graph that ONNX Runtime does not load with the fixed --inputShape
shapes (control flow whose inferred shapes break) is timed with the model's own input shapes, fed the same sample.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...targets import WEIGHTED_OPS
from .graph_plan import GraphPlan


def smallest_first(model: onnx.ModelProto, plan: GraphPlan) -> list[str]:
    """Names of the int8 weighted nodes, fewest multiply-adds first (weight elements x output positions, from
    shape inference where it knows the output shape)."""
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
              for vi in (*model.graph.value_info, *model.graph.output)}
    weights = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    costs = []
    for pos, node in enumerate(model.graph.node):
        if plan.roles[pos] != "compute" or node.op_type not in WEIGHTED_OPS or not node.name:
            continue
        out = shapes.get(node.output[0], [])
        positions = int(np.prod(out[2:])) if node.op_type.startswith("Conv") and len(out) > 2 else \
            int(np.prod(out[:-1])) if out else 1
        costs.append((weights.get(node.input[1], 0) * max(positions, 1), pos, node.name))
    return [name for _, _, name in sorted(costs)]
