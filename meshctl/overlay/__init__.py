"""Overlay networks: one VXLAN device per network per node, static peers from the store, and
the probes `meshctl doctor` sends over them (vxlan.py)."""
