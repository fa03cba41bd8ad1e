"""The store: desired state, observed state and jobs, in SQLite (one host) or PostgreSQL (a cluster).

It is the only channel between the control plane and the agents.
"""
