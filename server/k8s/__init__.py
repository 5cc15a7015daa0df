"""cachefs on Kubernetes: the CachedDataset operator.

The operator keeps cachefs' dataset registry in step with CachedDataset resources. The
resources are the source of truth; cachefs is told through its HTTP admin API only.

- `crd`        the resource: names, spec parsing and validation, status shape (pure)
- `kube`       the few Kubernetes API calls the operator makes (list, watch, patch)
- `workqueue`  keyed work queue: dedup, one worker per key, per-key backoff
- `reconciler` what to do for one resource, and the list/watch loop that feeds it
- `cli`        `cachefs operator`
"""
