"""meshctl: a Linux kernel-backed service mesh controller."""
