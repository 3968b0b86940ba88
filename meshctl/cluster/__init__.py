"""The cluster: membership under a lease, the leader's orchestration (slots, placement,
rolling updates), address claims, and the task and node records they write."""
