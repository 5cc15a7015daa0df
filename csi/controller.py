"""CSI Controller service of a node-only plugin: it offers nothing.

The plugin advertises no CONTROLLER_SERVICE, so kubelet never calls it; but csi-sanity
asks ControllerGetCapabilities before every Node spec and wants a non-empty list (an
empty repeated field reaches a Go client as nil). So it answers one capability of type
UNKNOWN: a capability that enables nothing. Every other Controller RPC is absent from
csi/proto and answers UNIMPLEMENTED.
"""

from __future__ import annotations

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as pb_grpc
from csi.rpc import rpc


class ControllerService(pb_grpc.ControllerServicer):
    @rpc
    def ControllerGetCapabilities(self, request: pb.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> pb.ControllerGetCapabilitiesResponse:
        nothing = pb.ControllerServiceCapability.RPC(type=pb.ControllerServiceCapability.RPC.UNKNOWN)
        return pb.ControllerGetCapabilitiesResponse(capabilities=[pb.ControllerServiceCapability(rpc=nothing)])
