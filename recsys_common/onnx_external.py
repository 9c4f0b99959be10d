"""Where an ONNX model's tensors keep their data: external-data references, read without the `onnx` package.

ONNX Runtime reads a tensor marked EXTERNAL from the file its `location` names, relative to the model's
directory. A bundle is flat and every file in it is checksummed (and signed), so the only external data
a service accepts is a plain file name listed in the manifest; anything else (a path, "..", an absolute
name, a file the manifest does not pin) is refused before ONNX Runtime opens the model. Recent ONNX
Runtime versions refuse paths that leave the model's directory themselves; this check does not depend
on that, and also refuses a file inside the directory that the manifest does not pin.

The services do not depend on `onnx` (it is the exporter's), so the model is parsed here with protobuf
against a minimal copy of the ONNX schema: only the messages and field numbers that can hold a tensor
(graph initializers, sparse initializers, node attributes, subgraphs, functions). Field numbers are
those of onnx/onnx.proto (IR version 10); fields not declared here are skipped as unknown fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "recsys_onnx_subset"
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _schema() -> dict[str, Any]:
    fields: dict[str, list[tuple[str, int, int, str]]] = {
        # name, number, type, message type (TYPE_MESSAGE only); labels: `single` below, the rest repeated
        "StringStringEntryProto": [("key", 1, _F.TYPE_STRING, ""), ("value", 2, _F.TYPE_STRING, "")],
        "TensorProto": [
            ("name", 8, _F.TYPE_STRING, ""),
            ("external_data", 13, _F.TYPE_MESSAGE, "StringStringEntryProto"),
            ("data_location", 14, _F.TYPE_INT32, ""),
        ],
        "SparseTensorProto": [
            ("values", 1, _F.TYPE_MESSAGE, "TensorProto"),
            ("indices", 2, _F.TYPE_MESSAGE, "TensorProto"),
        ],
        "AttributeProto": [
            ("name", 1, _F.TYPE_STRING, ""),
            ("t", 5, _F.TYPE_MESSAGE, "TensorProto"),
            ("g", 6, _F.TYPE_MESSAGE, "GraphProto"),
            ("tensors", 10, _F.TYPE_MESSAGE, "TensorProto"),
            ("graphs", 11, _F.TYPE_MESSAGE, "GraphProto"),
            ("sparse_tensor", 22, _F.TYPE_MESSAGE, "SparseTensorProto"),
            ("sparse_tensors", 23, _F.TYPE_MESSAGE, "SparseTensorProto"),
        ],
        "NodeProto": [("name", 3, _F.TYPE_STRING, ""), ("attribute", 5, _F.TYPE_MESSAGE, "AttributeProto")],
        "GraphProto": [
            ("node", 1, _F.TYPE_MESSAGE, "NodeProto"),
            ("initializer", 5, _F.TYPE_MESSAGE, "TensorProto"),
            ("sparse_initializer", 15, _F.TYPE_MESSAGE, "SparseTensorProto"),
        ],
        "FunctionProto": [("name", 1, _F.TYPE_STRING, ""), ("node", 7, _F.TYPE_MESSAGE, "NodeProto")],
        "ModelProto": [
            ("graph", 7, _F.TYPE_MESSAGE, "GraphProto"),
            ("functions", 25, _F.TYPE_MESSAGE, "FunctionProto"),
        ],
    }
    single = {("TensorProto", "name"), ("TensorProto", "data_location"), ("AttributeProto", "name"),
              ("AttributeProto", "t"), ("AttributeProto", "g"), ("AttributeProto", "sparse_tensor"),
              ("NodeProto", "name"), ("FunctionProto", "name"), ("ModelProto", "graph"),
              ("StringStringEntryProto", "key"), ("StringStringEntryProto", "value"),
              ("SparseTensorProto", "values"), ("SparseTensorProto", "indices")}  # fmt: skip
    file = descriptor_pb2.FileDescriptorProto(name=f"{_PACKAGE}.proto", package=_PACKAGE, syntax="proto2")
    for name, specs in fields.items():
        msg = file.message_type.add(name=name)
        for fname, number, ftype, mtype in specs:
            label = _F.LABEL_OPTIONAL if (name, fname) in single else _F.LABEL_REPEATED
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if mtype:
                f.type_name = f".{_PACKAGE}.{mtype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in fields}


_MESSAGES = _schema()
ModelProto = _MESSAGES["ModelProto"]


class NotAModel(ValueError):
    """The bytes are not an ONNX ModelProto."""


def _graph_tensors(graph: Any, where: str) -> Iterator[tuple[str, Any]]:
    for t in graph.initializer:
        yield f"{where}initializer {t.name!r}", t
    for s in graph.sparse_initializer:
        yield f"{where}sparse initializer {s.values.name!r}", s.values
        yield f"{where}sparse initializer {s.values.name!r} indices", s.indices
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    for attr in node.attribute:
        at = f"{where}node {node.name!r} attribute {attr.name!r}"
        if attr.HasField("t"):
            yield at, attr.t
        yield from ((at, t) for t in attr.tensors)
        for s in [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []:
            yield at, s.values
            yield at, s.indices
        for s in attr.sparse_tensors:
            yield at, s.values
            yield at, s.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g, f"{at} subgraph: ")
        for g in attr.graphs:
            yield from _graph_tensors(g, f"{at} subgraph: ")


def external_references(data: bytes) -> list[tuple[str, str]]:
    """(where, location) for every tensor of the model whose data lives in another file.

    A tensor marked EXTERNAL without a location yields location "". Raises NotAModel when the bytes do
    not parse as a ModelProto (protobuf's own nesting limit bounds the recursion).
    """
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (message.DecodeError, RecursionError) as exc:
        raise NotAModel(f"not an ONNX model ({exc})") from None
    found = []
    tensors = list(_graph_tensors(model.graph, ""))
    for fn in model.functions:
        for node in fn.node:
            tensors += _node_tensors(node, f"function {fn.name!r} ")
    for where, tensor in tensors:
        if tensor.data_location == EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            found.append((where, location))
    return found
