"""The only package that touches the kernel: netns, links, addresses, routes, neighbour and FDB
entries, IPVS, iptables, sysctl.

Every verb takes the namespace it acts in as its first argument (a name under /var/run/netns,
an absolute path such as /proc/PID/ns/net, or None for the namespace the process runs in: the node)
and takes and returns plain dataclasses; no pyroute2 object or iptables text leaves this package.
"""
