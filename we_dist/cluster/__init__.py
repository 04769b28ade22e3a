"""Running on a Ray cluster: a local two-node cluster, job submission and job control.

* :mod:`we_dist.cluster.local`  - `we-dist cluster up|down|status`: head + worker node on loopback
* :mod:`we_dist.cluster.submit` - `we-dist submit`: a recipe as a Ray Job (Jobs API)
* :mod:`we_dist.cluster.jobs`   - `we-dist jobs list|status|logs|stop`
* :mod:`we_dist.cluster.client` - address, token and the checks made before anything is submitted
"""
