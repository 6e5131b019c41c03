"""The tensors of a traced graph, inside its loops and the functions it calls."""

import numpy as np
from tensorflow.python.framework import function_def_to_graph


def all_graphs(graph):
    """`graph` and every function graph it calls, nested (While/StatelessWhile
    bodies and conditions, PartitionedCall, If branches...): each function
    named in an op's func or list(func) attribute, looked up in the graph's
    library and rebuilt with function_def_to_graph, its arguments given the
    shapes of the calling op's inputs (the loop variables of a While keep
    their shapes here), so that shape inference runs inside."""
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    todo, seen, graphs = [graph], set(), []
    while todo:
        g = todo.pop()
        graphs.append(g)
        for op in g.get_operations():
            for attr in op.node_def.attr.values():
                names = [attr.func.name] if attr.HasField("func") else []
                if attr.HasField("list"):
                    names += [f.name for f in attr.list.func]
                for name in names:
                    if name in seen or name not in library:
                        continue
                    seen.add(name)
                    fdef = library[name]
                    shapes = [t.shape for t in op.inputs]
                    if len(shapes) != len(fdef.signature.input_arg):
                        shapes = None
                    todo.append(
                        function_def_to_graph.function_def_to_graph(fdef, input_shapes=shapes)
                    )
    return graphs


def tensor_shapes(graph):
    """(graph name, op name, static shape) of every op output of `graph` and
    of the functions it calls."""
    return [
        (g.name, op.name, t.shape)
        for g in all_graphs(graph)
        for op in g.get_operations()
        for t in op.outputs
    ]


def holds_at_least(shape, rows, columns):
    """Whether a (possibly partly known) shape holds rows x columns elements:
    its known dimensions alone multiply to that many, or it has both."""
    if shape.rank is None:
        return False
    dims = [d for d in shape.as_list() if d is not None]
    return bool(dims) and (
        int(np.prod(dims)) >= rows * columns or (rows in dims and columns in dims)
    )
