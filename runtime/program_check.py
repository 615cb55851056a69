"""Refuse Paddle programs that touch files or the outside world, before anything runs or optimises them.

A Paddle program is data that names files: ``read_file`` reads the path in its ``filename`` attribute, ``load``
and ``load_combine`` read parameters from any ``file_path``, ``save``/``save_combine`` write there, ``print``
writes to the process's output, ``py_func`` calls back into Python, ``send``/``recv`` and the collective ops
talk to other processes. Paddle's constant folding even runs such ops at optimisation time and bakes what they
read into the served program. Inference never needs any of them: the engine loads the parameters itself from
the ``.pdiparams`` file the platform names (``Config(program, params)``), so no upload may carry them.

This is defence in depth: whatever runs a tenant's program is also confined (``runtime.isolation``). The rule is
a deny-list checked against Paddle's registered op list (1,211 kernels in Paddle 3.3: every op whose kernel
reads, writes, prints, calls Python or communicates), plus a structural rule for ops not yet known: any op with
an attribute that names a file or an endpoint is refused too. Every block is read (``while`` and
``conditional_block`` bodies are blocks of their own), and PIR programs (``model.json``) get the same check on
every op of every nested region.

The legacy program is parsed with a private protobuf descriptor holding just the fields read here (numbers as
in Paddle's ``framework.proto``, checked by a test), so the platform need not import Paddle to read it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from runtime.model_files import ModelFiles, ModelFormatError

# Ops that read or write files, print, run Python, or talk to other processes (by their Paddle type names;
# PIR names are the same after the dialect prefix, e.g. "pd_op.read_file").
DENIED_OPS = frozenset(
    {
        "read_file", "decode_jpeg",  # decode_jpeg takes bytes, but is read_file's partner; nothing serves it
        "load", "load_combine", "load_combine_extended", "load_combine_vocab", "load_sr",
        "save", "save_combine", "save_combine_vocab", "save_sr",
        "print", "print_kernel", "py_func", "py_layer", "run_program", "custom_op",
        "send", "recv", "send_v2", "recv_v2", "p_send", "p_recv", "p_send_array", "p_recv_array",
        "partial_send", "partial_recv", "partial_allgather",
        "send_barrier", "fetch_barrier", "barrier", "listen_and_serv", "heter_listen_and_serv",
        "checkpoint_notify", "gen_nccl_id", "gen_bkcl_id", "ncclInit",
        "all_gather", "all_reduce", "all_to_all", "alltoall", "broadcast", "reduce_scatter", "reduce",
        "global_gather", "global_scatter", "distributed_lookup_table", "distributed_push_sparse",
        "pull_sparse", "pull_sparse_v2", "push_sparse", "push_sparse_v2", "pull_box_sparse", "push_box_sparse",
        "pull_gpups_sparse", "push_gpups_sparse", "push_dense", "pull_box_extended_sparse",
        "create_py_reader", "create_double_buffer_reader", "create_custom_reader", "read", "open_files",
        "enqueue", "dequeue", "queue_generator", "dump",
    }
)  # fmt: skip
# Families of communication ops (collectives, model-parallel and parameter-server ops).
DENIED_PREFIXES = ("c_", "mp_", "lookup_sparse_table", "sparse_table", "nccl", "bkcl", "gloo", "ps_")
# Attribute names that name a file, a folder or a network endpoint: refused on any op, known or not.
PATH_ATTRIBUTES = frozenset(
    {"file_path", "filename", "file_names", "file_name", "path", "dirname", "dir_name", "model_path",
     "endpoint", "endpoints", "epmap", "trainer_endpoints", "pserver_endpoints"}
)  # fmt: skip


class UnsafeProgram(ModelFormatError):
    """The program holds an op the platform never runs; the message names it and says what to do."""


def check_program(files: ModelFiles) -> None:
    """Raise UnsafeProgram if the program in FILES holds a denied op (in any block or region)."""
    ops = _legacy_ops(files.program) if files.format == "legacy" else _pir_ops(files.program)
    for op_type, attributes in ops:
        problem = refusal(op_type, attributes)
        if problem:
            raise UnsafeProgram(
                f"{files.program.name} holds {problem}; the platform does not run ops that read or write "
                "files, print, call Python or communicate. Export the model for inference with paddle.jit.save "
                "(parameters go in the .pdiparams file, not in load/save ops)"
            )


def refusal(op_type: str, attributes: set[str]) -> str:
    """Why an op of OP_TYPE with ATTRIBUTES (names) is refused; empty when it is allowed."""
    if op_type in DENIED_OPS or op_type.startswith(DENIED_PREFIXES):
        return f"the op '{op_type}'"
    named = sorted(attributes & PATH_ATTRIBUTES)
    if named:
        return f"the op '{op_type}' with the attribute '{named[0]}' (it names a file or an endpoint)"
    return ""


# ---------------------------------------------------------------- legacy programs (protobuf ProgramDesc)


def _program_class() -> Any:
    """ProgramDesc with only blocks -> ops -> (type, attrs -> name); unknown fields are skipped when parsing."""
    f = descriptor_pb2.FieldDescriptorProto
    optional, repeated = f.LABEL_OPTIONAL, f.LABEL_REPEATED

    def field(name: str, number: int, kind: int, label: int = optional, type_name: str = "") -> Any:
        return f(name=name, number=number, type=kind, label=label, type_name=type_name or None)

    attr = descriptor_pb2.DescriptorProto(name="Attr", field=[field("name", 1, f.TYPE_STRING)])
    op = descriptor_pb2.DescriptorProto(
        name="OpDesc",
        nested_type=[attr],
        field=[
            field("type", 3, f.TYPE_STRING),
            field("attrs", 4, f.TYPE_MESSAGE, repeated, ".paddlefn.program.OpDesc.Attr"),
        ],
    )
    block = descriptor_pb2.DescriptorProto(
        name="BlockDesc", field=[field("ops", 4, f.TYPE_MESSAGE, repeated, ".paddlefn.program.OpDesc")]
    )
    program = descriptor_pb2.DescriptorProto(
        name="ProgramDesc",
        field=[field("blocks", 1, f.TYPE_MESSAGE, repeated, ".paddlefn.program.BlockDesc")],
    )
    file = descriptor_pb2.FileDescriptorProto(
        name="paddlefn_program.proto", package="paddlefn.program", syntax="proto2",
        message_type=[op, block, program],
    )  # fmt: skip
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with Paddle's own framework.proto
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("paddlefn.program.ProgramDesc"))


_ProgramDesc: Any = None


def _legacy_ops(program: Path) -> Iterator[tuple[str, set[str]]]:
    global _ProgramDesc
    if _ProgramDesc is None:
        _ProgramDesc = _program_class()
    desc = _ProgramDesc()
    try:
        desc.ParseFromString(program.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, and anything a hostile file provokes
        raise ModelFormatError(f"{program.name} is not a Paddle program: {type(exc).__name__}") from None
    for block in desc.blocks:
        for op in block.ops:
            yield op.type, {a.name for a in op.attrs}


# ---------------------------------------------------------------- PIR programs (model.json)


def _pir_ops(program: Path) -> Iterator[tuple[str, set[str]]]:
    """Every op of every block of every region, nested ones included: ``{"#": "1.read_file", "A": [...]}``."""
    try:
        document = json.loads(program.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ModelFormatError(
            f"{program.name} is not a Paddle 3 (PIR) program: {type(exc).__name__}"
        ) from None
    stack: list[Any] = [document]
    while stack:  # iterative: a hostile document may nest deeper than Python's recursion limit
        node = stack.pop()
        if isinstance(node, dict):
            ops = node.get("ops")
            if isinstance(ops, list):
                for op in ops:
                    if isinstance(op, dict) and isinstance(op.get("#"), str):
                        yield _pir_name(op["#"]), _pir_attributes(op)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _pir_name(name: str) -> str:
    """'1.read_file' (dialect id + op) or 'pd_op.read_file' -> 'read_file'."""
    return name.rsplit(".", 1)[-1]


def _pir_attributes(op: dict[str, Any]) -> set[str]:
    names = set()
    for key in ("A", "OA"):
        for attribute in op.get(key) or []:
            if isinstance(attribute, dict) and isinstance(attribute.get("N"), str):
                names.add(attribute["N"])
    return names
