"""The node's own networking: bridges, task wiring and their DNS redirect, published ports.

desired.py (pure: the view → desired kernel objects and the plan), kernel.py (observe and
apply), task_dns.py (how a task reaches 127.0.0.11), reconciler.py (the cache between passes).
"""
