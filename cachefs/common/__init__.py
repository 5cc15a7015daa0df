"""What every part of cachefs shares: the wire contract, the errors, the manifest, reading
an origin against its version tokens, and loading settings. A leaf: it imports nothing of
ours but `shard`, so the server, the client, the CSI plugin and the CLI all build on it
and none of them on another through it."""
