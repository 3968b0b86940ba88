"""The HTTP routing mesh: one HAProxy per node routes HTTP by Host header (and TLS by SNI) to
the tasks of the services that have routes.

- `spec`: what a node's router should do, a pure function of the cluster view;
- `config`: that spec as haproxy.cfg text (pure);
- `slots`: server changes as HAProxy runtime API commands, without a reload (pure);
- `haproxy`: the HAProxy process and its sockets (the edge: files, processes, sockets);
- `ops`: `meshctl router ...` commands and the route checks of `service create/update`.

The controller side (claims, wiring, supervision) is meshctl.router.sync.
"""
