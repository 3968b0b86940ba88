"""Every write to desired state, one module per noun: each one validated, then written in one
store transaction (read.py: what they and the CLI read).

Every write compare-and-swaps on each record it read (service, tasks, the networks involved)
and claims every unique value it takes with a key of its own in the same txn (addresses and the
subnet registry: meshctl.ipam; published ports; VNIs), so two meshctl commands racing never
half-apply: the loser re-reads and re-validates (store.retry_conflicts). Limits are checked in
the same attempt, on what the txn compare-and-swaps (the network count on the subnet registry).
On any error nothing is written.

Records (kind → name): network → name, ipam → network id, address → `<network-id>/<address>`,
registry → `subnets`, vni → the VNI of an overlay, service → name, task → task id, port →
`PORT/PROTO` (which service publishes it), node → name, container → name, router → `router`,
router-cert → host.

Lifecycle of tasks, with or without a controller running:
- create/scale/update make task records for missing slots: desired `running`, state
  `pending`, node "" (unassigned), addresses allocated on every network of the service.
- A task that must go (scale down, service rm) and that no node has claimed yet never ran:
  its record is deleted and its addresses released at once. A claimed task is marked desired
  `shutdown` (scale) or `removed` (service rm); its controller tears it down, then calls
  forget_task(), which deletes the record and releases its addresses.
- service rm deletes the service record at once, so `service ls` no longer shows it; tasks
  still draining on a node linger (desired `removed`) until their controller forgets them.
- network rm refuses while a service record uses the network, not while such lingering tasks
  hold addresses on it: it deletes the network with its IPAM record and address claims.
"""
