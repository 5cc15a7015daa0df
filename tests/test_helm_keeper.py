"""The chart's keeper container: beside the CSI plugin, on the shared plugin directory."""

from __future__ import annotations

from typing import Any

from helm_render import Rendered, container, render


def test_the_keeper_holds_sessions_beside_the_plugin(default: Rendered) -> None:
    pod = default.csi_pod
    keeper, plugin = container(pod, "cachefs-keeper"), container(pod, "cachefs-csi")
    assert keeper["image"] == plugin["image"]
    assert keeper["command"] == ["/usr/bin/tini", "-s", "--", "cachefs"]
    assert keeper["args"] == ["csi", "keeper", "--socket", "/csi/keeper.sock"]
    assert plugin["args"][plugin["args"].index("--keeper-socket") + 1] == "/csi/keeper.sock"
    mounts = {m["name"]: m for m in keeper["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in plugin["volumeMounts"]}.items() >= {
        n: m["mountPath"] for n, m in mounts.items()}.items()  # the same host directories, at the same paths
    assert mounts["plugin-dir"]["mountPropagation"] == mounts["pods-dir"]["mountPropagation"] == "Bidirectional"
    assert keeper["securityContext"]["privileged"] is True
    assert pod["spec"]["hostPID"] is True  # it watches mount processes of both containers, and of the old pod
    assert "CACHEFS_TOKEN" not in {e["name"] for e in keeper.get("env", [])}  # mounts hand over what they need


def test_without_the_keeper_the_plugin_runs_alone(chart: Any) -> None:
    pod = render(chart, {"csi": {"keeper": {"enabled": False}}}).csi_pod
    assert "cachefs-keeper" not in [c["name"] for c in pod["spec"]["containers"]]
    assert "--keeper-socket" not in container(pod, "cachefs-csi")["args"]
    assert "hostPID" not in pod["spec"]
    assert container(pod, "cachefs-csi")["command"] == ["/usr/bin/tini", "--", "cachefs"]
