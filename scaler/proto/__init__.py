"""Generated stubs of KEDA's external scaler protocol (``externalscaler.proto``, copied from KEDA).

Committed, not generated at build time, so that the scaler image needs no protoc. After regenerating, change
``import externalscaler_pb2`` in ``externalscaler_pb2_grpc.py`` to ``from scaler.proto import ...`` and keep
the ``# ruff: noqa`` / ``# mypy: ignore-errors`` header lines (generated code is not ours to lint).
"""
