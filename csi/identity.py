"""CSI Identity service: who the plugin is, what it offers, whether it is up."""

from __future__ import annotations

from importlib import metadata

import grpc
from google.protobuf import wrappers_pb2

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as pb_grpc
from csi.rpc import rpc


def vendor_version() -> str:
    try:
        return metadata.version("cachefs")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(self, driver_name: str) -> None:
        self.driver_name = driver_name

    @rpc
    def GetPluginInfo(self, request: pb.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=self.driver_name, vendor_version=vendor_version())

    @rpc
    def GetPluginCapabilities(self, request: pb.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> pb.GetPluginCapabilitiesResponse:
        # A node-only plugin: no controller service, and every node can mount every
        # dataset (the cache cluster is reachable from all of them), so no topology.
        return pb.GetPluginCapabilitiesResponse(capabilities=[])

    @rpc
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        # The plugin serves only after re-adopting recorded mounts, so serving means
        # ready. It does not ask the cache cluster: a cluster outage must not make the
        # liveness probe restart every node plugin.
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
