"""The internal load balancer of one network on one node: an LB namespace per network whose
VIPs are balanced by IPVS or by iptables (spec: pure builders; reconcile: observe/diff/apply)."""
