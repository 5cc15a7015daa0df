"""A FUSE server of our own, in three layers (see docs/architecture.md):

- `protocol`: the kernel's message layouts (linux/fuse.h) and the INIT negotiation; knows
  nothing of datasets.
- `dispatch`: a request to an operation, an exception to an errno, the reply written whole.
- `session`: the /dev/fuse descriptor: mounting (mount(2) or fusermount3), cloning, closing.

The dataset's operations live in csi/fusefs.py; they never see a byte of the protocol.
"""
