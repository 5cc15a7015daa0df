"""Where the plugin learns about datasets: the seam between volumes and the cluster.

The volume logic asks a Catalog two things: what a dataset is (size, allowed namespaces;
NotFound for an unknown one) and how a mount process reaches it (an fsspec URL plus the
environment carrying endpoint and token). ClusterCatalog answers from the cachefs client.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Mapping, Protocol

from cachefs.config import ClientConfig
from cachefs.common.errors import NodeUnavailable
from cachefs.common.wire import DatasetInfo


class Catalog(Protocol):
    endpoint: str

    def lookup(self, name: str) -> DatasetInfo:
        """The dataset's info; raises cachefs.common.errors.NotFound (a FileNotFoundError) if unknown."""
        ...

    def source(self, name: str) -> str:
        """The fsspec URL a mount process opens."""
        ...

    def mount_env(self) -> Mapping[str, str]:
        """Environment variables a mount process needs to reach the cluster."""
        ...


class ClusterCatalog:
    """Asks the cache cluster through the cachefs client, with a hard deadline per call."""

    def __init__(self, client: ClientConfig, timeout: float = 15.0) -> None:
        client.require_endpoint()
        self.client = client
        self.endpoint = client.endpoint
        self.timeout = timeout
        self._fs = None  # built on first use: importing the client pulls in aiohttp
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="catalog")

    def _filesystem(self):  # -> CachefsFileSystem
        if self._fs is None:
            from cachefs.filesystem import CachefsFileSystem

            self._fs = CachefsFileSystem(endpoint=self.client.endpoint, token=self.client.token)
        return self._fs

    def lookup(self, name: str) -> DatasetInfo:
        future = self._pool.submit(lambda: self._filesystem().dataset_info(name))
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise NodeUnavailable(
                f"the cache cluster at {self.endpoint} did not answer within {self.timeout:.0f} s") from None

    def source(self, name: str) -> str:
        return f"cachefs://{name}"

    def mount_env(self) -> Mapping[str, str]:
        return {"CACHEFS_ENDPOINT": self.client.endpoint, "CACHEFS_TOKEN": self.client.token}
