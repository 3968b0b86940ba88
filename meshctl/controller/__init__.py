"""The per-node controller: store → desired node state → plan → kernel, plus task supervision."""
