#!/usr/bin/env bash
# Regenerate csi_pb2.py, csi_pb2.pyi and csi_pb2_grpc.py from csi.proto (needs grpcio-tools,
# part of the `test` extra). Run from anywhere; the generated files are committed.
# The proto is compiled from the repository root so the generated modules import each
# other as `csi.proto.csi_pb2`, a package path, not as a top-level `csi_pb2`.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  csi/proto/csi.proto
echo "regenerated csi/proto/csi_pb2.py, csi_pb2.pyi, csi_pb2_grpc.py"
