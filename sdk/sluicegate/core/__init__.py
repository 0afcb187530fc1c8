"""The shared core: the parts of the SDK that the sidecar and the operator build on.

Users import :mod:`sluicegate`. The sidecar and the operator import :mod:`sluicegate` and the modules of
this package, and nothing else of the SDK (import-linter enforces it); this package never imports the
user API above it (the Dataset, its sources, the adapters, the CLI). What is here is internal: it may
change in any release, together with the sidecar and operator of that release.

- ``engine``: fetch, verify, cache and read ahead the blobs of a plan (embedded mode and the sidecar)
- ``store``: the dataset store layout (versions, manifests, blobs) on local disk or S3
- ``manifest``: the manifest's schema and rows; ``query``: the slice query language
- ``partition``: sharding and shuffling as pure functions; ``env``: rank and world size of this process
- ``mix``: weighted mixing of several sources (an epoch's counts, items and interleave) as pure functions
- ``ledger``: the format of the record of what runs consumed (hash-chained), its chains and their reading
- ``protocol``: the sidecar's wire protocol; ``broker_protocol``: the operator-sidecar contract
- ``quantity``: Kubernetes byte quantities; ``alloc``: the allocator settings of long-lived processes
- ``backoff``: the one retry policy; ``flights``: single flight (one task per key in flight)
- ``daemon``: how the sidecar and the operator read their flags and environment (pydantic-settings)
"""
