"""Embedded DNS: service discovery answered inside every task's namespace (docs/dns.md)."""

from meshctl.dns.forwarder import read_resolv_conf
from meshctl.dns.records import DnsPort, DnsService, DnsTask, DnsView
from meshctl.dns.server import DnsServer

__all__ = ["DnsPort", "DnsServer", "DnsService", "DnsTask", "DnsView", "read_resolv_conf"]
