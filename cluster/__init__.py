"""Cluster tooling: a local multi-node Ray cluster on one machine (`cluster.local_cluster`) and a
`ray job submit` helper (`cluster.jobs`).

Cloud configs live next to this package: `ray-cluster.yaml` (cluster launcher, repo root) and
`cluster/kuberay/*.yaml` (KubeRay manifests).
"""
